"""Segmentation probe: a linear 1x1x1 head on the encoder's five frozen maps, upsampled; Dice on ``val``.

The head is one 1x1x1 convolution over the concatenation of all five maps (or of the chosen
``levels``), each trilinearly upsampled to the input grid (:mod:`volpre.evaluate.probe.features`),
into ``K`` class logits. It is fitted on the ``train`` volumes and scored on the ``val`` volumes:

- **Fit.** Per training volume and seed, a class-stratified sample of voxels (up to
  :data:`VOXELS_PER_CLASS` of each class present, drawn without replacement from the probe's own
  seeded generator), each weighted by ``(voxels of its class) / (sampled voxels of its class)``, so
  weighted sums over the sample estimate sums over all voxels. The features are standardised
  (weighted mean and sd of the sample) and the head minimises cross-entropy plus soft Dice over all
  classes (the loss of the segmentation bundles, MONAI's ``DiceCELoss``, here pooled over the
  training voxels and estimated from the weighted sample) plus ``L2_PENALTY / 2 * ||W||^2``, by
  full-batch L-BFGS from zero weights (deterministic given the sample).
- **Score.** For each ``val`` volume the head is applied to each map at its own resolution and the
  ``K``-channel logits are upsampled and summed (a 1x1x1 convolution commutes with trilinear
  interpolation, so this is exactly the head on the upsampled concatenation), cropped to the
  unpadded volume, and the argmax is scored with MONAI's Dice (``compute_dice``: foreground classes,
  empty ground truth ignored): Dice per class (mean over ``val`` volumes) and their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import nn

from volpre.evaluate.probe.data import ProbeData
from volpre.evaluate.probe.features import LEVELS, check_levels, encoder_features, features_at, frozen

VOXELS_PER_CLASS = 256
"""Voxels sampled per class and training volume (all of a class that has fewer)."""
L2_PENALTY = 1e-4
"""Weight of ``1/2 ||W||^2`` on the standardised head weights (the bias is not penalised)."""
MAX_ITERATIONS = 200
"""L-BFGS iterations of one fit."""
DICE_SMOOTH = 1e-5
"""MONAI's ``smooth_nr``/``smooth_dr`` default, in (estimated) voxel counts."""
_SAMPLE_TAG = 0x5E6
"""Second word of the sampling generator's seed (keeps this stream apart from others of the same seed)."""


@dataclass(frozen=True)
class VoxelSample:
    """Voxels of one training volume drawn for one seed."""

    points: torch.Tensor
    """``(N, 3)`` int64 voxel indices ``(x, y, z)``."""
    classes: torch.Tensor
    """``(N,)`` int64 class of each voxel."""
    weights: torch.Tensor
    """``(N,)`` float32: voxels of its class in the volume / sampled voxels of that class (>= 1)."""


