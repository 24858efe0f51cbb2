"""Schedules as plain functions of the learner's step count (held in its state, so resume continues).

- ``mu_at``: the penalty ramp of Choromanska et al. (2019): ``mu_t = min(mu_0 + t * d_mu, mu_max)``.
- ``halving_factor``: the reference code's learning-rate decay ``1 / 2**(epoch // 8)``, expressed in
  steps so it works on a stream with no epochs (``halve_every = 8 * steps_per_epoch`` reproduces it).
"""
from __future__ import annotations

__all__ = ["mu_at", "halving_factor", "apply_lr_halving_"]


def mu_at(step: int, mu0: float, d_mu: float = 0.0, mu_max: float | None = None) -> float:
    """Penalty weight after ``step`` updates. ``mu_max`` defaults to ``10 * mu0`` (reference code)."""
    cap = 10.0 * mu0 if mu_max is None else mu_max
    return min(mu0 + step * d_mu, cap) if d_mu > 0 else mu0


def halving_factor(step: int, halve_every: int | None) -> float:
    """Learning-rate multiplier ``0.5 ** (step // halve_every)``; 1 when ``halve_every`` is None."""
    if not halve_every:
        return 1.0
    return 0.5 ** (step // halve_every)


def apply_lr_halving_(optimizer, step: int, halve_every: int | None) -> float:
    """Set every group's ``lr`` to ``initial_lr * halving_factor(step, halve_every)``; returns the factor.

    With ``halve_every=None`` (or 0) the learning rates are left alone, so that an external scheduler
    (``torch.optim.lr_scheduler``, Avalanche's ``LRSchedulerPlugin``) stays in charge of them.
    """
    if not halve_every:
        return 1.0
    factor = halving_factor(step, halve_every)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor
