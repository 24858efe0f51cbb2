"""Figures of the scripts, drawn with Matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_stream", "plot_accuracy_matrices"]


def plot_stream(curves: dict[str, list[tuple[int, float]]], path: str | Path, *,
                test: dict[str, list[tuple[int, float]]] | None = None, title: str = "",
                epoch_samples: int | None = None) -> Path:
    """Prequential accuracy per learner, plus held-out accuracy per epoch when there is more than one.

    Args:
        curves: learner name -> ``[(samples seen, cumulative prequential accuracy), ...]``.
        path: the PNG to write (its folder is created).
        test: learner name -> ``[(epoch, held-out accuracy), ...]``; a second panel is drawn when
            some learner has more than one point.
        title: figure title.
        epoch_samples: samples per epoch; draws a dotted line at each epoch boundary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    second = bool(test) and any(len(points) > 1 for points in test.values())
    fig, axes = plt.subplots(1, 2 if second else 1, figsize=(11 if second else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1.5)
    if epoch_samples:
        last = max((p[-1][0] for p in curves.values() if p), default=0)
        for boundary in range(epoch_samples, last, epoch_samples):
            ax.axvline(boundary, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("prequential accuracy (test-then-train)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if second:
        ax = axes[0, 1]
        for name, points in test.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name, linewidth=1.5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_matrices(matrices: dict[str, list[list[float]]], path: str | Path, *, title: str = "") -> Path:
    """One heat map per learner: row i = after training experience i, column j = test experience j.

    Cells carry the accuracy in percent while they are large enough to read (up to 20 experiences);
    the panels grow with the number of experiences.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(matrices)
    size = max((len(m) for m in matrices.values()), default=1)
    side = min(max(3.6, 0.42 * size + 1.2), 9.0)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 1.2, side + 0.4), squeeze=False, layout="constrained")
    image = None
    font = 9 if size <= 6 else 7 if size <= 12 else 5
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        if size <= 20:
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=font,
                            color="white" if value < 0.6 else "black")
        ax.set_title(name)
        ax.set_xlabel("test experience")
        ax.set_ylabel("after training experience")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (cells: %)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