def sample_voxels(label: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> VoxelSample:
    """A class-stratified voxel sample of one label volume.

    Args:
        label: ``(X, Y, Z)`` int64 class indices in ``[0, num_classes)``.
        num_classes: classes including background.
        per_class: at most this many voxels of each class (all of a class that has fewer).
        generator: a CPU ``torch.Generator``; the only source of randomness.
    """
    flat = label.reshape(-1)
    points, classes, weights = [], [], []
    for c in range(num_classes):
        where = torch.nonzero(flat == c).view(-1)
        if where.numel() == 0:
            continue
        chosen = where[torch.randperm(where.numel(), generator=generator)[:per_class]]
        points.append(torch.stack(torch.unravel_index(chosen, tuple(label.shape)), dim=1))
        classes.append(torch.full((chosen.numel(),), c, dtype=torch.int64))
        weights.append(torch.full((chosen.numel(),), where.numel() / chosen.numel(), dtype=torch.float32))
    return VoxelSample(torch.cat(points), torch.cat(classes), torch.cat(weights))


@dataclass(frozen=True)
class LinearHead:
    """A fitted head in raw feature units: ``logits = features @ weight.T + bias``."""

    weight: torch.Tensor
    """``(K, sum C_i)`` float32 (the standardisation folded in)."""
    bias: torch.Tensor
    """``(K,)`` float32."""


def dice_ce_loss(logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - mean soft Dice over all classes), estimated from a weighted voxel sample.

    Args:
        logits: ``(N, K)``; classes: ``(N,)`` int64; weights: ``(N,)`` voxels each sampled voxel stands for.

    Returns:
        A 0-dim tensor: the weighted mean cross-entropy plus ``1 - mean_c Dice_c`` with
        ``Dice_c = (2 sum w p_c y_c + s) / (sum w p_c + sum w y_c + s)`` (``s`` = :data:`DICE_SMOOTH`).
    """
    ce = (weights * F.cross_entropy(logits, classes, reduction="none")).sum() / weights.sum()
    probabilities = logits.softmax(dim=1)
    onehot = F.one_hot(classes, logits.shape[1]).to(probabilities.dtype)
    w = weights[:, None]
    intersection = (w * probabilities * onehot).sum(dim=0)
    denominator = (w * (probabilities + onehot)).sum(dim=0)
    dice = (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return ce + 1.0 - dice.mean()


def fit_linear_head(features: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor, num_classes: int) -> LinearHead:
    """Fit the head on sampled voxel features (see the module docstring).

    Args:
        features: ``(N, D)`` float32 voxel features; classes: ``(N,)`` int64; weights: ``(N,)`` float32.
        num_classes: ``K``, classes including background.
    """
    total = weights.sum()
    mean = (weights[:, None] * features).sum(dim=0) / total
    sd = ((weights[:, None] * (features - mean).square()).sum(dim=0) / total).sqrt().clamp_min(1e-6)
    standardised = (features - mean) / sd
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = dice_ce_loss(standardised @ weight.T + bias, classes, weights) + 0.5 * L2_PENALTY * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw_weight = (weight / sd).detach()
    return LinearHead(weight=raw_weight, bias=(bias - raw_weight @ mean).detach())


def predict_volume(head: LinearHead, maps: Sequence[torch.Tensor], grid_shape: Sequence[int],
                   shape: Sequence[int]) -> torch.Tensor:
    """The head's class of every voxel of one volume.

    Args:
        maps: the volume's maps ``(C_i, X_i, Y_i, Z_i)`` the head was fitted on;
            grid_shape: the padded input's ``(X', Y', Z')``;
            shape: the unpadded ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` int64 class indices, on the maps' device.
    """
    logits = head.bias.view(-1, 1, 1, 1).expand(-1, *grid_shape).clone()
    start = 0
    for m in maps:
        part = head.weight[:, start : start + m.shape[0]]
        start += m.shape[0]
        coarse = torch.einsum("kc,cxyz->kxyz", part, m)
        logits += F.interpolate(coarse[None], size=tuple(grid_shape), mode="trilinear", align_corners=False)[0]
    return logits[:, : shape[0], : shape[1], : shape[2]].argmax(dim=0)


def dice_per_class(predictions: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int) -> list[float]:
    """MONAI's Dice (``monai.metrics.compute_dice``) of each foreground class, averaged over the volumes
    whose ground truth holds it.

    The functional form, not the ``DiceMetric`` class: the metric class gathers its buffers over all
    ranks when a process group exists, and inside pretraining only rank 0 probes.

    Args:
        predictions, labels: ``(X, Y, Z)`` int64 class indices, pairwise on one grid.

    Returns:
        ``num_classes - 1`` floats (classes 1..K-1); NaN for a class no ground truth holds.
    """
    rows = []
    for prediction, label in zip(predictions, labels):
        onehot = [F.one_hot(v.long(), num_classes).permute(3, 0, 1, 2)[None].float() for v in (prediction, label)]
        rows.append(compute_dice(onehot[0], onehot[1].to(onehot[0].device), include_background=False, ignore_empty=True))
    per_volume = torch.cat(rows).cpu()  # (volumes, K - 1), NaN where a volume's ground truth lacks the class
    present = ~per_volume.isnan()
    sums = torch.where(present, per_volume, 0.0).sum(dim=0)
    counts = present.sum(dim=0)
    return [float(s / n) if n > 0 else math.nan for s, n in zip(sums, counts)]


class SegmentationProbe:
    """The segmentation probe of :class:`ProbeData` (see the module docstring).

    The voxel samples depend only on the labels and the seed, so they are drawn once here and
    every :meth:`score` of any encoder fits on the very same voxels.
    """

    metric = "dice"
    """Name of the headline score: mean foreground Dice on ``val``."""

    def __init__(self, data: ProbeData, seeds: Sequence[int], device: torch.device,
                 levels: Sequence[int] = LEVELS) -> None:
        if data.task != "segmentation":
            raise ValueError(f"SegmentationProbe needs segmentation data, got {data.task!r}")
        self.data, self.seeds, self.device = data, tuple(seeds), device
        self.levels = check_levels(levels)
        self.samples: dict[int, list[VoxelSample]] = {}
        for seed in self.seeds:
            generator = torch.Generator().manual_seed(int(seed) * 0x10000 + _SAMPLE_TAG)
            self.samples[seed] = [sample_voxels(v.label, data.num_classes, VOXELS_PER_CLASS, generator)
                                  for v in data.train]

    def class_names(self) -> list[str]:
        """Names of the per-class scores: ``class1`` .. ``class{K-1}``."""
        return [f"class{c}" for c in range(1, self.data.num_classes)]

    def score(self, encoder: nn.Module, seeds: Sequence[int] | None = None) -> list[dict[str, float]]:
        """Fit one head per seed on ``encoder``'s frozen features and score it on ``val``.

        Args:
            encoder: a volpre encoder on this probe's device (its train/eval modes are restored).
            seeds: a subset of the seeds given at construction (default: all).

        Returns:
            One dict per seed: ``{"dice": mean foreground Dice, "dice/class1": ..., ...}`` (NaN
            where no ``val`` ground truth holds a class; the mean skips those).
        """
        seeds = self.seeds if seeds is None else tuple(seeds)
        gathered: dict[int, list[torch.Tensor]] = {seed: [] for seed in seeds}
        with frozen(encoder):
            for index, volume in enumerate(self.data.train):
                maps = encoder_features(encoder, volume.image, self.device, self.levels)
                for seed in seeds:
                    gathered[seed].append(features_at(maps, self.samples[seed][index].points, volume.image.shape[1:]))
                del maps
            heads = {}
            for seed in seeds:
                sample = self.samples[seed]
                heads[seed] = fit_linear_head(
                    torch.cat(gathered.pop(seed)),
                    torch.cat([s.classes for s in sample]).to(self.device),
                    torch.cat([s.weights for s in sample]).to(self.device),
                    self.data.num_classes,
                )
            predictions: dict[int, list[torch.Tensor]] = {seed: [] for seed in seeds}
            for volume in self.data.val:
                maps = encoder_features(encoder, volume.image, self.device, self.levels)
                for seed in seeds:
                    predictions[seed].append(predict_volume(heads[seed], maps, volume.image.shape[1:], volume.shape))
                del maps
        labels = [v.label for v in self.data.val]
        results = []
        for seed in seeds:
            per_class = dice_per_class(predictions[seed], labels, self.data.num_classes)
            finite = [d for d in per_class if not math.isnan(d)]
            scores = {"dice": sum(finite) / len(finite) if finite else math.nan}
            scores.update({f"dice/{name}": d for name, d in zip(self.class_names(), per_class)})
            results.append(scores)
        return results

