"""Tests for amstream.functional against independent mathematical oracles.

Oracles: explicit column loops and dense solves (torch.linalg.solve / pinv) for the memory solvers, a
long coordinate-descent run and the KKT conditions for the L1 solve, torch.optim.SGD for the Nesterov
step, and hand-written autograd computations for the code update (Choromanska et al. 2019, Alg. 1;
reference equations in /work/shared/reference/algorithms.md, section 1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amstream.blocks import Sign, Step, StraightThrough, blocks_from_sequential
from amstream import functional
from amstream.functional import (CriterionLoss, code_objective, gram_pays, hidden_code_step_cap, linear_view,
                                 linear_weight_grads_, nesterov_step_, spectral_norm_bound, step_cap_may_bind,
                                 proximity_anchor, task_loss_gradient, update_codes)
from amstream.memory import (gauss_seidel_sweep, gauss_seidel_sweep_, gauss_seidel_sweep_reference, memory_solve,
                             proximal_sweep, soft_threshold, symmetric_update_, update_memory_)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread():
    """The matrices here are tiny: intra-op threads only add contention (on a loaded 2-core box
    one 20x20 FISTA run took 50 s with 2 threads and 0.15 s with 1). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------- helpers
def relu_memory(batch: int, d_in: int, d_out: int, *, dtype=F64, zero_cols: int = 0,
                normalize: bool = False, noise: float = 0.1):
    """Memories ``A = a^T a``, ``Bm = c^T a`` from ReLU activations with a bias column of ones.

    The first ``zero_cols`` input columns are all zero (inputs that never fire). ``c`` is a noisy
    linear function of ``a``.
    """
    x = torch.relu(torch.randn(batch, d_in - 1, dtype=dtype))
    x[:, :zero_cols] = 0.0
    a = torch.cat([x, torch.ones(batch, 1, dtype=dtype)], dim=1)
    w_true = torch.randn(d_out, d_in, dtype=dtype)
    c = a @ w_true.T + noise * torch.randn(batch, d_out, dtype=dtype)
    A, Bm = a.T @ a, c.T @ a
    if normalize:
        A, Bm = A / batch, Bm / batch
    return A, Bm


def column_loop_oracle(W, A, Bm, eps=1e-10):
    """Plain Gauss-Seidel over columns: ``w_j += (b_j - W a_j) / (A_jj + eps)`` (no normalization)."""
    W = W.clone()
    for j in range(A.shape[0]):
        W[:, j] = W[:, j] + (Bm[:, j] - W @ A[:, j]) / (A[j, j] + eps)
    return W


def l1_objective(W, A, Bm, lam):
    return (0.5 * torch.trace(W @ A @ W.T) - torch.trace(W @ Bm.T)
            + lam * (torch.diagonal(A) * W.abs().sum(dim=0)).sum())


# ------------------------------------------------------------------- Gauss-Seidel sweep
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d_in", [20, 100, 785])
def test_gauss_seidel_sweep_equals_reference_loop(dtype, d_in):
    A, Bm = relu_memory(256, d_in, 30, dtype=dtype, zero_cols=3)
    assert torch.all(torch.diagonal(A)[:3] == 0)
    W = 0.1 * torch.randn(30, d_in, dtype=dtype)
    fast = gauss_seidel_sweep(W, A, Bm)
    ref = gauss_seidel_sweep_reference(W, A, Bm)
    assert fast.dtype == dtype and fast.shape == W.shape
    assert torch.isfinite(fast).all()
    # 1e-5 relative to the weights' scale (|W| reaches ~30 here; float32 rounding over 785 terms).
    scale = max(1.0, ref.abs().max().item())
    assert (fast - ref).abs().max().item() <= 1e-5 * scale
    # Inputs that never fire leave their weight columns untouched (the fast version up to the
    # rounding of (eps * w) / eps).
    assert torch.equal(ref[:, :3], W[:, :3])
    assert torch.allclose(fast[:, :3], W[:, :3], rtol=1e-6, atol=0)
    # The sweep actually moved the other columns.
    assert not torch.allclose(fast[:, 3:], W[:, 3:])


@pytest.mark.parametrize("d_in", [20, 100])
def test_reference_sweep_equals_plain_column_loop(d_in):
    A, Bm = relu_memory(128, d_in, 7, zero_cols=2)
    W = torch.randn(7, d_in, dtype=F64)
    assert torch.allclose(gauss_seidel_sweep_reference(W, A, Bm), column_loop_oracle(W, A, Bm),
                          rtol=1e-10, atol=1e-10)


def test_gauss_seidel_sweep_does_not_modify_inputs():
    A, Bm = relu_memory(64, 20, 5)
    W = torch.randn(5, 20, dtype=F64)
    W0, A0, B0 = W.clone(), A.clone(), Bm.clone()
    gauss_seidel_sweep(W, A, Bm)
    gauss_seidel_sweep_reference(W, A, Bm)
    assert torch.equal(W, W0) and torch.equal(A, A0) and torch.equal(Bm, B0)


