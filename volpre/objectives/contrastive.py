"""Contrastive pretraining: SimCLR (``simclr``) and multi-instance contrastive learning (``micle``).

**SimCLR** follows Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations" (ICML), and its official code, google-research/simclr (``objective.py``
``add_contrastive_loss``, ``model_util.py`` ``projection_head``, ``data_util.py``): every crop (the
shipped configs cut one per volume, ``data.crops_per_volume: 1``) gives ``views_per_crop`` = 2
augmented views (:mod:`volpre.objectives.views`); the encoder's globally
average-pooled deepest features ``h`` go through a projection head ``g`` (2 linear layers, each
followed by BatchNorm, ReLU between them: the paper's MLP with one hidden layer; hidden width = the
width of ``h``; output 128; as the official head, no bias in the linear layers and no learned shift
in the last BatchNorm); the loss is NT-Xent on the L2-normalised ``z = g(h)``, over the global
batch: embeddings are gathered from every rank with gradients, anchors are this rank's rows.

Two recipes of the official code are shipped:

- the full configs (``swin-simclr``, ``resnet-simclr``, and ``*-micle``) take the paper's ImageNet
  recipe (its README's ImageNet command): temperature 0.1, colour strength 1 (brightness and
  contrast 0.8), jitter with probability 0.8, blur with probability 0.5 and sigma in [0.1, 2.0],
  random resized crops of 8-100 % of the crop with side ratios in [3/4, 4/3], weight decay 1e-6;
- the ``-tiny`` CPU profiles take its CIFAR-10 recipe (32-pixel images, as our 32^3 crops):
  temperature 0.5, colour strength 0.5 (brightness and contrast 0.4), no blur, the rest as above.
  SimCLR's larger temperature suits small batches; users whose global batch is far below
  SimCLR's 4096 views may prefer it for the full configs too (``objective.simclr.temperature=0.5``).

**MICLe** follows Azizi et al. 2021, "Big Self-Supervised Models Advance Medical Image
Classification" (ICCV; no official code was released): the same objective, but when a patient has
several images the positive pair is made of crops of two distinct images of that patient, and a
patient with one image falls back to SimCLR's two views of it. Here a dataset item holds every
scan of one subject in one modality class (``modality``, refined by ``sequence``;
``volpre.objectives.build_items``); its
``data.crops_per_volume`` = 2 crops come from two distinct scans when the item has them (a random
pair, drawn without replacement), each crop gives ``views_per_crop`` = 1 view, and all views of one
item are each other's positives (an item with one scan: two crops of it, as MICLe's fallback of
two views of one image). MICLe's loss is contrastive only, so ``reconstruction_weight``
defaults to 0 (the option exists; the paper has no such term).

Pairs (:func:`~volpre.objectives.losses.pair_roles`; a view is never its own candidate):

- ``simclr``: a view's positives are the other views of the same crop; views of other crops of the
  same subject (other crops of the same volume, crops of the subject's other scans) are neither
  positives nor negatives (left out of the softmax); views of every other subject are negatives.
- ``micle``: a view's positives are all other views of all crops of the same item: the subject's
  scans of the same modality (crops of its other scans included); views of the subject's scans of
  other modalities are neither; views of every other subject are negatives. With
  ``positives_across_modalities`` an item holds all of the subject's scans, so nothing is neither.

Subjects come from the manifest (``subject``; an entry without one is its own subject).

Deviations, all ours:

- 3D grayscale views: see :mod:`volpre.objectives.views` (flips on all axes, brightness and contrast
  only, no clipping).
- The loss is the mean over anchors of both views; the official code sums the two directions
  (``loss_a + loss_b``), i.e. twice ours. With two views per crop and no neutral pairs ours is
  NT-Xent exactly (tested against MONAI's ``ContrastiveLoss``).
- SimCLR counts two different images as negatives even when they show one patient; here crops of
  the same subject are never negatives (for ``simclr`` they are neither; for ``micle`` positives).
- Optimiser: the trainer's AdamW with warmup and cosine decay, at the learning rate of the other
  configs of the encoder (SimCLR: LARS at 0.3 x batch/256 on ImageNet, 1.0 x batch/256 on
  CIFAR-10; the shipped configs keep SimCLR's weight decay, 1e-6). Batches of 4096 are out of
  reach for 3D volumes; the global batch is ``data.batch_size x crops x views x ranks`` views.
- MICLe's paper trains with SimCLR's recipe; its settings here are SimCLR's, with one view per
  crop of two distinct scans. MICLe's images of a patient are all of one kind (dermatology
  photographs); a CT and an MR crop of one patient share little, and as positives they teach the
  encoder to ignore modality, so by default only scans of one modality are positives and the
  subject's other modalities are neither (``positives_across_modalities: true`` pairs them too).
- ``reconstruction_weight > 0`` adds an L1 term in which the pretraining decoder restores each
  view's un-jittered, un-blurred, noise-free box of the crop (a named option, off by default).
- Under DDP on CUDA every BatchNorm (ResNet encoder, projection head) becomes a
  ``torch.nn.SyncBatchNorm`` (``train.sync_batchnorm``), as SimCLR's ``global_bn``; CPU processes
  keep per-process BatchNorm (``volpre.engine.distributed.sync_batchnorm``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from volpre.config import SimCLRConfig
from volpre.objectives.base import ObjectiveOutput, Pretrainer, batch_image
from volpre.objectives.losses import multi_positive_info_nce, rank_offset, reconstruction_loss
from volpre.objectives.views import draw_views, make_views

Positives = Literal["crop", "subject"]
"""What makes two views positives: being views of one crop (SimCLR) or of one subject (MICLe)."""


class ProjectionHead(nn.Module):
    """SimCLR's ``g``: ``layers`` linear layers without bias, each followed by BatchNorm1d, ReLU
    between them; the last BatchNorm has a scale but no shift (its ``bias`` is frozen at 0).

    Input ``(N, in_dim)``, output ``(N, out_dim)``; hidden layers keep ``in_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, layers: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for _ in range(layers - 1):
            modules += [nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True)]
        last_norm = nn.BatchNorm1d(out_dim)
        last_norm.bias.requires_grad_(False)
        modules += [nn.Linear(in_dim, out_dim, bias=False), last_norm]
        self.layers = nn.Sequential(*modules)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class ContrastivePretrainer(Pretrainer):
    """SimCLR (``positives="crop"``) or MICLe (``positives="subject"``); see the module docstring.

    Args:
        encoder: a volpre encoder.
        decoder: its pretraining decoder when ``cfg.reconstruction_weight > 0``, else ``None``.
        cfg: the ``objective.simclr`` or ``objective.micle`` section.
        positives: ``"crop"`` or ``"subject"``.

    ``batch`` must hold ``image`` ``(B, C, X, Y, Z)`` and ``(B,)`` integer ``subject`` ids (and, for
    MICLe, ``item`` ids: the dataset item of each crop); the ``V = cfg.views_per_crop`` views of the
    batch are stacked view-major: row ``v * B + i`` is view ``v`` of crop ``i``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None, cfg: SimCLRConfig, positives: Positives) -> None:
        if (decoder is None) != (cfg.reconstruction_weight == 0):
            raise ValueError(f"{cfg.SECTION}.reconstruction_weight {cfg.reconstruction_weight} needs a decoder "
                             "exactly when it is > 0")
        super().__init__(encoder, decoder)
        self.cfg, self.positives = cfg, positives
        self.projection = ProjectionHead(encoder.feature_channels[-1], cfg.projection_dim, cfg.projection_layers)

    def draw(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The parameters of every view: :func:`~volpre.objectives.views.draw_views` for ``V * B`` views."""
        image = batch_image(batch, generator)
        return draw_views((self.cfg.views_per_crop * image.shape[0], *image.shape[1:]), self.cfg, generator)

    def pair_ids(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(groups, neutral)`` ids of the ``V * B`` views for :func:`multi_positive_info_nce`.

        SimCLR: groups are crop indices made unique across ranks (:func:`rank_offset`), neutral ids
        the subjects. MICLe: groups are the dataset items (one subject's scans, of one modality unless
        ``positives_across_modalities``), neutral ids the subjects. Both ``(V * B,)`` long on the
        batch's device.
        """
        image = batch_image(batch)
        n = image.shape[0]
        subject = self._ids(batch, "subject", n)
        if self.positives == "subject":
            group = self._ids(batch, "item", n)
        else:
            group = torch.arange(n, device=image.device) + rank_offset(n)
        views = self.cfg.views_per_crop
        return group.repeat(views), subject.repeat(views)

    def _ids(self, batch: dict, key: str, n: int) -> torch.Tensor:
        ids = batch.get(key)
        if ids is None:
            raise KeyError(f"{self.cfg.SECTION}: the batch has no {key!r} ids (the trainer's data stream gives them)")
        if not isinstance(ids, torch.Tensor) or ids.shape != (n,) or ids.is_floating_point():
            found = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"batch[{key!r}] must be an integer tensor of shape ({n},), got {found}")
        return ids.to(batch["image"].device, torch.long)

    def forward(self, batch: dict, draws: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Views of ``batch["image"]`` from ``draws`` -> encoder -> pooled -> projection -> NT-Xent."""
        image = batch_image(batch)
        n, views_per_crop = image.shape[0], self.cfg.views_per_crop
        groups, neutral = self.pair_ids(batch)
        views, geometric = make_views(image.float().repeat(views_per_crop, 1, 1, 1, 1), draws, self.cfg)
        features = self.encoder(views)
        embeddings = self.projection(features[-1].mean(dim=(2, 3, 4)))
        contrastive = multi_positive_info_nce(embeddings, groups, self.cfg.temperature, neutral_groups=neutral)
        loss, parts = contrastive, {"contrastive": contrastive.detach()}
        # the first crop's views and one of its positives: its second view, or (one view per crop) the next crop's
        second = views[n:2 * n] if views_per_crop > 1 else views.roll(-1, dims=0)[:n]
        images = {"input": image.detach(), "view_a": views[:n].detach(), "view_b": second.detach()}
        if self.decoder is not None:
            reconstruction = self.decoder(features)
            term = reconstruction_loss(reconstruction, geometric, "l1")
            loss = loss + self.cfg.reconstruction_weight * term
            parts["reconstruction"] = term.detach()
            images["reconstruction"] = reconstruction[:n].detach().float()
        return ObjectiveOutput(loss=loss, parts=parts, images=images)
