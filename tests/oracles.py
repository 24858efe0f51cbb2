"""Independent reference solutions for the method oracles of the tests."""
from __future__ import annotations

import torch


def lbfgs_prox_cross_entropy(center: torch.Tensor, Y: torch.Tensor, rho: float) -> torch.Tensor:
    """``argmin_Z sum_i CE(z_i, y_i) + rho/2 ||Z - center||^2`` by torch's L-BFGS run to convergence
    (the problem of ADMM-Softmax's Z-step and of dlADMM's last-layer z)."""
    Z = center.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([Z], lr=1.0, max_iter=5000, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = (torch.logsumexp(Z, 1) - (Z * Y).sum(1)).sum() + 0.5 * rho * (Z - center).square().sum()
        value.backward()
        return value

    opt.step(closure)
    return Z.detach()
