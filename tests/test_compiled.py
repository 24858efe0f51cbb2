"""``compile=``: compiled steps equal eager ones, checkpoints do not depend on the mode, and a function
the compiler cannot handle falls back to eager with a warning naming it.

The compiled tests run ``torch.compile`` on the CPU (inductor's C++ kernels): each compiles a small
graph once, a few seconds to half a minute on a cold cache. The CUDA-graph variant is under the
GPU marker.
"""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import amstream
from amstream.compiled import CompiledFunction, _cache_entries, resolve_compile

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_compiler_cache():
    """Each test starts with dynamo's in-memory cache empty: a whole step is specialized on its
    learner's class and settings, and the tests' many configurations would otherwise reach torch's
    recompile limit in one process (the compiled kernels stay in inductor's on-disk cache)."""
    torch._dynamo.reset()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(F64)


def _batches(n: int = 4, size: int = 24):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 12, generator=g, dtype=F64), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name, kwargs", [("am-adam", {}), ("backprop", {"lr": 3e-3}), ("am-mem", {}),
                                          ("locoprop-s", {"local_steps": 3}), ("locoprop-m", {"local_steps": 3}),
                                          ("dladmm", {}), ("admm-softmax", {}), ("frank-wolfe", {"lr": 3e-3}),
                                          ("frank-wolfe", {"lr": 3e-3, "inner_steps": 3, "faithful": True})])
