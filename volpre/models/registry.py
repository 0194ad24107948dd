"""Encoder registry: configs name encoders by string; one factory builds them and their decoder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from volpre.config import ConfigError, ModelConfig
from volpre.models.decoder import UNetDecoder
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


ENCODERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "swin": _build_swin,
    "resnet": _build_resnet,
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
