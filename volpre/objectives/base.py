"""What every pretraining objective is: a :class:`Pretrainer` module returning an :class:`ObjectiveOutput`.

The trainer wraps a ``Pretrainer`` in DDP and calls ``pretrainer(batch, generator)`` once per
micro-step, where ``batch["image"]`` is ``(B, C, X, Y, Z)`` float on the training device,
``batch.get("subject")`` an optional ``(B,)`` integer tensor of subject ids, and ``generator`` a
seeded ``torch.Generator`` on the same device from which every random mask and disruption is
drawn. Export takes ``pretrainer.encoder.state_dict()``; the decoder and any objective-specific
parameters (mask tokens, projection heads) are dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ObjectiveOutput(NamedTuple):
    """One micro-step's result (a NamedTuple, so DDP and pytrees can traverse it)."""

    loss: torch.Tensor
    """Scalar float32 with grad: the total loss to backpropagate."""
    parts: dict[str, torch.Tensor]
    """Detached scalar terms of the loss (e.g. ``reconstruction``, ``contrastive``), still on the device."""
    images: dict[str, torch.Tensor]
    """Detached ``(B, C, X, Y, Z)`` volumes for logging: ``input``, ``corrupted``, ``reconstruction``."""


class Pretrainer(nn.Module):
    """An encoder, its pretraining decoder and the objective's own parameters.

    Subclasses define ``forward(batch: dict, generator: torch.Generator) -> ObjectiveOutput`` and
    create only parameters their forward uses (DDP rejects unused ones).

    Args:
        encoder: a volpre encoder (five maps at strides 2..32; ``feature_channels``).
        decoder: maps the encoder's five maps back to ``(B, C, X, Y, Z)``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder


def batch_image(batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Return ``batch["image"]`` after checking it is ``(B, C, X, Y, Z)`` float on the generator's device."""
    if "image" not in batch:
        raise KeyError(f"the batch has no 'image' entry (keys: {sorted(batch)})")
    image = batch["image"]
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or not image.is_floating_point():
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"batch['image'] must be a float tensor (B, C, X, Y, Z), got {found}")
    if generator.device != image.device:
        raise ValueError(
            f"the random generator is on {generator.device} but batch['image'] is on {image.device}; "
            f"create the generator on the batch's device"
        )
    return image
