"""SimCLR-style augmented views of 3D crops, drawn on the batch's device and applied vectorised.

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
appendix A; official code google-research/simclr, ``data_util.py``) makes each view of an image by
a random resized crop with a horizontal flip, a colour distortion (jitter with probability 0.8,
random grayscale with probability 0.2) and a Gaussian blur with probability 0.5. For one-channel
(or co-registered multi-channel) volumes we keep what has a 3D grayscale analogue, in SimCLR's order:

1. **Random resized crop and flips** (one ``grid_sample`` per batch): a sub-box of the crop holding
   a fraction of its volume uniform in ``crop_scale`` (SimCLR: area in [0.08, 1]), side ratios
   within ``crop_aspect`` (SimCLR: [3/4, 4/3]), at a uniform position, resampled trilinearly to the
   crop's size; each axis in ``flip_axes`` mirrored with probability 1/2 (SimCLR flips 2D images
   horizontally only).
2. **Intensity jitter** with probability ``jitter_probability`` (SimCLR: 0.8): contrast (deviations
   from each channel's mean scaled by a factor uniform in ``[1 - contrast, 1 + contrast]``) and
   brightness (a shift uniform in ``[-brightness, brightness]``, as in the paper's appendix A
   pseudo-code, ``tf.image.random_brightness``; the official code's default ``impl='simclrv2'``
   multiplies by a factor in ``[1 - b, 1 + b]`` instead). SimCLR's brightness and contrast at
   colour strength s are 0.8 s (s = 1 on ImageNet, 0.5 on CIFAR-10); the two commute in this form,
   so SimCLR's random order is moot. Saturation, hue and grayscale have no grayscale analogue and
   are left out; nothing is clipped (SimCLR clips RGB to [0, 1]; MR z-scores are not bounded). CT
   crops are windowed to [0, 1] like SimCLR's images, so a shift means what it means there.
3. **Gaussian blur** with probability ``blur_probability`` (SimCLR: 0.5 on ImageNet, off on
   CIFAR-10), sigma uniform in ``blur_sigma`` voxels (SimCLR: [0.1, 2.0] pixels), kernels cut at
   4 sigma (SimCLR's kernel spans 10 % of the image).
4. **Gaussian noise** (ours, off by default): std uniform in ``noise_std`` per view.

:func:`draw_views` draws every random number of a batch of views from a ``torch.Generator`` (so a
compiled step sees no random op and resume stays exact); :func:`make_views` is deterministic given
them. Shapes: crops ``(N, C, X, Y, Z)`` float; every draw has ``N`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from volpre.config import SimCLRConfig
from volpre.objectives.perturbations import add_gaussian_noise, draw_gaussian_noise, gaussian_blur, random_uniform


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, device=generator.device)


def draw_views(shape: Sequence[int], cfg: SimCLRConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random parameters of ``shape[0]`` views of crops of ``shape`` ``(N, C, X, Y, Z)``.

    Returns, all on ``generator.device`` and drawn in this order:
        ``box_volume`` ``(N,)`` float32 in ``crop_scale``; ``box_log_aspect`` ``(N, 3)`` float32 in
        ``[log(lo) / 2, log(hi) / 2]`` of ``crop_aspect``; ``box_position`` ``(N, 3)`` float32 in
        [0, 1]; ``flip`` ``(N, 3)`` bool (False on axes not in ``flip_axes``); ``jitter`` ``(N,)``
        bool; ``contrast`` ``(N,)`` float32 factor; ``brightness`` ``(N,)`` float32 shift; ``blur``
        ``(N,)`` bool; ``blur_sigma`` ``(N,)`` float32; and, when ``noise_std`` is not [0, 0],
        ``noise_std`` ``(N,)`` float32 and ``noise`` float32 of ``shape``.
    """
    n = shape[0]
    lo, hi = cfg.crop_aspect
    coin = torch.rand((n, 3), generator=generator, device=generator.device) < 0.5
    draws = {
        "box_volume": random_uniform(n, cfg.crop_scale, generator),
        "box_log_aspect": _uniform((n, 3), math.log(lo) / 2, math.log(hi) / 2, generator),
        "box_position": torch.rand((n, 3), generator=generator, device=generator.device),
        "flip": torch.stack([coin[:, axis] & (axis in cfg.flip_axes) for axis in range(3)], dim=1),
        "jitter": torch.rand(n, generator=generator, device=generator.device) < cfg.jitter_probability,
        "contrast": random_uniform(n, (1.0 - cfg.contrast, 1.0 + cfg.contrast), generator),
        "brightness": random_uniform(n, (-cfg.brightness, cfg.brightness), generator),
        "blur": torch.rand(n, generator=generator, device=generator.device) < cfg.blur_probability,
        "blur_sigma": random_uniform(n, cfg.blur_sigma, generator),
    }
    if cfg.noise_std[1] > 0:
        draws["noise_std"], draws["noise"] = draw_gaussian_noise(shape, cfg.noise_std, generator)
    return draws