def test_gauss_seidel_sweeps_converge_to_solution():
    A, Bm = relu_memory(200, 20, 5, normalize=True)
    assert torch.linalg.eigvalsh(A).min() > 1e-3  # positive definite
    W = torch.zeros(5, 20, dtype=F64)
    residuals = []
    for _ in range(300):
        W = gauss_seidel_sweep(W, A, Bm)
        residuals.append((W @ A - Bm).norm().item())
    exact = torch.linalg.solve(A, Bm.T).T
    assert residuals[-1] < 1e-9 * Bm.norm().item()
    assert torch.allclose(W, exact, rtol=1e-7, atol=1e-7)
    # The energy 1/2 Tr(W A W^T) - Tr(W B^T) decreases monotonically along Gauss-Seidel sweeps.
    W = torch.zeros(5, 20, dtype=F64)
    energies = [l1_objective(W, A, Bm, 0.0).item()]
    for _ in range(20):
        W = gauss_seidel_sweep(W, A, Bm)
        energies.append(l1_objective(W, A, Bm, 0.0).item())
    assert all(e1 <= e0 + 1e-12 for e0, e1 in zip(energies, energies[1:]))


# --------------------------------------------------------------------------- memory_solve
@pytest.mark.parametrize("d", [100, 300, 785])  # one GEMM below two panels; panels with a ragged last one
def test_symmetric_update_equals_the_full_rank_k_update(d):
    a = torch.randn(50, d, dtype=F64)
    base = torch.randn(30, d, dtype=F64)
    A = base.T @ base
    expected = 0.7 * A + 0.3 * (a.T @ a)
    out = symmetric_update_(A, a, beta=0.7, alpha=0.3)
    assert out is A
    assert torch.allclose(A, expected, rtol=1e-12, atol=1e-12)
    # symmetric to rounding: below the diagonal blocks the lower triangle is the upper one's copy; the
    # diagonal blocks come whole from one GEMM, whose (i, j) and (j, i) sums MKL may add in different
    # orders (on an AMD EPYC they differ in the last bit; a stale lower triangle would differ by O(1))
    assert (A - A.T).abs().max() <= 1e-14 * A.abs().max()


@pytest.mark.parametrize("ridge", [0.0, 1e-12])
def test_memory_solve_equals_dense_solve(ridge):
    A, Bm = relu_memory(300, 40, 8)
    W = memory_solve(A, Bm, ridge=ridge)
    exact = torch.linalg.solve(A, Bm.T).T
    assert W.shape == (8, 40)
    assert torch.allclose(W, exact, rtol=1e-5, atol=1e-5)


def test_memory_solve_singular_consistent_system():
    """Duplicate input columns make A singular; B = C^T X lies in A's row space, so W A = B has
    exact (non-unique) solutions."""
    X = torch.randn(100, 10, dtype=F64)
    X = torch.cat([X, X[:, :3]], dim=1)
    A = X.T @ X
    assert torch.linalg.matrix_rank(A) == 10
    Bm = torch.randn(100, 4, dtype=F64).T @ X
    for ridge in (0.0, 1e-6):
        W = memory_solve(A, Bm, ridge=ridge)
        assert torch.isfinite(W).all()
        rel = ((W @ A - Bm).norm() / Bm.norm()).item()
        assert rel < (1e-8 if ridge == 0.0 else 1e-4)
    # ridge = 0 gives the minimum-norm solution, B A^+.
    assert torch.allclose(memory_solve(A, Bm, ridge=0.0), Bm @ torch.linalg.pinv(A), atol=1e-8)


def test_memory_solve_singular_inconsistent_system_is_least_squares():
    X = torch.randn(100, 10, dtype=F64)
    X = torch.cat([X, X[:, :3]], dim=1)
    A = X.T @ X
    Bm = torch.randn(4, 13, dtype=F64)  # not in A's row space: no exact solution
    W = memory_solve(A, Bm, ridge=0.0)
    assert torch.isfinite(W).all()
    # Normal equations of min ||W A - B||_F: (W A - B) A = 0.
    grad = (W @ A - Bm) @ A
    assert grad.norm() < 1e-8 * Bm.norm() * A.norm()
    assert (W @ A - Bm).norm() <= (Bm @ torch.linalg.pinv(A) @ A - Bm).norm() + 1e-8


