"""SparK masked volume modeling on an nnU-Net U-Net, reconstructing through nnU-Net's own decoder.

SparK (Tian et al., ICLR 2023; official code keyu-tian/SparK ``pretrain/spark.py``): mask random
cells of the input on the grid of the encoder's deepest feature map, run the encoder sparsely
(:mod:`volpre.objectives.sparse_nnunet`), *densify* each level's features -- a sparse norm over the
visible positions, the level's learned mask token in the masked positions, a projection (identity at
the deepest level, a 3^3 convolution above it) -- decode, and score the reconstruction on masked
cells only. As nnssl's SparK for nnU-Net (MIC-DKFZ/nnssl ``SparK3D``), the decoder is nnU-Net's U-Net
decoder itself, so pretraining trains the encoder *and* the decoder that ``nnUNetv2_train`` fine-tunes;
the densify layers and mask tokens belong to the objective and are not exported.

volpre's variations (named options, see ``objective.mvm``): the loss is ``l1`` or ``l2`` over the
masked voxels (SparK: L2 on per-patch normalised targets, ``norm_target: true, loss: l2``); mask cells
are the encoder's total stride on each axis (``mask_patch: null``, SparK's choice) or a multiple of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from volpre.config import MVMConfig
from volpre.data.nnunet_plan import mask_cells
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import normalize_patches, reconstruction_loss
from volpre.objectives.masking import expand_mask, random_grid_mask
from volpre.objectives.sparse_nnunet import (
    check_sparse_support,
    encoder_total_strides,
    masked_instance_norm,
    sparse_encoder_features,
)

MASK_TOKEN_INIT_STD = 0.02
"""Mask tokens start from a truncated normal with this std (as SparK)."""


class NNUNetSparKPretrainer(Pretrainer):
    """SparK on an nnU-Net encoder, decoded by nnU-Net's decoder.

    Args:
        encoder: ``network.encoder`` of :func:`volpre.models.nnunet.pretraining_network`.
        decoder: ``network.decoder`` of the same network (output ``(B, C, *roi)``).
        cfg: the ``objective.mvm`` section.

    Attributes:
        cells: edge of a mask cell per axis, in voxels (multiples of the total stride).
        mask_tokens: one ``(channels_i,)`` learned token per encoder stage.
        densify_norms: one affine ``InstanceNorm3d`` per stage, applied over visible positions.
        densify_projections: identity for the deepest stage, a 3^3 convolution (same width) above it.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, cfg: MVMConfig) -> None:
        super().__init__(encoder, decoder)
        check_sparse_support(encoder)
        self.cfg = cfg
        strides = encoder_total_strides(encoder)
        self.cells = mask_cells(cfg.mask_patch, strides)
        if any(c % s for c, s in zip(self.cells, strides)):
            raise ValueError(f"objective.mvm.mask_patch {cfg.mask_patch} must be a multiple of the nnU-Net encoder's "
                             f"total stride {list(strides)} on every axis (or null)")
        channels = list(encoder.feature_channels)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=MASK_TOKEN_INIT_STD, a=-MASK_TOKEN_INIT_STD, b=MASK_TOKEN_INIT_STD)
        self.densify_norms = nn.ModuleList(nn.InstanceNorm3d(c, affine=True) for c in channels)
        deepest = len(channels) - 1
        self.densify_projections = nn.ModuleList(
            nn.Identity() if level == deepest else nn.Conv3d(c, c, kernel_size=3, padding=1, bias=True)
            for level, c in enumerate(channels)
        )

    def _grid(self, spatial: torch.Size) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in spatial)
        if any(s % c for s, c in zip(shape, self.cells)):
            raise ValueError(f"the crop {shape} (data.roi) is not divisible by the mask cells {list(self.cells)}")
        grid = tuple(s // c for s, c in zip(shape, self.cells))
        masked = round(self.cfg.mask_ratio * math.prod(grid))
        if not 0 < masked < math.prod(grid):
            raise ValueError(f"objective.mvm.mask_ratio {self.cfg.mask_ratio} masks {masked} of the {math.prod(grid)} "
                             f"cells {list(self.cells)} of the crop {shape}; need one masked and one visible")
        return grid  # type: ignore[return-value]

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"mask": (B, 1, gx, gy, gz) bool}``: the masked cells of each crop (``True`` = masked)."""
        image = batch_image(batch, generator)
        return {"mask": random_grid_mask(image.shape[0], self._grid(image.shape[2:]), self.cfg.mask_ratio, generator)}

    def reconstruct(self, image: torch.Tensor, masked_grid: torch.Tensor) -> torch.Tensor:
        """``(B, C, *roi)`` and a ``(B, 1, gx, gy, gz)`` bool mask -> reconstruction ``(B, C, *roi)``."""
        visible_grid = ~masked_grid
        features = sparse_encoder_features(self.encoder, image, visible_grid)
        dense = []
        for feature, token, norm, projection in zip(features, self.mask_tokens, self.densify_norms,
                                                    self.densify_projections):
            visible = expand_mask(visible_grid, feature.shape[2:])
            normed = masked_instance_norm(feature, visible, norm)
            filled = torch.where(visible, normed, token.to(normed.dtype).view(1, -1, 1, 1, 1))
            dense.append(projection(filled))
        return self.decoder(dense)

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Mask ``batch["image"]`` ``(B, C, *roi)`` with ``draws["mask"]``, reconstruct, score the masked voxels."""
        image = batch_image(batch)
        masked_grid = draws["mask"]
        reconstruction = self.reconstruct(image, masked_grid)
        masked_voxels = expand_mask(masked_grid, image.shape[2:])
        if self.cfg.norm_target:
            target, mean, std = normalize_patches(image, self.cells)
            shown = reconstruction.detach().float() * std + mean
        else:
            target, shown = image.float(), reconstruction.detach().float()
        loss = reconstruction_loss(reconstruction, target, self.cfg.loss, mask=masked_voxels)
        images = {
            "input": image.detach(),
            "corrupted": image.detach().masked_fill(masked_voxels, 0.0),
            "reconstruction": shown,
        }
        return ObjectiveOutput(loss=loss, parts={"reconstruction": loss.detach()}, images=images)
