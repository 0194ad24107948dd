"""Survival probe: pooled frozen features (plus covariates) -> an L2-penalised Cox model; Harrell's C on ``val``.

Each volume's five maps (or the chosen ``levels``) are averaged over the part that covers the
unpadded volume and concatenated (:func:`volpre.evaluate.probe.features.pooled_features`, ``D``
numbers). With the covariates every entry carries (if any), they are standardised with the
``train`` entries' mean and sd, and each block (image features, covariates) is divided by the
square root of its width, so that both blocks weigh alike and a row's squared norm is about 1 per
block whatever ``D`` is.
A linear Cox model ``risk = x . beta`` minimises the negative partial log-likelihood
(:func:`volpre.survival.cox_ph_loss`, Breslow ties, averaged over events) plus
``COX_L2_PENALTY / 2 * ||beta||^2`` by L-BFGS from zero (convex: one optimum). The ``val`` entries'
risks are scored with Harrell's C-index (:func:`volpre.survival.concordance_index`).

Nothing here is random: for one encoder every seed gives the same score (seeds only change the
random-initialisation arm's encoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from volpre.evaluate.probe.data import ProbeData, ProbeVolume
from volpre.evaluate.probe.features import LEVELS, check_levels, encoder_features, frozen, pooled_features
from volpre.survival import concordance_index, cox_ph_loss

COX_L2_PENALTY = 1.0
"""Weight of ``1/2 ||beta||^2`` on the standardised, width-scaled features."""
MAX_ITERATIONS = 200
"""L-BFGS iterations of one fit."""


def fit_cox(features: torch.Tensor, time: torch.Tensor, event: torch.Tensor, l2: float = COX_L2_PENALTY) -> torch.Tensor:
    """``beta`` ``(D,)`` minimising ``cox_ph_loss(features @ beta, time, event) + l2/2 ||beta||^2``.

    ``cox_ph_loss`` averages over events, so this is lifelines' ``CoxPHFitter(penalizer=l2 * events / n)``
    on the same (already standardised) columns.

    Args:
        features: ``(n, D)`` float; time: ``(n,)``; event: ``(n,)`` 0/1; l2: the penalty's weight.
    """
    beta = torch.zeros(features.shape[1], dtype=features.dtype, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = cox_ph_loss(features @ beta, time, event) + 0.5 * l2 * beta.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return beta.detach()


def _standardise_blocks(train: Sequence[torch.Tensor], val: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise each block with the train rows' statistics and scale it by 1/sqrt(width); concatenate."""
    train_blocks, val_blocks = [], []
    for fit_block, score_block in zip(train, val):
        mean = fit_block.mean(dim=0)
        sd = fit_block.std(dim=0, unbiased=False)
        sd = torch.where(sd > 1e-6 * sd.max().clamp_min(1e-30), sd, torch.ones_like(sd))  # constant columns stay 0
        scale = fit_block.shape[1] ** -0.5
        train_blocks.append((fit_block - mean) / sd * scale)
        val_blocks.append((score_block - mean) / sd * scale)
    return torch.cat(train_blocks, dim=1), torch.cat(val_blocks, dim=1)


class SurvivalProbe:
    """The survival probe of :class:`ProbeData` (see the module docstring)."""

    metric = "cindex"
    """Name of the headline score: Harrell's C-index on ``val``."""

    def __init__(self, data: ProbeData, seeds: Sequence[int], device: torch.device,
                 levels: Sequence[int] = LEVELS) -> None:
        if data.task != "survival":
            raise ValueError(f"SurvivalProbe needs survival data, got {data.task!r}")
        self.data, self.seeds, self.device = data, tuple(seeds), device
        self.levels = check_levels(levels)

    def class_names(self) -> list[str]:
        """Survival has no per-class scores."""
        return []

    def _outcomes(self, volumes: Sequence[ProbeVolume]) -> tuple[torch.Tensor, torch.Tensor]:
        time = torch.tensor([v.entry.time for v in volumes], dtype=torch.float64, device=self.device)
        event = torch.tensor([v.entry.event for v in volumes], dtype=torch.float64, device=self.device)
        return time, event

    def _covariates(self, volumes: Sequence[ProbeVolume]) -> torch.Tensor:
        rows = [[float(v.entry.covariates[name]) for name in self.data.covariates] for v in volumes]
        return torch.tensor(rows, dtype=torch.float64, device=self.device).view(len(volumes), -1)

    def score(self, encoder: nn.Module, seeds: Sequence[int] | None = None) -> list[dict[str, float]]:
        """Pooled frozen features of ``encoder`` -> Cox fit on ``train`` -> C-index on ``val``.

        Returns:
            One ``{"cindex": C}`` per seed (the same C for every seed: the fit is deterministic).
        """
        seeds = self.seeds if seeds is None else tuple(seeds)
        pooled = {}
        with frozen(encoder):
            for split, volumes in (("train", self.data.train), ("val", self.data.val)):
                pooled[split] = torch.stack([
                    pooled_features(encoder_features(encoder, v.image, self.device, self.levels), v.shape,
                                    v.image.shape[1:])
                    for v in volumes
                ]).double()
        blocks = {"train": [pooled["train"]], "val": [pooled["val"]]}
        if self.data.covariates:
            blocks["train"].append(self._covariates(self.data.train))
            blocks["val"].append(self._covariates(self.data.val))
        train_x, val_x = _standardise_blocks(blocks["train"], blocks["val"])
        beta = fit_cox(train_x, *self._outcomes(self.data.train))
        cindex = concordance_index(val_x @ beta, *self._outcomes(self.data.val))
        return [{"cindex": cindex} for _ in seeds]