def test_memory_solve_ridge_is_scale_free():
    A, Bm = relu_memory(100, 30, 4, zero_cols=2)  # zero rows/cols: singular without the ridge
    W1 = memory_solve(A, Bm)
    W2 = memory_solve(1000.0 * A, 1000.0 * Bm)
    assert torch.isfinite(W1).all()
    assert torch.allclose(W1, W2, rtol=1e-8, atol=1e-10)
    # The ridge is relative to the mean diagonal: W (A + r mean(diag A) I) = B.
    r = 1e-3
    W = memory_solve(A, Bm, ridge=r)
    reg = A + r * torch.diagonal(A).mean() * torch.eye(30, dtype=F64)
    assert torch.allclose(W @ reg, Bm, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------- L1 weight solve
def test_soft_threshold():
    w = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    assert torch.equal(soft_threshold(w, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))


def test_reference_sweep_and_proximal_sweep_decrease_l1_objective():
    A, Bm = relu_memory(200, 20, 5, normalize=True)
    lam = 0.05
    W0 = torch.randn(5, 20, dtype=F64)
    f0 = l1_objective(W0, A, Bm, lam).item()
    # Reference BCD: exact coordinate minimization, so monotone over sweeps.
    W = W0
    values = [f0]
    for _ in range(10):
        W = gauss_seidel_sweep_reference(W, A, Bm, lambda_w=lam)
        values.append(l1_objective(W, A, Bm, lam).item())
    assert all(v1 <= v0 + 1e-10 for v0, v1 in zip(values, values[1:]))
    assert values[-1] < f0
    # FISTA (not monotone per step, but decreases overall).
    for it in (1, 10, 50):
        assert l1_objective(proximal_sweep(W0, A, Bm, lam, iterations=it), A, Bm, lam).item() < f0


def test_proximal_sweep_reaches_minimum_and_kkt():
    A, Bm = relu_memory(200, 20, 5, normalize=True)
    lam = 0.05
    W0 = torch.zeros(5, 20, dtype=F64)
    W_bcd = W0
    for _ in range(500):
        W_bcd = gauss_seidel_sweep_reference(W_bcd, A, Bm, lambda_w=lam)
    f_star = l1_objective(W_bcd, A, Bm, lam).item()
    W = proximal_sweep(W0, A, Bm, lam, iterations=500)
    f = l1_objective(W, A, Bm, lam).item()
    assert abs(f - f_star) <= 1e-4 * abs(f_star)
    assert f >= f_star - 1e-8 * abs(f_star)  # the long BCD run is (numerically) the minimum
    # KKT conditions of the L1 problem at a well-converged FISTA solution.
    W = proximal_sweep(W0, A, Bm, lam, iterations=3000)
    G = W @ A - Bm
    thr = (lam * torch.diagonal(A)).expand_as(W)
    nz = W != 0
    assert torch.allclose(G[nz], -thr[nz] * torch.sign(W[nz]), atol=1e-8)
    assert torch.all(G[~nz].abs() <= thr[~nz] + 1e-8)


def test_proximal_sweep_without_l1_converges_to_dense_solve():
    A, Bm = relu_memory(200, 15, 4, normalize=True)
    W = proximal_sweep(torch.zeros(4, 15, dtype=F64), A, Bm, 0.0, iterations=3000)
    assert torch.allclose(W, torch.linalg.solve(A, Bm.T).T, rtol=1e-6, atol=1e-6)


def test_proximal_sweep_large_lambda_gives_exact_zeros():
    A, Bm = relu_memory(200, 20, 5, normalize=True)
    W0 = torch.randn(5, 20, dtype=F64)
    W = proximal_sweep(W0, A, Bm, 1.0, iterations=1000)
    frac_zero = (W == 0).double().mean().item()
    assert 0.2 < frac_zero < 1.0
    # Larger lambda, more zeros; the reference BCD is sparse too.
    W2 = proximal_sweep(W0, A, Bm, 2.0, iterations=1000)
    assert (W2 == 0).sum() > (W == 0).sum()
    W_ref = W0
    for _ in range(50):
        W_ref = gauss_seidel_sweep_reference(W_ref, A, Bm, lambda_w=1.0)
    assert (W_ref == 0).sum() > 0
    # Huge lambda: the minimizer is exactly zero.
    assert torch.equal(proximal_sweep(W0, A, Bm, 1e6, iterations=5), torch.zeros_like(W0))


# ---------------------------------------------------------------------------- memories
def _batches(n=4, d_in=6, d_out=3):
    sizes = [5, 3, 7, 2][:n]
    return [(torch.randn(b, d_in, dtype=F64), torch.randn(b, d_out, dtype=F64)) for b in sizes]


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_update_memory_accumulates_every_batch(mode):
    """Sum mode holds the sums of a^T a and c^T a over all samples; mean mode the same divided by
    the number of samples, whatever the batch sizes."""
    batches = _batches()
    A, Bm = torch.zeros(6, 6, dtype=F64), torch.zeros(3, 6, dtype=F64)
    count = 0
    for a, c in batches:
        update_memory_(A, Bm, a, c, mode=mode, count=count)
        count += a.shape[0]
    a_all = torch.cat([a for a, _ in batches])
    c_all = torch.cat([c for _, c in batches])
    scale = 1.0 if mode == "sum" else 1.0 / count
    assert count == a_all.shape[0] == 17
    assert torch.allclose(A, scale * a_all.T @ a_all, rtol=1e-12, atol=1e-12)
    assert torch.allclose(Bm, scale * c_all.T @ a_all, rtol=1e-12, atol=1e-12)
    # Both modes give the same solution.
    assert torch.allclose(memory_solve(A, Bm, 0.0),
                          memory_solve(a_all.T @ a_all, c_all.T @ a_all, 0.0), atol=1e-10)


def test_update_memory_forget_mode():
    batches = _batches()
    eta = 0.3
    A = torch.eye(6, dtype=F64)
    Bm = torch.ones(3, 6, dtype=F64)
    A_ref, B_ref = A.clone(), Bm.clone()
    for k, (a, c) in enumerate(batches):
        update_memory_(A, Bm, a, c, mode="forget", count=k, forget=eta)
        A_ref = (1 - eta) * A_ref + eta * (a.T @ a)
        B_ref = (1 - eta) * B_ref + eta * (c.T @ a)
    assert torch.allclose(A, A_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(Bm, B_ref, rtol=1e-12, atol=1e-12)


def test_update_memory_bad_mode_raises_and_leaves_memory():
    A, Bm = torch.zeros(6, 6, dtype=F64), torch.zeros(3, 6, dtype=F64)
    a, c = _batches(1)[0]
    with pytest.raises(ValueError, match="memory mode"):
        update_memory_(A, Bm, a, c, mode="average", count=0)
    assert torch.equal(A, torch.zeros(6, 6, dtype=F64))
    assert torch.equal(Bm, torch.zeros(3, 6, dtype=F64))


# ----------------------------------------------------------------------- proximity anchor
def test_proximity_anchor_official_has_zero_gradient():
    c = torch.randn(4, 5, requires_grad=True)
    anchor = proximity_anchor(c, "official")
    assert anchor.requires_grad  # graph-connected (bug A1 of the reference code)
    with torch.no_grad():
        c.add_(torch.randn(4, 5))
    loss = F.mse_loss(c, anchor)
    assert loss.item() > 0  # the term itself is non-zero ...
    (g,) = torch.autograd.grad(loss, c)
    assert torch.equal(g, torch.zeros_like(g))  # ... but its gradient is exactly zero


def test_proximity_anchor_paper_gradient():
    c = torch.randn(4, 5, dtype=F64, requires_grad=True)
    anchor = proximity_anchor(c, "paper")
    c0 = c.detach().clone()
    assert not anchor.requires_grad
    with torch.no_grad():
        c.add_(torch.randn(4, 5, dtype=F64))
    assert torch.equal(anchor, c0)  # a copy, not a view of c
    (g,) = torch.autograd.grad(F.mse_loss(c, anchor), c)
    expected = 2 * (c.detach() - c0) / c.numel()
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)
    assert g.abs().max() > 0


def test_proximity_anchor_unknown_mode():
    with pytest.raises(ValueError, match="prox"):
        proximity_anchor(torch.randn(3), "detached")


# ------------------------------------------------------------------------------ Nesterov
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_nesterov_step_matches_torch_sgd(momentum):
    Q = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 1.0]], dtype=F64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    start = torch.tensor([0.7, -1.2, 2.0], dtype=F64)
    lr, n_steps = 0.1, 15

    def grad_at(x):
        return Q @ x - b

    p = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=momentum > 0)
    c = start.clone()
    buf = None
    for _ in range(n_steps):
        opt.zero_grad()
        p.grad = grad_at(p.detach())
        opt.step()
        buf = nesterov_step_(c, buf, grad_at(c), lr, momentum)
        assert torch.allclose(c, p.detach(), rtol=1e-14, atol=1e-14)
    # The iterates approach the minimizer Q^{-1} b.
    x_star = torch.linalg.solve(Q, b)
    assert (c - x_star).norm() < (start - x_star).norm()


