"""ADMM-Softmax: oracles for its Z-step, W-step and rho rule, and the learner's own behaviour.

The contract every learner obeys (resume, rollback, bad input...) is checked by the conformance
suite; here, each part of the iteration against an independent solution.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amstream import ADMMSoftmax, UnsupportedModelError
from amstream.data import load_digits
from oracles import lbfgs_prox_cross_entropy
from amstream.learners.admm_softmax import (NormalEquations, image_laplacian, newton_direction, prox_lbfgs,
                                            softmax_prox_newton, update_rho)


def _problem(n=40, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    V = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    Y = F.one_hot(torch.randint(0, c, (n,), generator=g), c).to(torch.float64)
    return V, Y


@pytest.mark.parametrize("rho", [1e-2, 1.0, 100.0])
def test_newton_z_step_equals_lbfgs(rho):
    V, Y = _problem()
    Z, steps = softmax_prox_newton(V, Y, rho, iterations=100)
    assert steps < 100  # converged, not stopped by the cap
    torch.testing.assert_close(Z, lbfgs_prox_cross_entropy(V, Y, rho), atol=1e-6, rtol=0)
    # the optimality condition itself: softmax(z) - y + rho (z - v) = 0
    assert (torch.softmax(Z, 1) - Y + rho * (Z - V)).abs().max() < 1e-9


def test_float32_newton_takes_the_steps_that_rounding_cannot_resolve_without_halving_them():
    """Near the optimum a row's cross-entropy is the small difference of two terms of the logits' size,
    and its Newton decrease is below their rounding. Such a step is taken at once (the Armijo test's
    slack is the rounding of the terms, not of the small objective); halving it up to 30 times
    gained nothing and cost dlADMM's streaming step a third of its time (BENCHMARKS.md, section 10).
    The solution is the float64 one to float32's precision."""
    from amstream.learners.admm_softmax import armijo_trial, newton_step

    V, Y = _problem(n=200, scale=8.0)
    Z0 = V + 0.5 * torch.randn(V.shape, generator=torch.Generator().manual_seed(1), dtype=V.dtype)
    calls = {"newton": 0, "trials": 0}

    def counted(name, kernel):
        def run(*args):
            calls[name] += 1
            return kernel(*args)
        return run

    Z, steps = softmax_prox_newton(V.float(), Y.float(), 0.1, Z0.float(), iterations=50, tol=1e-5,
                                   kernels=(counted("newton", newton_step), counted("trials", armijo_trial)))
    exact, _ = softmax_prox_newton(V, Y, 0.1, Z0, iterations=100)
    assert steps < 50
    assert calls["trials"] <= 2 * steps  # a full step is taken; a halving or two where it overshoots
    torch.testing.assert_close(Z.double(), exact, atol=2e-4, rtol=0)


def test_sherman_morrison_equals_a_dense_solve():
    V, Y = _problem(n=16, c=7)
    for rho in (1e-8, 1e-3, 1.0, 50.0):
        P = torch.softmax(V, 1)
        G = P - Y + rho * torch.randn_like(V)
        S = newton_direction(P, G, rho)
        H = torch.diag_embed(rho + P) - P[:, :, None] * P[:, None, :]
        dense = torch.linalg.solve(H, G[:, :, None])[:, :, 0]
        torch.testing.assert_close(S, dense, rtol=1e-7, atol=1e-9 / rho)


def test_z_step_for_a_custom_loss_equals_newton_for_the_cross_entropy():
    V, Y = _problem(n=12, c=5)
    labels = Y.argmax(1)
    newton, _ = softmax_prox_newton(V, Y, 0.5)
    lbfgs = prox_lbfgs(lambda Z: F.cross_entropy(Z, labels, reduction="sum"), V, 0.5, iterations=200)
    torch.testing.assert_close(lbfgs, newton, atol=1e-6, rtol=0)


def _least_squares(D, T, rho, alpha, L=None):
    """``argmin_X rho ||D X - T||^2 + alpha ||L X||^2`` by torch.linalg.lstsq on the stacked system."""
    L = torch.eye(D.shape[1], dtype=D.dtype) if L is None else L
    A = torch.cat([rho ** 0.5 * D, alpha ** 0.5 * L])
    B = torch.cat([rho ** 0.5 * T, torch.zeros(L.shape[0], T.shape[1], dtype=D.dtype)])
    return torch.linalg.lstsq(A, B).solution


