"""Denoisers, the priors of plug-and-play ADMM: a DnCNN-style network and total variation.

A denoiser is called as ``denoiser(image, sigma)``: ``image`` is ``(H, W)`` (or a batch
``(N, H, W)``), ``sigma`` the standard deviation of the Gaussian noise it should remove, on the
image's scale (pixel values in ``[0, 1]``). In PnP-ADMM, ``sigma`` is the strength of the prior.

- :func:`dncnn`: a residual convolutional denoiser in the manner of DnCNN (Zhang, Zuo, Chen, Meng,
  Zhang, IEEE TIP 2017): ``depth`` 3x3 convolutions with ReLUs in between, trained to predict the
  noise (the denoised image is the input minus the prediction). New here, as in FFDNet (Zhang, Zuo,
  Zhang, IEEE TIP 2018): a constant noise-level map is a second input channel, so one network
  serves every ``sigma`` of the range it was trained on, and PnP can tune ``sigma``. It is a plain
  ``nn.Sequential`` of Conv2d and ReLU, so every block-wise learner of the registry can train it.
- :class:`NetworkDenoiser`: such a network with the noise range it was trained on; a ``sigma``
  outside that range is refused, since the network has never seen it.
- :class:`TVDenoiser`: the proximal operator of isotropic total variation,
  ``argmin_x 1/(2 sigma^2) ||x - v||^2 + tau TV(x)``, by Chambolle's dual projection algorithm
  (J. Math. Imaging Vis. 2004). Inside ADMM it is an exact proximal step, so PnP-ADMM with it *is*
  ADMM for TV-regularized least squares: the classical baseline.
- :class:`IdentityDenoiser`: returns its input (PnP-ADMM then is the proximal point method).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_save
from ..utils import eval_mode

__all__ = ["dncnn", "NetworkDenoiser", "TVDenoiser", "IdentityDenoiser", "DenoiserRangeError", "check_noise_level",
           "load_denoiser", "save_denoiser"]


class DenoiserRangeError(ValueError):
    """A denoiser was asked for a noise level it was not made for."""


def dncnn(features: int = 32, depth: int = 7, channels: int = 1) -> nn.Sequential:
    """A DnCNN-style noise predictor: ``(N, channels + 1, H, W) -> (N, channels, H, W)``.

    The extra input channel is the noise-level map (``sigma`` everywhere). With the defaults it has
    47,073 parameters. No batch normalization: the block-wise learners fit each convolution to its
    own codes, and AM-mem's exact solves want plain linear layers.
    """
    for name, value, low in (("features", features, 1), ("depth", depth, 2), ("channels", channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    layers: list[nn.Module] = [nn.Conv2d(channels + 1, features, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(features, channels, 3, padding=1))
    return nn.Sequential(*layers)


def noise_level_input(noisy: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The network's input for ``noisy`` images ``(N, 1, H, W)``: the image and its noise-level map."""
    sigma = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device).reshape(-1, 1, 1, 1)
    return torch.cat([noisy, sigma.expand(noisy.shape[0], 1, *noisy.shape[2:])], dim=1)


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise DenoiserRangeError(f"sigma must be a positive number, got {sigma!r}")
    return float(sigma)


def check_noise_level(sigma: float, noise_range: tuple[float, float], name: str = "the network") -> float:
    """``sigma`` if a network trained on ``noise_range`` knows it, else :class:`DenoiserRangeError`."""
    sigma = _check_sigma(sigma)
    low, high = noise_range
    if not low * (1 - 1e-6) <= sigma <= high * (1 + 1e-6):
        raise DenoiserRangeError(
            f"{name} was trained for noise levels sigma in [{low:g}, {high:g}] "
            f"({low * 255:.3g}-{high * 255:.3g} on the 0-255 scale), not {sigma:g}; train one for this level "
            "or choose sigma in its range")
    return sigma


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(image, torch.Tensor) or image.dim() not in (2, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"a denoiser reads an image (H, W) or a batch (N, H, W), got {shape}")
    return (image[None], True) if image.dim() == 2 else (image, False)