def test_nesterov_first_step_and_buffer():
    c = torch.tensor([1.0, 2.0], dtype=F64)
    g = torch.tensor([0.5, -1.0], dtype=F64)
    buf = nesterov_step_(c, None, g, lr=0.1, momentum=0.9)
    assert torch.allclose(c, torch.tensor([1.0, 2.0], dtype=F64) - 0.1 * 1.9 * g)
    assert torch.equal(buf, g) and buf is not g
    g2 = torch.tensor([1.0, 1.0], dtype=F64)
    c_before = c.clone()
    buf = nesterov_step_(c, buf, g2, lr=0.1, momentum=0.9)
    buf_expected = 0.9 * g + g2
    assert torch.allclose(buf, buf_expected)
    assert torch.allclose(c, c_before - 0.1 * (g2 + 0.9 * buf_expected))


# -------------------------------------------------------------------------- code objective
@pytest.mark.parametrize("lambda_c", [0.0, 0.2])
def test_code_objective_last_and_hidden(lambda_c):
    c = torch.randn(4, 6, dtype=F64)
    c0 = torch.randn(4, 6, dtype=F64)
    downstream = torch.tensor(1.7, dtype=F64)
    mu = 0.003
    mse = ((c - c0) ** 2).mean()
    l1 = (lambda_c / mu) * c.abs().mean()
    last = code_objective(c, c0, downstream, mu=mu, lambda_c=lambda_c, is_last=True)
    hidden = code_objective(c, c0, downstream, mu=mu, lambda_c=lambda_c, is_last=False)
    assert torch.allclose(last, downstream / mu + mse + l1, rtol=1e-12)
    assert torch.allclose(hidden, downstream + mse + l1, rtol=1e-12)
    assert not torch.allclose(last, hidden)


# ------------------------------------------------------------------------------ update_codes
def _tiny_problem(dtype=F64):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)
    blocks = blocks_from_sequential(model)
    x = torch.randn(4, 6, dtype=dtype)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        codes, _ = blocks.forward_with_codes(x)

    def loss_fn(out):
        return F.cross_entropy(out, y)

    return blocks, codes, loss_fn


def test_update_codes_returns_new_tensors_and_keeps_inputs():
    blocks, codes, loss_fn = _tiny_problem()
    saved = [c.clone() for c in codes]
    new = update_codes(codes, blocks.hidden, blocks.output, loss_fn, mu=0.5, steps=3, lrs=[0.1, 0.1])
    assert len(new) == 2
    for n, c, s in zip(new, codes, saved):
        assert n is not c
        assert n.data_ptr() != c.data_ptr()
        assert torch.equal(c, s)
        assert not n.requires_grad
        assert n.shape == c.shape
    assert not torch.equal(new[1], saved[1])
    assert not torch.equal(new[0], saved[0])