def test_compiled_steps_equal_eager_ones(name, kwargs):
    eager = amstream.LEARNERS[name](_mlp(), device="cpu", **kwargs)
    compiled = amstream.LEARNERS[name](_mlp(), device="cpu", compile=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
        for x, y in _batches():
            eager.learn(x, y)
            compiled.learn(x, y)
            # step by step from the same state (over many steps any two float orders drift apart)
            assert _max_difference(eager.model, compiled.model) < 1e-12
            compiled.load_state_dict(eager.state_dict())
        x = _batches(1)[0][0]
        assert torch.allclose(compiled.predict(x), eager.predict(x), atol=1e-10, rtol=0)
    assert compiled._compiled_functions, "compile=True must route the step through compiled functions"
    assert all(f.active for f in compiled._compiled_functions.values())
    if name in ("am-adam", "backprop", "am-mem", "locoprop-s", "locoprop-m", "frank-wolfe"):  # from the second
        # step, each step is one compiled function (LocoProp's with 3 local steps here: its graph unrolls
        # them; Frank-Wolfe's, one per position in the round of inner steps)
        assert "the whole step" in compiled._compiled_functions


def test_admm_rnn_compiles_its_elementwise_a_update_and_equals_eager():
    """ADMMiRNN's a update (safeguarded Newton on every element of the unrolled pre-activations) is
    one pure tensor function; compiled, its sixty-odd passes a Newton step fuse. The fused tanh
    differs from torch's by an ulp, so where a trial and the current point tie to rounding an
    element may keep either: the objective is the same to rounding, the points (and the weights
    fitted to them) differ by far less than any tolerance of the method."""
    from amstream.learners.admm_rnn import _tanh_objective, tanh_prox
    from amstream.models import ElmanRNN

    g = torch.Generator().manual_seed(0)
    m, q = 2 * torch.randn(7, 24, 16, generator=g, dtype=F64), 2 * torch.rand(7, 24, 16, generator=g, dtype=F64) - 1
    a0 = torch.randn(7, 24, 16, generator=g, dtype=F64)
    a_eager, a_compiled = tanh_prox(m, q, 1.0, 0.5, a0), torch.compile(tanh_prox)(m, q, 1.0, 0.5, a0)
    f_eager, f_compiled = _tanh_objective(a_eager, m, q, 1.0, 0.5), _tanh_objective(a_compiled, m, q, 1.0, 0.5)
    assert float((f_eager - f_compiled).abs().max()) < 1e-15
    assert float((a_eager - a_compiled).abs().max()) < 1e-7

    def make(**kw):
        torch.manual_seed(0)
        return amstream.LEARNERS["admm-rnn"](ElmanRNN(6, 16, 4).to(F64), device="cpu", **kw)

    eager, compiled = make(), make(compile=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(24, 7, 6, generator=g, dtype=F64), torch.randint(0, 4, (24,), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its steps are compiled piece by piece: said once
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
            eager.learn(x, y)
            compiled.learn(x, y)
        assert _max_difference(eager.model, compiled.model) < 1e-8
        compiled.load_state_dict(eager.state_dict())
    assert compiled._compiled_functions["the a update"].active


def test_am_adam_captures_its_whole_step_in_one_graph():
    """compile=True: from its second step (once torch's Adam has state) AM-Adam's step is one
    compiled function without graph breaks (codes, local gradients, Adam), the same as the eager
    step under every setting it reads, and a changing mu or learning rate is an input of the graph,
    not a reason to compile again. A step with a penalty takes the eager path."""
    from torch._dynamo.utils import counters

    kwargs = dict(weight_steps=2, lambda_w=1e-3, lambda_c=1e-3, output_fit="forward", reduction="sum",
                  d_mu=0.01, lr_halve_every=2, code_lr=0.05)
    eager = amstream.AMAdam(_mlp(), device="cpu", **kwargs)
    captured = amstream.AMAdam(_mlp(), device="cpu", compile=True, **kwargs)
    counters.clear()
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
        for i, (x, y) in enumerate(_batches(6)):
            if i % 2:  # AMStrategy's order: the output first, then the step reuses its forward pass
                for learner in (eager, captured):
                    learner.forward_for_step(x)
            penalty = (lambda: sum(p.square().sum() for p in captured.model.parameters())) if i == 5 else None
            eager.learn(x, y, penalty=(lambda: sum(p.square().sum() for p in eager.model.parameters()))
                        if penalty else None)
            info = captured.learn(x, y, penalty=penalty)
            assert _max_difference(eager.model, captured.model) < 1e-12
            assert info.diagnostics["am/mu"] == pytest.approx(min(0.003 + 0.01 * i, 0.03))  # mu_max: 10 mu
            captured.load_state_dict(eager.state_dict())
            graphs.append(counters["stats"]["unique_graphs"])
    assert captured._compiled_functions["the whole step"].active
    assert captured.optimizer.param_groups[0]["lr"] < 0.008 / 3  # the rates were halved twice
    assert graphs[2] > graphs[1] and graphs[4] == graphs[2]  # compiled at the second step, not again



def test_step_caps_that_cannot_bind_are_left_out_of_eager_and_compiled_steps(monkeypatch):
    """AM-Adam's mean-reduced code step cap is far above its step sizes: at a 128-wide layer the
    host's screen (``functional.step_cap_may_bind``) leaves the cap's spectral bound (4 products of
    128 x 128 matrices) out of the eager step and out of the compiled graph, which equal each other."""
    from amstream import functional

    def no_bound(weight, power=16):
        raise AssertionError("the spectral norm bound was computed although the cap cannot bind")

    monkeypatch.setattr(functional, "spectral_norm_bound", no_bound)

    def wide_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)).to(F64)

    eager = amstream.AMAdam(wide_mlp(), device="cpu")
    captured = amstream.AMAdam(wide_mlp(), device="cpu", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
        for x, y in _batches(3):
            eager.learn(x, y)
            captured.learn(x, y)
            assert _max_difference(eager.model, captured.model) < 1e-12
            captured.load_state_dict(eager.state_dict())
    assert captured._compiled_functions["the whole step"].active


def test_am_mem_whole_step_keeps_the_symmetric_memory_update_of_a_wide_layer():
    """A first layer of 300 inputs (+ the bias column: two or more row panels) takes the memory
    update's row panels inside the compiled graph, as one operator that writes the next memory set
    in place: the step equals the eager one, the memories are symmetric (to the rounding of the
    diagonal blocks' GEMM: a lower triangle left stale would differ by O(1)), and the current set is
    left as it was until the step is committed."""
    from amstream.memory import SYMMETRIC_PANEL

    def wide_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(300, 16), nn.ReLU(), nn.Linear(16, 4)).to(F64)

    eager = amstream.AMMem(wide_mlp(), device="cpu")
    captured = amstream.AMMem(wide_mlp(), device="cpu", compile=True)
    assert 301 >= 2 * SYMMETRIC_PANEL
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would make this test vacuous
        for _ in range(4):
            x, y = torch.randn(24, 300, generator=g, dtype=F64), torch.randint(0, 4, (24,), generator=g)
            eager.learn(x, y)
            captured.learn(x, y)
            assert _max_difference(eager.model, captured.model) < 1e-12
            for (A, Bm), (A_c, B_c) in zip(eager._memories, captured._memories):
                assert torch.allclose(A_c, A, rtol=0, atol=1e-12) and torch.allclose(B_c, Bm, rtol=0, atol=1e-12)
                assert (A_c - A_c.T).abs().max() <= 1e-14 * A_c.abs().max()
            captured.load_state_dict(eager.state_dict())
    assert captured._compiled_functions["the whole step"].active

def test_am_adam_with_batchnorm_captures_its_whole_step():
    """Blocks Linear -> BatchNorm1d (the section 1 protocol's network): the whole step takes the
    BatchNorm's backward in closed form with the batch's statistics, and the forward pass alone
    updates the running ones; the weights, running statistics and predictions equal the eager
    learner's. The Linear biases right before a BatchNorm are left out of the weight comparison:
    they have no effect on the output, a zero true gradient, and Adam turns its rounding into
    steps of about lr x 1e-8. bn_stats="all" (running statistics from every step) is refused."""
    def bn_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                             nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(F64)

    eager = amstream.AMAdam(bn_mlp(), device="cpu")
    captured = amstream.AMAdam(bn_mlp(), device="cpu", compile=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile=True")  # neither a fallback nor a refusal
        for i, (x, y) in enumerate(_batches(4)):
            if i % 2:
                eager.forward_for_step(x)
                captured.forward_for_step(x)
            eager.learn(x, y)
            captured.learn(x, y)
            for (name, p), q in zip(eager.model.named_parameters(), captured.model.parameters()):
                if name not in ("0.bias", "3.bias"):
                    assert float((p - q).detach().abs().max()) < 1e-12, name
            for p, q in zip(eager.model.buffers(), captured.model.buffers()):
                assert torch.allclose(p, q, atol=1e-12, rtol=0)
            captured.load_state_dict(eager.state_dict())
    assert captured._compiled_functions["the whole step"].active
    x = _batches(1)[0][0]
    assert torch.allclose(captured.predict(x), eager.predict(x), atol=1e-12, rtol=0)
    refused = amstream.AMAdam(bn_mlp(), device="cpu", compile=True, bn_stats="all")
    with pytest.warns(UserWarning, match="bn_stats='all'"):
        for x, y in _batches(2):
            refused.learn(x, y)
    assert "the whole step" not in refused._compiled_functions


def test_a_step_the_graph_cannot_hold_takes_the_eager_path():
    """AM-mem with running-mean memories (their weights change with every batch: a new graph each
    step; said once) and a loss without a closed-form gradient (autograd would break the graph)
    keep the compiled code update and never build a whole-step graph; the result is the eager one."""
    eager = amstream.AMMem(_mlp(), device="cpu", memory="mean")
    compiled = amstream.AMMem(_mlp(), device="cpu", memory="mean", compile=True)
    smooth = amstream.AMAdam(_mlp(), device="cpu", criterion=nn.CrossEntropyLoss(label_smoothing=0.1), compile=True)
    for i, (x, y) in enumerate(_batches(3)):
        eager.learn(x, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled.learn(x, y)
            smooth.learn(x, y)
        said = [str(w.message) for w in caught if "piece by piece" in str(w.message)]
        assert len(said) == (i == 0) and all("running-mean memories" in m and "AMMem" in m for m in said), said
        assert _max_difference(eager.model, compiled.model) < 1e-12
    assert "the whole step" not in compiled._compiled_functions
    assert "the whole step" not in smooth._compiled_functions
    assert compiled._compiled_functions["the code update"].active


def test_a_learner_without_a_whole_step_graph_says_so_once():
    """SBE reads each layer's rows through forward hooks and autograd: with ``compile=True`` its
    first step says that the steps run eagerly, and no later step repeats it."""
    learner = amstream.SBE(_mlp(), device="cpu", compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in _batches(3):
            learner.learn(x, y)
    said = [str(w.message) for w in caught if "piece by piece" in str(w.message)]
    assert len(said) == 1 and "SBE" in said[0] and "forward hooks" in said[0], said


def test_frank_wolfe_compiles_one_graph_per_position_in_its_round():
    """The position in the round of inner steps is fixed per graph (two at ``inner_steps=2``); the
    learning rate and Adam's step number are inputs, so a new learning rate compiles nothing."""
    learner = amstream.FrankWolfeLearner(_mlp(), device="cpu", lr=3e-3, compile=True)
    for i, (x, y) in enumerate(_batches(10)):
        if i == 5:
            for group in learner.optimizer.param_groups:
                group["lr"] = 1e-3
        learner.learn(x, y)
    whole = learner._compiled_functions["the whole step"]
    assert whole.active and len(_cache_entries()(whole._code)) == 2


def test_frank_wolfe_on_one_batch_says_why_its_step_is_not_one_graph():
    """With ``same_batch=True`` the inner steps re-evaluate the batch inside the optimizer's step, so
    the step cannot be one graph: said once, and the steps are the eager ones."""
    eager = amstream.FrankWolfeLearner(_mlp(), device="cpu", same_batch=True, inner_steps=3)
    compiled = amstream.FrankWolfeLearner(_mlp(), device="cpu", same_batch=True, inner_steps=3, compile=True)
    for i, (x, y) in enumerate(_batches(3)):
        eager.learn(x, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled.learn(x, y)
        said = [str(w.message) for w in caught if "piece by piece" in str(w.message)]
        assert len(said) == (i == 0) and all("same_batch=True" in m for m in said), said
        assert _max_difference(eager.model, compiled.model) == 0.0
    assert "the whole step" not in compiled._compiled_functions


@pytest.mark.parametrize("name", ["am-adam", "am-mem", "backprop", "frank-wolfe"])
def test_a_captured_step_that_goes_non_finite_is_rolled_back(name):
    """The guarantees hold around the whole-step graph: a step whose loss has an infinite target
    (weights, memories and Adam state go non-finite inside the graph) is undone exactly, and the
    learner then steps as an eager one from the same state. Loading a state and the rollback leave
    every tensor the step updates where it was, so that its CUDA graph would replay as recorded."""
    from agents.td import TDLoss
    from state_utils import addresses, assert_same_state, snapshot

    eager = amstream.LEARNERS[name](_mlp(), device="cpu", criterion=nn.MSELoss())
    captured = amstream.LEARNERS[name](_mlp(), device="cpu", criterion=nn.MSELoss(), compile=True)
    g = torch.Generator().manual_seed(3)

    def td_batch(target_value=None):
        x = torch.randn(24, 12, generator=g, dtype=F64)
        target = torch.randn(24, generator=g, dtype=F64)
        if target_value is not None:
            target[3] = target_value
        return x, TDLoss("mse", torch.randint(0, 4, (24,), generator=g), target)

    for _ in range(2):
        x, loss_fn = td_batch()
        eager.step(x, loss_fn)
        captured.step(x, loss_fn)
    assert captured._compiled_functions["the whole step"].active
    held = addresses(captured)  # what a CUDA graph of the step would hold
    captured.load_state_dict(eager.state_dict())
    before = snapshot(captured)
    x, loss_fn = td_batch(math.inf)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        info = captured.step(x, loss_fn)
    assert info.rolled_back
    assert_same_state(snapshot(captured), before)
    x, loss_fn = td_batch()
    eager.step(x, loss_fn)
    captured.step(x, loss_fn)
    assert _max_difference(eager.model, captured.model) < 1e-12
    assert addresses(captured) == held  # loaded and rolled back in place: the graph would replay


def test_the_captured_adam_update_is_torch_adam():
    """``adam_update_`` on torch.optim.Adam's own state gives torch's update (fused and foreach),
    with the learning rate a float or a 0-dim tensor."""
    from amstream.optim.adam_update import adam_state, adam_update_

    for implementation in ({"fused": True}, {"foreach": True}):
        torch.manual_seed(0)
        ours, theirs = (nn.Linear(5, 3).to(F64) for _ in range(2))
        theirs.load_state_dict(ours.state_dict())
        opt_ours, opt_theirs = (torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                                 **implementation) for m in (ours, theirs))
        for step in range(6):
            grads = [torch.randn_like(p) for p in ours.parameters()]
            for p, q, g in zip(ours.parameters(), theirs.parameters(), grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt_theirs.step()
            group = opt_ours.param_groups[0]
            state = adam_state(opt_ours, group, group["params"])
            if state is None:  # torch makes the state at the first step
                opt_ours.step()
                continue
            lr = torch.tensor(1e-2, dtype=F64) if step % 2 else 1e-2
            with torch.no_grad():
                adam_update_(group["params"], grads, state, lr=lr, beta1=0.8, beta2=0.99, eps=1e-6)
            assert _max_difference(ours, theirs) < 1e-14
        assert opt_ours.state_dict()["state"][0]["step"] == 6
    decayed = torch.optim.Adam(ours.parameters(), weight_decay=0.1)
    assert adam_state(decayed, decayed.param_groups[0], list(ours.parameters())) is None  # another rule


def test_the_compiled_local_gradient_is_specialized_once_per_layer_kind():
    """LocoProp-M's local gradient, compiled: one graph per (transfer function, first-step or later)
    and layer shape, reused at every step (the transfer functions are the same objects each step).
    With SGD as the local optimizer the whole step is not one graph (said once), so every step runs
    the pieces."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compile here, not in an earlier test's cache
    learner = amstream.LEARNERS["locoprop-m"](_mlp(), device="cpu", compile=True, local_optimizer="sgd", lr=0.01)
    counters.clear()
    batches = _batches(4)
    with pytest.warns(UserWarning, match="the local optimizer is sgd"):
        learner.learn(*batches[0])
    for x, y in batches[1:2]:
        learner.learn(x, y)
    after_two = counters["stats"]["unique_graphs"]
    for x, y in batches[2:]:
        learner.learn(x, y)
    assert after_two > 0 and counters["stats"]["unique_graphs"] == after_two  # no recompilation
    assert learner._compiled_functions["the local gradient"].active


def test_the_compiled_newton_z_step_takes_rho_as_an_input():
    """ADMM-Softmax's Z-step with compile=True: its Newton direction and Armijo trial are compiled
    functions, the convergence tests stay on the host; rho changes from step to step (adaptive rho)
    and costs one recompilation at most (torch makes a float input symbolic the second time it sees
    a new value), not one per value."""
    from torch._dynamo.utils import counters

    learner = amstream.ADMMSoftmax(_mlp(), device="cpu", compile=True)
    counters.clear()
    graphs = []
    for rho, (x, y) in zip([1.0, 0.5, 0.25, 3.0, 7.5], _batches(5)):
        learner.current_rho = rho
        learner.learn(x, y)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[-1] == graphs[2]  # nothing new after the second value of rho
    assert all(learner._compiled_functions[name].active for name in ("the Newton step", "the Armijo trial"))


def test_the_compiled_code_update_equals_the_eager_one():
    from amstream.functional import CriterionLoss, update_codes

    learner = amstream.AMAdam(_mlp(), device="cpu", compile=True)
    x, y = _batches(1)[0]
    codes, _ = learner.blocks.forward_with_codes(x)
    kwargs = dict(mu=0.003, steps=5, lrs=[0.3, 0.3], momentum=0.9, cap_steps=True)
    loss_fn = CriterionLoss(learner.criterion, y)
    eager = update_codes(codes, learner.blocks.hidden, learner.blocks.output, loss_fn, **kwargs)
    compiled = learner._compiled("the code update", update_codes)(
        codes, learner.blocks.hidden, learner.blocks.output, loss_fn, **kwargs)
    assert learner._compiled_functions["the code update"].active
    for e, c, c0 in zip(eager, compiled, codes):
        assert (e - c0).abs().max() > 1e-3  # the codes moved
        assert torch.allclose(c, e, atol=1e-12, rtol=0)


def test_checkpoints_do_not_depend_on_the_mode():
    eager = amstream.AMAdam(_mlp(), device="cpu")
    compiled = amstream.AMAdam(_mlp(), device="cpu", compile=True)
    for x, y in _batches(2):
        compiled.learn(x, y)
    state = compiled.state_dict()
    assert state.keys() == eager.state_dict().keys()
    assert state["model"].keys() == eager.state_dict()["model"].keys()  # no "_orig_mod." prefixes
    eager.load_state_dict(state)
    x, y = _batches(3)[2]
    eager.learn(x, y)
    compiled.learn(x, y)
    assert _max_difference(eager.model, compiled.model) < 1e-12


def test_a_function_that_cannot_be_compiled_runs_eagerly_with_a_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    learner = amstream.AMAdam(_mlp(), device="cpu", compile=True)
    reference = amstream.AMAdam(_mlp(), device="cpu")
    x, y = _batches(1)[0]
    with pytest.warns(RuntimeWarning, match=r"AMAdam: the code update could not be compiled.*no C\+\+ compiler"):
        learner.learn(x, y)
    reference.learn(x, y)
    assert _max_difference(learner.model, reference.model) == 0.0  # the eager result, exactly
    assert not learner._compiled_functions["the code update"].active
    # from the second step (Adam's state exists) AM-Adam's whole step is one compiled function
    with pytest.warns(RuntimeWarning, match=r"AMAdam: the whole step could not be compiled"):
        learner.learn(x, y)
    reference.learn(x, y)
    assert _max_difference(learner.model, reference.model) < 1e-12  # the eager whole step
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once, not at every step
        learner.learn(x, y)


def test_an_error_of_the_function_itself_is_raised_not_hidden(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def bad(x):
        raise ValueError("shapes do not fit")

    wrapped = CompiledFunction(bad, "bad", torch.device("cpu"))
    with pytest.raises(ValueError, match="shapes do not fit"):
        wrapped(torch.zeros(1))
    assert wrapped.active  # the compiler was not at fault


def test_compile_choice_is_checked():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        amstream.AMAdam(_mlp(), device="cpu", compile="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("name, kwargs", [("am-adam", {}), ("backprop", {"lr": 3e-3}), ("am-mem", {})])
def test_captured_steps_equal_eager_ones_on_cuda(name, kwargs):
    """On CUDA compile=True (and "auto") runs the whole step as one CUDA graph ("reduce-overhead":
    codes, local gradients and Adam for AM-Adam, the memory solves too for AM-mem; forward, backward
    and Adam for backprop), never skipped for mutating its inputs (Adam's state and AM-mem's memories
    are marked static); the weights after each step match the eager learner's, and the step's record
    outlives the next replay."""
    from torch._dynamo.utils import counters

    def mlp32():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    eager = amstream.LEARNERS[name](mlp32(), device="cuda", **kwargs)
    captured = amstream.LEARNERS[name](mlp32(), device="cuda", compile="auto", **kwargs)
    assert captured.compile
    counters.clear()
    records = []
    for x, y in _batches(6):
        x, y = x.float().cuda(), y.cuda()
        expected = eager.learn(x, y)
        records.append((captured.learn(x, y), float(expected.loss)))
        assert _max_difference(eager.model, captured.model) < 1e-5
        captured.load_state_dict(eager.state_dict())
    assert all(f.active for f in captured._compiled_functions.values())
    assert captured._compiled_functions["the whole step"].active
    assert not counters["inductor"]["cudagraph_skips"], "a step ran without its CUDA graph"
    for info, loss in records:  # read after later replays: copies, not the graph's memory
        assert float(info.loss) == pytest.approx(loss, rel=1e-5)


def test_a_function_compiled_for_as_many_variants_as_torch_allows_says_so():
    """Past its recompile limit torch runs new input variants eagerly without an error: the wrapper
    warns once, naming the function. (The limit is set by torch's own config patch: pytest's
    monkeypatch deletes a torch config entry when it undoes, which broke later compiled tests in the
    same process.)"""
    torch._dynamo.reset()

    def double_plus_one(x):
        return 2 * x + 1

    compiled = CompiledFunction(double_plus_one, "AMAdam: the test function", torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(recompile_limit=2):
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float64, torch.float16):
            assert torch.equal(compiled(torch.ones(3, dtype=dtype)), torch.full((3,), 3.0, dtype=dtype))
    messages = [str(w.message) for w in caught if "recompile_limit" in str(w.message)]
    assert len(messages) == 1 and "the test function" in messages[0], [str(w.message) for w in caught]
    assert compiled.saturated


def test_import_does_not_load_the_compiler():
    """``import amstream`` leaves torch's compiler (dynamo: about 2 s to import) for the first compiled
    function (or torch optimizer), so that a script that stops on bad input or ``--help`` answers at once."""
    code = "import sys, amstream; assert 'torch._dynamo' not in sys.modules, 'dynamo imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
