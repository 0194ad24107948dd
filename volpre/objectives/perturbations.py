"""Low-level image disruptions with per-sample random strength, vectorised over the batch.

Every function takes ``x`` of shape ``(B, C, X, Y, Z)`` (float) and returns a tensor of the same
shape, dtype and device. Random parameters are drawn as ``(B,)`` tensors from the caller's
``torch.Generator`` (which must live on ``x``'s device), so the same generator state gives the same
disruptions; the ``random_*`` functions return the drawn parameters beside the result.

Blur and down-then-up sampling are convex combinations of input voxels, so they keep values in
the input's ``[min, max]``; noise does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import apply_filter

BLUR_TRUNCATE = 4.0
"""Gaussian kernels are cut at ``int(max(sigma * 4, 0.5) + 0.5)`` voxels, as MONAI's ``gaussian_1d``."""


def _check_generator(x: torch.Tensor, generator: torch.Generator) -> None:
    if generator.device != x.device:
        raise ValueError(
            f"the random generator is on {generator.device} but the images are on {x.device}; "
            f"create the generator on the batch's device"
        )


def random_uniform(
    batch_size: int, value_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """``(B,)`` float32 on ``generator.device``, uniform in ``[low, high]`` (``low`` if they are equal)."""
    low, high = value_range
    return low + (high - low) * torch.rand(batch_size, generator=generator, device=generator.device)


def random_gaussian_noise(
    x: torch.Tensor, std_range: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add zero-mean Gaussian noise whose std is drawn per sample.

    Returns:
        ``(x + std[b] * N(0, 1), std)`` with ``std`` ``(B,)`` float32 in ``std_range``.
    """
    _check_generator(x, generator)
    std = random_uniform(x.shape[0], std_range, generator)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std.to(x.dtype).view(-1, 1, 1, 1, 1) * noise, std


def gaussian_kernels(sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Normalised sampled 1D Gaussian kernels, one per sample.

    Args:
        sigma: ``(B,)`` positive float, in voxels; values above ``max_sigma`` are cut at its tail.
        max_sigma: the largest sigma the batch may hold (sets the common kernel length).

    Returns:
        ``(B, K)`` float32, ``K = 2 * tail(max_sigma) + 1``; row ``b`` is zero beyond
        ``tail(sigma[b])`` and equals ``monai.networks.layers.gaussian_1d(sigma[b],
        truncated=4.0, approx="sampled", normalize=True)`` centred in the row.
    """
    max_tail = int(max(max_sigma * BLUR_TRUNCATE, 0.5) + 0.5)
    offsets = torch.arange(-max_tail, max_tail + 1, device=sigma.device, dtype=torch.float32)
    sigma = sigma.to(torch.float32).view(-1, 1)
    tail = torch.floor(torch.clamp(sigma * BLUR_TRUNCATE, min=0.5) + 0.5)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= tail)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma per sample (replicate padding).

    Args:
        x: ``(B, C, X, Y, Z)`` float.
        sigma: ``(B,)`` float on ``x``'s device, in voxels, at most ``max_sigma``.
        max_sigma: upper bound of ``sigma`` (a Python float, so no device sync is needed).

    Returns:
        ``(B, C, X, Y, Z)`` like ``x``; sample ``b`` is blurred with ``sigma[b]`` on every axis.
    """
    kernels = gaussian_kernels(sigma, max_sigma).to(x.dtype)  # (B, K)
    tail = (kernels.shape[1] - 1) // 2
    out = x
    for axis in range(3):
        kernel_shape = [x.shape[0], 1, 1, 1, 1]
        kernel_shape[2 + axis] = kernels.shape[1]
        padding = [0] * 6
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = tail  # F.pad lists the last axis first
        padded = F.pad(out, padding, mode="replicate")
        out = apply_filter(padded, kernels.view(kernel_shape), padding=0)
    return out


def random_gaussian_blur(
    x: torch.Tensor, sigma_range: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur each sample with a sigma drawn uniformly from ``sigma_range`` (voxels).

    Returns:
        ``(blurred, sigma)``; ``sigma`` is ``(B,)`` float32.
    """
    _check_generator(x, generator)
    sigma = random_uniform(x.shape[0], sigma_range, generator)
    return gaussian_blur(x, sigma, max_sigma=sigma_range[1]), sigma


def down_up_sample(x: torch.Tensor, factor: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Average-pool by an integer factor, then upsample trilinearly back, per sample.

    Args:
        x: ``(B, C, X, Y, Z)`` float, spatial sizes divisible by every entry of ``factors``.
        factor: ``(B,)`` long, each entry one of ``factors``.
        factors: the distinct factors the batch may use (each is computed for the whole batch and
            selected per sample, so the cost grows with ``len(factors)``, not with ``B``).

    Returns:
        ``(B, C, X, Y, Z)`` like ``x``: a low-resolution version of each sample.
    """
    if any(size % f for f in factors for size in x.shape[2:]):
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} must be divisible by every downsample factor {list(factors)}"
        )
    out = x
    for f in factors:
        low = F.avg_pool3d(x, kernel_size=f)
        restored = F.interpolate(low, scale_factor=f, mode="trilinear", align_corners=False)
        out = torch.where((factor == f).view(-1, 1, 1, 1, 1), restored, out)
    return out


def random_down_up_sample(
    x: torch.Tensor, factors: Sequence[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Down-then-up sample each sample by a factor drawn uniformly from ``factors``.

    Returns:
        ``(low_resolution, factor)``; ``factor`` is ``(B,)`` long.
    """
    _check_generator(x, generator)
    choice = torch.randint(len(factors), (x.shape[0],), generator=generator, device=x.device)
    factor = torch.zeros_like(choice)
    for index, f in enumerate(factors):
        factor = torch.where(choice == index, f, factor)
    return down_up_sample(x, factor, factors), factor