def test_update_codes_zero_steps_is_identity():
    blocks, codes, loss_fn = _tiny_problem()
    new = update_codes(codes, blocks.hidden, blocks.output, loss_fn, mu=0.5, steps=0, lrs=[0.1, 0.1])
    assert all(torch.equal(n, c) for n, c in zip(new, codes))


@pytest.mark.parametrize("prox", ["paper", "official"])
def test_update_codes_decreases_objectives(prox):
    blocks, codes, loss_fn = _tiny_problem()
    mu = 0.5
    new = update_codes(codes, blocks.hidden, blocks.output, loss_fn, mu=mu, steps=5,
                       lrs=[0.05, 0.05], prox=prox)
    with torch.no_grad():
        j_last_old = loss_fn(blocks.output(codes[1])) / mu  # the proximity term is 0 at c0
        j_last_new = loss_fn(blocks.output(new[1])) / mu + F.mse_loss(new[1], codes[1])
        assert j_last_new < j_last_old
        # The lower code's objective, with the updated top code as its target.
        j_low_old = F.mse_loss(blocks.hidden[1](codes[0]), new[1])
        j_low_new = F.mse_loss(blocks.hidden[1](new[0]), new[1]) + F.mse_loss(new[0], codes[0])
        assert j_low_new < j_low_old


def test_update_codes_paper_prox_stays_closer_than_official():
    blocks, codes, loss_fn = _tiny_problem()
    kwargs = dict(mu=1.0, steps=300, lrs=[0.1, 0.1], momentum=0.9)
    paper = update_codes(codes, blocks.hidden, blocks.output, loss_fn, prox="paper", **kwargs)
    official = update_codes(codes, blocks.hidden, blocks.output, loss_fn, prox="official", **kwargs)
    for p, o, c in zip(paper, official, codes):
        assert (p - c).norm() < 0.5 * (o - c).norm()


def test_update_codes_is_top_down():
    """One step: the top code moves on CE/mu; the lower code then moves towards the *new* top code.
    With the old top code as target its gradient would be exactly zero (c_2 = f_2(c_1))."""
    blocks, codes, loss_fn = _tiny_problem()
    mu, lrs, m = 0.5, [0.2, 0.1], 0.9
    new = update_codes(codes, blocks.hidden, blocks.output, loss_fn, mu=mu, steps=1, lrs=lrs,
                       momentum=m, prox="paper")
    # Manual top code: first Nesterov step is c - lr (1 + m) g; the prox gradient is 0 at c0.
    c2 = codes[1].clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(loss_fn(blocks.output(c2)) / mu, c2)
    top = codes[1] - lrs[1] * (1 + m) * g2
    assert torch.allclose(new[1], top, rtol=1e-12, atol=1e-14)
    # Manual lower code with the new top code as target.
    c1 = codes[0].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.mse_loss(blocks.hidden[1](c1), top), c1)
    low = codes[0] - lrs[0] * (1 + m) * g1
    assert torch.allclose(new[0], low, rtol=1e-12, atol=1e-14)
    assert not torch.equal(new[0], codes[0])
    # Sanity of the claim in the docstring: the old target gives a zero gradient.
    (g_old,) = torch.autograd.grad(F.mse_loss(blocks.hidden[1](c1), codes[1]), c1)
    assert torch.equal(g_old, torch.zeros_like(g_old))


def test_update_codes_lambda_c_shrinks_codes():
    blocks, codes, loss_fn = _tiny_problem()
    kwargs = dict(mu=1.0, steps=20, lrs=[0.1, 0.1], prox="paper")
    plain = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **kwargs)
    sparse = update_codes(codes, blocks.hidden, blocks.output, loss_fn, lambda_c=2.0, **kwargs)
    assert sparse[1].abs().sum() < plain[1].abs().sum()


# ------------------------------------------------- closed-form fast path (fast=True) vs autograd
def _fast_path_models():
    return {
        "relu": (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)),
                 (4, 6)),
        "tanh-sigmoid-leaky": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(),
                                             nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3)), (4, 6)),
        "straight-through": (nn.Sequential(nn.Linear(6, 5), Sign(), nn.Linear(5, 4), Step(), nn.Linear(4, 4),
                                           StraightThrough(nn.Hardtanh()), nn.Linear(4, 3)), (4, 6)),
        "conv-flatten": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5),
                                       nn.Sigmoid(), nn.Linear(5, 3)), (4, 1, 6, 6)),
        "flatten-then-act": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Tanh(), nn.Linear(32, 3)),
                             (4, 1, 6, 6)),
        "batchnorm-logsoftmax": (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                                               nn.Hardtanh(), nn.Linear(4, 3), nn.LogSoftmax(dim=1)), (4, 6)),
    }


@pytest.mark.parametrize("name", list(_fast_path_models()))
@pytest.mark.parametrize("prox, lambda_c", [("paper", 0.0), ("official", 0.0), ("paper", 0.3)],
                         ids=["paper", "official", "paper-l1"])
