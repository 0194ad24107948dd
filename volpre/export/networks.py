"""The networks volpre bundles fine-tune, built by factories that load their weights strictly.

A bundle's ``network_def`` is one of the factories below, so that parsing ``network_def``
(``ConfigWorkflow.initialize()``, ``verify_net_in_out``, ``ckpt_export``) already yields the
network holding its weights:

- ``pretrained_encoder``: the exported ``models/pretrained_encoder.pt`` (network keys of the
  encoder only, see :mod:`volpre.export.keymap`) is loaded into the encoder; the rest of the
  network keeps its random initialisation. ``None`` is the *scratch* arm (no pretrained weights).
- ``checkpoint``: a whole-network state dict (``models/model.pt``, written by the bundle's
  ``CheckpointSaver`` after fine-tuning) is loaded into the whole network.

Both loads are strict: a missing, unexpected or misshapen key (another ResNet depth, another
Swin ``feature_size``, another ``in_channels``) raises :class:`~volpre.models.weights.WeightsError`
listing all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from monai.networks.nets import FlexibleUNet, SwinUNETR
from torch import nn

from volpre.export.errors import ExportError
from volpre.models import ResNet3DEncoder, SwinEncoder
from volpre.models.weights import check_state_dict, load_strictly, read_state_dict
from volpre.survival import SurvivalNet


@dataclass(frozen=True)
class NetworkSpec:
    """A network a bundle can hold."""

    task: str
    """``"segmentation"`` or ``"survival"``."""
    network_class: type[nn.Module]
    encoder_attr: str
    """Attribute of the network holding the pretrained encoder."""
    encoders: tuple[str, ...]
    """volpre encoder families whose weights it takes."""


NETWORKS: dict[str, NetworkSpec] = {
    "swinunetr": NetworkSpec("segmentation", SwinUNETR, "swinViT", ("swin",)),
    "flexibleunet": NetworkSpec("segmentation", FlexibleUNet, "encoder", ("resnet",)),
    "survivalnet": NetworkSpec("survival", SurvivalNet, "encoder", ("swin", "resnet")),
}
"""Network name (``volpre export --network``) -> what it is and where its encoder sits: the one
table of which network takes which encoder (the key maps, the export defaults and checks derive
from it; the CLI's ``--network`` choices are checked against it by a test)."""


def default_network(task: str, encoder: str) -> str | None:
    """The network a ``task`` bundle of an ``encoder`` holds unless told otherwise: the first of
    :data:`NETWORKS` for that task that takes the encoder (None if none does)."""
    return next((name for name, spec in NETWORKS.items() if spec.task == task and encoder in spec.encoders), None)


def network_name(network: nn.Module) -> str:
    """The :data:`NETWORKS` name of ``network`` (unwrapping DDP / DataParallel ``.module``).

    Raises:
        TypeError: ``network`` is none of the bundle networks.
    """
    module = network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network
    for name, spec in NETWORKS.items():
        if isinstance(module, spec.network_class):
            return name
    known = ", ".join(spec.network_class.__name__ for spec in NETWORKS.values())
    raise TypeError(f"{type(module).__name__} is not a network volpre bundles fine-tune (expected one of {known})")


def encoder_of(network: nn.Module) -> nn.Module:
    """The pretrained-encoder submodule of a bundle network (``swinViT`` or ``encoder``)."""
    module = network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network
    return getattr(module, NETWORKS[network_name(module)].encoder_attr)


def load_weights(network: nn.Module, pretrained_encoder: str | os.PathLike[str] | None,
                 checkpoint: str | os.PathLike[str] | None, description: str) -> nn.Module:
    """Strictly load the encoder file or the whole-network file into ``network``; return it.

    ``description`` names the network and the arguments that decide its keys and shapes (for
    error messages).

    Raises:
        ExportError: both files are given.
        WeightsError: a file cannot be read or does not fit (every key problem listed).
    """
    if pretrained_encoder is not None and checkpoint is not None:
        raise ExportError(
            f"network_def: give pretrained_encoder ({pretrained_encoder}) or checkpoint ({checkpoint}), not both: "
            "the checkpoint already holds the encoder"
        )
    name = network_name(network)
    if checkpoint is not None:
        state = read_state_dict(checkpoint, "fine-tuned network weights")
        load_strictly(network, state, source=f"fine-tuned network weights {checkpoint}", target=description)
    if pretrained_encoder is not None:
        attr = NETWORKS[name].encoder_attr
        prefix = attr + "."
        state = read_state_dict(pretrained_encoder, "pretrained encoder weights")
        expected = {k: v for k, v in network.state_dict().items() if k.startswith(prefix)}
        source, target = f"pretrained encoder weights {pretrained_encoder}", f"the {attr} of {description}"
        check_state_dict(expected, state, source, target)
        load_strictly(getattr(network, attr), {k[len(prefix):]: v for k, v in state.items()}, source, target)
    return network


def swin_unetr(
    in_channels: int,
    out_channels: int,
    feature_size: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int,
    use_v2: bool,
    use_checkpoint: bool = False,
    dropout_path_rate: float = 0.0,
    pretrained_encoder: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> SwinUNETR:
    """MONAI ``SwinUNETR`` for ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``.

    X, Y, Z must be multiples of 32, and at least 64 when training (SwinUNETR's instance norm
    needs more than one voxel on its deepest, stride-32 map). The Swin arguments are the
    pretraining encoder's (``model.swin`` of the run config); see :func:`load_weights` for the
    two weight files.
    """
    network = SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        use_v2=use_v2,
        use_checkpoint=use_checkpoint,
        dropout_path_rate=dropout_path_rate,
    )
    description = (
        f"SwinUNETR(in_channels={in_channels}, out_channels={out_channels}, feature_size={feature_size}, "
        f"depths={list(depths)}, num_heads={list(num_heads)}, window_size={window_size}, use_v2={use_v2})"
    )
    return load_weights(network, pretrained_encoder, checkpoint, description)


def flexible_unet(
    in_channels: int,
    out_channels: int,
    backbone: str,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    pretrained_encoder: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> FlexibleUNet:
    """MONAI ``FlexibleUNet`` with a 3D ResNet backbone (``"resnet10"`` ... ``"resnet50"``).

    ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``; X, Y, Z multiples of 32
    (batch >= 2 when training on 32^3 crops: BatchNorm on the 1^3 deepest map). Never downloads
    weights (``pretrained=False``); see :func:`load_weights` for the two weight files.
    """
    network = FlexibleUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        backbone=backbone,
        pretrained=False,
        decoder_channels=tuple(decoder_channels),
        spatial_dims=3,
    )
    description = (
        f"FlexibleUNet(backbone={backbone}, in_channels={in_channels}, out_channels={out_channels}, "
        f"decoder_channels={list(decoder_channels)})"
    )
    return load_weights(network, pretrained_encoder, checkpoint, description)


def survival_net(
    encoder: SwinEncoder | ResNet3DEncoder,
    hidden_channels: Sequence[int] = (128,),
    dropout: float = 0.0,
    pretrained_encoder: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> SurvivalNet:
    """:class:`volpre.survival.SurvivalNet` on a volpre encoder: ``(B, C, X, Y, Z)`` -> risk ``(B, 1)``.

    Args:
        encoder: a volpre encoder (in a bundle, a ``volpre.models.SwinEncoder`` or
            ``volpre.models.ResNet3DEncoder`` component built with the pretraining arguments).
        hidden_channels: widths of the MLP head's hidden layers.
        dropout: dropout after each hidden layer of the head.
        pretrained_encoder, checkpoint: see :func:`load_weights`.
    """
    network = SurvivalNet(encoder, encoder.feature_channels[-1], hidden_channels=hidden_channels, dropout=dropout)
    description = (
        f"SurvivalNet({type(encoder).__name__} with feature channels {list(encoder.feature_channels)}, "
        f"in_channels={encoder.in_channels}, hidden_channels={list(hidden_channels)})"
    )
    return load_weights(network, pretrained_encoder, checkpoint, description)
