"""Figures of the scripts, drawn with Matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_stream", "plot_accuracy_matrices", "plot_score_matrices", "plot_learning_curves", "plot_soak",
           "plot_loss_curves"]


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
    """One heat map per learner: row i = after training experience i, column j = test experience j."""
    return plot_score_matrices(matrices, path, title=title, vmin=0.0, vmax=1.0, percent=True,
                               label="accuracy (cells: %)", what="experience")


def plot_score_matrices(matrices: dict[str, list[list[float]]], path: str | Path, *, title: str = "",
                        vmin: float | None = None, vmax: float | None = None, percent: bool = False,
                        label: str = "score", what: str = "task") -> Path:
    """One heat map per learner of a score matrix (row i: after training ``what`` i; column j:
    evaluated on ``what`` j). Cells carry the value (in percent with ``percent``) while they are
    large enough to read (up to 20 rows); the panels grow with the number of rows. The colour
    scale is shared, from ``vmin``/``vmax`` or the data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(matrices)
    values = [v for m in matrices.values() for row in m for v in row]
    lo = min(values, default=0.0) if vmin is None else vmin
    hi = max(values, default=1.0) if vmax is None else vmax
    hi = hi if hi > lo else lo + 1.0
    size = max((len(m) for m in matrices.values()), default=1)
    side = min(max(3.6, 0.42 * size + 1.2), 9.0)
    fig, axes = plt.subplots(1, n, figsize=(side * n + 1.2, side + 0.4), squeeze=False, layout="constrained")
    image = None
    font = 9 if size <= 6 else 7 if size <= 12 else 5
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix, vmin=lo, vmax=hi, cmap="viridis")
        if size <= 20:
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    text = f"{100 * value:.0f}" if percent else f"{value:.0f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=font,
                            color="white" if (value - lo) / (hi - lo) < 0.6 else "black")
        ax.set_title(name)
        ax.set_xlabel(f"evaluated on {what}")
        ax.set_ylabel(f"after training {what}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, list[list[tuple[int, float]]]], path: str | Path, *, title: str = "",
                         ylabel: str = "evaluation return", threshold: float | None = None) -> Path:
    """Mean over seeds (line) and min-max over seeds (band) of each learner's evaluation curve.

    Args:
        curves: learner -> one ``[(step, value), ...]`` list per seed (same steps for every seed).
        threshold: a dashed horizontal line (a "solved" score).
    """
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        steps = [s for s, _ in runs[0][:length]]
        values = np.array([[v for _, v in r[:length]] for r in runs])
        line, = ax.plot(steps, values.mean(axis=0), label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_soak(series: dict[str, list[tuple[int, float]]], path: str | Path, *,
              title: str = "resident memory while streaming") -> Path:
    """Resident memory (MB) against samples streamed, one line per learner and phase."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for name, points in series.items():
        ax.plot([s for s, _ in points], [r for _, r in points], label=name)
    ax.set_xlabel("samples streamed (learn_one)")
    ax.set_ylabel("RSS (MB)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(curves: dict[str, list[tuple[int, float, float]]], path: str | Path, *, title: str = "",
                     ylabel: str = "training loss") -> Path:
    """Loss against epochs (left) and against wall time (right), one line per run.

    Args:
        curves: run label -> ``[(epoch, loss, seconds so far), ...]``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained", sharey=True)
    for label, points in curves.items():
        epochs, losses, seconds = zip(*points) if points else ((), (), ())
        line, = axes[0].plot(epochs, losses, marker="o", markersize=3, label=label)
        axes[1].plot(seconds, losses, marker="o", markersize=3, color=line.get_color())
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_against_time(curves: dict[str, list[tuple[float, float]]], path: str | Path, *, ylabel: str,
                      title: str = "", lines: dict[str, float] | None = None, xlabel: str = "wall time (s)",
                      xscale: str = "linear") -> Path:
    """One value (a validation accuracy) against wall time, one line per method; ``lines``: labelled
    horizontal reference lines (a loss to beat)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for label, points in curves.items():
        seconds, values = zip(*points) if points else ((), ())
        ax.plot(seconds, values, marker="o", markersize=2.5, label=label)
    for label, value in (lines or {}).items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=0.9)
        ax.annotate(label, (0.99, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize="x-small", color="grey")
    if xscale == "symlog":  # runs whose times differ by orders of magnitude; linear below 1 s
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
