"""Build the :class:`~volpre.objectives.base.Pretrainer` a run config names."""

from __future__ import annotations

from collections.abc import Sequence

from volpre.config import ConfigError, RunConfig
from volpre.data.dataset import VolumeGroups
from volpre.data.manifest import ManifestEntry, ManifestError
from volpre.models import build_encoder, build_encoder_and_decoder
from volpre.objectives.base import Pretrainer
from volpre.objectives.contrastive import ContrastivePretrainer
from volpre.objectives.dae import DAEPretrainer
from volpre.objectives.mvm import SimMIMPretrainer, SparKPretrainer, spark_decoder

MVM_VARIANTS: dict[str, type[Pretrainer]] = {"swin": SimMIMPretrainer, "resnet": SparKPretrainer}
"""Masked volume modeling variant per encoder name (``model.encoder``); ``nnunet`` has
:class:`volpre.objectives.spark_nnunet.NNUNetSparKPretrainer` (imported on use: nnU-Net is optional)."""

CONTRASTIVE_ENCODERS: dict[str, tuple[str, ...]] = {"simclr": ("resnet", "swin"), "micle": ("resnet", "swin")}
"""Encoders each contrastive objective is built and tested for (``nnunet``: not yet)."""


def samples_by_subject(run_cfg: RunConfig) -> bool:
    """Whether the objective needs dataset items that hold all scans of one subject (its positives
    come from several scans of a patient), rather than one item per scan: ``micle`` only (the
    ``dae``'s contrastive term contrasts modalities, not subjects; ``mvm`` and ``simclr`` take one
    scan per item)."""
    return run_cfg.objective.name == "micle"


def items_by_modality(run_cfg: RunConfig) -> bool:
    """Whether by-subject items are split further by modality (one item per subject and modality)."""
    return run_cfg.objective.name == "micle" and not run_cfg.objective.micle.positives_across_modalities


def build_items(run_cfg: RunConfig, entries: Sequence[ManifestEntry]) -> VolumeGroups:
    """The dataset items the objective draws its crops from (see :func:`samples_by_subject`)."""
    return VolumeGroups.build(entries, by_subject=samples_by_subject(run_cfg), by_modality=items_by_modality(run_cfg))


def check_items_fit_objective(run_cfg: RunConfig, groups: VolumeGroups, manifest: str, world_size: int = 1) -> list[str]:
    """Refuse data the objective cannot learn from; return warnings about settings that weaken it.

    For ``simclr`` and ``micle`` (whose negatives are crops of other subjects in the same step's
    global batch of ``data.batch_size x world_size`` items): raises
    :class:`~volpre.config.ConfigError` when that batch holds one item, and
    :class:`~volpre.data.manifest.ManifestError` when the (selected entries of the) manifest hold
    one subject; NT-Xent without a negative is 0 and teaches nothing. For ``micle`` also: raises
    :class:`~volpre.data.manifest.ManifestError` when no subject has two scans (of one modality
    class, unless ``objective.micle.positives_across_modalities``), since every positive pair would
    then be two crops of one scan; warns when ``data.crops_per_volume`` is 1 (each subject gives one
    crop of one scan per step, so no positive comes from another scan).
    """
    name = run_cfg.objective.name
    if name not in ("simclr", "micle"):
        return []
    items = run_cfg.data.batch_size * world_size
    if items < 2:
        raise ConfigError(
            f"objective.name {name} takes its negatives from the other items of a step: data.batch_size "
            f"{run_cfg.data.batch_size} x {world_size} process(es) is one item per step, so there is none and the "
            "loss is 0; set data.batch_size >= 2"
        )
    if len(set(groups.subject_index)) < 2:
        raise ManifestError(
            f"objective.name {name} takes its negatives from other subjects, but the entries of {manifest} "
            "are all of one subject; pretrain on a manifest with two subjects or more"
        )
    if name != "micle":
        return []
    if groups.items_with_several_scans() == 0:
        one_modality = " of one modality" if items_by_modality(run_cfg) else ""
        raise ManifestError(
            f"objective.name micle takes its positives from several scans of one subject, but no subject in "
            f"{manifest} has two scans{one_modality}; give the scans of one patient the same 'subject' in the "
            "manifest, or use objective.name=simclr (e.g. --config resnet-simclr)"
            + (", or pair scans of different modalities with objective.micle.positives_across_modalities=true"
               if one_modality else "")
        )
    if run_cfg.data.crops_per_volume < 2:
        return [
            "objective micle with data.crops_per_volume=1: each subject gives one crop of one scan per step, so "
            "no positive pair comes from two different scans (only views of one crop); set data.crops_per_volume=2"
        ]
    return []


def build_pretrainer(run_cfg: RunConfig) -> Pretrainer:
    """Encoder + decoder + objective for ``run_cfg.model`` and ``run_cfg.objective`` (on the CPU)."""
    model, objective = run_cfg.model, run_cfg.objective
    if objective.name in CONTRASTIVE_ENCODERS and model.encoder not in CONTRASTIVE_ENCODERS[objective.name]:
        raise ConfigError(
            f"objective.name {objective.name!r} supports model.encoder "
            f"{' or '.join(CONTRASTIVE_ENCODERS[objective.name])}, got {model.encoder!r}"
        )
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
    if objective.name in CONTRASTIVE_ENCODERS:
        section = getattr(objective, objective.name)
        return ContrastivePretrainer(encoder, decoder if section.reconstruction_weight > 0 else None, section,
                                     positives="crop" if objective.name == "simclr" else "subject")
    raise ConfigError(f"objective.name: got {objective.name!r}, expected one of 'dae', 'mvm', 'simclr', 'micle'")
