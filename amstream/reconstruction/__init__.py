"""Streaming inverse problems: incremental plug-and-play ADMM with denoisers trained by amstream learners.

- :mod:`~amstream.reconstruction.operators`: forward operators cut into measurement blocks
  (compressive sensing, parallel-beam CT, Gaussian blur) with exact adjoints and proximal steps.
- :mod:`~amstream.reconstruction.pnp`: PnP-ADMM, full and incremental (Sun et al., IEEE TCI 2021),
  and a streaming mode; exact resume from ``state_dict``.
- :mod:`~amstream.reconstruction.denoisers`: a DnCNN-style network, total variation, identity.
- :mod:`~amstream.reconstruction.training`: train the network with any registered learner.
- :mod:`~amstream.reconstruction.images`: scikit-image's test and training images (an optional
  extra), MNIST digits, PSNR.

Only torch is needed to import it; scikit-image is imported when an image is loaded.
"""
from .denoisers import (DenoiserRangeError, IdentityDenoiser, NetworkDenoiser, TVDenoiser, dncnn, load_denoiser,
                        save_denoiser)
from .images import MissingExtraError, load_test_image, load_training_images, psnr, random_patches
from .operators import OPERATORS, BlockOperator, GaussianBlur, GaussianSensing, ParallelBeamCT, conjugate_gradient
from .pnp import PnPADMM, ReconstructionStep, back_projection
from .training import denoising_psnr, train_denoiser

__all__ = [
    "BlockOperator", "GaussianSensing", "ParallelBeamCT", "GaussianBlur", "OPERATORS", "conjugate_gradient",
    "PnPADMM", "ReconstructionStep", "back_projection",
    "dncnn", "NetworkDenoiser", "TVDenoiser", "IdentityDenoiser", "DenoiserRangeError", "save_denoiser",
    "load_denoiser", "train_denoiser", "denoising_psnr",
    "load_test_image", "load_training_images", "random_patches", "psnr", "MissingExtraError",
]
