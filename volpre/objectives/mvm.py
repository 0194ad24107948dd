"""Masked volume modeling: hide random cubic patches, reconstruct them, score only the hidden voxels.

Two variants, one per encoder family, sharing the mask, the target and the loss:

- :class:`SimMIMPretrainer` (Swin; Xie et al. 2022, "SimMIM"): the patch embeddings of masked
  patches are replaced by one learned mask token before the Swin stages.
- :class:`SparKPretrainer` (3D ResNet; Tian et al. 2023, "SparK"): the encoder runs sparsely
  (:mod:`volpre.objectives.sparse_resnet`: masked positions zero after every layer, BatchNorm
  statistics over visible positions); before decoding, masked positions of each feature map are
  filled with a learned per-level mask embedding.

The mask tokens/embeddings live in the pretrainer, not in the encoder, so export keys stay exact.
The target is the input crop, or with ``norm_target`` each ``mask_patch^3`` block normalised to zero
mean and unit variance; the logged reconstruction is mapped back to intensities in that case.
"""

from __future__ import annotations

import torch
from torch import nn

from volpre.config import MVMConfig
from volpre.models.contract import FEATURE_STRIDES
from volpre.models.resnet import ResNet3DEncoder
from volpre.models.swin import PATCH_SIZE, SwinEncoder
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import normalize_patches, reconstruction_loss
from volpre.objectives.masking import expand_mask, mask_grid_shape, random_grid_mask
from volpre.objectives.sparse_resnet import sparse_resnet_features

MASK_TOKEN_INIT_STD = 0.02
"""Mask tokens/embeddings start from a truncated normal with this std (as SimMIM and SparK)."""


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


class SimMIMPretrainer(Pretrainer):
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

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"mask": (B, 1, gx, gy, gz) bool}``: the masked ``mask_patch^3`` cells of each crop."""
        image = batch_image(batch, generator)
        return {"mask": _draw_mask(self.cfg, image, generator)}

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Mask ``batch["image"]`` ``(B, C, X, Y, Z)`` with ``draws["mask"]``, reconstruct, score the
        masked voxels."""
        image = batch_image(batch)
        return _score(self.cfg, image, draws["mask"], self.reconstruct(image, draws["mask"]))


class SparKPretrainer(Pretrainer):
    """SparK on a :class:`~volpre.models.ResNet3DEncoder`.

    Args:
        encoder: the ResNet encoder.
        decoder: its pretraining decoder.
        cfg: the ``objective.mvm`` section (``mask_patch`` a multiple of 32, the total stride).

    Attributes:
        mask_embeddings: five ``(feature_channels[i],)`` learned embeddings filling the masked
            positions of each feature map before decoding.
    """

    def __init__(self, encoder: ResNet3DEncoder, decoder: nn.Module, cfg: MVMConfig) -> None:
        super().__init__(encoder, decoder)
        _check_patch(cfg, FEATURE_STRIDES[-1], "resnet")
        self.cfg = cfg
        self.mask_embeddings = nn.ParameterList(
            nn.Parameter(torch.zeros(channels)) for channels in encoder.feature_channels
        )
        for embedding in self.mask_embeddings:
            nn.init.trunc_normal_(embedding, std=MASK_TOKEN_INIT_STD)

    def reconstruct(self, image: torch.Tensor, masked_grid: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` and a ``(B, 1, gx, gy, gz)`` bool mask -> reconstruction ``(B, C, X, Y, Z)``."""
        features = sparse_resnet_features(self.encoder, image, ~masked_grid)
        filled = [
            torch.where(expand_mask(masked_grid, f.shape[2:]), e.to(f.dtype).view(1, -1, 1, 1, 1), f)
            for f, e in zip(features, self.mask_embeddings)
        ]
        return self.decoder(filled)

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"mask": (B, 1, gx, gy, gz) bool}``: the masked ``mask_patch^3`` cells of each crop."""
        image = batch_image(batch, generator)
        return {"mask": _draw_mask(self.cfg, image, generator)}

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Mask ``batch["image"]`` ``(B, C, X, Y, Z)`` with ``draws["mask"]``, reconstruct, score the
        masked voxels."""
        image = batch_image(batch)
        return _score(self.cfg, image, draws["mask"], self.reconstruct(image, draws["mask"]))
