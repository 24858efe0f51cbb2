"""AM-mem's co-activation memories and the solves of ``W A = B`` (pure functions).

J. Mairal, F. Bach, J. Ponce, G. Sapiro, "Online dictionary learning for sparse coding", ICML 2009,
as used by AM-mem in Choromanska et al., "Beyond Backprop", ICML 2019. For a layer with inputs ``a``
(``(B, d_in)``, a constant 1 column for the bias) and codes ``c`` (``(B, d_out)``), the memories are
``A (d_in, d_in)`` and ``Bm (d_out, d_in)``, and the weights ``W (d_out, d_in)`` minimize
``1/2 Tr(W A W^T) - Tr(W Bm^T) [+ lambda_w sum_j A_jj ||w_j||_1]``.
"""
from __future__ import annotations

import torch

__all__ = [
    "update_memory_",
    "memory_weights",
    "symmetric_update_",
    "gauss_seidel_sweep",
    "gauss_seidel_sweep_",
    "gauss_seidel_sweep_reference",
    "memory_solve",
    "proximal_sweep",
    "soft_threshold",
]


@torch.no_grad()
def update_memory_(A: torch.Tensor, Bm: torch.Tensor, a: torch.Tensor, c: torch.Tensor, *,
                   mode: str, count: int, forget: float = 0.0,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Accumulate co-activations ``A <- a^T a``, ``Bm <- c^T a`` in place, or into ``out = (A', Bm')``
    (then ``A`` and ``Bm`` are unchanged).

    Modes: ``"sum"`` running sums (the reference default, eta = 0); ``"mean"`` running means over the
    ``count`` samples seen before this batch (same solution, bounded magnitudes); ``"forget"``
    exponential forgetting ``A <- (1 - eta) A + eta a^T a`` (reference eta > 0).
    """
    keep, new = memory_weights(mode, count, a.shape[0], forget)
    A_out, B_out = out if out is not None else (A, Bm)
    # One fused scale-and-accumulate GEMM each, no temporaries; A's only for its upper triangle
    # when it is wide (the lower one is its transpose).
    symmetric_update_(A, a, beta=keep, alpha=new, out=A_out)
    torch.addmm(Bm, c.T, a, beta=keep, alpha=new, out=B_out)


def memory_weights(mode: str, count: int, batch: int, forget: float = 0.0) -> tuple[float, float]:
    """``(keep, new)`` of a memory update ``M <- keep M + new * (batch's sum of outer products)``
    (:func:`update_memory_`'s modes; ``count``: samples seen before this batch of ``batch``)."""
    if mode == "sum":
        return 1.0, 1.0
    if mode == "mean":
        total = count + batch
        return count / total, 1.0 / total
    if mode == "forget":
        return 1.0 - forget, forget
    raise ValueError(f"memory mode must be 'sum', 'mean' or 'forget', got {mode!r}")


#: row-panel height of :func:`symmetric_update_` (measured on one CPU thread at d = 785, batch 200:
#: 1.61 ms for the full GEMM, 1.18-1.25 ms with panels of 100-130 rows)
SYMMETRIC_PANEL = 128


def symmetric_update_(A: torch.Tensor, a: torch.Tensor, *, beta: float, alpha: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``A <- beta A + alpha a^T a`` in place for a symmetric ``A`` (or into ``out``, ``A`` unchanged),
    computing only the upper triangle and the diagonal blocks.

    Torch has no symmetric rank-k update (BLAS syrk), so the rows are cut into panels of
    :data:`SYMMETRIC_PANEL`: panel ``I`` updates ``A[I, I_start:]`` with one GEMM (the diagonal
    block and everything to its right), and the block below the diagonal is copied from its
    transpose. For d columns this does about half the multiply-adds plus a copy of the lower
    triangle. Below two panels it is the plain GEMM. The diagonal blocks are symmetric to rounding
    only: a GEMM may sum ``(i, j)`` and ``(j, i)`` in different orders (MKL on an AMD EPYC does)."""
    out = A if out is None else out
    d = A.shape[0]
    if d < 2 * SYMMETRIC_PANEL:
        return torch.addmm(A, a.T, a, beta=beta, alpha=alpha, out=out)
    if torch.compiler.is_compiling():
        # Traced, writes into panels of a tensor become whole-matrix scatters (6 ms a step at
        # 785 x 785) and the plain GEMM needs a copy into ``out`` (2.6 ms with it against 1.2 ms
        # for the panels): the panels run as one opaque operator that writes ``out`` in place.
        if out is A:
            return out.copy_(torch.addmm(A, a.T, a, beta=beta, alpha=alpha))
        _symmetric_update_into(out, A, a, float(beta), float(alpha))
        return out
    return _symmetric_panels(out, A, a, beta, alpha)


@torch.library.custom_op("amstream::symmetric_update_into", mutates_args=("out",))
def _symmetric_update_into(out: torch.Tensor, A: torch.Tensor, a: torch.Tensor, beta: float,
                           alpha: float) -> None:
    """:func:`symmetric_update_` into a distinct ``out`` as an operator of its own, so that a compiled
    graph calls the row panels as they run eagerly (``out`` must not alias ``A``)."""
    _symmetric_panels(out, A, a, beta, alpha)


@_symmetric_update_into.register_fake
def _(out: torch.Tensor, A: torch.Tensor, a: torch.Tensor, beta: float, alpha: float) -> None:
    return None


def _symmetric_panels(out: torch.Tensor, A: torch.Tensor, a: torch.Tensor, beta: float,
                      alpha: float) -> torch.Tensor:
    d = A.shape[0]
    for start in range(0, d, SYMMETRIC_PANEL):
        stop = min(start + SYMMETRIC_PANEL, d)
        torch.addmm(A[start:stop, start:], a[:, start:stop].T, a[:, start:], beta=beta, alpha=alpha,
                    out=out[start:stop, start:])
        if stop < d:
            out[stop:, start:stop].copy_(out[start:stop, stop:].T)
    return out


def _sweep_blocks(d: int) -> int:
    """Column blocks of a sweep: one below 512 columns, then one per 256 (at most 8)."""
    return max(1, min(8, d // 256))


def gauss_seidel_sweep_(W: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, eps: float = 1e-10,
                        shift: torch.Tensor | float = 0.0, anchor: torch.Tensor | None = None,
                        blocks: int | None = None) -> torch.Tensor:
    """One block-coordinate (Gauss-Seidel) sweep over the columns of ``W`` for ``W A = Bm``, in
    place, as a few GEMMs and triangular solves instead of a loop over columns.

    The reference column loop is ``w_j += (b_j - W a_j) / (A_jj + eps)`` for j = 1..d, where ``W``
    already holds the updated columns k < j. Split the columns into blocks; for block ``J``, with
    ``W`` holding the updated blocks before ``J`` and the old ones from ``J`` on, the loop over
    the columns of ``J`` is exactly

        W_J <- W_J + (Bm_J - W A_{:,J}) (D_J + eps I + U_JJ)^{-1}

    (``A_JJ = L_JJ + D_J + U_JJ``): one GEMM for the residual and one right-sided triangular
    solve on the diagonal block. With one block this is ``W_new (D + eps I + U) = Bm - W_old L +
    eps W_old``. Blocks cut the flops from 3 m d^2 (a dense GEMM and a full triangular solve) to
    (2 + 1/K) m d^2 for K blocks.

    With ``shift`` = lam > 0 it is the same sweep for the damped system ``W (A + lam I) = Bm + lam
    anchor`` (``anchor`` defaults to ``W``, whose proximal term then adds nothing to the residual):
    only the diagonal of the triangular blocks moves, so damping costs nothing extra. ``shift`` may
    also be one lam per column (a vector of length d): the system is then ``W (A + diag(lam)) = Bm
    + anchor diag(lam)``.
    """
    d = A.shape[0]
    k = blocks or _sweep_blocks(d)
    size = -(-d // k)
    per_column = isinstance(shift, torch.Tensor) and shift.ndim == 1
    for start in range(0, d, size):
        stop = min(start + size, d)
        lam = shift[start:stop] if per_column else shift
        residual = torch.addmm(Bm[:, start:stop], W, A[:, start:stop], alpha=-1.0)
        if anchor is not None and anchor is not W:
            residual.add_(lam * (anchor[:, start:stop] - W[:, start:stop]))
        diagonal_block = A[start:stop, start:stop].clone()
        diagonal_block.diagonal().add_(eps + lam)
        W[:, start:stop] += torch.linalg.solve_triangular(diagonal_block, residual, upper=True, left=False)
    return W


def gauss_seidel_sweep(W: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, eps: float = 1e-10,
                       shift: torch.Tensor | float = 0.0, anchor: torch.Tensor | None = None,
                       blocks: int | None = None) -> torch.Tensor:
    """:func:`gauss_seidel_sweep_` on a copy: returns the swept weights, ``W`` is unchanged."""
    return gauss_seidel_sweep_(W.clone(), A, Bm, eps, shift, anchor=W if anchor is None else anchor,
                               blocks=blocks)


def soft_threshold(w: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0.0)


@torch.no_grad()
def gauss_seidel_sweep_reference(W: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                                 eps: float = 1e-10, lambda_w: float = 0.0) -> torch.Tensor:
    """The reference code's column-by-column BCD sweep (``altmin.BCD``, one iteration).

    A Python loop over columns, kept as the oracle for :func:`gauss_seidel_sweep` and as the
    baseline in ``scripts/bench.py``. Like the reference, it accumulates the update size with one
    ``.item()`` per column and tests convergence after the sweep. With ``lambda_w > 0`` each column
    is soft-thresholded.
    """
    W = W.clone()
    d = torch.diagonal(A) + eps
    A_n = A / d
    B_n = Bm / d
    W_before = W.clone()
    error = 0.0
    for j in range(A.shape[0]):
        delta = B_n[:, j] - W @ A_n[:, j]
        W[:, j] += delta
        if lambda_w > 0:
            W[:, j] = soft_threshold(W[:, j], lambda_w)
        error += delta.abs().mean().item()
    (W - W_before).abs().max().item()  # the reference's convergence test after each sweep
    return W


def memory_solve(A: torch.Tensor, Bm: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The converged BCD fixed point: ``W = Bm (A + r I)^{-1}`` by a Cholesky solve.

    ``ridge`` is relative to the mean diagonal of ``A`` (so it is scale-free) and keeps the system
    positive definite when some inputs never vary (MNIST's constant border pixels are collinear
    with the bias column: with 1e-6 the float32 factorization fails there). Falls back to a
    least-squares solve, about 10x slower, if the Cholesky factorization fails.
    """
    d = A.shape[0]
    scale = torch.diagonal(A).mean().clamp_min(torch.finfo(A.dtype).tiny)
    reg = A + (ridge * scale) * torch.eye(d, dtype=A.dtype, device=A.device)
    factor, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0:
        return torch.cholesky_solve(Bm.T, factor).T
    if not bool(torch.isfinite(reg).all()):
        # Non-finite memories: return NaN so the learner's finiteness check rolls the step back.
        return torch.full_like(Bm, float("nan"))
    return torch.linalg.lstsq(reg, Bm.T).solution.T


def proximal_sweep(W: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, lambda_w: float,
                   iterations: int = 10) -> torch.Tensor:
    """L1-regularized memory solve by FISTA, warm-started from ``W``.

    Minimizes ``1/2 Tr(W A W^T) - Tr(W Bm^T) + lambda_w * sum_j A_jj ||w_j||_1`` (the reference BCD's
    objective, whose soft threshold is ``lambda_w`` in units of ``A_jj``). The step is ``1/Lip`` with
    Lip a Gershgorin bound on the largest eigenvalue of ``A`` (safe, no eigen-decomposition).
    """
    lip = A.abs().sum(dim=1).max().clamp_min(torch.finfo(A.dtype).tiny)
    step = 1.0 / lip
    threshold = lambda_w * torch.diagonal(A) * step  # per column j
    x_prev = W
    z = W
    t = 1.0
    for _ in range(iterations):
        x = soft_threshold(z - step * (z @ A - Bm), threshold)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        z = x + ((t - 1.0) / t_next) * (x - x_prev)
        x_prev, t = x, t_next
    return x_prev
