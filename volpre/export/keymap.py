"""Explicit key maps from a volpre encoder's state dict to the networks the bundles fine-tune.

volpre encoders are built in MONAI's own layouts (:mod:`volpre.models`): the Swin encoder's keys
are those of ``SwinUNETR(...).swinViT`` and the ResNet encoder's those of MONAI's
``ResNetFeatures`` (= ``FlexibleUNet(backbone="resnetNN", spatial_dims=3).encoder``). So every
supported (encoder, network) pair maps a key by prepending the attribute that holds the encoder
in the network, and nothing is renamed inside it:

- ``swin`` -> ``swinunetr`` (``monai.networks.nets.SwinUNETR``): ``k`` becomes ``swinViT.k``
- ``resnet`` -> ``flexibleunet`` (``monai.networks.nets.FlexibleUNet``): ``k`` becomes ``encoder.k``
- ``swin`` -> ``survivalnet`` (``volpre.survival.SurvivalNet``): ``k`` becomes ``encoder.k``
- ``resnet`` -> ``survivalnet`` (``volpre.survival.SurvivalNet``): ``k`` becomes ``encoder.k``

The exported ``models/pretrained_encoder.pt`` holds the mapped keys, i.e. exactly the network's
own names for the encoder's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from volpre.export.errors import ExportError
from volpre.export.networks import NETWORKS

def key_prefix(encoder: str, network: str) -> str:
    """The prefix of the encoder's keys inside ``network``: its ``encoder_attr`` and a dot
    (:data:`volpre.export.networks.NETWORKS`, the one table of which network takes which encoder).

    Raises:
        ExportError: the pair is not supported; the message lists the supported pairs.
    """
    spec = NETWORKS.get(network)
    if spec is None or encoder not in spec.encoders:
        pairs = ", ".join(f"{e} -> {n}" for n, s in NETWORKS.items() for e in s.encoders)
        raise ExportError(f"no key map from a {encoder!r} encoder to network {network!r}; supported pairs: {pairs}")
    return spec.encoder_attr + "."


def to_network_keys(encoder_state: Mapping[str, torch.Tensor], encoder: str, network: str) -> dict[str, torch.Tensor]:
    """Rename an encoder state dict (keys as in ``volpre.models.build_encoder(...)``) to the network's keys.

    The tensors are the same objects (no copy).
    """
    prefix = key_prefix(encoder, network)
    return {prefix + key: value for key, value in encoder_state.items()}


def to_encoder_keys(network_state: Mapping[str, torch.Tensor], encoder: str, network: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_network_keys`: the encoder's part of a network state dict, encoder keys.

    Keys outside the encoder (decoder, head) are left out.
    """
    prefix = key_prefix(encoder, network)
    return {key[len(prefix):]: value for key, value in network_state.items() if key.startswith(prefix)}
