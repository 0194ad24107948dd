"""Build the :class:`~volpre.objectives.base.Pretrainer` a run config names."""

from __future__ import annotations

from volpre.config import ConfigError, RunConfig
from volpre.models import build_decoder, build_encoder
from volpre.objectives.base import Pretrainer
from volpre.objectives.dae import DAEPretrainer
from volpre.objectives.mvm import SimMIMPretrainer, SparKPretrainer, spark_decoder

MVM_VARIANTS: dict[str, type[Pretrainer]] = {"swin": SimMIMPretrainer, "resnet": SparKPretrainer}
"""Masked volume modeling variant per encoder name (``model.encoder``)."""


def samples_by_subject(run_cfg: RunConfig) -> bool:
    """Whether the objective needs dataset items that hold all scans of one subject (its positives
    come from several scans of a patient), rather than one item per scan. Neither ``dae`` (whose
    contrastive term contrasts modalities, not subjects) nor ``mvm`` does."""
    del run_cfg  # no objective of this module contrasts subjects
    return False


def build_pretrainer(run_cfg: RunConfig) -> Pretrainer:
    """Encoder + decoder + objective for ``run_cfg.model`` and ``run_cfg.objective`` (on the CPU)."""
    encoder = build_encoder(run_cfg.model)
    objective = run_cfg.objective
    if objective.name == "dae":
        return DAEPretrainer(encoder, build_decoder(run_cfg.model, encoder), objective.dae)
    if objective.name == "mvm":
        variant = MVM_VARIANTS.get(run_cfg.model.encoder)
        if variant is None:
            raise ConfigError(
                f"objective.name 'mvm' has no variant for model.encoder {run_cfg.model.encoder!r}; "
                f"expected one of {', '.join(MVM_VARIANTS)}"
            )
        if variant is SparKPretrainer and objective.mvm.resnet_densify == "spark":
            decoder = spark_decoder(encoder, run_cfg.model.decoder_channels)
        else:
            decoder = build_decoder(run_cfg.model, encoder)
        return variant(encoder, decoder, objective.mvm)
    raise ConfigError(f"objective.name: got {objective.name!r}, expected one of 'dae', 'mvm'")