def box_affine(box_volume: torch.Tensor, box_log_aspect: torch.Tensor, box_position: torch.Tensor,
               flip: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 4)`` float32 ``theta`` for ``F.affine_grid`` (``align_corners=False``) that samples each
    view's box of the crop, mirrored along its flipped axes.

    The box's side on axis ``k``, as a fraction of the crop's, is ``box_volume ** (1/3) * exp(a_k -
    mean(a))`` with ``a = box_log_aspect`` (so its sides multiply to ``box_volume`` and any two sides'
    ratio is ``exp(a_i - a_j)``), cut at 1 (which then lowers the volume); its centre lies uniformly
    where the box fits (``box_position`` 0 and 1 are the two extremes).
    """
    log_aspect = box_log_aspect - box_log_aspect.mean(dim=1, keepdim=True)
    side = (box_volume.unsqueeze(1) ** (1.0 / 3.0) * log_aspect.exp()).clamp(max=1.0)  # (N, 3) in X, Y, Z
    centre = (1.0 - side) * (2.0 * box_position - 1.0)  # normalised [-1, 1] coordinates
    scale = side * (1.0 - 2.0 * flip.to(side.dtype))
    # affine_grid's coordinates run over (W, H, D) = (Z, Y, X) of an (N, C, X, Y, Z) tensor
    return torch.cat([torch.diag_embed(scale.flip(1)), centre.flip(1).unsqueeze(2)], dim=2)


def resized_crop(crops: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Trilinear resampling of each crop's box (``theta`` from :func:`box_affine`) to the crop's size."""
    grid = F.affine_grid(theta.to(crops.dtype), list(crops.shape), align_corners=False)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_intensity(x: torch.Tensor, apply: torch.Tensor, contrast: torch.Tensor,
                     brightness: torch.Tensor) -> torch.Tensor:
    """``(x - mean_c) * contrast + mean_c + brightness`` for the views where ``apply``; ``x`` elsewhere.

    ``mean_c`` is each view's per-channel mean; ``apply``, ``contrast``, ``brightness`` are ``(N,)``.
    """
    per_view = (-1, 1, 1, 1, 1)
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    jittered = (x - mean) * contrast.to(x.dtype).view(per_view) + mean + brightness.to(x.dtype).view(per_view)
    return torch.where(apply.view(per_view), jittered, x)


def make_views(crops: torch.Tensor, draws: dict[str, torch.Tensor],
               cfg: SimCLRConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the view ``draws`` (from :func:`draw_views`) to ``crops`` ``(N, C, X, Y, Z)``.

    Returns:
        ``(views, geometric)``, both ``(N, C, X, Y, Z)`` float32: the augmented views, and the same
        boxes and flips without intensity jitter, blur or noise (the reconstruction target).
        Computed in float32 even under autocast, so views do not depend on the training precision.
    """
    with torch.autocast(device_type=crops.device.type, enabled=False):
        x = crops.float()
        geometric = resized_crop(x, box_affine(draws["box_volume"], draws["box_log_aspect"], draws["box_position"],
                                               draws["flip"]))
        views = jitter_intensity(geometric, draws["jitter"], draws["contrast"], draws["brightness"])
        blurred = gaussian_blur(views, draws["blur_sigma"], max_sigma=cfg.blur_sigma[1])
        views = torch.where(draws["blur"].view(-1, 1, 1, 1, 1), blurred, views)
        if "noise" in draws:
            views = add_gaussian_noise(views, draws["noise_std"], draws["noise"])
    return views, geometric
