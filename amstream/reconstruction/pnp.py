"""Plug-and-play ADMM, full and incremental (Sun, Wu, Xu, Wohlberg, Kamilov, IEEE TCI 7, 2021).

The problem is ``min_x g(x) + r(x)`` with the data term ``g(x) = 1/2 ||A x - y||^2`` and a prior
``r`` known only through a denoiser ``D_sigma`` that stands in for its proximal step. With the
scaled dual ``s``, one iteration of PnP-ADMM is

    z^k = prox_{gamma g}(x^{k-1} - s^{k-1})      (data consistency)
    x^k = D_sigma(z^k + s^{k-1})                 (the prior)
    s^k = s^{k-1} + z^k - x^k                    (dual step)

The incremental variant (IPA) replaces ``g`` by the term of one random block of measurements,
``g_i(x) = b/2 ||A_i x - y_i||^2`` with ``b`` blocks (so ``E_i[g_i] = g`` and ``gamma`` means the
same thing for every ``b``); a step may use a mini-batch ``B`` of blocks, ``g_B = b/|B| sum_{i in B}
1/2 ||A_i x - y_i||^2``. Its cost and memory per iteration depend on the block, not on the number
of measurements. No code of the paper was found; the choices made here:

- the scaling of ``g_i`` above; blocks drawn uniformly without replacement within a mini-batch
  (``order="random"``) or in turn (``order="cyclic"``), from the reconstruction's own generator,
  so a run is reproducible and resumes exactly;
- the proximal step is the operator's: exact for compressive sensing (cached Cholesky factors),
  a fixed number of conjugate-gradient steps warm-started at its argument otherwise;
- ``x^0`` is the least-squares-scaled back-projection ``c A^T y`` when the measurements are given,
  zero in the streaming mode; ``s^0 = 0``;
- records: the fixed-point residual ``||x^k - x^{k-1}|| / ||x^{k-1}||``, the primal residual
  ``||z^k - x^k|| / sqrt(n)``, the PSNR against a reference image when one is given, the time.

Streaming mode (new): without stored measurements, :meth:`PnPADMM.observe` ``(i, y_i)`` runs one
iteration on block ``i`` as it arrives and keeps nothing of it, so memory stays that of one block
whatever the length of the stream.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .images import psnr
from .operators import BlockOperator

__all__ = ["PnPADMM", "ReconstructionStep", "back_projection"]

MODES = ("full", "incremental")
ORDERS = ("random", "cyclic")


@dataclass
class ReconstructionStep:
    """What one PnP-ADMM iteration did.

    Attributes:
        iteration: the iteration's number (1 for the first).
        blocks: the measurement blocks its data step used.
        fixed_point_residual: ``||x^k - x^{k-1}|| / ||x^{k-1}||``.
        primal_residual: ``||z^k - x^k|| / sqrt(n)`` (root mean square).
        psnr: of ``x^k`` against the reference image in dB, or None without one.
        seconds: wall time of the iteration.
    """

    iteration: int
    blocks: tuple[int, ...]
    fixed_point_residual: float
    primal_residual: float
    psnr: float | None = None
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)


def back_projection(operator: BlockOperator, ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """``c A^T y`` with ``c = <A A^T y, y> / ||A A^T y||^2``, the scale that best fits the measurements."""
    bp = operator.adjoint(ys)
    projected = operator.forward(bp)
    num = sum(torch.vdot(p.flatten(), operator._as_input(y).flatten()) for p, y in zip(projected, ys))
    den = sum(torch.vdot(p.flatten(), p.flatten()) for p in projected)
    return bp * (num / den) if float(den) > 0 else bp


class PnPADMM:
    """A plug-and-play ADMM reconstruction; :meth:`step` runs one iteration.

    Args:
        operator: the forward operator and its blocks.
        denoiser: ``denoiser(image, sigma) -> image`` (:mod:`amstream.reconstruction.denoisers`).
        measurements: one tensor per block (checked: shapes, finiteness), or None for the
            streaming mode (:meth:`observe` only).
        gamma: the data step's weight (the ADMM penalty's inverse).
        sigma: the denoiser's noise level (the prior's strength); checked against the denoiser.
        mode: ``"full"`` (every block each iteration: PnP-ADMM) or ``"incremental"`` (IPA).
        order: how the incremental mode picks blocks: ``"random"`` or ``"cyclic"``.
        blocks_per_step: blocks per incremental iteration (the mini-batch).
        x0: the starting image (default: the scaled back-projection, zero when streaming).
        reference: the ground truth, for the PSNR records (never used by the iteration).
        seed: seed of the block draws.
    """

    def __init__(self, operator: BlockOperator, denoiser, measurements: Sequence[torch.Tensor] | None = None, *,
                 gamma: float, sigma: float, mode: str = "incremental", order: str = "random",
                 blocks_per_step: int = 1, x0: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                 seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        if (isinstance(blocks_per_step, bool) or not isinstance(blocks_per_step, int)
                or not 1 <= blocks_per_step <= operator.n_blocks):
            raise ValueError(f"blocks_per_step must be an integer in 1..{operator.n_blocks} (the operator's blocks), "
                             f"got {blocks_per_step!r}")
        self.sigma = denoiser.check_sigma(sigma)
        if measurements is not None:
            measurements = list(measurements)
            operator.check_measurements(measurements)
            measurements = [operator._as_input(y) for y in measurements]
        for name, image in (("x0", x0), ("reference", reference)):
            if image is not None:
                operator.check_image(image, name)
                if not bool(torch.isfinite(image).all()):
                    raise ValueError(f"{name} contains non-finite values")
        if mode == "full" and measurements is None:
            raise ValueError("the full mode uses every block each iteration: give the measurements")
        self.operator = operator
        self.denoiser = denoiser
        self.measurements = measurements
        self.gamma = float(gamma)
        self.mode = mode
        self.order = order
        self.blocks_per_step = operator.n_blocks if mode == "full" else blocks_per_step
        self.reference = None if reference is None else operator._as_input(reference)
        self.device = operator.device
        if x0 is not None:
            x = operator._as_input(x0).clone()
        elif measurements is not None:
            x = back_projection(operator, measurements)
        else:
            x = torch.zeros(operator.image_shape, device=operator.device, dtype=operator.dtype)
        self.x = x
        self.s = torch.zeros_like(x)
        self.iteration = 0
        self._cursor = 0
        self._generator = torch.Generator().manual_seed(seed)

    # ----------------------------------------------------------------------------- iteration
    def _next_blocks(self) -> tuple[int, ...]:
        b, k = self.operator.n_blocks, self.blocks_per_step
        if k == b:
            return tuple(range(b))
        if self.order == "cyclic":
            blocks = tuple((self._cursor + j) % b for j in range(k))
            self._cursor = (self._cursor + k) % b
            return blocks
        return tuple(sorted(torch.randperm(b, generator=self._generator)[:k].tolist()))

    def _iterate(self, blocks: tuple[int, ...], ys) -> ReconstructionStep:
        start = time.perf_counter()
        weight = self.gamma * self.operator.n_blocks / len(blocks)
        z = self.operator.prox(self.x - self.s, ys, blocks, weight)
        x = self.denoiser(z + self.s, self.sigma)
        s = self.s + z - x
        if not (torch.isfinite(x).all() and torch.isfinite(s).all()):
            raise FloatingPointError(
                f"PnP-ADMM iteration {self.iteration + 1} (blocks {list(blocks)}) produced non-finite values; "
                "the reconstruction is unchanged (lower gamma, or check the denoiser)")
        previous = torch.linalg.vector_norm(self.x)
        residual = float(torch.linalg.vector_norm(x - self.x) / previous) if float(previous) > 0 else math.inf
        primal = float(torch.linalg.vector_norm(z - x)) / math.sqrt(x.numel())
        self.x, self.s = x, s
        self.iteration += 1
        quality = None if self.reference is None else psnr(x, self.reference)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        diagnostics = {"pnp/fixed_point_residual": residual, "pnp/primal_residual": primal}
        if quality is not None:
            diagnostics["pnp/psnr"] = quality
        return ReconstructionStep(self.iteration, blocks, residual, primal, quality, seconds, diagnostics)

    def step(self) -> ReconstructionStep:
        """One iteration on the stored measurements (every block, or the next mini-batch of blocks)."""
        if self.measurements is None:
            raise RuntimeError("this reconstruction has no stored measurements (streaming mode): use observe(i, y_i)")
        state = (self._cursor, self._generator.get_state())
        try:
            return self._iterate(self._next_blocks(), self.measurements)
        except BaseException:
            self._cursor = state[0]
            self._generator.set_state(state[1])
            raise

    def observe(self, block: int, measurement: torch.Tensor) -> ReconstructionStep:
        """Streaming: one iteration on block ``block`` with its measurements, as they arrive."""
        self.operator.check_block(measurement, block)
        return self._iterate((block,), {block: self.operator._as_input(measurement)})

    def run(self, iterations: int, *, logger=None, progress: bool = False, every: int = 1) -> list[ReconstructionStep]:
        """``iterations`` calls of :meth:`step`; records every ``every``-th to ``logger`` (TensorBoard)."""
        from tqdm.auto import tqdm  # lazy: only runs that ask for a bar pay for it

        records = []
        bar = tqdm(range(iterations), desc=f"PnP-ADMM ({self.mode})", disable=not progress, leave=False)
        for _ in bar:
            record = self.step()
            records.append(record)
            if logger is not None and record.iteration % every == 0:
                for tag, value in record.diagnostics.items():
                    logger.record(tag, value, record.iteration)
            if record.psnr is not None:
                bar.set_postfix(psnr=f"{record.psnr:.2f}")
        return records

    # ----------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict:
        op = self.operator
        # the measurements' sum identifies them cheaply: a state of another data set is refused
        checksum = None if self.measurements is None else float(sum(y.double().sum() for y in self.measurements))
        return {"operator": op.describe(), "image_shape": list(op.image_shape), "n_blocks": op.n_blocks,
                "mode": self.mode, "order": self.order, "blocks_per_step": self.blocks_per_step,
                "gamma": self.gamma, "sigma": self.sigma, "measurements_sum": checksum}

    def state_dict(self) -> dict:
        """The iterates, the dual, the iteration count and the block generator: an exact resume point."""
        return {"x": self.x.clone(), "s": self.s.clone(), "iteration": self.iteration, "cursor": self._cursor,
                "generator": self._generator.get_state(), "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; all or nothing (a state of another problem raises ``ValueError``)."""
        required = ("x", "s", "iteration", "cursor", "generator", "config")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"not a PnP-ADMM state: missing {missing}")
        mine = self._config()
        if state["config"] != mine:
            diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
            raise ValueError(f"the state is of another reconstruction; (saved, this one): {diff}")
        for name in ("x", "s"):
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self.operator.image_shape:
                raise ValueError(f"state[{name!r}] is not an image of shape {self.operator.image_shape}")
        generator = torch.Generator()
        generator.set_state(state["generator"].cpu())  # validates before anything changes
        self.x = self.operator._as_input(state["x"]).clone()
        self.s = self.operator._as_input(state["s"]).clone()
        self.iteration = int(state["iteration"])
        self._cursor = int(state["cursor"])
        self._generator = generator
