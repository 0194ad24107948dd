"""Encoders (a registry named by ``model.encoder``) and the light pretraining decoder."""

from volpre.models.contract import FEATURE_STRIDES, check_encoder_input
from volpre.models.decoder import SparKLightDecoder, UNetDecoder
from volpre.models.registry import ENCODERS, build_decoder, build_encoder, build_encoder_and_decoder
from volpre.models.resnet import RESNET_DEPTHS, ResNet3DEncoder
from volpre.models.swin import SwinEncoder

__all__ = [
    "ENCODERS",
    "FEATURE_STRIDES",
    "RESNET_DEPTHS",
    "ResNet3DEncoder",
    "SparKLightDecoder",
    "SwinEncoder",
    "UNetDecoder",
    "build_decoder",
    "build_encoder",
    "build_encoder_and_decoder",
    "check_encoder_input",
]
