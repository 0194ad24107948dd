"""Low-level image disruptions with per-sample random strength, vectorised over the batch.

Each disruption comes in two halves: a ``draw_*`` function takes the caller's ``torch.Generator``
and returns the random parameters as tensors on its device (so the same generator state gives the
same disruptions), and a deterministic function applies them to ``x`` of shape ``(B, C, X, Y, Z)``
(float), returning a tensor of the same shape, dtype and device. The draws run eagerly, outside a
compiled step (seeded random ops are graph breaks under ``torch.compile``); the apply functions
are plain tensor code.

Blur and down-then-up sampling are convex combinations of input voxels, so they keep values in
the input's ``[min, max]``; noise does not. The disruptive autoencoder's defaults (noise of a given
variance, nearest-neighbour down-then-up sampling) follow its official code (Project-MONAI
research-contributions ``DAE/Pretrain_full_contrast/main_runner.py``); blur and the
average-then-trilinear sampling are volpre's variations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import apply_filter

BLUR_TRUNCATE = 4.0
"""Gaussian kernels are cut at ``int(max(sigma * 4, 0.5) + 0.5)`` voxels, as MONAI's ``gaussian_1d``."""


def random_uniform(
    batch_size: int, value_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """``(B,)`` float32 on ``generator.device``, uniform in ``[low, high]`` (``low`` if they are equal)."""
    low, high = value_range
    return low + (high - low) * torch.rand(batch_size, generator=generator, device=generator.device)


def draw_gaussian_noise(
    shape: Sequence[int], variance_range: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise strengths and the unit noise for a batch of ``shape`` ``(B, C, X, Y, Z)``.

    Returns:
        ``(std, noise)``: ``std`` ``(B,)`` float32, the square root of a variance drawn uniformly
        from ``variance_range``; ``noise`` float32 standard normal of ``shape``.
        :func:`add_gaussian_noise` applies them.
    """
    std = random_uniform(shape[0], variance_range, generator).sqrt()
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    return std, noise


def add_gaussian_noise(x: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x + std[b] * noise`` per sample: ``x`` and ``noise`` ``(B, C, X, Y, Z)``, ``std`` ``(B,)``."""
    return x + std.to(x.dtype).view(-1, 1, 1, 1, 1) * noise.to(x.dtype)


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
        # apply_filter views (B, C, ...) as (1, B*C, ...): a channels_last tensor cannot be viewed so
        out = apply_filter(padded.contiguous(), kernels.view(kernel_shape), padding=0)
    return out


DOWNSAMPLE_MODES = ("nearest", "area")
"""How :func:`down_up_sample` resamples: ``nearest`` both ways, or average pooling then trilinear."""


def down_up_sample(
    x: torch.Tensor, factor: torch.Tensor, factors: Sequence[int], mode: str = "nearest"
) -> torch.Tensor:
    """Downsample by an integer factor, then upsample back to the input size, per sample.

    ``nearest`` is what the disruptive autoencoder's official code does (``F.interpolate`` to
    ``size / factor`` and back, both with its default nearest mode): each ``factor^3`` block takes
    the value of its first voxel. ``area`` averages each block, then interpolates trilinearly.

    Args:
        x: ``(B, C, X, Y, Z)`` float, spatial sizes divisible by every entry of ``factors``.
        factor: ``(B,)`` long, each entry one of ``factors``.
        factors: the distinct factors the batch may use (each is computed for the whole batch and
            selected per sample, so the cost grows with ``len(factors)``, not with ``B``).
        mode: one of :data:`DOWNSAMPLE_MODES`.

    Returns:
        ``(B, C, X, Y, Z)`` like ``x``: a low-resolution version of each sample.
    """
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample mode must be one of {', '.join(DOWNSAMPLE_MODES)}, got {mode!r}")
    if any(size % f for f in factors for size in x.shape[2:]):
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} must be divisible by every downsample factor {list(factors)}"
        )
    out = x
    for f in factors:
        if mode == "nearest":
            low = F.interpolate(x, size=tuple(size // f for size in x.shape[2:]), mode="nearest")
            restored = F.interpolate(low, size=tuple(x.shape[2:]), mode="nearest")
        else:
            low = F.avg_pool3d(x, kernel_size=f)
            restored = F.interpolate(low, scale_factor=f, mode="trilinear", align_corners=False)
        out = torch.where((factor == f).view(-1, 1, 1, 1, 1), restored, out)
    return out


def draw_down_up_factor(batch_size: int, factors: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``(B,)`` long on ``generator.device``: a factor drawn uniformly from ``factors`` per sample."""
    choice = torch.randint(len(factors), (batch_size,), generator=generator, device=generator.device)
    factor = torch.zeros_like(choice)
    for index, f in enumerate(factors):  # no host-to-device copy of the factor list
        factor = torch.where(choice == index, f, factor)
    return factor
