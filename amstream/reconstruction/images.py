"""Real images for reconstruction: scikit-image's test images and training patches, MNIST digits.

Test images (:data:`TEST_IMAGES`) are never used for training: the denoisers learn from patches of
other images that ship inside scikit-image (:data:`TRAINING_IMAGES`). Everything is grayscale in
``[0, 1]``, float32. scikit-image is an optional extra (``pip install 'amstream[reconstruction]'``);
without it these functions raise :class:`MissingExtraError` saying so. MNIST and Fashion-MNIST
(``"mnist:<k>"``, ``"fashion-mnist:<k>"``: test image ``k``; training on the train split) are the
small-image case and need only the data files (``AMSTREAM_DATA``).

Choices (documented because no reference fixes them): a test image is centre-cropped to a square
and resized with anti-aliasing to ``size x size``; training images are resized by ``scale`` (0.3 by
default: roughly the factor by which the 400-512 pixel test images shrink to 128) before patches
are cut, so the textures the network sees have the test images' scale.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TEST_IMAGES", "TRAINING_IMAGES", "MissingExtraError", "load_test_image", "load_training_images",
           "random_patches", "psnr"]

#: the benchmark's test images (``phantom`` is scikit-image's Shepp-Logan phantom)
TEST_IMAGES = ("camera", "moon", "coins", "phantom")
#: images whose patches train the denoisers; disjoint from TEST_IMAGES
TRAINING_IMAGES = ("grass", "gravel", "brick", "coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field")
_DIGIT_SETS = ("mnist", "fashion-mnist")


class MissingExtraError(ImportError):
    """An optional dependency of the reconstruction module is not installed."""


def _skimage():
    try:
        import skimage.color
        import skimage.data
        import skimage.transform
    except ImportError as err:
        raise MissingExtraError(
            "the reconstruction images need scikit-image, an optional extra: "
            "pip install 'amstream[reconstruction]' (or pip install scikit-image)") from err
    return skimage


def _gray(name: str) -> np.ndarray:
    skimage = _skimage()
    loader = "shepp_logan_phantom" if name == "phantom" else name
    if not hasattr(skimage.data, loader):
        raise ValueError(f"scikit-image has no image {name!r}")
    image = getattr(skimage.data, loader)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    image = image.astype(np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    return image


def _digit(name: str, split: str):
    from ..data import load_dataset

    return load_dataset(name, split).x  # (N, 1, 28, 28) standardized; undone by the callers


def _digit_stats(name: str) -> tuple[float, float]:
    return (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)


def load_test_image(name: str, size: int | None = 128) -> torch.Tensor:
    """A test image ``(size, size)`` in ``[0, 1]``: one of :data:`TEST_IMAGES` or ``"mnist:<k>"``.

    ``size=None`` keeps the square crop's own resolution (28 for digits).
    """
    if not isinstance(name, str):
        raise TypeError(f"image name must be a string, got {type(name).__name__}")
    base, _, index = name.partition(":")
    if base in _DIGIT_SETS:
        k = int(index or 0)
        mean, std = _digit_stats(base)
        image = (_digit(base, "test")[k, 0] * std + mean).clamp(0, 1).double().numpy()
    elif base in TEST_IMAGES:
        image = _gray(base)
    else:
        raise ValueError(f"unknown test image {name!r}; known: {', '.join(TEST_IMAGES)}, mnist:<k>, fashion-mnist:<k> "
                         f"(training images {', '.join(TRAINING_IMAGES)} are kept for the denoisers)")
    height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
    if size is not None and size != side:
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8, got {size!r}")
        image = _skimage().transform.resize(image, (size, size), anti_aliasing=True)
    return torch.from_numpy(np.clip(image, 0.0, 1.0)).to(torch.float32)


def load_training_images(names: tuple[str, ...] | str = TRAINING_IMAGES, scale: float = 0.3) -> list[torch.Tensor]:
    """The denoisers' training images, grayscale ``[0, 1]``, resized by ``scale``.

    ``names`` may be ``"mnist"`` / ``"fashion-mnist"``: the train split's digits (no resizing).
    Test images are refused.
    """
    if names in _DIGIT_SETS:
        mean, std = _digit_stats(names)
        digits = (_digit(names, "train")[:, 0] * std + mean).clamp(0, 1)
        return list(digits)
    names = (names,) if isinstance(names, str) else tuple(names)
    leaked = sorted(set(names) & set(TEST_IMAGES))
    if leaked:
        raise ValueError(f"{', '.join(leaked)} are test images; a denoiser must not train on them")
    skimage = _skimage()
    images = []
    for name in names:
        image = _gray(name)
        shape = tuple(max(8, round(s * scale)) for s in image.shape)
        image = skimage.transform.resize(image, shape, anti_aliasing=True)
        images.append(torch.from_numpy(np.clip(image, 0.0, 1.0)).to(torch.float32))
    return images


def random_patches(images: list[torch.Tensor], count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random ``size x size`` patches ``(count, 1, size, size)``, each flipped/rotated at random.

    Images are drawn in proportion to the number of patch positions they hold.
    """
    usable = [im for im in images if min(im.shape) >= size]
    if not usable:
        raise ValueError(f"no training image is at least {size}x{size} pixels")
    generator = torch.Generator().manual_seed(seed)
    weights = torch.tensor([(im.shape[0] - size + 1) * (im.shape[1] - size + 1) for im in usable], dtype=torch.float64)
    which = torch.multinomial(weights, count, replacement=True, generator=generator)
    patches = torch.empty(count, 1, size, size)
    for k, j in enumerate(which.tolist()):
        image = usable[j]
        top = int(torch.randint(image.shape[0] - size + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[1] - size + 1, (1,), generator=generator))
        patch = image[top:top + size, left:left + size]
        turns, flip = (int(v) for v in torch.randint(4, (2,), generator=generator))
        patch = torch.rot90(patch, turns)
        patches[k, 0] = patch.flip(-1) if flip % 2 else patch
    return patches


def psnr(image: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(peak^2 / mse)``; images clipped to ``[0, peak]`` first."""
    if image.shape != reference.shape:
        raise ValueError(f"PSNR of images of different shapes {tuple(image.shape)} and {tuple(reference.shape)}")
    mse = float(torch.mean((image.clamp(0, peak).double() - reference.double()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
