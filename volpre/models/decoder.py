"""Pretraining decoders (dropped at export): volpre's light UNet-like decoder of five encoder maps,
and SparK's light hierarchical decoder (:class:`SparKLightDecoder`, used by the ResNet's SparK).

:class:`UNetDecoder`: five encoder feature maps back to a full-resolution volume.

Used only during pretraining (export drops it). It is built from MONAI's ``BasicUNet`` pieces:
a 1x1 convolution on the deepest map, four ``UpCat`` stages (transposed-conv upsampling, concat
with the encoder map of that stride, two 3^3 convolutions), then a transposed 2^3 convolution from
stride 2 to full resolution and a 1x1 output convolution (no 3^3 convolution at full resolution,
where it would cost the most). GroupNorm keeps it independent of batch size and well defined on
the 1^3 deepest map of a 32^3 crop. It sees only encoder features (never the input image), so it
cannot copy masked voxels through a skip connection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetOutBlock
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from volpre.models.contract import FEATURE_STRIDES

NORM_GROUPS = 8
"""GroupNorm groups in every decoder convolution (the decoder widths are multiples of it)."""
_NORM = ("group", {"num_groups": NORM_GROUPS})
_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


class UNetDecoder(nn.Module):
    """Decode five maps at strides 2..32 into ``(B, out_channels, X, Y, Z)`` (linear output).

    Args:
        encoder_channels: channels of the five encoder maps, finest first.
        width: channels at stride 2; the stage at stride ``2**(i+1)`` has ``width * 2**i``.
            A multiple of :data:`NORM_GROUPS`.
        out_channels: channels of the reconstruction (the encoder's input channels).
    """

    def __init__(self, encoder_channels: Sequence[int], width: int, out_channels: int) -> None:
        super().__init__()
        if len(encoder_channels) != len(FEATURE_STRIDES):
            raise ValueError(
                f"decoder needs {len(FEATURE_STRIDES)} encoder levels, got channels {list(encoder_channels)}"
            )
        if width < NORM_GROUPS or width % NORM_GROUPS:
            raise ValueError(f"decoder width (model.decoder_channels) must be a multiple of {NORM_GROUPS}, got {width}")
        widths = [width * 2**level for level in range(len(encoder_channels))]
        self.bottleneck = Convolution(3, encoder_channels[-1], widths[-1], kernel_size=1, act=_ACT, norm=_NORM)
        self.up_stages = nn.ModuleList(
            UpCat(3, widths[level + 1], encoder_channels[level], widths[level], act=_ACT, norm=_NORM, bias=True)
            for level in reversed(range(len(encoder_channels) - 1))
        )
        self.to_full_resolution = Convolution(
            3,
            widths[0],
            widths[0],
            strides=2,
            kernel_size=2,
            padding=0,
            output_padding=0,
            act=_ACT,
            norm=_NORM,
            is_transposed=True,
        )
        self.head = UnetOutBlock(3, widths[0], out_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]``: ``(B, encoder_channels[i], X/2**(i+1), ...)`` -> ``(B, out_channels, X, Y, Z)``."""
        x = self.bottleneck(features[-1])
        for stage, skip in zip(self.up_stages, reversed(features[:-1])):
            # UpCat.forward's computation, called piecewise: its torch.jit.isinstance check is a
            # torch.compile graph break per stage. The encoder's strides are exact (crop sides are
            # multiples of 32), so UpCat's replicate padding of odd shapes never applies.
            up = stage.upsample(x)
            if up.shape[2:] != skip.shape[2:]:
                raise ValueError(f"decoder: upsampled map {tuple(up.shape[2:])} does not match the encoder map "
                                 f"{tuple(skip.shape[2:])}; crop sides must be multiples of 32")
            x = stage.convs(torch.cat([skip, up], dim=1))
        return self.head(self.to_full_resolution(x))


class SparKLightDecoder(nn.Module):
    """SparK's light hierarchical decoder (Tian et al. 2023, keyu-tian/SparK ``pretrain/decoder.py``
    ``LightDecoder``), in 3D: dense maps at strides 32, 16, 8, 4 -> ``(B, out_channels, X, Y, Z)``.

    Five blocks, each: transposed convolution ``4^3`` stride 2 (upsampling ``x2``), then ``3^3``
    conv, BatchNorm, ReLU6, ``3^3`` conv, BatchNorm. The input of block ``i`` is the sum of block
    ``i - 1``'s output and the map given for that stride (none after stride 4); a ``1^3``
    convolution makes the output. Widths halve at each block from ``width`` (SparK's rule, there
    ``width=768`` at stride 32). Initialisation as SparK's: convolutions truncated normal (std
    0.02), transposed convolutions Kaiming normal (fan out), BatchNorm weight 1 and bias 0.

    Args:
        width: channels at stride 32 (a multiple of 32, so the last block has ``width / 32``).
        out_channels: channels of the reconstruction.
    """

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        blocks = len(FEATURE_STRIDES)
        if width % 2**blocks:
            raise ValueError(f"SparK decoder width must be a multiple of {2**blocks}, got {width}")
        self.widths = tuple(width // 2**i for i in range(blocks + 1))
        """Channels entering each block (strides 32, 16, 8, 4, 2), then the output block's."""
        self.blocks = nn.ModuleList(self._block(cin, cout) for cin, cout in zip(self.widths[:-1], self.widths[1:]))
        self.head = nn.Conv3d(self.widths[-1], out_channels, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.ConvTranspose3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.ConvTranspose3d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True),
            nn.Conv3d(cin, cin, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: maps at strides 32, 16, 8, 4 (deepest first), ``features[i]`` with
        ``widths[i]`` channels -> ``(B, out_channels, X, Y, Z)``."""
        if len(features) >= len(self.blocks):
            raise ValueError(f"SparK decoder takes at most {len(self.blocks) - 1} maps, got {len(features)}")
        x = features[0]
        for index, block in enumerate(self.blocks):
            if 0 < index < len(features):
                x = x + features[index]
            x = block(x)
        return self.head(x)