@pytest.mark.parametrize("eigen", [True, False])
def test_cached_factorization_equals_lstsq_for_every_rho(eigen):
    g = torch.Generator().manual_seed(1)
    D = torch.randn(30, 9, generator=g, dtype=torch.float64)
    T = torch.randn(30, 4, generator=g, dtype=torch.float64)
    solver = NormalEquations(D.T @ D, 0.3, eigen=eigen)
    for rho in (1e-8, 0.5, 1.0, 0.5, 64.0):  # 0.5 twice: the cached factor is reused
        torch.testing.assert_close(solver.solve(rho, rho * D.T @ T), _least_squares(D, T, rho, 0.3))
    assert (solver._eig is not None) == eigen and len(solver._cholesky) == (0 if eigen else 4)


def test_laplacian_regularized_solve_equals_lstsq():
    g = torch.Generator().manual_seed(2)
    L = image_laplacian((2, 3, 4), dtype=torch.float64)  # 24 features and the bias
    D = torch.randn(20, 25, generator=g, dtype=torch.float64)
    T = torch.randn(20, 3, generator=g, dtype=torch.float64)
    solver = NormalEquations(D.T @ D, 2.0, L.T @ L)
    torch.testing.assert_close(solver.solve(0.7, 0.7 * D.T @ T), _least_squares(D, T, 0.7, 2.0, L))


def test_image_laplacian_leaves_constant_channels_alone_and_keeps_the_bias():
    L = image_laplacian((3, 4, 5))
    x = torch.cat([torch.full((20,), 2.0), torch.full((20,), -1.0), torch.full((20,), 5.0), torch.ones(1)])
    out = L @ x
    assert out[:60].abs().max() < 1e-6 and out[60] == 1.0
    bump = torch.zeros(61)
    bump[7] = 1.0  # one pixel off in the first channel: penalized, and only there
    assert (L @ bump)[:20].abs().sum() > 0 and (L @ bump)[20:].abs().sum() == 0