class NetworkDenoiser:
    """A trained :func:`dncnn` network as a denoiser for ``sigma`` in ``noise_range``.

    Args:
        model: the network (its noise-level channel is its last input channel).
        noise_range: ``(low, high)``: the noise levels it was trained on; others are refused.
        name: how tables and logs call it (``"DnCNN (AM-Adam)"``).
    """

    def __init__(self, model: nn.Module, noise_range: tuple[float, float], name: str = "DnCNN") -> None:
        low, high = (float(v) for v in noise_range)
        if not 0 < low <= high:
            raise ValueError(f"noise_range must be (low, high) with 0 < low <= high, got {noise_range!r}")
        self.model = model
        self.noise_range = (low, high)
        self.name = name

    def check_sigma(self, sigma: float) -> float:
        return check_noise_level(sigma, self.noise_range, self.name)

    def __call__(self, image: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = self.check_sigma(sigma)
        batch, single = _as_batch(image)
        parameter = next(self.model.parameters())
        noisy = batch.to(device=parameter.device, dtype=parameter.dtype)[:, None]
        with torch.no_grad(), eval_mode(self.model):
            denoised = noisy - self.model(noise_level_input(noisy, sigma))
        out = denoised[:, 0].to(device=image.device, dtype=image.dtype)
        return out[0] if single else out


class TVDenoiser:
    """Isotropic total-variation denoising, ``argmin_x 1/(2 sigma^2)||x - v||^2 + tau TV(x)``.

    Chambolle's projection algorithm on the dual field ``p`` (forward differences, Neumann
    boundary), ``steps`` iterations with step 1/8, warm-started from zero on every call (so a
    call's result depends only on its input). ``tau`` is the prior's weight; the prox weight is
    ``tau * sigma^2``.
    """

    def __init__(self, tau: float = 1.0, steps: int = 50) -> None:
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.tau = float(tau)
        self.steps = steps
        self.name = "TV"
        self.noise_range = None

    def check_sigma(self, sigma: float) -> float:
        return _check_sigma(sigma)

    def __call__(self, image: torch.Tensor, sigma: float) -> torch.Tensor:
        weight = self.tau * self.check_sigma(sigma) ** 2
        batch, single = _as_batch(image)
        out = tv_prox(batch, weight, self.steps)
        return out[0] if single else out


def _gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gx = torch.zeros_like(u)
    gy = torch.zeros_like(u)
    gx[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    gy[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    return gx, gy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    # the negative adjoint of _gradient
    div = torch.zeros_like(px)
    div[..., :-1, :] += px[..., :-1, :]
    div[..., 1:, :] -= px[..., :-1, :]
    div[..., :, :-1] += py[..., :, :-1]
    div[..., :, 1:] -= py[..., :, :-1]
    return div


def tv_prox(v: torch.Tensor, weight: float, steps: int) -> torch.Tensor:
    """``argmin_x 1/2 ||x - v||^2 + weight * TV(x)`` for each image of ``v`` (..., H, W)."""
    px = torch.zeros_like(v)
    py = torch.zeros_like(v)
    step = 1.0 / 8.0
    for _ in range(steps):
        gx, gy = _gradient(_divergence(px, py) - v / weight)
        scale = 1 + step * torch.sqrt(gx * gx + gy * gy)
        px = (px + step * gx) / scale
        py = (py + step * gy) / scale
    return v - weight * _divergence(px, py)


class IdentityDenoiser:
    """Returns its input: PnP-ADMM with it is the proximal point method on the data term."""

    name = "identity"
    noise_range = None

    def check_sigma(self, sigma: float) -> float:
        return _check_sigma(sigma)

    def __call__(self, image: torch.Tensor, sigma: float) -> torch.Tensor:  # noqa: ARG002
        return image.clone()


def save_denoiser(path: str | os.PathLike, denoiser: NetworkDenoiser, **extra) -> Path:
    """Write a :func:`dncnn` denoiser (weights, shape, noise range, ``extra``) to ``path`` atomically."""
    convs = [m for m in denoiser.model if isinstance(m, nn.Conv2d)]
    payload = {
        "kind": "amstream-dncnn",
        "features": convs[0].out_channels, "depth": len(convs), "channels": convs[-1].out_channels,
        "noise_range": list(denoiser.noise_range), "name": denoiser.name,
        "state": {k: v.detach().cpu() for k, v in denoiser.model.state_dict().items()},
        "extra": extra,
    }
    return atomic_save(payload, path)


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[NetworkDenoiser, dict]:
    """Read a denoiser written by :func:`save_denoiser`; return it and its ``extra`` values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no denoiser file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"cannot read denoiser {path}: {type(err).__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("kind") != "amstream-dncnn":
        raise ValueError(f"{path} is not an amstream denoiser file (written by save_denoiser)")
    model = dncnn(payload["features"], payload["depth"], payload["channels"])
    model.load_state_dict(payload["state"])
    denoiser = NetworkDenoiser(model.to(device), tuple(payload["noise_range"]), payload["name"])
    return denoiser, payload["extra"]
