"""``fused_adam_step_``: torch's fused Adam kernels called directly, bit for bit ``optimizer.step()``,
and declined (nothing changed) wherever the optimizer's own step would do something else."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from amstream import LEARNERS
from amstream.data import load_digits
from amstream.optim.adam_update import fused_adam_step_


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


def _groups(net: nn.Module) -> list[dict]:
    return [{"params": list(net[0].parameters()), "lr": 3e-3},
            {"params": list(net[2].parameters()), "lr": 1e-3, "weight_decay": 0.1}]


def _set_grads(net: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    if step % 3 == 2:  # a parameter without a gradient is skipped, as torch's step skips it
        net[2].bias.grad = None


def _twins(cls, **kw):
    a = _net()
    b = copy.deepcopy(a)
    return (a, cls(_groups(a), fused=True, **kw)), (b, cls(_groups(b), fused=True, **kw))


def _state(net, opt):
    return [p.detach().clone() for p in net.parameters()] + [
        t.clone() for s in opt.state.values() for t in s.values()]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_it_is_the_optimizers_own_step_bit_for_bit(cls):
    (net_a, opt_a), (net_b, opt_b) = _twins(cls, betas=(0.8, 0.99), eps=1e-6)
    taken = []
    for step in range(6):
        _set_grads(net_a, step)
        _set_grads(net_b, step)
        opt_a.step()
        taken.append(fused_adam_step_(opt_b))
        if not taken[-1]:
            opt_b.step()
        for x, y in zip(_state(net_a, opt_a), _state(net_b, opt_b), strict=True):
            assert torch.equal(x, y)
    # the first step makes torch's state: declined; every later one is taken
    assert taken == [False] + [True] * 5


def _stepped_once():
    net = _net()
    opt = torch.optim.Adam(_groups(net), fused=True)
    _set_grads(net, 0)
    opt.step()
    _set_grads(net, 1)
    return net, opt


def _hook(*args):
    return None


@pytest.mark.parametrize("change", [
    "not fused", "amsgrad", "maximize", "tensor lr", "pre hook", "post hook", "global hook",
    "scheduler", "subclass", "mixed dtypes", "state of another optimizer",
])
def test_declines_and_changes_nothing_where_the_step_would_differ(change):
    net, opt = _stepped_once()
    handles = []
    if change == "not fused":
        opt.param_groups[0]["fused"] = False
    elif change in ("amsgrad", "maximize"):
        opt.param_groups[1][change] = True
    elif change == "tensor lr":
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    elif change == "pre hook":
        handles.append(opt.register_step_pre_hook(_hook))
    elif change == "post hook":
        handles.append(opt.register_step_post_hook(_hook))
    elif change == "global hook":
        handles.append(register_optimizer_step_pre_hook(_hook))
    elif change == "scheduler":  # counts the optimizer's steps by wrapping opt.step
        torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    elif change == "subclass":
        opt.__class__ = type("MyAdam", (torch.optim.Adam,), {})
    elif change == "mixed dtypes":
        opt.param_groups[0]["params"][1].data = opt.param_groups[0]["params"][1].data.double()
        opt.param_groups[0]["params"][1].grad = torch.zeros(7, dtype=torch.float64)
    elif change == "state of another optimizer":  # e.g. loaded from an SGD's state dict
        opt.state[net[2].weight] = {"momentum_buffer": torch.zeros_like(net[2].weight)}
    before = _state(net, opt)
    try:
        assert fused_adam_step_(opt) is False
    finally:
        for handle in handles:
            handle.remove()
    for x, y in zip(before, _state(net, opt), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["backprop", "am-adam", "am-mem"])
def test_learners_step_their_fused_adam_as_torch_would(name, monkeypatch):
    """Two learners on the same batches, one with the fast step disabled: the same weights and
    Adam state, bit for bit, after several steps."""
    import amstream.learners.base as base

    taken = []

    def spy(optimizer):
        taken.append(fused_adam_step_(optimizer))
        return taken[-1]

    monkeypatch.setattr(base, "fused_adam_step_", spy)
    train = load_digits("train")
    x, y = train.x, train.y
    learners = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        learner = LEARNERS[name](model, device="cpu")
        if not fast:  # an empty step hook makes fused_adam_step_ decline: torch's own step runs
            learner.optimizer.register_step_post_hook(_hook)
        learners.append(learner)
    for i in range(5):
        for learner in learners:
            learner.learn(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
    fast, slow = learners
    assert taken.count(True) == 4 and taken.count(False) == 6  # the fast one's steps after its first
    for p, q in zip(fast.model.parameters(), slow.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for s, t in zip(fast.optimizer.state.values(), slow.optimizer.state.values(), strict=True):
        for key in s:
            assert torch.equal(s[key], t[key])
