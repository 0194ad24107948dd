"""Strict reading and loading of weight files: every missing, unexpected or misshapen key is reported.

``torch.nn.Module.load_state_dict(strict=True)`` stops at the first problem class and says
nothing about files that cannot be read. Here a state dict is compared with the module's own
before anything is copied, and the error lists *all* differences, grouped::

    pretrained encoder weights BUNDLE/models/pretrained_encoder.pt does not fit the encoder of
    FlexibleUNet(backbone=resnet34, in_channels=2, ...):
      missing from the file (100): encoder.layer1.1.bn1.bias, ...
      unexpected in the file (0)
      shape mismatches (1): encoder.conv1.weight: file (64, 1, 7, 7, 7), network (64, 2, 7, 7, 7)

Nothing here loads non-strictly: every load is checked key by key first, then strict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from volpre.errors import UserInputError
from volpre.files import read_torch_file


class WeightsError(UserInputError, RuntimeError):
    """A weight file cannot be read, or its tensors do not fit the network that loads them."""


def read_state_dict(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read a ``{key: tensor}`` file with the safe unpickler (``weights_only=True``), on the CPU.

    Args:
        path: the ``.pt`` file (e.g. ``models/pretrained_encoder.pt`` or ``models/model.pt``).
        what: what the file should hold, for messages (e.g. ``"pretrained encoder weights"``).

    Raises:
        WeightsError: the file is missing, truncated or corrupt, or does not hold a flat mapping
            of string keys to tensors. The message names the file.
    """
    path = Path(path)
    state = read_torch_file(path, what, error=WeightsError)
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"{what} {path}: expected a mapping of parameter names to tensors, got {type(state).__name__}"
        )
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{what} {path}: expected a mapping of parameter names to tensors; "
            f"{len(bad)} entries are not tensors (e.g. {', '.join(bad[:5])})"
        )
    return dict(state)


def _listing(title: str, items: list[str]) -> str:
    return f"  {title} ({len(items)})" + (": " + ", ".join(items) if items else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, target: str
) -> None:
    """Raise unless ``given`` has exactly the keys of ``expected``, each with the same shape.

    Args:
        expected: the receiving module's ``state_dict()`` (or the part of it that must be filled).
        given: the tensors to load.
        source: names where ``given`` comes from (a file, a checkpoint), for the message.
        target: names what receives it (a network and its configuration), for the message.

    Raises:
        WeightsError: listing every missing key, every unexpected key and every shape mismatch.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{key}: file {tuple(given[key].shape)}, network {tuple(expected[key].shape)}"
        for key in set(expected) & set(given)
        if given[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        raise WeightsError(
            "\n".join(
                [
                    f"{source} does not fit {target}:",
                    _listing("missing from the file", missing),
                    _listing("unexpected in the file", unexpected),
                    _listing("shape mismatches", mismatched),
                ]
            )
        )


def load_strictly(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Copy ``state`` into ``module`` after :func:`check_state_dict`; then ``load_state_dict(strict=True)``.

    Tensors are copied onto the module's own devices and dtypes (``load_state_dict`` semantics).

    Raises:
        WeightsError: the keys or shapes differ (all differences listed).
    """
    check_state_dict(module.state_dict(), state, source, target)
    module.load_state_dict(state, strict=True)
