"""Masked volume modeling: hide random cubic patches, reconstruct them, score only the hidden voxels.

Two variants, one per encoder family, sharing the mask (exactly ``round(mask_ratio * patches)``
cells of ``mask_patch^3`` per crop) and the masked loss:

- :class:`SimMIMPretrainer` (Swin; Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image
  Modeling", official code microsoft/SimMIM): the patch embeddings of masked patches are replaced
  by one learned mask token before the Swin stages; the target is the raw crop, the loss L1 over
  masked voxels (SimMIM's ``l1_loss * mask / mask.sum()``); mask patch 16 voxels for a model patch of
  2, ratio 0.6 (``swin-mvm``). Same as SimMIM; the 3D setting is that of the DAE paper's SimMIM
  baseline (Project-MONAI research-contributions ``DAE/Pretrain_full_contrast``). Deviation: the
  decoder is volpre's light UNet decoder (SimMIM: one linear layer and pixel shuffle), as the DAE
  code's ``swin_skip`` model also decodes with a UNet.
- :class:`SparKPretrainer` (3D ResNet; Tian et al., ICLR 2023, "Designing BERT for Convolutional
  Networks: Sparse and Hierarchical Masked Modeling", official code keyu-tian/SparK ``pretrain/``;
  MIC-DKFZ/nnssl has another 3D port). With ``resnet_densify: spark`` (the default of
  ``resnet-mvm``), as SparK:

  - the mask lives on the encoder's stride-32 grid (``mask_patch`` 32, ratio 0.6) and the encoder
    runs sparsely (:mod:`volpre.objectives.sparse_resnet`: masked positions zero after every
    convolution, BatchNorm and pooling; BatchNorm statistics over visible positions);
  - each of the four stage outputs (strides 32, 16, 8, 4; SparK's hierarchy ``C2``-``C5``) is
    densified: a BatchNorm over its visible positions, the level's learned mask token in its empty
    positions, a projection convolution (``1^3`` at stride 32, none there if the widths agree;
    ``3^3`` elsewhere) to the decoder's width at that stride;
  - :class:`~volpre.models.SparKLightDecoder` decodes them (SparK's ``LightDecoder`` in 3D);
  - the target is the crop with each ``mask_patch^3`` patch normalised by its own mean and
    variance (:func:`~volpre.objectives.losses.normalize_patches`; ``norm_target: true``), the loss
    the squared error over the masked patches (``loss: l2``).

  Deviations: 3D instead of 2D (cubes, ``3^3``/``4^3`` kernels); the decoder width is
  ``model.decoder_channels * 16`` at stride 32 (SparK: 768), to keep full-resolution 3D maps
  affordable; the stem's stride-2 map is not decoded (nor is it in SparK).
  ``resnet_densify: embedding`` is volpre's variation: masked positions of all five maps are
  filled with a learned per-level embedding and decoded by volpre's UNet decoder, with no
  densifying norm or projection. ``norm_target`` and ``loss`` are options for either variant.

The mask tokens and densify layers live in the pretrainer, not in the encoder, so export keys stay
exact. With ``norm_target`` the logged reconstruction is mapped back to intensities.
"""

from __future__ import annotations

import torch
from torch import nn

from volpre.config import MVMConfig
from volpre.models.contract import FEATURE_STRIDES
from volpre.models.decoder import SparKLightDecoder
from volpre.models.resnet import ResNet3DEncoder
from volpre.models.swin import PATCH_SIZE, SwinEncoder
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import normalize_patches, reconstruction_loss
from volpre.objectives.masking import expand_mask, mask_grid_shape, random_grid_mask
from volpre.objectives.sparse_resnet import masked_batch_norm, sparse_resnet_features

MASK_TOKEN_INIT_STD = 0.02
"""Mask tokens/embeddings start from a truncated normal with this std (as SimMIM and SparK; SparK
also cuts it at +-0.02)."""

SPARK_DECODER_WIDTH_FACTOR = 16
"""The SparK decoder's width at stride 32 is ``model.decoder_channels`` times this (so the stride-2
block has ``decoder_channels`` channels, as volpre's UNet decoder)."""


