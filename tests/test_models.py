"""Encoders (Swin, 3D ResNet), their export-key contract with MONAI, and the pretraining decoder."""

from __future__ import annotations

import typing

import pytest
import torch
from monai.networks.nets import FlexibleUNet, SwinUNETR

from volpre.config import ConfigError, ModelConfig, ResNetConfig, SwinConfig, config_from_dict
from volpre.models import (
    ENCODERS,
    FEATURE_STRIDES,
    RESNET_DEPTHS,
    ResNet3DEncoder,
    SwinEncoder,
    UNetDecoder,
    build_decoder,
    build_encoder,
)

TINY_SWIN = SwinConfig(feature_size=12, window_size=4)


def _swin_cfg(in_channels: int = 1, use_v2: bool = True, **swin) -> ModelConfig:
    fields = {**TINY_SWIN.__dict__, "use_v2": use_v2, **swin}
    return ModelConfig(encoder="swin", in_channels=in_channels, decoder_channels=8, swin=SwinConfig(**fields))


def _resnet_cfg(depth: int = 10, in_channels: int = 1) -> ModelConfig:
    return ModelConfig(encoder="resnet", in_channels=in_channels, decoder_channels=8, resnet=ResNetConfig(depth=depth))


def _volume(batch: int, channels: int, shape=(32, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- export keys


@pytest.mark.parametrize("use_v2", [True, False])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_swin_keys_equal_swinunetr_swinvit_and_load_strictly(use_v2, in_channels):
    torch.manual_seed(0)
    encoder = build_encoder(_swin_cfg(in_channels, use_v2)).eval()
    reference = SwinUNETR(
        in_channels=in_channels,
        out_channels=3,
        feature_size=12,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=4,
        use_v2=use_v2,
    ).swinViT.eval()
    assert list(encoder.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(encoder.state_dict(), strict=True)
    x = _volume(2, in_channels, (32, 32, 64))
    with torch.no_grad():
        ours, theirs = encoder(x), reference(x)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_resnet_keys_equal_flexibleunet_encoder_and_load_strictly(depth):
    torch.manual_seed(0)
    encoder = build_encoder(_resnet_cfg(depth)).eval()
    reference = FlexibleUNet(in_channels=1, out_channels=2, backbone=f"resnet{depth}", spatial_dims=3).encoder.eval()
    assert list(encoder.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(encoder.state_dict(), strict=True)
    x = _volume(1, 1)
    with torch.no_grad():
        ours, theirs = encoder(x), reference(x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resnet_in_channels_reach_the_stem():
    encoder = build_encoder(_resnet_cfg(10, in_channels=3))
    assert encoder.conv1.in_channels == 3
    reference = FlexibleUNet(in_channels=3, out_channels=2, backbone="resnet10", spatial_dims=3).encoder
    reference.load_state_dict(encoder.state_dict(), strict=True)


# ----------------------------------------------------------------------------- encoder contract


@pytest.mark.parametrize(
    "model_cfg", [_swin_cfg(2), _resnet_cfg(10, 2), _resnet_cfg(50, 2)], ids=["swin", "resnet10", "resnet50"]
)
def test_encoder_returns_five_maps_at_strides_2_to_32_with_declared_channels(model_cfg):
    encoder = build_encoder(model_cfg)
    shape = (32, 64, 96)
    features = encoder(_volume(2, 2, shape))
    assert len(features) == len(encoder.feature_channels) == len(FEATURE_STRIDES) == 5
    for feature, channels, stride in zip(features, encoder.feature_channels, FEATURE_STRIDES):
        assert feature.shape == (2, channels, *(s // stride for s in shape))
        assert feature.dtype == torch.float32


def test_swin_embed_then_stages_is_forward():
    encoder = build_encoder(_swin_cfg()).eval()
    x = _volume(1, 1)
    embedding = encoder.embed(x)
    assert embedding.shape == (1, 12, 16, 16, 16)
    for a, b in zip(encoder.stages(embedding), encoder(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_swin_gradient_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build_encoder(_swin_cfg(use_checkpoint=False))
    checkpointed = build_encoder(_swin_cfg(use_checkpoint=True))
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    x = _volume(1, 1)
    for model in (plain, checkpointed):
        sum(f.square().mean() for f in model(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("model_cfg", [_swin_cfg(), _resnet_cfg()], ids=["swin", "resnet"])
def test_encoder_rejects_sizes_not_multiple_of_32(model_cfg):
    encoder = build_encoder(model_cfg)
    with pytest.raises(ValueError, match=r"multiples of 32 \(data.roi\), got \(32, 48, 32\)"):
        encoder(_volume(1, 1, (32, 48, 32)))


@pytest.mark.parametrize("model_cfg", [_swin_cfg(), _resnet_cfg()], ids=["swin", "resnet"])
def test_encoder_rejects_wrong_channel_count(model_cfg):
    encoder = build_encoder(model_cfg)
    with pytest.raises(ValueError, match=r"1 channels \(model.in_channels\).*got shape \(1, 2, 32, 32, 32\)"):
        encoder(_volume(1, 2))


def test_registry_names_match_the_config_literal():
    assert set(ENCODERS) == set(typing.get_args(typing.get_type_hints(ModelConfig)["encoder"]))
    assert isinstance(build_encoder(_swin_cfg()), SwinEncoder)
    assert isinstance(build_encoder(_resnet_cfg()), ResNet3DEncoder)


def test_build_encoder_names_unknown_encoder():
    bad = ModelConfig()
    bad.encoder = "vit"  # bypasses the typed loader on purpose
    with pytest.raises(ConfigError, match=r"model.encoder: got 'vit', expected one of swin, resnet"):
        build_encoder(bad)


def test_resnet_rejects_unsupported_depth():
    with pytest.raises(ValueError, match=r"model.resnet.depth: got 101, expected one of \[10, 18, 34, 50\]"):
        ResNet3DEncoder(depth=101, in_channels=1)


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("model_cfg", [_swin_cfg(2), _resnet_cfg(10, 2)], ids=["swin", "resnet"])
@pytest.mark.parametrize("shape", [(32, 32, 32), (64, 32, 96)])
def test_decoder_output_shape_equals_input_shape(model_cfg, shape):
    encoder = build_encoder(model_cfg)
    decoder = build_decoder(model_cfg, encoder)
    x = _volume(2, 2, shape)
    out = decoder(encoder(x))
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_decoder_width_follows_decoder_channels():
    decoder = UNetDecoder((12, 24, 48, 96, 192), width=16, out_channels=1)
    assert decoder.bottleneck.conv.out_channels == 16 * 2**4
    assert decoder.head.conv.conv.in_channels == 16


def test_decoder_rejects_width_not_multiple_of_8():
    with pytest.raises(ValueError, match=r"model.decoder_channels\) must be a multiple of 8, got 12"):
        UNetDecoder((12, 24, 48, 96, 192), width=12, out_channels=1)


def test_decoder_rejects_wrong_level_count():
    with pytest.raises(ValueError, match=r"decoder needs 5 encoder levels, got channels \[12, 24\]"):
        UNetDecoder((12, 24), width=8, out_channels=1)


# ----------------------------------------------------------------------------- config sections


@pytest.mark.parametrize(
    "override, message",
    [
        ({"swin": {"feature_size": 18}}, r"model.swin.feature_size must be a positive multiple of 12, got 18"),
        ({"swin": {"depths": [2, 2, 2]}}, r"model.swin.depths and model.swin.num_heads need 4 stages"),
        ({"swin": {"depths": [2, 0, 2, 2]}}, r"model.swin.depths must be >= 1 in every stage, got \[2, 0, 2, 2\]"),
        ({"swin": {"num_heads": [5, 6, 12, 24]}}, r"model.swin.num_heads\[0\] must divide the stage's 48 channels"),
        ({"swin": {"window_size": 0}}, r"model.swin.window_size must be >= 1, got 0"),
        ({"swin": {"drop_path_rate": 1.0}}, r"model.swin.drop_path_rate must be in \[0, 1\), got 1.0"),
        ({"decoder_channels": 20}, r"model.decoder_channels must be a positive multiple of 8, got 20"),
        ({"in_channels": 0}, r"model.in_channels must be >= 1, got 0"),
        ({"resnet": {"depth": 101}}, r"model.resnet.depth: got 101, expected one of 10, 18, 34, 50"),
    ],
)
def test_model_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": override})
