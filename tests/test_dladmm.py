"""dlADMM: oracles for its closed-form and iterative updates, its step-size rules and its full-batch run.

The contract every learner obeys is checked by the conformance suite; here, each update against an
independent solution.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amstream import DLADMM, UnsupportedModelError
from amstream.data import load_digits
from oracles import lbfgs_prox_cross_entropy
from amstream.learners.dladmm import (BacktrackingError, _linearized_step, bias_update, fista_last_z,
                                       relu_z_update, rho_schedule)


def test_hidden_z_update_equals_a_brute_force_minimum_over_a_grid():
    g = torch.Generator().manual_seed(0)
    m = 3 * torch.randn(400, generator=g, dtype=torch.float64)
    a = torch.cat([3 * torch.randn(300, generator=g, dtype=torch.float64).abs(), torch.zeros(100, dtype=torch.float64)])
    z = relu_z_update(m, a)
    grid = torch.linspace(-12, 12, 240_001, dtype=torch.float64)  # step 1e-4
    values = (grid[None, :] - m[:, None]).square() + (a[:, None] - torch.relu(grid[None, :])).square()
    best = values.min(1).values
    ours = (z - m).square() + (a - torch.relu(z)).square()
    assert (ours <= best + 1e-9).all()  # never worse than the grid's best
    assert (ours >= best - 1e-7).all()  # and the grid, 1e-4 apart, gets within rounding of it


def test_b_update_is_the_exact_minimizer():
    g = torch.Generator().manual_seed(3)
    inp = torch.randn(50, 7, generator=g, dtype=torch.float64)
    W, b = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    target = torch.randn(50, 4, generator=g, dtype=torch.float64)
    b_new = bias_update(F.linear(inp, W, b), b, target)
    torch.testing.assert_close(b_new, (target - inp @ W.T).mean(0))  # the closed form of the least squares
    grad = -2 * (target - inp @ W.T - b_new).sum(0)
    assert grad.abs().max() < 1e-10
    # with a proximal weight of 50 samples (as many as the batch) the step is halved
    torch.testing.assert_close(bias_update(F.linear(inp, W, b), b, target, prox=50.0), b + 0.5 * (b_new - b))


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.mark.parametrize("rho", [0.5, 2.0])
def test_fista_last_layer_solution_equals_lbfgs(rho):
    g = torch.Generator().manual_seed(1)
    center = 2 * torch.randn(30, 10, generator=g, dtype=torch.float64)
    Y = F.one_hot(torch.randint(0, 10, (30,), generator=g), 10).to(torch.float64)
    z, steps = fista_last_z(center, Y, center.clone(), rho, iterations=20_000, tol=1e-14)
    assert steps < 20_000
    torch.testing.assert_close(z, lbfgs_prox_cross_entropy(center, Y, rho), atol=1e-5, rtol=0)


def test_fista_handles_logits_that_overflow_exp():
    center = torch.tensor([[500.0, -500.0, 0.0]], dtype=torch.float64)
    Y = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    z, _ = fista_last_z(center, Y, center.clone(), 1.0)
    assert torch.isfinite(z).all()


def test_backtracking_terminates_and_the_learner_persists_its_constants(digits):
    x = torch.randn(20, 5, dtype=torch.float64)
    A = x.T @ x

    def f(v):
        return 0.5 * (v @ A @ v)

    v = torch.ones(5, dtype=torch.float64)
    new, constant = _linearized_step(v, A @ v, f, 1e-3, True, 60, "a test")
    assert constant >= 1e-3 and f(new) <= f(v)
    with pytest.raises(BacktrackingError, match="step_size='bound'"):
        _linearized_step(v, A @ v, f, 1e-30, True, 3, "a test")

    torch.manual_seed(0)
    learner = DLADMM(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
                     step_size="backtracking", device="cpu")
    train = digits[0]
    learner.learn(train.x[:32], train.y[:32])
    first = learner.step_constants
    assert any(t > 1.0 for t in first[0])  # some theta doubled past its start
    learner.learn(train.x[32:64], train.y[32:64])
    assert all(b >= a for a, b in zip(first[0], learner.step_constants[0]))  # started from the persisted ones


def test_a_model_that_is_not_a_relu_mlp_is_refused():
    with pytest.raises(UnsupportedModelError, match="ReLU MLP"):
        DLADMM(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), device="cpu")
    with pytest.raises(UnsupportedModelError, match="ReLU MLP"):
        DLADMM(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3)), device="cpu")


@pytest.mark.parametrize("preset", ["reference", None])
def test_full_batch_fit_learns(digits, preset):
    """The reference's run on the digits (the faithful settings, and the new defaults)."""
    train, test = digits
    torch.manual_seed(0)
    kwargs = DLADMM.presets["reference"] if preset else {}
    learner = DLADMM(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), device="cpu",
                     **{**kwargs, "rho": 0.1})
    records = learner.fit(train.x, train.y, iterations=30)
    accuracy = (learner.predict(test.x).argmax(1) == test.y).float().mean().item()
    assert records[-1]["training_cost"] < records[0]["training_cost"]
    assert accuracy > 0.7, accuracy