def _check_patch(cfg: MVMConfig, multiple: int, encoder_name: str) -> None:
    if cfg.mask_patch % multiple:
        raise ValueError(
            f"objective.mvm.mask_patch must be a multiple of {multiple} for the {encoder_name} encoder, "
            f"got {cfg.mask_patch}"
        )


def _draw_mask(cfg: MVMConfig, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(B, 1, gx, gy, gz)`` bool grid of ``mask_patch^3`` cells, ``True`` where masked."""
    try:
        grid = mask_grid_shape(image.shape[2:], cfg.mask_patch, cfg.mask_ratio)
    except ValueError as exc:
        raise ValueError(
            f"objective.mvm.mask_patch={cfg.mask_patch} / objective.mvm.mask_ratio={cfg.mask_ratio} "
            f"do not fit the crop (data.roi): {exc}"
        ) from exc
    return random_grid_mask(image.shape[0], grid, cfg.mask_ratio, generator)


def _score(
    cfg: MVMConfig, image: torch.Tensor, masked_grid: torch.Tensor, reconstruction: torch.Tensor
) -> ObjectiveOutput:
    """Loss over masked voxels, and the logged images."""
    masked_voxels = expand_mask(masked_grid, image.shape[2:])
    if cfg.norm_target:
        target, mean, std = normalize_patches(image, cfg.mask_patch)
        shown = reconstruction.detach().float() * std + mean
    else:
        target, shown = image.float(), reconstruction.detach().float()
    loss = reconstruction_loss(reconstruction, target, cfg.loss, mask=masked_voxels)
    images = {
        "input": image.detach(),
        "corrupted": image.detach().masked_fill(masked_voxels, 0.0),
        "reconstruction": shown,
    }
    return ObjectiveOutput(loss=loss, parts={"reconstruction": loss.detach()}, images=images)


class _MaskedVolumePretrainer(Pretrainer):
    """What SimMIM and SparK share: draw a grid mask per crop, reconstruct, score the masked voxels.
    Each subclass sets ``cfg`` (the ``objective.mvm`` section) and defines ``reconstruct(image,
    masked_grid)``: ``(B, C, X, Y, Z)`` and a ``(B, 1, gx, gy, gz)`` bool mask -> ``(B, C, X, Y, Z)``."""

    cfg: MVMConfig

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"mask": (B, 1, gx, gy, gz) bool}``: the masked ``mask_patch^3`` cells of each crop."""
        image = batch_image(batch, generator)
        return {"mask": _draw_mask(self.cfg, image, generator)}

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Mask ``batch["image"]`` ``(B, C, X, Y, Z)`` with ``draws["mask"]``, reconstruct, score the
        masked voxels."""
        image = batch_image(batch)
        return _score(self.cfg, image, draws["mask"], self.reconstruct(image, draws["mask"]))


class SimMIMPretrainer(_MaskedVolumePretrainer):
    """SimMIM on a :class:`~volpre.models.SwinEncoder`.

    Args:
        encoder: the Swin encoder.
        decoder: its pretraining decoder.
        cfg: the ``objective.mvm`` section (``mask_patch`` a multiple of the Swin patch, 2).

    Attributes:
        mask_token: ``(feature_size,)`` learned embedding put in place of masked patches.
    """

    def __init__(self, encoder: SwinEncoder, decoder: nn.Module, cfg: MVMConfig) -> None:
        super().__init__(encoder, decoder)
        _check_patch(cfg, PATCH_SIZE, "swin")
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(encoder.feature_channels[0]))
        nn.init.trunc_normal_(self.mask_token, std=MASK_TOKEN_INIT_STD)

    def reconstruct(self, image: torch.Tensor, masked_grid: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` and a ``(B, 1, gx, gy, gz)`` bool mask -> reconstruction ``(B, C, X, Y, Z)``."""
        embedding = self.encoder.embed(image)
        masked_tokens = expand_mask(masked_grid, embedding.shape[2:])
        token = self.mask_token.to(embedding.dtype).view(1, -1, 1, 1, 1)
        return self.decoder(self.encoder.stages(torch.where(masked_tokens, token, embedding)))


class SparKPretrainer(_MaskedVolumePretrainer):
    """SparK on a :class:`~volpre.models.ResNet3DEncoder` (see the module docstring).

    Args:
        encoder: the ResNet encoder.
        decoder: with ``cfg.resnet_densify == "spark"`` a :class:`~volpre.models.SparKLightDecoder`
            whose ``widths`` start at stride 32; with ``"embedding"`` the UNet decoder of five maps.
        cfg: the ``objective.mvm`` section (``mask_patch`` a multiple of 32, the total stride).

    Attributes:
        mask_tokens: per decoded level (deepest first), a ``(channels,)`` learned token put in the
            masked positions (``spark``: the four stage outputs; ``embedding``: all five maps,
            finest first).
        densify_norms: ``spark`` only: per stage output (deepest first), the BatchNorm applied to
            its visible positions.
        densify_projs: ``spark`` only: per stage output (deepest first), the projection to the
            decoder's width (``1^3`` convolution at stride 32, or none when the widths already
            agree, as in SparK; ``3^3`` elsewhere).
    """

    def __init__(self, encoder: ResNet3DEncoder, decoder: nn.Module, cfg: MVMConfig) -> None:
        super().__init__(encoder, decoder)
        _check_patch(cfg, FEATURE_STRIDES[-1], "resnet")
        self.cfg = cfg
        self.densify_norms: nn.ModuleList | None = None
        self.densify_projs: nn.ModuleList | None = None
        if cfg.resnet_densify == "spark":
            if not isinstance(decoder, SparKLightDecoder):
                raise TypeError(f"resnet_densify 'spark' decodes with a SparKLightDecoder, got {type(decoder).__name__}")
            stage_channels = encoder.feature_channels[:0:-1]  # strides 32, 16, 8, 4
            self.densify_norms = nn.ModuleList(nn.BatchNorm3d(c) for c in stage_channels)
            self.densify_projs = nn.ModuleList(
                nn.Identity() if level == 0 and c == width  # SparK's rule: no projection needed
                else nn.Conv3d(c, width, kernel_size=1 if level == 0 else 3, padding=0 if level == 0 else 1)
                for level, (c, width) in enumerate(zip(stage_channels, decoder.widths))
            )
            token_channels = stage_channels
        else:
            token_channels = encoder.feature_channels
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in token_channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=MASK_TOKEN_INIT_STD, a=-MASK_TOKEN_INIT_STD, b=MASK_TOKEN_INIT_STD)

    def reconstruct(self, image: torch.Tensor, masked_grid: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` and a ``(B, 1, gx, gy, gz)`` bool mask -> reconstruction ``(B, C, X, Y, Z)``."""
        features = sparse_resnet_features(self.encoder, image, ~masked_grid)
        if self.densify_norms is None:  # volpre's variation: per-level embedding, UNet decoder
            return self.decoder([self._fill(f, masked_grid, t) for f, t in zip(features, self.mask_tokens)])
        dense = []
        for feature, norm, token, proj in zip(features[:0:-1], self.densify_norms, self.mask_tokens, self.densify_projs):
            visible = ~expand_mask(masked_grid, feature.shape[2:])
            dense.append(proj(self._fill(masked_batch_norm(feature, visible, norm), masked_grid, token)))
        return self.decoder(dense)

    @staticmethod
    def _fill(feature: torch.Tensor, masked_grid: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """``feature`` with ``token`` in its masked positions."""
        masked = expand_mask(masked_grid, feature.shape[2:])
        return torch.where(masked, token.to(feature.dtype).view(1, -1, 1, 1, 1), feature)


def spark_decoder(encoder: ResNet3DEncoder, decoder_channels: int) -> SparKLightDecoder:
    """The SparK decoder for ``encoder``: width ``decoder_channels * 16`` at stride 32, one output
    channel per input channel."""
    return SparKLightDecoder(decoder_channels * SPARK_DECODER_WIDTH_FACTOR, encoder.in_channels)
