"""Survival network: a pretrained 3D encoder, global average pooling and an MLP risk head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import FullyConnectedNet
from torch import nn


class SurvivalNet(nn.Module):
    """One Cox log-hazard per volume from an encoder's deepest feature map and optional covariates.

    ``image`` -> ``encoder`` -> deepest feature map -> mean over its spatial axes ->
    (concatenate ``covariates``) -> MONAI ``FullyConnectedNet`` -> risk ``(B, 1)``.

    The encoder stays at the attribute ``encoder``, so a pretrained encoder's state dict loads
    into ``SurvivalNet.encoder`` unchanged and the network's keys read ``encoder.*`` and ``head.*``.

    Args:
        encoder: module mapping ``(B, C, *spatial)`` to a list or tuple of feature maps
            ``(B, C_k, *spatial_k)``, deepest last; e.g. MONAI's
            ``ResNetFeatures("resnet10", pretrained=False, spatial_dims=3, in_channels=1)``
            (deepest 512 channels) or ``SwinUNETR(...).swinViT`` (deepest ``16 * feature_size``).
        encoder_channels: channels of the encoder's deepest feature map.
        num_covariates: clinical covariates per subject concatenated to the pooled image
            features (0: image only). Standardise them beforehand; the head sees them raw.
        hidden_channels: widths of the head's hidden layers (PReLU, then dropout); empty for a
            linear head.
        dropout: dropout probability after each hidden layer of the head.

    In a MONAI engine, pass covariates with
    ``prepare_batch=monai.engines.PrepareBatchExtraInput({"covariates": "covariates"})``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        encoder_channels: int,
        num_covariates: int = 0,
        hidden_channels: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder_channels < 1:
            raise ValueError(f"SurvivalNet: encoder_channels must be >= 1, got {encoder_channels}")
        if num_covariates < 0:
            raise ValueError(f"SurvivalNet: num_covariates must be >= 0, got {num_covariates}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SurvivalNet: dropout must be in [0, 1), got {dropout}")
        self.encoder = encoder
        self.encoder_channels = encoder_channels
        self.num_covariates = num_covariates
        self.head = FullyConnectedNet(
            in_channels=encoder_channels + num_covariates,
            out_channels=1,
            hidden_channels=list(hidden_channels),
            dropout=dropout,
        )

    def forward(self, image: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Risk of each volume.

        Args:
            image: ``(B, C, X, Y, Z)`` float, what the encoder expects (normalised intensities).
            covariates: ``(B, num_covariates)`` float on ``image``'s device; required exactly when
                ``num_covariates > 0``.

        Returns:
            ``(B, 1)`` log-hazard scores (unbounded reals; higher = earlier event), in the
            head's dtype (float32, or the autocast dtype under autocast).
        """
        features = self.encoder(image)
        if not isinstance(features, (list, tuple)):
            raise TypeError(
                "SurvivalNet: the encoder must return a list or tuple of feature maps (deepest last), "
                f"got {type(features).__name__}"
            )
        deepest = features[-1]
        if deepest.ndim < 3 or deepest.shape[1] != self.encoder_channels:
            raise ValueError(
                f"SurvivalNet: the encoder's deepest feature map has shape {tuple(deepest.shape)}, "
                f"expected (B, encoder_channels={self.encoder_channels}, *spatial)"
            )
        pooled = deepest.mean(dim=tuple(range(2, deepest.ndim)))
        if self.num_covariates == 0:
            if covariates is not None:
                raise ValueError(
                    f"SurvivalNet: got covariates of shape {tuple(covariates.shape)} but the network was "
                    "built with num_covariates=0"
                )
            return self.head(pooled)
        if covariates is None or covariates.shape != (image.shape[0], self.num_covariates):
            found = "none" if covariates is None else f"shape {tuple(covariates.shape)}"
            raise ValueError(
                f"SurvivalNet: covariates must have shape (B={image.shape[0]}, "
                f"num_covariates={self.num_covariates}), got {found}"
            )
        return self.head(torch.cat([pooled, covariates.to(pooled.dtype)], dim=1))