def test_update_codes_fast_path_equals_autograd(name, prox, lambda_c):
    model, x_shape = _fast_path_models()[name]
    model = model.to(F64).eval()
    blocks = blocks_from_sequential(model)
    x = torch.randn(*x_shape, dtype=F64)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        codes, out = blocks.forward_with_codes(x)
    if name == "batchnorm-logsoftmax":
        def loss_fn(o):
            return F.nll_loss(o, y)
    else:
        def loss_fn(o):
            return F.cross_entropy(o, y)
    kwargs = dict(mu=0.7, steps=4, lrs=[0.2] * len(codes), momentum=0.9, prox=prox, lambda_c=lambda_c)
    fast = update_codes(codes, blocks.hidden, blocks.output, loss_fn, fast=True, **kwargs)
    slow = update_codes(codes, blocks.hidden, blocks.output, loss_fn, fast=False, **kwargs)
    for f, s_, c in zip(fast, slow, codes):
        assert f.shape == c.shape
        assert torch.allclose(f, s_, rtol=1e-10, atol=1e-12)
        assert not torch.equal(s_, c)


def test_linear_view_selects_closed_form_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 4),
                          nn.Flatten(), Sign(), nn.Linear(4, 2), nn.LogSoftmax(dim=1))
    b = blocks_from_sequential(model)
    views = [linear_view(block) for block in b]
    assert views[0] is not None and views[0].act is None and views[0].linear is model[0]
    assert views[1] is None  # BatchNorm in the code layer
    assert views[2] is not None and isinstance(views[2].act, nn.ReLU) and views[2].linear is model[5]
    assert views[3] is None  # Dropout
    assert views[4] is None  # ELU: no closed form registered
    assert views[5] is None  # output block with a post (LogSoftmax)
    conv = blocks_from_sequential(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 2)))
    assert linear_view(conv[0]) is None
    v = linear_view(conv[1])
    assert v is not None and v.flatten and v.act is None
    c = torch.randn(3, 1, 2, 2)
    assert torch.equal(v.inputs(c), c.flatten(1))


def test_task_loss_gradient_equals_autograd():
    out = torch.randn(5, 3, dtype=F64)
    y = torch.tensor([0, 2, 1, 1, 0])
    g = task_loss_gradient(out, lambda o: F.cross_entropy(o, y))  # a plain function: autograd
    # Oracle: d CE / d logits = (softmax - onehot) / B.
    expected = (torch.softmax(out, 1) - F.one_hot(y, 3).to(F64)) / 5
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-14)
    assert not out.requires_grad


def _autograd(out, loss_fn):
    out = out.detach().requires_grad_(True)
    return torch.autograd.grad(loss_fn(out), out)[0]


@pytest.mark.parametrize("case", ["ce", "ce-per-position", "mse"])
def test_criterion_loss_closed_form_equals_autograd(case):
    if case == "ce":
        criterion, out, y = nn.CrossEntropyLoss(), torch.randn(6, 4, dtype=F64), torch.randint(0, 4, (6,))
    elif case == "ce-per-position":  # a sequence model's outputs (B, C, T) and labels (B, T)
        criterion, out, y = nn.CrossEntropyLoss(), torch.randn(3, 5, 7, dtype=F64), torch.randint(0, 5, (3, 7))
    else:
        criterion, out, y = nn.MSELoss(), torch.randn(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    loss_fn = CriterionLoss(criterion, y)
    closed = loss_fn.gradient(out)
    assert closed is not None, "the closed form must apply here"
    assert torch.allclose(closed, _autograd(out, loss_fn), rtol=1e-12, atol=1e-15)
    assert torch.equal(task_loss_gradient(out, loss_fn), closed)
    assert torch.equal(loss_fn(out), criterion(out, y))


@pytest.mark.parametrize("criterion, target", [
    (nn.CrossEntropyLoss(label_smoothing=0.1), torch.tensor([0, 2, 1])),
    (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=F64)), torch.tensor([0, 2, 1])),
    (nn.CrossEntropyLoss(), torch.softmax(torch.randn(3, 3, dtype=F64), 1)),  # soft labels
    (nn.MSELoss(reduction="sum"), torch.randn(3, 3, dtype=F64)),
    (nn.SmoothL1Loss(), torch.randn(3, 3, dtype=F64)),
])
def test_criterion_loss_without_closed_form_uses_autograd(criterion, target):
    loss_fn = CriterionLoss(criterion, target)
    out = torch.randn(3, 3, dtype=F64)
    assert loss_fn.gradient(out) is None
    assert torch.allclose(task_loss_gradient(out, loss_fn), _autograd(out, loss_fn), rtol=1e-12)


@pytest.mark.parametrize("bias, lambda_w", [(True, 0.0), (False, 0.0), (True, 0.05)])
def test_linear_weight_grads_equal_autograd(bias, lambda_w):
    lin = nn.Linear(6, 4, bias=bias).to(F64)
    view = linear_view(blocks_from_sequential(nn.Sequential(lin))[0])
    a = torch.randn(5, 6, dtype=F64)
    target = torch.randn(5, 4, dtype=F64)
    loss = F.mse_loss(lin(a), target) + lambda_w * lin.weight.abs().mean()
    expected = torch.autograd.grad(loss, list(lin.parameters()))
    with torch.no_grad():
        g_out = 2.0 * (lin(a) - target) / target.numel()
    linear_weight_grads_(view, a, g_out, lambda_w)
    assert torch.allclose(lin.weight.grad, expected[0], rtol=1e-12, atol=1e-14)
    if bias:
        assert torch.allclose(lin.bias.grad, expected[1], rtol=1e-12, atol=1e-14)


