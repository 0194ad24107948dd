"""The contract every volpre encoder meets.

An encoder is an ``nn.Module`` whose ``forward(x)`` takes ``(B, C, X, Y, Z)`` float with X, Y, Z
multiples of 32 and returns a list of five feature maps at strides :data:`FEATURE_STRIDES` of the
input, and whose attribute ``feature_channels`` (a tuple of five ints) gives each map's channels.
"""

from __future__ import annotations

import torch

FEATURE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
"""Stride of each encoder feature map relative to the input, finest first."""


def check_encoder_input(x: torch.Tensor, in_channels: int) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, X, Y, Z)`` with X, Y, Z multiples of 32.

    Only reads the (static) shape, so it never synchronises with the device.
    """
    total_stride = FEATURE_STRIDES[-1]
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(
            f"encoder input must be (batch, {in_channels} channels (model.in_channels), X, Y, Z), "
            f"got shape {tuple(x.shape)}"
        )
    if any(size % total_stride for size in x.shape[2:]):
        raise ValueError(
            f"encoder input spatial size must be multiples of {total_stride} (data.roi), got {tuple(x.shape[2:])}"
        )
