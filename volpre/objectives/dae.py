"""Disruptive autoencoder (DAE), after Valanarasu et al. 2023, "Disruptive Autoencoders: Leveraging
Low-level features for 3D Medical Image Pre-training" (arXiv:2307.16896), and its official code,
Project-MONAI/research-contributions ``DAE/Pretrain_full_contrast`` (``main_runner.py``,
``models/simmim_advanced.py``; its README's "ALL DISTURBANCE" command line, ``--choice all``).

Each crop is disrupted, the encoder and decoder reconstruct the clean crop, and a cross-modal
contrastive loss (CMCL) makes the deepest features modality-aware::

    loss = reconstruction(decoder(encoder(disrupt(x))), x) + cmcl_weight * CMCL(encoder features, modality)

Where volpre follows the paper and the official code (the defaults of ``objective.dae``, shipped in
``swin-dae`` and ``resnet-dae``):

- Perturbations and their order: additive Gaussian noise of variance 0.1 (std ~0.32; ``--variance
  0.1``, ``img + variance**0.5 * randn``), then downsampling by 4 and upsampling back, both
  nearest-neighbour (``--interpolate 4``, ``F.interpolate`` with its default mode), then local
  masking.
- Local masking: after the patch embedding, 60% of the embedding channels (``int(0.6 * C)``) are
  zeroed at every token (``x = x * mask`` with ``mask[:, chosen_channels] = 0``); the tokens
  themselves are all kept, unlike the global token masking of SimMIM that the paper argues
  against for low-level features. The masked embedding is also the decoder's stride-2 skip input,
  as in the official ``SwinTransformerSkipForSimMIM``.
- Reconstruction: L1 over every voxel of the clean crop (``--loss_type all_img``).
- CMCL on the deepest encoder map, flattened over channels and positions (the official
  ``hidden_states_out[4].reshape(bsz, -1)``), weight 0.03 (``--mm_con 0.03``) and temperature 0.5
  (``--temperature 0.5``). Its classes are the modalities, with MR sequences apart (the official
  code's ``ct``, ``t1``, ``t1ce``, ``t2``, ``flair``): here the manifest's ``modality`` refined by its
  optional ``sequence`` (``batch["modality"]``, ids of
  :attr:`volpre.data.dataset.VolumeGroups.modality_classes`).

Where volpre differs, and why:

- Local masking draws its channels per crop (one subset for all of a crop's tokens); the official
  code draws one subset per step for its whole per-GPU batch (``random.sample`` once). Per crop, a
  crop's disruption does not depend on which crops share its batch or on the number of GPUs.
- ResNet: the paper and code use Swin only. The closest analogue of the patch embedding is the
  ResNet stem (7^3 stride-2 convolution, BatchNorm, ReLU: the first map at stride 2, like Swin's
  embedding), so local masking zeroes 60% of the stem's output channels after its ReLU: BatchNorm
  statistics stay those of the undisrupted convolution, and a zeroed channel reads as "no
  activation" to max pooling and ``layer1``, as a zeroed channel of a Swin token does to the
  first Swin stage.
- CMCL's form: the paper states it as a contrastive loss with same-modality positives and
  other-modality negatives; the official code instead scores unnormalised dot products (times
  ``exp(0.5)``) with ``cross_entropy(logits, class_id)``, which takes a class id for the index of a
  sample in the batch. volpre computes the stated loss in the supervised-contrastive form
  (:func:`~volpre.objectives.losses.multi_positive_info_nce`: cosine similarity / temperature,
  every same-class crop a positive) over the global batch (gathered across ranks with gradients;
  the official code contrasts each GPU's batch alone). Anchors with no positive or no negative are
  left out, so a batch (or a manifest) of one class contributes nothing rather than a term that
  only equalises similarities.
- Decoder: volpre's light UNet decoder of the encoder's five maps (:mod:`volpre.models.decoder`),
  shared with the other objectives; the official model decodes with SwinUNETR's decoder, whose
  first skip is a convolution of the disrupted input itself (``encoder1(x)``).
- nnU-Net encoders (``model.encoder: nnunet``): the plan's U-Net has no patch embedding; local
  masking zeroes the channels of its first stage's output (after the stem of a residual encoder),
  the same analogue as the ResNet stem, and the U-Net's own decoder reconstructs.
- Noise variance and downsampling factor may be ranges or lists drawn per crop (equal ends and a
  single factor, the defaults, give the official fixed values).
- The CPU profiles ``swin-dae-tiny`` and ``resnet-dae-tiny`` downsample by 2, not 4: they work on
  4 mm voxels, where the official factor (a 6 mm grid at the paper's 1.5 mm) would leave a 16 mm
  grid, as coarse as a small lesion; 2 leaves 8 mm, the nearest to the paper's scale. On the demo
  data factor 2 gave the better frozen-feature probe on average, inside the spread of pretraining
  seeds (README, "Probes").
- The CPU profiles also pretrain at the soft-tissue CT window [-175, 250] HU, not [-1000, 1000],
  in which the 10-25 HU that tell liver, lesion and soft tissue apart are under 1% of the range
  (and the noise of variance 0.1, relative to the window scaled to [0, 1], is about 630 HU; 134 HU
  at [-175, 250]). On the demo data both tiny encoders probed higher after pretraining at it
  (three pretraining seeds each; README, "Probes"); lowering the noise at the wide window did not
  help, so the noise alone does not explain it. The full profiles keep [-1000, 1000].
- volpre's own variations, off by default, named options: ``block_mask`` (zero ``block_mask_ratio``
  of the crop's ``block_mask_size^3`` voxel blocks, a global SimMIM-like masking in image space),
  ``blur`` (Gaussian blur with per-crop sigma) and ``downsample_mode: area`` (average pooling down,
  trilinear up). The image disruptions are applied in the order ``disruptions`` lists them.

All disruptions are computed in float32 even under autocast, so the corruption does not depend on
the training precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from volpre.config import DAEConfig
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import multi_positive_info_nce, reconstruction_loss
from volpre.objectives.masking import expand_mask, mask_grid_shape, random_channel_mask, random_grid_mask
from volpre.objectives.perturbations import (
    add_gaussian_noise,
    down_up_sample,
    draw_down_up_factor,
    draw_gaussian_noise,
    gaussian_blur,
    random_uniform,
)


def _embedding_split(encoder: nn.Module) -> tuple[Callable, Callable, int]:
    """``(embed, stages, embedding_channels)`` of an encoder: volpre's Swin and ResNet encoders have
    ``embed``/``stages`` methods; an nnU-Net encoder (``nnunet``) is split after its first stage
    (:func:`volpre.models.nnunet.nnunet_embed`), the analogue of the ResNet stem."""
    if hasattr(encoder, "embed"):
        return encoder.embed, encoder.stages, encoder.feature_channels[0]
    from volpre.models.nnunet import nnunet_embed, nnunet_stages

    return (lambda x: nnunet_embed(encoder, x)), (lambda e: nnunet_stages(encoder, e)), encoder.output_channels[0]


class DAEPretrainer(Pretrainer):
    """Disrupt, reconstruct the clean crop, contrast modalities (see the module docstring).

    Args:
        encoder: a volpre encoder with ``embed(x)`` (the patch embedding or ResNet stem, stride 2)
            and ``stages(embedding)`` (the five feature maps), as both volpre encoders have, or an
            nnU-Net encoder (split after its first stage; its local masking zeroes that stage's
            output channels, our analogue of the patch embedding for a plan's U-Net).
        decoder: its pretraining decoder (five maps -> ``(B, C, X, Y, Z)``).
        cfg: the ``objective.dae`` section.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, cfg: DAEConfig) -> None:
        super().__init__(encoder, decoder)
        self.cfg = cfg

    def draw_disruption(self, shape: torch.Size, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of one disruption of a batch of ``shape`` ``(N, C, X, Y, Z)``.

        Returns a dict holding, for the configured disruptions only, drawn in the order listed:
        ``noise_std`` ``(N,)`` float32 and ``noise`` float32 of ``shape``; ``downsample_factor``
        ``(N,)`` long; ``blur_sigma`` ``(N,)`` float32; ``block_mask`` ``(N, 1, gx, gy, gz)`` bool
        (``True`` = zeroed block); ``local_mask`` ``(N, feature_channels[0])`` bool (``True`` =
        zeroed embedding channel). All on ``generator.device``.
        """
        cfg, n = self.cfg, shape[0]
        draws: dict[str, torch.Tensor] = {}
        for name in cfg.disruptions:
            if name == "noise":
                draws["noise_std"], draws["noise"] = draw_gaussian_noise(shape, cfg.noise_variance, generator)
            elif name == "downsample":
                draws["downsample_factor"] = draw_down_up_factor(n, cfg.downsample_factors, generator)
            elif name == "blur":
                draws["blur_sigma"] = random_uniform(n, cfg.blur_sigma, generator)
            elif name == "block_mask":
                draws["block_mask"] = random_grid_mask(n, self._block_grid(shape[2:]), cfg.block_mask_ratio, generator)
            else:  # local_mask
                channels = _embedding_split(self.encoder)[2]
                draws["local_mask"] = random_channel_mask(n, channels, cfg.local_mask_ratio, generator)
        return draws

    def disrupt(self, image: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the image disruptions of ``draws`` (from :meth:`draw_disruption`), in the listed order.

        Args:
            image: ``(N, C, X, Y, Z)`` float.
            draws: the parameters for a batch of ``image``'s shape.

        Returns:
            ``(N, C, X, Y, Z)`` float32; blocks of ``block_mask`` are exactly 0. Local masking is not
            applied here (it acts on the patch embedding, :meth:`encode`).
        """
        cfg = self.cfg
        with torch.autocast(device_type=image.device.type, enabled=False):
            x = image.float()
            for name in cfg.disruptions:
                if name == "noise":
                    x = add_gaussian_noise(x, draws["noise_std"], draws["noise"])
                elif name == "downsample":
                    x = down_up_sample(x, draws["downsample_factor"], cfg.downsample_factors, cfg.downsample_mode)
                elif name == "blur":
                    x = gaussian_blur(x, draws["blur_sigma"], max_sigma=cfg.blur_sigma[1])
                elif name == "block_mask":
                    x = x.masked_fill(expand_mask(draws["block_mask"], x.shape[2:]), 0.0)
        return x

    def encode(self, corrupted: torch.Tensor, draws: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features of the disrupted crops, with local masking of the patch embedding.

        Args:
            corrupted: ``(N, C, X, Y, Z)`` from :meth:`disrupt`.
            draws: with ``local_mask`` ``(N, feature_channels[0])`` bool when it is configured.

        Returns:
            The encoder's five maps; the first is the (masked) embedding's map.
        """
        embed, stages, _ = _embedding_split(self.encoder)
        embedding = embed(corrupted)
        if "local_mask" in draws:
            kept = (~draws["local_mask"]).to(embedding.dtype)
            embedding = embedding * kept.view(*kept.shape, 1, 1, 1)
        return stages(embedding)

    def _block_grid(self, spatial_shape: torch.Size) -> tuple[int, int, int]:
        try:
            return mask_grid_shape(spatial_shape, self.cfg.block_mask_size, self.cfg.block_mask_ratio)
        except ValueError as exc:
            raise ValueError(
                f"objective.dae.block_mask_size={self.cfg.block_mask_size} / "
                f"objective.dae.block_mask_ratio={self.cfg.block_mask_ratio} do not fit the crop (data.roi): {exc}"
            ) from exc

    def _modality_ids(self, batch: dict, image: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long modality class ids of the crops, checked."""
        modality = batch.get("modality")
        if modality is None:
            raise KeyError(
                "objective.dae.cmcl_weight > 0 needs the crops' modality classes, but the batch has no "
                "'modality' ids (set objective.dae.cmcl_weight=0 to train without the cross-modal term)"
            )
        if not isinstance(modality, torch.Tensor) or modality.shape != (image.shape[0],) or modality.is_floating_point():
            found = tuple(modality.shape) if isinstance(modality, torch.Tensor) else type(modality).__name__
            raise ValueError(f"batch['modality'] must be an integer tensor of shape ({image.shape[0]},), got {found}")
        return modality.to(image.device)

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The disruption of every crop: :meth:`draw_disruption` for the batch's shape."""
        image = batch_image(batch, generator)
        return self.draw_disruption(image.shape, generator)

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Disrupt ``batch["image"]`` ``(B, C, X, Y, Z)`` with ``draws``, reconstruct it; contrast the
        deepest features by ``batch["modality"]`` ``(B,)`` when ``cmcl_weight > 0``."""
        image = batch_image(batch)
        target = image.float()
        corrupted = self.disrupt(target, draws)
        features = self.encode(corrupted, draws)
        reconstruction = self.decoder(features)
        reconstruction_term = reconstruction_loss(reconstruction, target, self.cfg.loss)
        loss = reconstruction_term
        parts = {"reconstruction": reconstruction_term.detach()}
        if self.cfg.cmcl_weight > 0:
            modality = self._modality_ids(batch, image)
            cmcl = multi_positive_info_nce(
                features[-1].flatten(1), modality, self.cfg.cmcl_temperature, need_negative=True
            )
            loss = loss + self.cfg.cmcl_weight * cmcl
            parts["cmcl"] = cmcl.detach()
        images = {
            "input": image.detach(),
            "corrupted": corrupted.detach(),
            "reconstruction": reconstruction.detach().float(),
        }
        return ObjectiveOutput(loss=loss, parts=parts, images=images)
