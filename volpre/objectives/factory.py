"""Build the :class:`~volpre.objectives.base.Pretrainer` a run config names."""

from __future__ import annotations

from volpre.config import ConfigError, RunConfig
from volpre.models import build_encoder, build_encoder_and_decoder
from volpre.objectives.base import Pretrainer
from volpre.objectives.dae import DAEPretrainer
from volpre.objectives.mvm import SimMIMPretrainer, SparKPretrainer, spark_decoder

MVM_VARIANTS: dict[str, type[Pretrainer]] = {"swin": SimMIMPretrainer, "resnet": SparKPretrainer}
"""Masked volume modeling variant per encoder name (``model.encoder``); ``nnunet`` has
:class:`volpre.objectives.spark_nnunet.NNUNetSparKPretrainer` (imported on use: nnU-Net is optional)."""


def samples_by_subject(run_cfg: RunConfig) -> bool:
    """Whether the objective needs dataset items that hold all scans of one subject (its positives
    come from several scans of a patient), rather than one item per scan. Neither ``dae`` (whose
    contrastive term contrasts modalities, not subjects) nor ``mvm`` does."""
    del run_cfg  # no objective of this module contrasts subjects
    return False


def build_pretrainer(run_cfg: RunConfig) -> Pretrainer:
    """Encoder + decoder + objective for ``run_cfg.model`` and ``run_cfg.objective`` (on the CPU)."""
    model, objective = run_cfg.model, run_cfg.objective
    if objective.name == "mvm" and model.encoder == "resnet" and objective.mvm.resnet_densify == "spark":
        encoder = build_encoder(model)  # SparK's own light decoder replaces the UNet decoder
        return SparKPretrainer(encoder, spark_decoder(encoder, model.decoder_channels), objective.mvm)
    encoder, decoder = build_encoder_and_decoder(model)
    if objective.name == "dae":
        return DAEPretrainer(encoder, decoder, objective.dae)
    if objective.name == "mvm":
        if model.encoder == "nnunet":  # imported here: nnU-Net is an optional dependency
            from volpre.objectives.spark_nnunet import NNUNetSparKPretrainer

            return NNUNetSparKPretrainer(encoder, decoder, objective.mvm)
        variant = MVM_VARIANTS.get(model.encoder)
        if variant is None:
            raise ConfigError(
                f"objective.name 'mvm' has no variant for model.encoder {model.encoder!r}; "
                f"expected one of {', '.join(MVM_VARIANTS)}"
            )
        return variant(encoder, decoder, objective.mvm)
    raise ConfigError(f"objective.name: got {objective.name!r}, expected one of 'dae', 'mvm'")
