"""The probe inside pretraining: what ``volpre.engine.trainer`` calls every ``probe.every`` steps.

:class:`TrainingProbe` is a ``volpre.engine.trainer.Probe``: built once per run on rank 0 from the
run config (it reads and preprocesses the ``probe`` section's entries with the run's own
``preprocess`` config, and draws its voxel sample with seed 0, so every probe of the run fits on
the same voxels), then called with the current encoder (or the EMA's).
"""

from __future__ import annotations

import torch
from torch import nn

from volpre.config import RunConfig
from volpre.evaluate.probe.compare import build_probe
from volpre.evaluate.probe.data import load_probe_data

TRAINING_SEED = 0
"""The one seed of an in-training probe (its voxel sample is fixed for the run)."""


class TrainingProbe:
    """Frozen-feature probe of the encoder during pretraining (``probe`` config section).

    Args:
        run_cfg: the pretraining run's config (``probe``, ``preprocess``, ``model.in_channels``).
        device: the training device (features and the head's fit run there).

    Raises:
        EvaluationError, ManifestError, VolumeError: as :func:`volpre.evaluate.probe.load_probe_data`.
    """

    def __init__(self, run_cfg: RunConfig, device: torch.device) -> None:
        probe_cfg = run_cfg.probe
        if probe_cfg.manifest is None:
            raise ValueError("TrainingProbe needs probe.manifest (the probe is disabled without it)")
        data = load_probe_data(probe_cfg.manifest, probe_cfg.task, probe_cfg.modality, run_cfg.preprocess,
                               run_cfg.model.in_channels, probe_cfg.max_entries)
        self._probe = build_probe(data, (TRAINING_SEED,), device)
        self.metric: str = self._probe.metric
        """``dice`` (mean foreground Dice on val) or ``cindex`` (Harrell's C on val)."""

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """``{"dice": ..., "dice/class1": ..., ...}`` or ``{"cindex": ...}`` for ``encoder`` (modes restored)."""
        return self._probe.score(encoder)[0]