def test_rho_rule_and_the_clipping_fix_rescale_u():
    U = torch.ones(3, 2)
    assert update_rho(1.0, U, r_primal=100.0, r_dual=1.0) == 2.0 and torch.equal(U, torch.full((3, 2), 0.5))
    assert update_rho(1.0, U, r_primal=1.0, r_dual=100.0) == 0.5 and torch.equal(U, torch.ones(3, 2))
    assert update_rho(1.0, U, r_primal=2.0, r_dual=1.0) == 1.0 and torch.equal(U, torch.ones(3, 2))
    # a change clipped at the bound: U = Y / rho must follow rho's actual change, 600 -> 1000
    fixed, faithful = torch.ones(2), torch.ones(2)
    assert update_rho(600.0, fixed, 100.0, 1.0, bounds=(1e-16, 1e3)) == 1e3
    assert update_rho(600.0, faithful, 100.0, 1.0, bounds=(1e-16, 1e3), faithful=True) == 1e3
    torch.testing.assert_close(fixed, torch.full((2,), 600.0 / 1000.0))
    torch.testing.assert_close(faithful, torch.full((2,), 0.5))  # the reference's: scaled as if rho were 1200


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def _features_model(seed=0):
    """Fixed random ReLU features of the digits and a linear classifier on them."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_only_the_output_layer_is_trained(digits):
    train, _ = digits
    learner = ADMMSoftmax(_features_model(), device="cpu")
    hidden = learner.model[1].weight.detach().clone()
    output = learner.model[3].weight.detach().clone()
    learner.learn(train.x[:64], train.y[:64])
    assert torch.equal(learner.model[1].weight, hidden)
    assert not torch.equal(learner.model[3].weight, output)
    assert [g["name"] for g in learner.optimizer.param_groups] == ["output"]


def test_a_model_that_does_not_end_in_a_linear_layer_is_refused():
    with pytest.raises(UnsupportedModelError, match="must be an nn.Linear or an nn.Sequential ending in one"):
        ADMMSoftmax(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), device="cpu")
    with pytest.raises(ValueError, match="feature_shape"):
        ADMMSoftmax(nn.Linear(4, 3), regularizer="laplacian", device="cpu")


def test_full_batch_fit_reaches_the_regularized_optimum(digits):
    """The reference's run on a whole set: the residuals fall and the weights reach the minimizer of
    the summed cross-entropy plus alpha/2 ||W||^2 (found independently by L-BFGS on W)."""
    train, test = digits
    x, y = train.x[:300].flatten(1).double(), train.y[:300]
    learner = ADMMSoftmax(nn.Linear(64, 10).double(), alpha=1.0, rho=1.0, device="cpu")
    records = learner.fit(x, y, iterations=300)
    assert records[-1]["primal_residual"] < 1e-3 * records[0]["primal_residual"]
    W = torch.zeros(10, 65, dtype=torch.float64, requires_grad=True)
    D = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    opt = torch.optim.LBFGS([W], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = F.cross_entropy(D @ W.T, y, reduction="sum") + 0.5 * W.square().sum()
        value.backward()
        return value

    opt.step(closure)
    fitted = torch.cat([learner.model.weight, learner.model.bias[:, None]], 1).detach()
    assert (fitted - W.detach()).abs().max() < 1e-3 * W.detach().abs().max()
    accuracy = (learner.predict(test.x.flatten(1).double()).argmax(1) == test.y).double().mean()
    assert accuracy > 0.85


def test_fit_stops_at_its_time_budget_and_the_callback_time_is_not_counted(digits):
    train, _ = digits
    learner = ADMMSoftmax(nn.Linear(64, 10), device="cpu")
    seen = []
    records = learner.fit(train.x.flatten(1), train.y, iterations=10_000, seconds=0.2,
                          callback=lambda it, rec: seen.append(it))
    assert 1 <= len(records) < 10_000 and seen == [r["iteration"] for r in records]
    assert records[-1]["seconds"] >= 0.2 and learner.step_count == len(records)


def test_streaming_memories_carry_the_past_batches(digits):
    """With running sums the W-step sees every batch so far: learning batch A then batch B ends nearer
    the fit on A and B together than learning B alone does."""
    train, _ = digits
    a, b = (train.x[:200], train.y[:200]), (train.x[200:400], train.y[200:400])
    settings = {"iterations": 20, "alpha": 1.0, "memory": "sum", "device": "cpu"}
    both = ADMMSoftmax(_features_model(), **settings)
    both.fit(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), iterations=200)
    streamed = ADMMSoftmax(_features_model(), **settings)
    streamed.learn(*a)
    streamed.learn(*b)
    alone = ADMMSoftmax(_features_model(), mode="batch", **settings)
    alone.learn(*a)
    alone.learn(*b)
    target = both.model[3].weight.detach()

    def gap(learner):
        return float((learner.model[3].weight.detach() - target).norm())
    assert gap(streamed) < 0.5 * gap(alone)  # measured 1.94 against 6.70
    assert streamed.samples_seen == 400


def test_a_parameter_penalty_enters_the_w_step_as_its_gradient(digits):
    """A penalty of the parameters (EWC's, an L2 pull) enters the W-step linearized at the batch's
    start: the weights move along minus its gradient, relative to the same step without it."""
    train, _ = digits
    free = ADMMSoftmax(_features_model(), device="cpu")
    held = ADMMSoftmax(_features_model(), device="cpu")
    target = held.model[3].weight.detach() + 1.0  # the penalty's minimum, away from the start
    free.learn(train.x[:64], train.y[:64])
    held.learn(train.x[:64], train.y[:64], penalty=lambda: 0.5 * (held.model[3].weight - target).square().sum())
    shift = held.model[3].weight.detach() - free.model[3].weight.detach()
    assert float((shift * (target - free.model[3].weight.detach())).sum()) > 0
    assert torch.equal(held.model[1].weight, free.model[1].weight)  # the features: untouched by both


def test_step_info_reports_residuals_rho_and_objective(digits):
    train, _ = digits
    learner = ADMMSoftmax(_features_model(), device="cpu")
    info = learner.learn(train.x[:64], train.y[:64])
    assert set(info.diagnostics) == {"admm/primal_residual", "admm/dual_residual", "admm/rho", "admm/objective"}
    assert info.diagnostics["admm/rho"] == learner.current_rho and float(info.diagnostics["admm/objective"]) > 0


def test_am_mem_with_the_admm_softmax_output_rule_learns_and_resumes_exactly(digits, tmp_path):
    """AM-mem's output layer solved by ADMM-Softmax's streaming iteration: it learns the digits,
    reports the output's residuals, and a checkpoint (its ADMM memories and rho) resumes exactly."""
    import amstream
    from amstream import AMMem
    from learner_cases import batches, mlp
    from state_utils import assert_same_state
    train, test = digits
    steps = batches(train, seed=0)

    def make(seed=0):
        torch.manual_seed(seed)
        return AMMem(mlp(), output_rule="admm-softmax", device="cpu")

    straight = make()
    for x, y in steps:
        info = straight.learn(x, y)
    accuracy = (straight.predict(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy > 0.6, accuracy
    assert {"admm/primal_residual", "admm/rho"} <= set(info.diagnostics) and straight.output_rho > 0
    first = make()
    for x, y in steps[:10]:
        first.learn(x, y)
    amstream.save_checkpoint(tmp_path / "ck.pt", first)
    resumed = make(seed=5)
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    for x, y in steps[10:]:
        resumed.learn(x, y)
    assert_same_state(straight.state_dict(), resumed.state_dict())
    assert resumed.output_rho == straight.output_rho
