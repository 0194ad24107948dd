"""Encoder registry: configs name encoders by string; one factory builds them and their decoder.

``swin`` and ``resnet`` are encoders with volpre's light pretraining decoder; ``nnunet`` is the U-Net an
nnU-Net plan describes, whose own decoder reconstructs (:mod:`volpre.models.nnunet`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from volpre.config import ConfigError, ModelConfig
from volpre.data.nnunet_plan import NNUNetPlan
from volpre.models.decoder import UNetDecoder
from volpre.models.nnunet import pretraining_network
from volpre.models.resnet import ResNet3DEncoder
from volpre.models.swin import SwinEncoder


def _build_swin(model_cfg: ModelConfig) -> SwinEncoder:
    swin = model_cfg.swin
    return SwinEncoder(
        in_channels=model_cfg.in_channels,
        feature_size=swin.feature_size,
        depths=swin.depths,
        num_heads=swin.num_heads,
        window_size=swin.window_size,
        use_v2=swin.use_v2,
        use_checkpoint=swin.use_checkpoint,
        drop_path_rate=swin.drop_path_rate,
    )


def _build_resnet(model_cfg: ModelConfig) -> ResNet3DEncoder:
    return ResNet3DEncoder(depth=model_cfg.resnet.depth, in_channels=model_cfg.in_channels)


def _build_nnunet(model_cfg: ModelConfig) -> nn.Module:
    return pretraining_network(NNUNetPlan.load(model_cfg.nnunet)).encoder


ENCODERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "swin": _build_swin,
    "resnet": _build_resnet,
    "nnunet": _build_nnunet,
}
"""Encoder name (``model.encoder``) -> builder from the model config section."""


def build_encoder(model_cfg: ModelConfig) -> nn.Module:
    """Build the encoder named by ``model_cfg.encoder`` (see :mod:`volpre.models.contract`)."""
    builder = ENCODERS.get(model_cfg.encoder)
    if builder is None:
        raise ConfigError(f"model.encoder: got {model_cfg.encoder!r}, expected one of {', '.join(ENCODERS)}")
    return builder(model_cfg)


def build_decoder(model_cfg: ModelConfig, encoder: nn.Module) -> UNetDecoder:
    """The pretraining decoder for ``encoder``: its five maps -> ``(B, in_channels, X, Y, Z)``."""
    return UNetDecoder(encoder.feature_channels, model_cfg.decoder_channels, model_cfg.in_channels)


def build_encoder_and_decoder(model_cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The encoder and the decoder that reconstructs from it during pretraining.

    ``swin``/``resnet``: :func:`build_encoder` and volpre's light :func:`build_decoder`; ``nnunet``: the
    plan's network's own ``encoder`` and ``decoder`` (one network, built by nnU-Net's code).
    """
    if model_cfg.encoder == "nnunet":
        network = pretraining_network(NNUNetPlan.load(model_cfg.nnunet))
        return network.encoder, network.decoder
    encoder = build_encoder(model_cfg)
    return encoder, build_decoder(model_cfg, encoder)