def test_rho_schedule_raises_rho_after_three_rises_of_the_cost():
    assert rho_schedule([1.0, 0.9, 0.8, 0.7], 1e-6, 0.1) == 1e-6
    assert rho_schedule([1.0, 1.1, 1.2], 1e-6, 0.1) == 1e-6  # three costs are two rises
    assert rho_schedule([1.0, 1.1, 1.2, 1.3], 1e-6, 0.1) == pytest.approx(1e-5)
    assert rho_schedule([1.0, 1.1, 1.1, 1.3], 1e-6, 0.1) == 1e-6  # a tie breaks the run
    assert rho_schedule([0.5, 1.0, 1.1, 1.2, 1.3], 0.05, 0.1) == 0.1  # capped


@pytest.mark.parametrize("preset", ["reference", "bound"])
def test_full_batch_fit_resumes_exactly_from_a_checkpoint(digits, preset, tmp_path, monkeypatch):
    """A run stopped at iteration 7 and continued from its checkpoint by a fresh learner reaches the
    uninterrupted run's weights, rho and step constants bit for bit, across rho changes (forced at
    iterations 5 and 9: on the digits the cost does not rise three times in a row this early)."""
    from amstream import load_checkpoint, save_checkpoint
    from amstream.learners import dladmm

    monkeypatch.setattr(dladmm, "rho_schedule", lambda costs, rho, _: 10 * rho if len(costs) in (5, 9) else rho)
    train, _ = digits
    kwargs = {**DLADMM.presets["reference"], "rho": 1e-4}
    if preset == "bound":
        kwargs["step_size"] = "bound"

    def learner():
        torch.manual_seed(0)
        return DLADMM(nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)),
                      device="cpu", **kwargs)

    whole = learner()
    records = whole.fit(train.x, train.y, iterations=14)
    assert sorted({r["rho"] for r in records}) == pytest.approx([1e-4, 1e-3, 1e-2])

    first = learner()
    first.fit(train.x, train.y, iterations=14,
              callback=lambda it, _: it == 7 and save_checkpoint(tmp_path / "run.pt", first))
    resumed = learner()
    load_checkpoint(tmp_path / "run.pt", resumed)
    assert resumed.fit_run.iteration == 7 and resumed.step_count == 7
    rest = resumed.fit(train.x, train.y, iterations=14, resume=True)
    assert [r["iteration"] for r in rest] == list(range(8, 15))
    assert [r["training_cost"] for r in rest] == [r["training_cost"] for r in records[7:]]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert (resumed.current_rho, resumed.step_constants) == (whole.current_rho, whole.step_constants)


def test_full_batch_resume_refuses_another_data_set_or_no_run(digits):
    train, _ = digits
    learner = DLADMM(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), device="cpu")
    with pytest.raises(ValueError, match="no full-batch run to resume"):
        learner.fit(train.x, train.y, iterations=2, resume=True)
    learner.fit(train.x, train.y, iterations=2)
    before = [p.clone() for p in learner.model.parameters()]
    with pytest.raises(ValueError, match="the data differ"):
        learner.fit(train.x.flip(0), train.y.flip(0), iterations=4, resume=True)  # the same samples, reordered
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    assert len(learner.fit(train.x, train.y, iterations=4, resume=True)) == 2  # iterations 3 and 4