def _relu_memories(n: int, d_in: int, d_out: int, dead: int):
    """Memories ``A = a^T a``, ``B = c^T a`` of ``n`` ReLU inputs (input ``dead`` never fires)."""
    torch.manual_seed(0)
    a = torch.relu(torch.randn(n, d_in, dtype=F64))
    a[:, dead] = 0.0
    return a.T @ a, torch.randn(n, d_out, dtype=F64).T @ a


def test_damped_sweep_equals_the_column_loop_on_the_damped_system():
    """gauss_seidel_sweep(shift=lam, anchor=W0) is a Gauss-Seidel sweep on W (A + lam I) = B + lam W0,
    also over several sweeps with the anchor held fixed."""
    A, Bm = _relu_memories(300, 50, 7, dead=7)
    W0 = torch.randn(7, 50, dtype=F64)
    lam = 2.0
    fast, loop = W0.clone(), W0.clone()
    for _ in range(3):
        fast = gauss_seidel_sweep(fast, A, Bm, 1e-10, shift=lam, anchor=W0)
        loop = gauss_seidel_sweep_reference(loop, A + lam * torch.eye(50, dtype=F64), Bm + lam * W0, 1e-10)
    torch.testing.assert_close(fast, loop, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fast, gauss_seidel_sweep(W0, A, Bm))  # the damping did change the sweep


@pytest.mark.parametrize("blocks", [1, 3])
def test_per_column_damped_sweep_equals_the_column_loop(blocks):
    """A vector shift (one lam per column) is the sweep on W (A + diag(lam)) = B + W0 diag(lam)."""
    A, Bm = _relu_memories(300, 50, 7, dead=7)
    W0 = torch.randn(7, 50, dtype=F64)
    lam = 0.5 * A.diagonal()
    fast = gauss_seidel_sweep(W0, A, Bm, 1e-10, shift=lam, anchor=W0, blocks=blocks)
    loop = gauss_seidel_sweep_reference(W0, A + torch.diag(lam), Bm + W0 * lam, 1e-10)
    torch.testing.assert_close(fast, loop, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fast, gauss_seidel_sweep(W0, A, Bm, 1e-10, shift=lam.mean(), anchor=W0))


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
def test_blocked_in_place_sweep_equals_the_column_loop(blocks):
    """Any number of column blocks gives the same sweep as the reference loop, updating W in place."""
    A, Bm = _relu_memories(200, 61, 9, dead=5)
    W = torch.randn(9, 61, dtype=F64)
    expected = gauss_seidel_sweep_reference(W, A, Bm)
    result = gauss_seidel_sweep_(W, A, Bm, blocks=blocks)
    assert result is W
    torch.testing.assert_close(W, expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- code step-size cap
@pytest.mark.parametrize("shape", [(100, 100), (10, 100), (100, 784), (300, 50), (1, 7), (300, 300)])
def test_spectral_norm_bound_is_a_tight_upper_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=F64) * 0.1
    exact = torch.linalg.matrix_norm(w, 2)
    bound = spectral_norm_bound(w)
    n = min(shape)
    assert exact * (1 - 1e-12) <= bound <= exact * n ** (1 / 16)
    # the code steps' W^T W gives the same bound (the same nonzero eigenvalues as W W^T)
    torch.testing.assert_close(spectral_norm_bound(w, gram=w.T @ w), bound, rtol=1e-12, atol=0)
    # A dominant direction (trained weights' spectra decay): the bound is nearly exact.
    w[0] *= 50
    assert torch.isclose(spectral_norm_bound(w), torch.linalg.matrix_norm(w, 2), rtol=1e-3)


def test_spectral_norm_bound_of_zero_weights_is_zero():
    assert spectral_norm_bound(torch.zeros(5, 3)) == 0


@pytest.mark.parametrize("fast", [True, False])
def test_capped_code_steps_stay_stable_when_the_next_layer_grows(fast):
    """A hidden code whose next layer has large weights: a fixed step diverges, the capped one
    decreases the code's objective (sum reduction, as AM-mem)."""
    torch.manual_seed(0)
    blocks, codes, loss_fn = _tiny_problem()
    with torch.no_grad():
        blocks.hidden[1].weight_layer.weight.mul_(20.0)
        codes, _ = blocks.forward_with_codes(torch.randn(4, 6, dtype=F64))
    kwargs = dict(mu=0.5, steps=5, lrs=[0.3, 0.01], reduction="sum", fast=fast)
    target = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **kwargs)[1]

    def objective(c):  # the lower code's objective with the (same) updated top code as target
        return (blocks.hidden[1](c) - target).square().sum() + (c - codes[0]).square().sum()

    with torch.no_grad():
        start = objective(codes[0])
        free = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **kwargs)[0]
        capped = update_codes(codes, blocks.hidden, blocks.output, loss_fn, cap_steps=True, **kwargs)[0]
        assert objective(free) > 100 * start  # the fixed step overshoots and grows
        assert objective(capped) < start
    view = linear_view(blocks.hidden[1])
    cap = hidden_code_step_cap(view, codes[0], "sum")
    assert 0 < cap < 0.3


