"""3D ResNet encoder in MONAI's ``ResNetFeatures`` layout.

:class:`ResNet3DEncoder` *is* a :class:`monai.networks.nets.ResNetFeatures` (built with
``pretrained=False``: MONAI's default downloads MedicalNet weights), so its ``state_dict()`` keys
are exactly those of ``FlexibleUNet(backbone="resnetNN", spatial_dims=3).encoder`` and one state
dict serves segmentation strictly.

Like :class:`~volpre.models.SwinEncoder`, the forward pass is split at the stem (the ResNet's
"patch embedding": a 7^3 stride-2 convolution, BatchNorm and ReLU) into :meth:`~ResNet3DEncoder.embed`
and :meth:`~ResNet3DEncoder.stages`, so an objective can disrupt the stem's output (the disruptive
autoencoder's local masking does).
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNetFeatures
from monai.networks.nets.resnet import ResNetBottleneck

from volpre.models.contract import check_encoder_input

RESNET_DEPTHS: tuple[int, ...] = (10, 18, 34, 50)
"""Depths volpre builds (MONAI also has 101/152/200; FlexibleUNet accepts them, we do not test them)."""


class ResNet3DEncoder(ResNetFeatures):
    """3D ResNet returning five feature maps at strides 2, 4, 8, 16 and 32.

    Level 0 is the stem (conv 7^3 stride 2, BatchNorm, ReLU; 64 channels); levels 1-4 are
    ``layer1``-``layer4`` (64/128/256/512 channels times the block expansion: 1 for
    ResNet10/18/34, 4 for ResNet50).

    Args:
        depth: one of :data:`RESNET_DEPTHS`.
        in_channels: input channels ``C``.
    """

    def __init__(self, depth: int, in_channels: int) -> None:
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"model.resnet.depth: got {depth}, expected one of {list(RESNET_DEPTHS)}")
        super().__init__(f"resnet{depth}", pretrained=False, spatial_dims=3, in_channels=in_channels)
        self.in_channels = in_channels
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        last_convs = [
            stage[-1].conv3 if isinstance(stage[-1], ResNetBottleneck) else stage[-1].conv2 for stage in stages
        ]
        self.feature_channels: tuple[int, ...] = (self.conv1.out_channels, *(conv.out_channels for conv in last_convs))
        """Channels of the five feature maps, finest (stride 2) first."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: ``(B, C, X, Y, Z)`` float -> ``(B, 64, X/2, Y/2, Z/2)`` (conv 7^3 stride 2, BN, ReLU; >= 0)."""
        check_encoder_input(x, self.in_channels)
        return self.act(self.bn1(self.conv1(x)))

    def stages(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Max pooling and ``layer1``-``layer4`` on a stem output ``(B, 64, X/2, Y/2, Z/2)``.

        Returns five maps at strides 2..32: the stem output itself, then each stage's output (as
        ``ResNetFeatures.forward``).
        """
        features = [embedding]
        x = embedding if self.no_max_pool else self.maxpool(embedding)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, X, Y, Z)`` float, X/Y/Z multiples of 32 -> five maps at strides 2..32."""
        return self.stages(self.embed(inputs))
