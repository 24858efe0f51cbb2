"""Training a denoiser with any registered learner, and measuring it.

The network learns the noise, not the image (residual learning, as DnCNN): its input is a noisy
patch and its noise-level map, its target the noise itself, with the mean squared error. This is
an ordinary regression batch ``learner.learn(inputs, noise)``, so every learner of
:data:`amstream.LEARNERS` that can fit a convolutional ``nn.Sequential`` under MSE can train it.
"""
from __future__ import annotations

import torch

from .denoisers import NetworkDenoiser, noise_level_input

__all__ = ["train_denoiser", "noisy_copies", "denoising_psnr"]


def noisy_copies(clean: torch.Tensor, noise_range: tuple[float, float], generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels drawn uniformly from ``noise_range`` (one per image) and the Gaussian noise to add."""
    low, high = noise_range
    sigma = low + (high - low) * torch.rand(clean.shape[0], generator=generator, dtype=clean.dtype)
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype) * sigma.reshape(-1, 1, 1, 1)
    return sigma, noise


def train_denoiser(learner, patches: torch.Tensor, noise_range: tuple[float, float], *, epochs: int = 1,
                   batch_size: int = 64, seed: int = 0, name: str | None = None, logger=None,
                   progress: bool = False) -> tuple[NetworkDenoiser, list[float]]:
    """Train ``learner``'s :func:`~amstream.reconstruction.denoisers.dncnn` on ``patches`` ``(N, 1, p, p)``.

    Every epoch visits the patches in a new random order and draws fresh noise. Returns the
    denoiser (sharing the learner's model) and the training loss of every step.
    """
    from tqdm.auto import tqdm

    if patches.dim() != 4 or patches.shape[1] != 1:
        raise ValueError(f"patches must be (N, 1, size, size), got {tuple(patches.shape)}")
    low, high = (float(v) for v in noise_range)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    steps = epochs * -(-patches.shape[0] // batch_size)
    bar = tqdm(total=steps, desc=f"training the denoiser ({type(learner).__name__})", disable=not progress,
               leave=False)
    for _ in range(epochs):
        order = torch.randperm(patches.shape[0], generator=generator)
        for start in range(0, patches.shape[0], batch_size):
            clean = patches[order[start:start + batch_size]]
            sigma, noise = noisy_copies(clean, (low, high), generator)
            info = learner.learn(noise_level_input(clean + noise, sigma), noise)
            losses.append(float(info.loss))
            if logger is not None:
                logger.log_step(info, len(losses))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.2e}")
    bar.close()
    denoiser = NetworkDenoiser(learner.model, (low, high), name or f"DnCNN ({type(learner).__name__})")
    return denoiser, losses


def denoising_psnr(denoiser, images: list[torch.Tensor], sigma: float, seed: int = 0) -> tuple[float, float]:
    """Mean PSNR (dB) of the noisy images and of the denoised ones, Gaussian noise of ``sigma``."""
    from .images import psnr

    generator = torch.Generator().manual_seed(seed)
    noisy_psnr, denoised_psnr = [], []
    for image in images:
        noisy = image + sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype)
        noisy_psnr.append(psnr(noisy, image))
        denoised_psnr.append(psnr(denoiser(noisy, sigma), image))
    return sum(noisy_psnr) / len(images), sum(denoised_psnr) / len(images)
