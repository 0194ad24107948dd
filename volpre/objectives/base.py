"""What every pretraining objective is: a :class:`Pretrainer` module returning an :class:`ObjectiveOutput`.

A micro-step has two halves, so that the second can be compiled without graph breaks:

1. ``draws = pretrainer.draw(batch, generator)``, run eagerly: every random number the step
   needs (masks, noise, disruption strengths) drawn from ``generator``, a seeded
   ``torch.Generator`` on the training device, into a dict of tensors. Seeded random ops are graph
   breaks under ``torch.compile``; drawing them here also keeps resume exact (the generator's
   state is checkpointed).
2. ``pretrainer(batch, draws)`` (the DDP-wrapped, optionally compiled ``forward``): deterministic
   given ``batch`` and ``draws``.

``batch["image"]`` is ``(B, C, X, Y, Z)`` float on the training device; ``batch.get("subject")``,
``batch.get("modality")``, ``batch.get("item")`` and ``batch.get("scan")`` are optional ``(B,)``
integer tensors of subject ids, modality class ids, dataset item ids and manifest entry ids (the
data loader always provides all four; the contrastive objectives form their pairs from them).
:func:`draw_and_forward` runs both halves
(tests and probes use it). Export takes ``pretrainer.encoder.state_dict()``; the decoder and any
objective-specific parameters (mask tokens, projection heads) are dropped.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import nn


class ObjectiveOutput(NamedTuple):
    """One micro-step's result (a NamedTuple, so DDP and pytrees can traverse it)."""

    loss: torch.Tensor
    """Scalar float32 with grad: the total loss to backpropagate."""
    parts: dict[str, torch.Tensor]
    """Detached scalar terms of the loss (e.g. ``reconstruction``, ``cmcl``), still on the device."""
    images: dict[str, torch.Tensor]
    """Detached ``(B, C, X, Y, Z)`` volumes for logging: ``input``, ``corrupted``, ``reconstruction``."""


class Pretrainer(nn.Module, abc.ABC):
    """An encoder, its pretraining decoder and the objective's own parameters.

    Subclasses define ``draw(batch, generator) -> dict[str, Tensor]`` and ``forward(batch, draws)
    -> ObjectiveOutput`` (see the module docstring), and create only parameters their forward uses
    (DDP rejects unused ones).

    Args:
        encoder: a volpre encoder (five maps at strides 2..32; ``feature_channels``).
        decoder: maps encoder features (the five maps, or what the objective makes of them) back
            to ``(B, C, X, Y, Z)``; ``None`` for an objective that reconstructs nothing (its forward
            must not use one).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @abc.abstractmethod
    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random tensor one ``forward(batch, draws)`` needs, drawn from ``generator``."""

    @abc.abstractmethod
    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """The micro-step's loss, its parts and logging images; deterministic given ``draws``."""


def draw_and_forward(pretrainer: Pretrainer, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
    """One micro-step's forward: ``pretrainer(batch, pretrainer.draw(batch, generator))``."""
    return pretrainer(batch, pretrainer.draw(batch, generator))


def batch_image(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``batch["image"]`` after checking it is ``(B, C, X, Y, Z)`` float (on the generator's
    device, when a generator is given: :meth:`Pretrainer.draw` checks that)."""
    if "image" not in batch:
        raise KeyError(f"the batch has no 'image' entry (keys: {sorted(batch)})")
    image = batch["image"]
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or not image.is_floating_point():
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"batch['image'] must be a float tensor (B, C, X, Y, Z), got {found}")
    if generator is not None and generator.device != image.device:
        raise ValueError(
            f"the random generator is on {generator.device} but batch['image'] is on {image.device}; "
            f"create the generator on the batch's device"
        )
    return image
