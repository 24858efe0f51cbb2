"""Forward operators of imaging inverse problems, cut into measurement blocks.

An inverse problem measures an image ``x`` (shape ``(H, W)``) as ``y = A x + noise``. Incremental
plug-and-play ADMM (Sun, Wu, Xu, Wohlberg, Kamilov, IEEE TCI 2021) splits the measurements into
blocks ``y_i = A_i x`` and touches one block per iteration, so every operator here is a
:class:`BlockOperator`: ``forward_block(x, i)``, its exact adjoint ``adjoint_block(y_i, i)`` and the
proximal step of a weighted set of blocks,

    prox(v, blocks, c) = argmin_x  c/2 * sum_{i in blocks} ||A_i x - y_i||^2 + 1/2 ||x - v||^2
                       = (I + c sum A_i^T A_i)^-1 (v + c sum A_i^T y_i),

solved in closed form where the operator allows it (:class:`GaussianSensing`: a Cholesky factor per
set of blocks and weight, cached) and otherwise by conjugate gradients warm-started at ``v``
(:class:`ParallelBeamCT`, :class:`GaussianBlur`).

- :class:`GaussianSensing`: compressive sensing, ``m`` rows of i.i.d. ``N(0, 1/m)`` entries cut into
  contiguous row blocks (``E[A^T A] = I``).
- :class:`ParallelBeamCT`: sparse-view parallel-beam tomography. The Radon transform is computed
  in torch: for each angle, bilinear samples of the image along every ray (``grid_sample``),
  summed along the ray with unit spacing. Blocks are interleaved subsets of the angles
  (``angles[i::b]``) so every block spans the half circle. The adjoint is the exact transpose of
  those bilinear samples (the vector-Jacobian product of the linear forward map).
- :class:`GaussianBlur`: a Gaussian convolution with zero boundary; blocks are interleaved rows
  of the blurred image.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BlockOperator", "GaussianSensing", "ParallelBeamCT", "GaussianBlur", "conjugate_gradient",
           "OPERATORS"]


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x0: torch.Tensor,
                       steps: int, tol: float = 0.0) -> torch.Tensor:
    """Solve ``apply(x) = rhs`` for a symmetric positive definite ``apply`` by at most ``steps`` CG steps.

    Stops early when the residual's norm falls below ``tol * ||rhs||`` (``tol=0``: exactly
    ``steps`` steps, which keeps a run's cost and result independent of the data's luck).
    """
    x = x0.clone()
    r = rhs - apply(x)
    p = r.clone()
    rr = torch.vdot(r.flatten(), r.flatten())
    stop = (tol * torch.linalg.vector_norm(rhs)) ** 2
    for _ in range(steps):
        if tol > 0 and rr <= stop:  # one host sync per step only when early stopping was asked for
            break
        ap = apply(p)
        pap = torch.vdot(p.flatten(), ap.flatten())
        # once the residual is exactly zero the ratios are 0/0: keep x (no host sync to test for it)
        alpha = torch.where(pap > 0, rr / pap, torch.zeros_like(rr))
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_new = torch.vdot(r.flatten(), r.flatten())
        p.mul_(torch.where(rr > 0, rr_new / rr, torch.zeros_like(rr))).add_(r)
        rr = rr_new
    return x


class BlockOperator(abc.ABC):
    """A linear map from images ``(H, W)`` to measurements, as ``n_blocks`` row blocks.

    Subclasses implement :meth:`forward_block`, :meth:`adjoint_block` and :meth:`block_shape`;
    :meth:`prox` defaults to conjugate gradients on the normal equations.

    Attributes:
        image_shape: ``(H, W)`` of the images the operator reads.
        n_blocks: number of measurement blocks.
        cg_steps: conjugate-gradient steps of the default proximal solve.
    """

    name = "operator"

    def __init__(self, image_shape: Sequence[int], n_blocks: int, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cg_steps: int = 10) -> None:
        image_shape = tuple(image_shape)
        if len(image_shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in image_shape):
            raise ValueError(f"image_shape must be (height, width) with both >= 2, got {image_shape!r}")
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
            raise ValueError(f"n_blocks must be a positive integer, got {n_blocks!r}")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps must be a positive integer, got {cg_steps!r}")
        self.image_shape = image_shape
        self.n_blocks = n_blocks
        self.device = torch.device(device)
        self.dtype = dtype
        self.cg_steps = cg_steps

    # ----------------------------------------------------------------------------- per block
    @abc.abstractmethod
    def block_shape(self, i: int) -> tuple[int, ...]:
        """Shape of the measurements of block ``i``."""

    @abc.abstractmethod
    def forward_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``A_i x`` for an image ``x`` of :attr:`image_shape`."""

    @abc.abstractmethod
    def adjoint_block(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """``A_i^T y`` for measurements ``y`` of :meth:`block_shape` ``(i)``; an image."""

    def describe(self) -> str:
        """One line for tables and logs."""
        return f"{self.name} {self.image_shape[0]}x{self.image_shape[1]}, {self.n_blocks} blocks"

    @property
    def n_measurements(self) -> int:
        return sum(math.prod(self.block_shape(i)) for i in range(self.n_blocks))

    # ----------------------------------------------------------------------------- whole operator
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's measurements ``[A_1 x, ..., A_b x]``."""
        self.check_image(x)
        return [self.forward_block(x, i) for i in range(self.n_blocks)]

    def adjoint(self, ys: Sequence[torch.Tensor], blocks: Sequence[int] | None = None) -> torch.Tensor:
        """``sum_i A_i^T y_i`` over ``blocks`` (all by default); ``ys`` holds every block's measurements."""
        blocks = range(self.n_blocks) if blocks is None else blocks
        out = torch.zeros(self.image_shape, device=self.device, dtype=self.dtype)
        for i in blocks:
            out += self.adjoint_block(ys[i], i)
        return out

    def normal(self, x: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        """``sum_{i in blocks} A_i^T A_i x``."""
        out = torch.zeros_like(x)
        for i in blocks:
            out += self.adjoint_block(self.forward_block(x, i), i)
        return out

    def prox(self, v: torch.Tensor, ys: Sequence[torch.Tensor], blocks: Sequence[int], weight: float) -> torch.Tensor:
        """``argmin_x weight/2 sum_{i in blocks} ||A_i x - y_i||^2 + 1/2 ||x - v||^2``.

        ``ys`` is indexed by block (a list over all blocks or a dict of the ones in ``blocks``).
        The default solves the normal equations by :attr:`cg_steps` conjugate-gradient steps
        warm-started at ``v``.
        """
        rhs = v + weight * self.adjoint(ys, blocks)
        return conjugate_gradient(lambda u: u + weight * self.normal(u, blocks), rhs, v, self.cg_steps)

    # ----------------------------------------------------------------------------- checks
    def check_image(self, x: torch.Tensor, what: str = "image") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.image_shape:
            raise ValueError(f"{what} has shape {tuple(x.shape)} but the {self.describe()} reads images of "
                             f"shape {self.image_shape}")

    def check_measurements(self, ys: Sequence[torch.Tensor]) -> None:
        """Raise ``ValueError`` naming the block if ``ys`` does not fit the blocks or is not finite."""
        if len(ys) != self.n_blocks:
            raise ValueError(f"{len(ys)} measurement blocks given, the {self.describe()} has {self.n_blocks}")
        for i, y in enumerate(ys):
            self.check_block(y, i)

    def check_block(self, y: torch.Tensor, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_blocks:
            raise ValueError(f"block index {i!r} is not in 0..{self.n_blocks - 1}")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"measurements of block {i} must be a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape) != self.block_shape(i):
            raise ValueError(f"measurements of block {i} have shape {tuple(y.shape)}, the {self.describe()} "
                             f"gives {self.block_shape(i)}")
        if not bool(torch.isfinite(y).all()):
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"measurements of block {i} contain {bad} non-finite value(s) (NaN or Inf)")

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)


class GaussianSensing(BlockOperator):
    """Compressive sensing: ``m = round(ratio * H * W)`` rows of i.i.d. ``N(0, 1/m)`` entries.

    Rows are cut into ``n_blocks`` contiguous blocks of (nearly) equal size. The proximal step is
    exact: with ``A_B`` the rows of the chosen blocks (``k`` of them), it solves
    ``(I_k + c A_B A_B^T)`` by Cholesky when ``k <= H W`` (Woodbury) and ``(I_n + c A_B^T A_B)``
    otherwise; the factor is cached per (blocks, weight), so an incremental run factors each
    block once. Random mini-batches of blocks cut their Gram matrix from that of all rows
    (computed once, ``m^2`` numbers), so a new mini-batch costs one ``k x k`` Cholesky.
    """

    name = "compressive sensing"

    def __init__(self, image_shape: Sequence[int], ratio: float, n_blocks: int = 1, *, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(image_shape, n_blocks, device=device, dtype=dtype)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 64:
            raise ValueError(f"ratio (measurements per pixel) must be in (0, 64], got {ratio!r}")
        n = math.prod(self.image_shape)
        m = max(n_blocks, round(ratio * n))
        self.ratio = ratio
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        # drawn on the CPU in float64 and cast, so the matrix is the same on every device and dtype
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64).div_(math.sqrt(m))
        self.blocks = [b.to(device=self.device, dtype=dtype).contiguous()
                       for b in torch.tensor_split(matrix, n_blocks, dim=0)]
        self._factors: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._row_gram: torch.Tensor | None = None

    def describe(self) -> str:
        return f"{super().describe()}, ratio {self.ratio:g} ({self.n_measurements} rows)"

    def block_shape(self, i: int) -> tuple[int, ...]:
        return (self.blocks[i].shape[0],)

    def forward_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.blocks[i] @ self._as_input(x).reshape(-1)

    def adjoint_block(self, y: torch.Tensor, i: int) -> torch.Tensor:
        return (self.blocks[i].T @ self._as_input(y)).reshape(self.image_shape)

    def _gram(self, blocks: tuple[int, ...], rows: torch.Tensor) -> torch.Tensor:
        """``A_B A_B^T``. For a mini-batch of some of the blocks (a new set each iteration) it is cut
        from the Gram matrix of all rows, computed once; one block, or all, is computed directly."""
        if len(blocks) in (1, self.n_blocks):
            return rows @ rows.T
        if self._row_gram is None:
            everything = torch.cat(self.blocks)
            self._row_gram = everything @ everything.T
            self._offsets = [0]
            for block in self.blocks:
                self._offsets.append(self._offsets[-1] + block.shape[0])
        index = torch.cat([torch.arange(self._offsets[i], self._offsets[i + 1], device=self.device) for i in blocks])
        return self._row_gram[index][:, index]

    def _factor(self, blocks: tuple[int, ...], weight: float) -> tuple[str, torch.Tensor, torch.Tensor]:
        rows = self.blocks[blocks[0]] if len(blocks) == 1 else torch.cat([self.blocks[i] for i in blocks])
        key = (blocks, float(weight))
        if key not in self._factors:
            if len(self._factors) >= 4 * self.n_blocks + 4:  # random mini-batches or a weight schedule: bounded
                self._factors.clear()
            k, n = rows.shape
            if k <= n:
                gram = torch.eye(k, device=self.device, dtype=self.dtype).add_(self._gram(blocks, rows), alpha=weight)
                self._factors[key] = ("rows", torch.linalg.cholesky(gram))
            else:
                gram = torch.addmm(torch.eye(n, device=self.device, dtype=self.dtype), rows.T, rows, alpha=weight)
                self._factors[key] = ("columns", torch.linalg.cholesky(gram))
        side, chol = self._factors[key]
        return side, chol, rows

    def prox(self, v: torch.Tensor, ys: Sequence[torch.Tensor], blocks: Sequence[int], weight: float) -> torch.Tensor:
        blocks = tuple(blocks)
        side, chol, rows = self._factor(blocks, weight)
        y = torch.cat([self._as_input(ys[i]) for i in blocks])
        rhs = self._as_input(v).reshape(-1) + weight * (rows.T @ y)
        if side == "columns":
            x = torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
        else:  # Woodbury: (I + c A^T A)^-1 r = r - c A^T (I + c A A^T)^-1 A r
            inner = torch.cholesky_solve((rows @ rhs).unsqueeze(1), chol).squeeze(1)
            x = rhs - weight * (rows.T @ inner)
        return x.reshape(self.image_shape)


class ParallelBeamCT(BlockOperator):
    """Parallel-beam computed tomography (a Radon transform) at ``n_angles`` angles in ``[0, 180)``.

    Detector bins and samples along each ray are one pixel apart; ``ceil(sqrt(2) * max(H, W))``
    of each cover the whole image, so no part of it is outside every ray. Bilinear interpolation
    with zero outside the image (``grid_sample``); block ``i`` holds the angles ``i::n_blocks``.
    With ``cache_grids`` the sampling grids are kept (memory grows with the number of angles);
    otherwise only the last block's is, and the others are rebuilt when used (memory of one block).
    """

    name = "parallel-beam CT"

    def __init__(self, image_shape: Sequence[int], n_angles: int, n_blocks: int = 1, *,
                 cache_grids: bool = True, cg_steps: int = 10,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(image_shape, n_blocks, device=device, dtype=dtype, cg_steps=cg_steps)
        if isinstance(n_angles, bool) or not isinstance(n_angles, int) or n_angles < n_blocks:
            raise ValueError(f"n_angles must be an integer >= n_blocks ({n_blocks}), got {n_angles!r}")
        self.n_angles = n_angles
        self.angles = torch.arange(n_angles, dtype=torch.float64) * (math.pi / n_angles)
        self.n_detectors = math.ceil(math.sqrt(2) * max(self.image_shape))
        self.cache_grids = cache_grids
        self._grids: dict[int, torch.Tensor] = {}
        self._last_grid: tuple[int, torch.Tensor] | None = None

    def describe(self) -> str:
        return f"{self.name} {self.image_shape[0]}x{self.image_shape[1]}, {self.n_angles} angles, {self.n_blocks} blocks"

    def block_angles(self, i: int) -> torch.Tensor:
        return self.angles[i::self.n_blocks]

    def block_shape(self, i: int) -> tuple[int, ...]:
        return (len(range(i, self.n_angles, self.n_blocks)), self.n_detectors)

    def _grid(self, i: int) -> torch.Tensor:
        grid = self._grids.get(i)
        if grid is None and self._last_grid is not None and self._last_grid[0] == i:
            grid = self._last_grid[1]
        if grid is None:
            theta = self.block_angles(i)
            d = self.n_detectors
            offsets = torch.arange(d, dtype=torch.float64) - (d - 1) / 2  # detector position t and ray position s
            cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
            t, s = offsets[None, None, :], offsets[None, :, None]
            # pixel units from the image centre, (angles, samples s, detectors t); the orientation of
            # skimage.transform.radon (angle 0 sums each column, rows grow downwards)
            col = t * cos + s * sin
            row = s * cos - t * sin
            height, width = self.image_shape
            # grid_sample(align_corners=False): pixel centre j of n sits at (2j + 1)/n - 1, so centred u -> 2u/n
            grid = torch.stack((2 * col / width, 2 * row / height), dim=-1).to(self.device, self.dtype)
            if self.cache_grids:
                self._grids[i] = grid
            else:  # the last block's only: the many products of one proximal step reuse it
                self._last_grid = (i, grid)
        return grid

    def _project(self, x: torch.Tensor, i: int) -> torch.Tensor:
        grid = self._grid(i)
        images = x.reshape(1, 1, *self.image_shape).expand(grid.shape[0], 1, *self.image_shape)
        samples = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return samples.sum(dim=2).squeeze(1)  # the line integral with unit spacing: (angles, detectors)

    def forward_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self._project(self._as_input(x), i)

    def adjoint_block(self, y: torch.Tensor, i: int) -> torch.Tensor:
        # the transpose of the bilinear sampling: the vector-Jacobian product of the linear projection
        with torch.enable_grad():
            x = torch.zeros(self.image_shape, device=self.device, dtype=self.dtype, requires_grad=True)
            (grad,) = torch.autograd.grad(self._project(x, i), x, self._as_input(y))
        return grad


class GaussianBlur(BlockOperator):
    """A Gaussian blur (standard deviation ``sigma`` pixels, zero boundary); block ``i`` = rows ``i::b``."""

    name = "Gaussian blur"

    def __init__(self, image_shape: Sequence[int], sigma: float = 1.6, n_blocks: int = 1, *, cg_steps: int = 20,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(image_shape, n_blocks, device=device, dtype=dtype, cg_steps=cg_steps)
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
            raise ValueError(f"sigma (pixels) must be positive, got {sigma!r}")
        if n_blocks > self.image_shape[0]:
            raise ValueError(f"n_blocks ({n_blocks}) must be at most the image height ({self.image_shape[0]})")
        self.sigma = float(sigma)
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel_1d = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel_1d /= kernel_1d.sum()
        self.kernel = torch.outer(kernel_1d, kernel_1d)[None, None].to(self.device, self.dtype)
        self.radius = radius

    def describe(self) -> str:
        return f"{super().describe()}, sigma {self.sigma:g} px"

    def block_shape(self, i: int) -> tuple[int, ...]:
        return (len(range(i, self.image_shape[0], self.n_blocks)), self.image_shape[1])

    def forward_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        blurred = F.conv2d(self._as_input(x)[None, None], self.kernel, padding=self.radius)[0, 0]
        return blurred[i::self.n_blocks]

    def adjoint_block(self, y: torch.Tensor, i: int) -> torch.Tensor:
        full = torch.zeros(self.image_shape, device=self.device, dtype=self.dtype)
        full[i::self.n_blocks] = self._as_input(y)
        return F.conv_transpose2d(full[None, None], self.kernel, padding=self.radius)[0, 0]


#: name -> operator class, for scripts and checkpoints
OPERATORS: dict[str, type[BlockOperator]] = {"cs": GaussianSensing, "ct": ParallelBeamCT, "blur": GaussianBlur}