def test_code_step_cap_is_inactive_below_it():
    blocks, codes, loss_fn = _tiny_problem()
    kwargs = dict(mu=0.5, steps=3, lrs=[0.01, 0.01], reduction="sum")
    free = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **kwargs)
    capped = update_codes(codes, blocks.hidden, blocks.output, loss_fn, cap_steps=True, **kwargs)
    for a, b in zip(free, capped):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def _wide_problem(width=128, batch=200, scale=1.0):
    """A 20-width-width-3 ReLU MLP whose middle weight is big enough for the cap's screening."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))
    with torch.no_grad():
        model[2].weight.mul_(scale)
    blocks = blocks_from_sequential(model.to(F64))
    x, y = torch.randn(batch, 20, dtype=F64), torch.randint(0, 3, (batch,))
    with torch.no_grad():
        codes, _ = blocks.forward_with_codes(x)
    return blocks, codes, lambda out: F.cross_entropy(out, y)


def test_code_step_cap_skips_its_bound_where_the_frobenius_norm_shows_it_cannot_bind(monkeypatch):
    """AM-Adam's mean-reduced objective: ||W||_F already gives a cap far above the step size, so the
    bound's matrix products (4 n^3 multiply-adds) are not done, and the steps are the uncapped ones."""
    blocks, codes, loss_fn = _wide_problem()
    view = linear_view(blocks.hidden[1])
    exact_cap = hidden_code_step_cap(view, codes[0], "mean")
    assert exact_cap > 0.3
    kwargs = dict(mu=0.5, steps=3, lrs=[0.3, 0.3], reduction="mean")
    free = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **kwargs)

    def no_bound(weight, power=16):
        raise AssertionError("the spectral norm bound was computed although the cap cannot bind")

    monkeypatch.setattr(functional, "spectral_norm_bound", no_bound)
    assert not step_cap_may_bind(view, 200, "mean", 0.3)
    for cap_steps in (True, (False, False)):  # screened by update_codes, or by its caller
        capped = update_codes(codes, blocks.hidden, blocks.output, loss_fn, cap_steps=cap_steps, **kwargs)
        for a, b in zip(free, capped):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("below", [False, True], ids=["binding", "just-below"])
def test_code_step_cap_screening_keeps_the_cap_where_it_may_bind(below):
    """Sum reduction and large weights (AM-mem's case): the screen cannot rule the cap out, both
    where it binds and where the step size is just below it (the Frobenius norm's cap is lower
    still: it cannot tell), and the steps are capped as without the screen."""
    blocks, codes, loss_fn = _wide_problem(scale=10.0)
    view = linear_view(blocks.hidden[1])
    exact_cap = float(hidden_code_step_cap(view, codes[0], "sum"))
    lr = 0.99 * exact_cap if below else 0.3
    assert exact_cap < 0.3
    assert step_cap_may_bind(view, 200, "sum", lr)
    assert not step_cap_may_bind(view, 200, "sum", 1e-9)  # far below, the screen sees it
    kwargs = dict(mu=0.5, steps=3, lrs=[lr, lr], reduction="sum")
    by_hand = update_codes(codes, blocks.hidden, blocks.output, loss_fn, **{**kwargs, "lrs": [min(lr, exact_cap), lr]})
    capped = update_codes(codes, blocks.hidden, blocks.output, loss_fn, cap_steps=True, **kwargs)
    for a, b in zip(by_hand, capped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_gram_form_of_the_code_steps_equals_autograd():
    """Full batches take the hidden code's steps by its next weight's Gram matrix; the codes are
    autograd's (float64), with and without the next layer's bias."""
    blocks, codes, loss_fn = _wide_problem(width=16, batch=64)
    view = linear_view(blocks.hidden[1])
    assert gram_pays(view, batch=64, steps=4) and not gram_pays(view, batch=1, steps=4)
    for bias in (True, False):
        if not bias:
            blocks.hidden[1].weight_layer.bias = None
        kwargs = dict(mu=0.7, steps=4, lrs=[0.2, 0.2], momentum=0.9, lambda_c=0.1, reduction="sum")
        fast = update_codes(codes, blocks.hidden, blocks.output, loss_fn, fast=True, **kwargs)
        slow = update_codes(codes, blocks.hidden, blocks.output, loss_fn, fast=False, **kwargs)
        for f, s_, c in zip(fast, slow, codes):
            torch.testing.assert_close(f, s_, rtol=1e-10, atol=1e-12)
            assert not torch.equal(s_, c)


def test_gram_form_pays_for_full_batches_only():
    """The multiply-add counts of gram_pays' docstring: the shared protocol's hidden layer at batch
    200 and a 4096-wide one at batch 2048 take the Gram form, one sample or a wide input does not."""
    def view(m, n):
        return linear_view(blocks_from_sequential(nn.Sequential(nn.Linear(3, n), nn.ReLU(), nn.Linear(n, m))).output)

    assert gram_pays(view(100, 100), batch=200, steps=5)
    assert gram_pays(view(4096, 4096), batch=2048, steps=5)
    assert not gram_pays(view(100, 100), batch=1, steps=5)
    assert not gram_pays(view(10, 784), batch=200, steps=5)
