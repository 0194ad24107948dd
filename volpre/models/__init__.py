"""Encoders (a registry named by ``model.encoder``), the light pretraining decoders, ``--init``
weight layouts (:mod:`~volpre.models.init_weights`) and strict weight loading (:mod:`~volpre.models.weights`).

Imports: errors, files, config, data (an nnU-Net plan's network); no objective, engine or export code.
"""

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
