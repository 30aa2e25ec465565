"""Corruptions of the paper's Sect. 4.3 (docs/method.md §2.18, Fig. 4): nine, each with degrees 1..5.

Every corruption acts on a batch of [0, 1] images ``[B, 3, H, W]`` and is a
``torchvision.transforms.v2`` transform (or built from one). Severity grows with the degree
through one parameter per corruption (:data:`SEVERITY`):

==================  ====================================================================
jpeg                JPEG quality (lower is worse)
gaussian_blur       Gaussian blur σ as a fraction of the (shorter) image side: σ_px = f · side
brightness          ``ColorJitter(brightness=b)``: factor ~ U[1 - b, 1 + b] per image
contrast            ``ColorJitter(contrast=c)``: factor ~ U[1 - c, 1 + c] per image
random_erasing      erased area fraction a: one rectangle per image (aspect ratio ~ log-U[0.3, 3.3])
                    filled with Gaussian noise. As in the usual recipe, the erasing runs on the
                    *normalised* image with N(0, 1) noise, i.e. the fill is mean + std · N(0, 1)
                    in pixel space, clamped to [0, 1]
gaussian_noise      additive N(0, σ²) per pixel, clipped to [0, 1]
rotation            ``RandomRotation(θ)``: angle ~ U[-θ, θ] degrees per image, black fill
skew                ``RandomAffine(shear=s)``: x-shear ~ U[-s, s] degrees per image, black fill
distribution_shift  the images are untouched; the normalisation statistics become
                    mean + δ · u and std · exp(δ · v), u, v ~ U[-1, 1]³ (one draw per call)
==================  ====================================================================

Randomness comes from torch's CPU RNG inside ``torch.random.fork_rng`` seeded with ``seed``:
a call is reproducible and leaves the global RNG state as it was. The same seed gives the
same underlying uniform draws at every degree (common random numbers), so a higher degree is a
stronger version of the same perturbation; that is what makes the curves of Fig. 4 smooth.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

from . import data

NAMES = ("jpeg", "gaussian_blur", "brightness", "contrast", "random_erasing", "gaussian_noise",
         "rotation", "skew", "distribution_shift")
DEGREES = 5

# one severity parameter per degree 1..5 (see the module docstring for its meaning)
SEVERITY: dict[str, tuple[float, ...]] = {
    "jpeg": (80, 60, 40, 20, 10),
    "gaussian_blur": (0.02, 0.03, 0.045, 0.06, 0.08),
    "brightness": (0.15, 0.3, 0.45, 0.6, 0.75),
    "contrast": (0.15, 0.3, 0.45, 0.6, 0.75),
    "random_erasing": (0.05, 0.1, 0.15, 0.2, 0.3),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "rotation": (10, 20, 30, 45, 60),
    "skew": (8, 16, 24, 32, 40),
    "distribution_shift": (0.05, 0.1, 0.15, 0.2, 0.3),
}

# corruptions that draw nothing at random: every seed gives the same images
SEEDLESS = frozenset({"jpeg", "gaussian_blur"})

Normalize = Callable[[Tensor], Tensor]


def _each(transform) -> Callable[[Tensor], Tensor]:
    """Apply ``transform`` image by image: v2 transforms draw one parameter set per call, and
    a batch would otherwise share it."""
    return lambda images: torch.stack([transform(image) for image in images])


def _jpeg(quality: float, images: Tensor) -> Tensor:
    encoded = v2.JPEG(int(quality))(v2.functional.to_dtype(images, torch.uint8, scale=True))
    return v2.functional.to_dtype(encoded, torch.float32, scale=True)


def _blur(fraction: float, images: Tensor) -> Tensor:
    side = min(images.shape[-2:])
    sigma = fraction * side
    # 3σ each side, capped so that the reflect padding (k - 1) / 2 stays below the image side
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * side - 1)
    return v2.GaussianBlur(kernel, sigma=(sigma, sigma))(images)


def _erase(area: float, images: Tensor) -> Tensor:
    erase = v2.RandomErasing(p=1.0, scale=(area, area), ratio=(0.3, 3.3), value="random")
    mean, std = (torch.as_tensor(s, dtype=images.dtype).view(1, -1, 1, 1) for s in (data.MEAN, data.STD))
    return _each(erase)(data.normalize(images)) * std + mean


_PIXEL: dict[str, Callable[[float, Tensor], Tensor]] = {
    "jpeg": _jpeg,
    "gaussian_blur": _blur,
    "brightness": lambda b, x: _each(v2.ColorJitter(brightness=b))(x),
    "contrast": lambda c, x: _each(v2.ColorJitter(contrast=c))(x),
    "random_erasing": _erase,
    "gaussian_noise": lambda s, x: v2.GaussianNoise(sigma=s, clip=True)(x),
    "rotation": lambda a, x: _each(v2.RandomRotation(a, interpolation=v2.InterpolationMode.BILINEAR))(x),
    "skew": lambda s, x: _each(v2.RandomAffine(degrees=0, shear=s, interpolation=v2.InterpolationMode.BILINEAR))(x),
}


def _shifted_normalize(delta: float) -> Normalize:
    """``data.normalize`` with mean + δ·u and std·exp(δ·v), u, v ~ U[-1, 1] per channel."""
    u, v = (2 * torch.rand(2, len(data.MEAN), dtype=torch.float64) - 1).unbind(0)
    mean = tuple((torch.tensor(data.MEAN, dtype=torch.float64) + delta * u).tolist())
    std = tuple((torch.tensor(data.STD, dtype=torch.float64) * torch.exp(delta * v)).tolist())
    return functools.partial(data.normalize, mean=mean, std=std)


def severity(name: str, degree: int) -> float:
    """The severity parameter of ``name`` at ``degree`` (1..5); clear errors otherwise."""
    if name not in SEVERITY:
        raise ValueError(f"analysis.corruptions.names: unknown corruption {name!r}; known: {', '.join(NAMES)}")
    if not 1 <= degree <= DEGREES:
        raise ValueError(f"corruption degree {degree} is out of range; use 0 (clean) or 1..{DEGREES}")
    return SEVERITY[name][degree - 1]


def corrupt(images: Tensor, name: str, degree: int, seed: int) -> tuple[Tensor, Normalize]:
    """Corrupted copy of a [0, 1] batch and the normalisation to feed it to a network.

    ``degree`` 0 returns the batch unchanged with :func:`data.normalize`. The work runs on the
    CPU (JPEG coding needs it; the RNG fork covers the CPU generator only); the result goes
    back to the batch's device and stays in [0, 1] with the same shape and dtype.
    """
    if degree == 0:
        return images, data.normalize
    level = severity(name, degree)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "distribution_shift":
            return images, _shifted_normalize(level)
        out = _PIXEL[name](level, images.detach().cpu().float())
    return out.clamp(0, 1).to(device=images.device, dtype=images.dtype), data.normalize
