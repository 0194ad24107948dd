"""Disruptive autoencoder (after Valanarasu et al. 2023, "Disruptive Autoencoders: Leveraging
Low-level features for 3D Medical Image Pre-training").

Each crop is disrupted by the configured combination of down-then-up sampling, Gaussian blur,
additive Gaussian noise and local block masking (in that order, strengths drawn per sample), the
encoder and decoder reconstruct the clean crop, and the loss is the L1 or L2 error over all voxels.

With ``contrastive_weight > 0`` every crop is disrupted twice (independent draws); both views are
reconstructed, and their globally pooled deepest features go through a small projection head into
a multi-positive InfoNCE term. Positives are the other view of the same crop (``views``) or every
view of every crop of the same subject (``subject``, from ``batch["subject"]``); the own other view
is always a positive, so no anchor lacks one.
"""

from __future__ import annotations

import torch
from torch import nn

from volpre.config import DAEConfig
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import multi_positive_info_nce, reconstruction_loss
from volpre.objectives.masking import expand_mask, mask_grid_shape, random_grid_mask
from volpre.objectives.perturbations import (
    add_gaussian_noise,
    down_up_sample,
    draw_down_up_factor,
    draw_gaussian_noise,
    gaussian_blur,
    random_uniform,
)


class DAEPretrainer(Pretrainer):
    """Disrupt, reconstruct the clean crop, optionally contrast two disruptions.

    Args:
        encoder: a volpre encoder.
        decoder: its pretraining decoder.
        cfg: the ``objective.dae`` section.

    Attributes:
        projection: ``Linear(C4, C4) -> ReLU -> Linear(C4, projection_dim)`` on the pooled deepest
            features (``C4 = encoder.feature_channels[-1]``); ``None`` when the contrastive term is off.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, cfg: DAEConfig) -> None:
        super().__init__(encoder, decoder)
        self.cfg = cfg
        self.projection: nn.Module | None = None
        if cfg.contrastive_weight > 0:
            deepest = encoder.feature_channels[-1]
            self.projection = nn.Sequential(
                nn.Linear(deepest, deepest), nn.ReLU(inplace=True), nn.Linear(deepest, cfg.projection_dim)
            )

    @property
    def views(self) -> int:
        """Disruptions of each crop per step: 2 with the contrastive term, else 1."""
        return 1 if self.projection is None else 2

    def draw_disruption(self, shape: torch.Size, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of one independent disruption of a batch of ``shape`` ``(N, C, X, Y, Z)``.

        Returns a dict holding, for the configured disruptions only: ``downsample_factor`` ``(N,)``
        long, ``blur_sigma`` ``(N,)`` float32, ``noise_std`` ``(N,)`` float32 and ``noise`` float32 of
        ``shape``, ``mask`` ``(N, 1, gx, gy, gz)`` bool (``True`` = masked block); all on
        ``generator.device``, drawn in that order.
        """
        cfg, n = self.cfg, shape[0]
        draws: dict[str, torch.Tensor] = {}
        if "downsample" in cfg.disruptions:
            draws["downsample_factor"] = draw_down_up_factor(n, cfg.downsample_factors, generator)
        if "blur" in cfg.disruptions:
            draws["blur_sigma"] = random_uniform(n, cfg.blur_sigma, generator)
        if "noise" in cfg.disruptions:
            draws["noise_std"], draws["noise"] = draw_gaussian_noise(shape, cfg.noise_std, generator)
        if "mask" in cfg.disruptions:
            draws["mask"] = random_grid_mask(n, self._mask_grid(shape[2:]), cfg.mask_ratio, generator)
        return draws

    def disrupt(self, image: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the disruption ``draws`` (from :meth:`draw_disruption`) to every crop.

        Args:
            image: ``(N, C, X, Y, Z)`` float.
            draws: the parameters for a batch of ``image``'s shape.

        Returns:
            ``(N, C, X, Y, Z)`` float32; masked blocks are exactly 0. Computed in float32 even under
            autocast, so the corruption does not depend on the training precision.
        """
        cfg = self.cfg
        with torch.autocast(device_type=image.device.type, enabled=False):
            x = image.float()
            if "downsample" in cfg.disruptions:
                x = down_up_sample(x, draws["downsample_factor"], cfg.downsample_factors)
            if "blur" in cfg.disruptions:
                x = gaussian_blur(x, draws["blur_sigma"], max_sigma=cfg.blur_sigma[1])
            if "noise" in cfg.disruptions:
                x = add_gaussian_noise(x, draws["noise_std"], draws["noise"])
            if "mask" in cfg.disruptions:
                x = x.masked_fill(expand_mask(draws["mask"], x.shape[2:]), 0.0)
        return x

    def _mask_grid(self, spatial_shape: torch.Size) -> tuple[int, int, int]:
        try:
            return mask_grid_shape(spatial_shape, self.cfg.mask_block, self.cfg.mask_ratio)
        except ValueError as exc:
            raise ValueError(
                f"objective.dae.mask_block={self.cfg.mask_block} / objective.dae.mask_ratio={self.cfg.mask_ratio} "
                f"do not fit the crop (data.roi): {exc}"
            ) from exc

    def _contrastive_groups(self, batch: dict, image: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long group ids of the crops: their index (``views``) or their subject id."""
        if self.cfg.contrastive_pairs == "views":
            return torch.arange(image.shape[0], device=image.device)
        subject = batch.get("subject")
        if subject is None:
            raise KeyError(
                "objective.dae.contrastive_pairs is 'subject' but the batch has no 'subject' ids "
                "(the manifest needs a subject for every scan)"
            )
        if not isinstance(subject, torch.Tensor) or subject.shape != (image.shape[0],) or subject.is_floating_point():
            found = tuple(subject.shape) if isinstance(subject, torch.Tensor) else type(subject).__name__
            raise ValueError(f"batch['subject'] must be an integer tensor of shape ({image.shape[0]},), got {found}")
        return subject.to(image.device)

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The disruptions of every view: :meth:`draw_disruption` for ``views * B`` crops (view-major)."""
        image = batch_image(batch, generator)
        return self.draw_disruption((self.views * image.shape[0], *image.shape[1:]), generator)

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Disrupt ``batch["image"]`` ``(B, C, X, Y, Z)`` with ``draws``, reconstruct it, return loss,
        parts and images."""
        image = batch_image(batch)
        batch_size = image.shape[0]
        views = self.views
        groups = None if self.projection is None else self._contrastive_groups(batch, image).repeat(views)
        target = image.float().repeat(views, 1, 1, 1, 1)
        corrupted = self.disrupt(target, draws)
        features = self.encoder(corrupted)
        reconstruction = self.decoder(features)
        reconstruction_term = reconstruction_loss(reconstruction, target, self.cfg.loss)
        loss = reconstruction_term
        parts = {"reconstruction": reconstruction_term.detach()}
        if self.projection is not None:
            embeddings = self.projection(features[-1].mean(dim=(2, 3, 4)))
            contrastive_term = multi_positive_info_nce(embeddings, groups, self.cfg.temperature)
            loss = loss + self.cfg.contrastive_weight * contrastive_term
            parts["contrastive"] = contrastive_term.detach()
        images = {
            "input": image.detach(),
            "corrupted": corrupted[:batch_size].detach(),
            "reconstruction": reconstruction[:batch_size].detach().float(),
        }
        return ObjectiveOutput(loss=loss, parts=parts, images=images)
