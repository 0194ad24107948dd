"""``volpre export``: a pretraining checkpoint -> a MONAI bundle that fine-tunes its encoder.

:func:`export_bundle` reads and checks the checkpoint's encoder (:mod:`volpre.export.source`),
maps its keys onto the bundle network (:mod:`volpre.export.keymap`), proves the mapped file
loads strictly into that network, and writes the bundle from the templates in ``bundles/``::

    OUT/configs/train.json            fine-tuning (ConfigWorkflow; pretrained encoder loaded by network_def)
    OUT/configs/multi_gpu_train.json  overlay on train.json for torchrun (NCCL on GPUs, gloo on CPUs)
    OUT/configs/evaluate.json         overlay on train.json: metrics of models/model.pt on the test split
    OUT/configs/inference.json        predictions of models/model.pt for a split
    OUT/configs/metadata.json         MONAI meta schema 20240725, exact versions, network_data_format
    OUT/configs/logging.conf
    OUT/models/pretrained_encoder.pt  the encoder's tensors under the network's own key names
    OUT/docs/README.md                what the weights are, how to fine-tune, the exact commands
    OUT/LICENSE

Fine-tuning adds ``OUT/models/model.pt`` (the best validation checkpoint). The bundle is built in a
temporary folder beside ``OUT`` and renamed onto it when complete: an export that fails or is killed
leaves no ``OUT``.

No file of the bundle holds a local path unless the user asks for one with ``manifest``:
provenance is file names and SHA-256 digests, ``bundle_root`` is ``"."`` as in MONAI's model zoo
(``--bundle_root`` at run time), and the docs use ``BUNDLE`` and ``MANIFEST`` placeholders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from monai.bundle import ConfigParser

from volpre.config import ModelConfig, RunConfig
from volpre.export import networks
from volpre.export.errors import ExportError
from volpre.export.keymap import to_network_keys
from volpre.export.metadata import Provenance, fill_metadata, installed_package_versions
from volpre.export.source import PretrainedEncoder, read_pretrained_encoder
from volpre.export.templates import TASKS, templates_root
from volpre.export.transforms import check_ct_window
from volpre.files import atomic_torch_save, check_new_output, remove_stale_temporaries, temporary_path
from volpre.models.weights import check_state_dict

ENCODER_FILE = "models/pretrained_encoder.pt"
"""Where a bundle keeps the exported encoder, relative to its root."""

SWINUNETR_MIN_TRAIN_ROI = 64
"""SwinUNETR's instance norm needs more than one voxel on its stride-32 map when training."""


def _swin_arguments(model: ModelConfig) -> dict[str, Any]:
    """The Swin architecture keys shared by SwinUNETR's ``swinViT`` and volpre's SwinEncoder."""
    swin = model.swin
    return {
        "in_channels": "@in_channels",
        "feature_size": swin.feature_size,
        "depths": list(swin.depths),
        "num_heads": list(swin.num_heads),
        "window_size": swin.window_size,
        "use_v2": swin.use_v2,
        "use_checkpoint": swin.use_checkpoint,
    }


def _network_def(network: str, cfg: RunConfig) -> dict[str, Any]:
    """The architecture arguments of ``network_def`` for the pretraining encoder ``cfg.model``."""
    model = cfg.model
    if network == "swinunetr":
        return {"_target_": "volpre.export.networks.swin_unetr", "out_channels": "@out_channels",
                **_swin_arguments(model)}
    if network == "flexibleunet":
        return {
            "_target_": "volpre.export.networks.flexible_unet",
            "in_channels": "@in_channels",
            "out_channels": "@out_channels",
            "backbone": f"resnet{model.resnet.depth}",
            "decoder_channels": [256, 128, 64, 32, 16],
        }
    if model.encoder == "swin":
        encoder = {"_target_": "volpre.models.SwinEncoder", **_swin_arguments(model), "drop_path_rate": 0.0}
    else:
        encoder = {"_target_": "volpre.models.ResNet3DEncoder", "depth": model.resnet.depth,
                   "in_channels": "@in_channels"}
    return {
        "_target_": "volpre.export.networks.survival_net",
        "encoder": encoder,
        "hidden_channels": [128],
        "dropout": 0.0,
    }


def _build_network(network_def: dict[str, Any], in_channels: int, out_channels: int | None) -> torch.nn.Module:
    """Instantiate ``network_def`` (no weights) with MONAI's config parser, as the bundle will."""
    parser = ConfigParser({"in_channels": in_channels, "out_channels": out_channels,
                           "network_def": {**network_def, "pretrained_encoder": None, "checkpoint": None}})
    return parser.get_parsed_content("network_def")


def _check_choices(task: str, network: str | None, pretrained: PretrainedEncoder,
                   out_channels: int | None, roi_size: Sequence[int], modality: str) -> str:
    if task not in TASKS:
        raise ExportError(f"task: got {task!r}, expected one of {', '.join(TASKS)}")
    encoder = pretrained.encoder
    name = network if network is not None else networks.default_network(task, encoder)
    spec = networks.NETWORKS.get(name)
    if spec is None or spec.task != task or encoder not in spec.encoders:
        allowed = [n for n, s in networks.NETWORKS.items() if s.task == task and encoder in s.encoders]
        raise ExportError(
            f"network: got {name!r}; a {task} bundle of the {encoder} encoder in {pretrained.checkpoint} "
            f"can hold {', '.join(allowed)}"
        )
    if modality not in ("CT", "MR"):
        raise ExportError(f"modality: got {modality!r}, expected 'CT' or 'MR'")
    if len(roi_size) != 3 or any(not isinstance(r, int) or r <= 0 or r % 32 for r in roi_size):
        raise ExportError(f"roi_size: got {list(roi_size)}, expected three positive multiples of 32 (X, Y, Z voxels)")
    if name == "swinunetr" and min(roi_size) < SWINUNETR_MIN_TRAIN_ROI:
        raise ExportError(
            f"roi_size: got {list(roi_size)}; SwinUNETR needs at least {SWINUNETR_MIN_TRAIN_ROI} voxels per axis to "
            f"train (its instance norm needs more than one voxel on the stride-32 map): pass roi_size="
            f"{[max(r, SWINUNETR_MIN_TRAIN_ROI) for r in roi_size]}"
        )
    if task == "segmentation" and (out_channels is None or out_channels < 2):
        raise ExportError(
            f"out_channels: got {out_channels!r}; a segmentation bundle needs the number of classes including "
            "background (>= 2; e.g. 3 for volpre's demo CT labels: background, liver, lesion)"
        )
    if task == "survival" and out_channels is not None:
        raise ExportError(f"out_channels: got {out_channels!r}; a survival bundle predicts one risk, leave it unset")
    return name


def default_roi(task: str, network: str | None, pretrained: PretrainedEncoder,
                roi_size: Sequence[int] | None) -> tuple[tuple[int, ...], str]:
    """The bundle's crop size and a sentence for its docs saying where it comes from.

    ``roi_size`` when given; else the pretraining crop ``data.roi``, raised per axis to the smallest crop
    the network trains on (SwinUNETR: :data:`SWINUNETR_MIN_TRAIN_ROI`) when it is smaller (the ``-tiny``
    Swin profiles pretrain on 32^3).
    """
    if roi_size is not None:
        return tuple(roi_size), "chosen at export (`volpre export --roi`)"
    pretraining = tuple(pretrained.config.data.roi)
    name = network if network is not None else networks.default_network(task, pretrained.encoder)
    if name == "swinunetr" and min(pretraining) < SWINUNETR_MIN_TRAIN_ROI:
        roi = tuple(max(r, SWINUNETR_MIN_TRAIN_ROI) for r in pretraining)
        return roi, (f"the pretraining crop {list(pretraining)} raised to {list(roi)}, the smallest crop SwinUNETR "
                     f"trains on ({SWINUNETR_MIN_TRAIN_ROI} voxels per axis: its instance norm needs more than one "
                     "voxel on the stride-32 map); choose another with `volpre export --roi` or `--roi_size`")
    return pretraining, "the pretraining crop (`data.roi`); choose another with `volpre export --roi`"


def _fine_tuning_window(ct_window: Sequence[float] | None, pretraining: Sequence[float],
                        modality: str) -> tuple[float, float]:
    """The bundle's ``ct_window``: ``ct_window`` checked, or the pretraining window when it is ``None``."""
    if ct_window is None:
        return float(pretraining[0]), float(pretraining[1])
    if modality != "CT":
        raise ExportError(f"ct_window: got {list(ct_window)} for a {modality} bundle; only CT is windowed (MR is "
                          "z-scored), leave it unset")
    return check_ct_window(ct_window, "ct_window")


def _check_output(out: Path) -> None:
    check_new_output(out, "bundle output")


@contextlib.contextmanager
def _staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to build the bundle in, renamed onto ``out`` at the end.

    An export that fails or is killed half way leaves no ``out`` (a killed one leaves its
    temporary folder, removed by the next export to ``out``), so a rerun starts clean.
    """
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, name=out.name)
    work = temporary_path(out)
    for sub in ("configs", "models", "docs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    try:
        yield work
        _check_output(out)  # nobody created it meanwhile
        os.replace(work, out)  # onto a missing or empty folder: atomic
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fill_config(template: dict[str, Any], values: dict[str, Any], where: Path) -> dict[str, Any]:
    """Set ``values`` on the template's top-level keys (each must be declared by the template)."""
    config = dict(template)
    for key, value in values.items():
        if key not in config:
            raise KeyError(f"bundle template {where} has no top-level key {key!r} for volpre export to set")
        if key == "network_def":  # architecture from the checkpoint, weight files from the template
            value = {**value, "pretrained_encoder": config[key]["pretrained_encoder"],
                     "checkpoint": config[key]["checkpoint"]}
        config[key] = value
    return config


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def export_bundle(
    checkpoint: str | os.PathLike[str] | PretrainedEncoder,
    task: Literal["segmentation", "survival"],
    out: str | os.PathLike[str],
    network: str | None = None,
    manifest: str | os.PathLike[str] | None = None,
    modality: Literal["CT", "MR"] = "CT",
    out_channels: int | None = None,
    roi_size: Sequence[int] | None = None,
    weights: Literal["model", "ema"] = "model",
    ct_window: Sequence[float] | None = None,
) -> Path:
    """Write a MONAI bundle that fine-tunes the encoder of ``checkpoint``; return its folder.

    Args:
        checkpoint: a volpre pretraining checkpoint (e.g. ``RUN/checkpoints/last.pt``), or encoder
            weights already read (:func:`volpre.export.source.read_encoder_weights`, for
            ``volpre export --encoder-weights``; ``weights`` is then ignored).
        task: ``"segmentation"`` (SwinUNETR for Swin, FlexibleUNet for ResNet encoders) or
            ``"survival"`` (``volpre.survival.SurvivalNet``).
        out: the bundle folder to create (must not exist, or be empty).
        network: ``"swinunetr"``, ``"flexibleunet"`` or ``"survivalnet"``; default: the one
            fitting ``task`` and the checkpoint's encoder.
        manifest: the volpre manifest the bundle fine-tunes on by default (the ``manifest`` key
            of ``train.json`` and ``inference.json``, as an absolute path; ``--manifest PATH``
            overrides it at run time). ``None`` (a bundle to share, holding no local path): users
            must pass ``--manifest``.
        modality: which entries of the manifest the bundle reads and which preset it applies.
        out_channels: segmentation only: classes including background.
        roi_size: crop size ``(X, Y, Z)``, multiples of 32 (SwinUNETR: >= 64); default the
            pretraining crop size ``data.roi``. Survival bundles pad or centre-crop every
            preprocessed volume to it.
        weights: ``"model"`` (trained weights) or ``"ema"`` (their moving average, when kept).
        ct_window: CT only: the fine-tuning intensity window ``(low, high)`` in HU, clipped and
            scaled to [0, 1] (the bundle's ``ct_window`` key, recorded in ``metadata.json``
            under ``volpre_finetuning``); default the pretraining window ``preprocess.ct_window``.
            A narrower window than pretraining's spreads soft tissue over more of [0, 1], as in
            MONAI's Swin UNETR BTCV recipe (pretraining [-1000, 1000], fine-tuning [-175, 250]).

    Raises:
        CheckpointError: the checkpoint cannot be read or fails its checksum, is not a volpre
            checkpoint, has an invalid config, holds Swin weights from MONAI < 1.5, or encoder
            tensors with NaN/Inf.
        WeightsError: its encoder tensors do not fit the encoder (or the network) they should
            load into; every missing, unexpected and misshapen key is listed.
        ExportError: an argument does not fit the task, the encoder or the network (or
            ``ct_window`` is not ``low < high``, or given for an MR bundle).
        FileExistsError: ``out`` exists and is not an empty directory.
    """
    pretrained = (checkpoint if isinstance(checkpoint, PretrainedEncoder)
                  else read_pretrained_encoder(checkpoint, weights=weights))
    cfg = pretrained.config
    roi, roi_note = default_roi(task, network, pretrained, roi_size)
    name = _check_choices(task, network, pretrained, out_channels, roi, modality)
    window = _fine_tuning_window(ct_window, cfg.preprocess.ct_window, modality)
    installed_package_versions()  # fail before writing anything if a bundle dependency is missing
    out_dir = Path(out)
    network_def = _network_def(name, cfg)

    # the mapped tensors must fill the network's encoder exactly, before anything is written
    network_state = to_network_keys(pretrained.state, pretrained.encoder, name)
    model = _build_network(network_def, cfg.model.in_channels, out_channels)
    prefix = networks.NETWORKS[name].encoder_attr + "."
    check_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(prefix)},
        network_state,
        source=f"the encoder of checkpoint {pretrained.checkpoint}",
        target=f"the {prefix[:-1]} of the bundle's {name}",
    )

    with _staged_output(out_dir) as work_dir:
        _write_bundle(work_dir, pretrained, task, name, network_def, model, network_state, manifest,
                      modality, roi, roi_note, out_channels, window)
    return out_dir


def _write_bundle(work_dir: Path, pretrained: PretrainedEncoder, task: str, name: str,
                  network_def: dict[str, Any], model: torch.nn.Module, network_state: dict[str, torch.Tensor],
                  manifest: str | os.PathLike[str] | None, modality: str, roi: tuple[int, ...], roi_note: str,
                  out_channels: int | None, window: tuple[float, float]) -> None:
    """Write every file of the bundle into ``work_dir`` (renamed onto the bundle's folder afterwards)."""
    cfg = pretrained.config
    encoder_path = work_dir / ENCODER_FILE
    atomic_torch_save({k: v.detach().clone().contiguous() for k, v in network_state.items()}, encoder_path)
    networks.load_weights(model, encoder_path, None, f"the bundle's {name}")  # the bundle's own strict load

    root = templates_root()
    pre = cfg.preprocess
    # No local path unless the user gives one: bundle_root stays the templates' "." (MONAI's
    # convention, set with --bundle_root at run time), and the manifest is named only when
    # passed, in the two configs that read it (train.json, inference.json; evaluate.json and
    # multi_gpu_train.json are overlays on train.json).
    values: dict[str, Any] = {
        "manifest": None if manifest is None else str(Path(manifest).resolve()),
        "modality": modality,
        "in_channels": cfg.model.in_channels,
        "roi_size": list(roi),
        # every field of the pretraining's PreprocessConfig, so that a new one cannot go missing
        "preprocess": {"_target_": "volpre.config.PreprocessConfig",
                       **{key: list(value) if isinstance(value, tuple) else value
                          for key, value in dataclasses.asdict(pre).items()}},
        "ct_window": list(window),
        "network_def": network_def,
    }
    if out_channels is not None:
        values["out_channels"] = out_channels
    task_dir = root / task / "configs"
    for name_json in ("train.json", "inference.json"):
        template = json.loads((task_dir / name_json).read_text())
        _write_json(_fill_config(template, values, task_dir / name_json), work_dir / "configs" / name_json)
    shutil.copyfile(task_dir / "evaluate.json", work_dir / "configs" / "evaluate.json")
    for common in ("multi_gpu_train.json", "logging.conf"):
        shutil.copyfile(root / "common" / "configs" / common, work_dir / "configs" / common)
    shutil.copyfile(root / "common" / "LICENSE", work_dir / "LICENSE")

    provenance = Provenance.of(pretrained)
    metadata = fill_metadata(json.loads((task_dir / "metadata.json").read_text()), pretrained, name, modality, roi,
                             out_channels, provenance, window)
    _write_json(metadata, work_dir / "configs" / "metadata.json")
    readme = _render_readme(root / task / "docs" / "README.md", task, pretrained, provenance, name, metadata,
                            {**values, "roi_note": roi_note})
    (work_dir / "docs" / "README.md").write_text(readme)


def _json_block(values: dict[str, Any]) -> str:
    """A JSON object with one top-level key per line (nested values on that line)."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in values.items()) + "\n}"


def _weights_origin(pretrained: PretrainedEncoder, provenance: Provenance) -> str:
    """The docs' sentence on where ``models/pretrained_encoder.pt`` comes from."""
    file, digest = provenance.checkpoint["file"], provenance.checkpoint["sha256"]
    if pretrained.pretrained_by_volpre:
        return (f"the encoder of the volpre checkpoint `{file}` (SHA-256 `{digest}`; {pretrained.weights} weights), "
                f"pretrained with the `{pretrained.config.objective.name}` objective for {pretrained.step} optimiser "
                "steps")
    return (f"the encoder weights of `{file}` (SHA-256 `{digest}`; {pretrained.origin} layout, exported with "
            "`volpre export --encoder-weights`, not pretrained by volpre: the objective, pretraining data and "
            "versions below are not known)")


PAPERS = {
    "dae": "Valanarasu J. M. J., Tang Y., Yang D., Xu Z., Zhao C., Li W., Patel V. M., Landman B., Xu D., He Y., "
           "Nath V. Disruptive Autoencoders: Leveraging Low-level Features for 3D Medical Image Pre-training. 2023. "
           "https://arxiv.org/abs/2307.16896",
    "simmim": "Xie Z. et al. SimMIM: A Simple Framework for Masked Image Modeling. CVPR 2022. "
              "https://arxiv.org/abs/2111.09886",
    "spark": "Tian K. et al. Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling. "
             "ICLR 2023. https://arxiv.org/abs/2301.03580",
    "simclr": "Chen T., Kornblith S., Norouzi M., Hinton G. A Simple Framework for Contrastive Learning of Visual "
              "Representations. ICML 2020. https://arxiv.org/abs/2002.05709",
    "micle": "Azizi S. et al. Big Self-Supervised Models Advance Medical Image Classification. ICCV 2021. "
             "https://arxiv.org/abs/2101.05224",
}
"""The paper each pretraining objective follows (``mvm``: SimMIM for Swin, SparK for the CNN encoders)."""


def objective_paper(objective: str, encoder: str) -> str:
    """The citation of the paper ``objective`` (a config's ``objective.name``) follows for ``encoder``."""
    if objective == "mvm":
        return PAPERS["simmim" if encoder == "swin" else "spark"]
    return PAPERS[objective]


def _render_readme(template_path: Path, task: str, pretrained: PretrainedEncoder, provenance: Provenance,
                   network: str, metadata: dict[str, Any], values: dict[str, Any]) -> str:
    """The bundle's docs: file names and digests for provenance; BUNDLE and MANIFEST placeholders in commands."""
    cfg = pretrained.config
    model = cfg.to_dict()["model"]
    encoder_config = {"encoder": model["encoder"], "in_channels": model["in_channels"],
                      model["encoder"]: model[model["encoder"]]}
    objective = cfg.objective.name if pretrained.pretrained_by_volpre else None
    citation = (f"The pretraining objective, `{objective}`, follows: {objective_paper(objective, cfg.model.encoder)}"
                if objective else "The encoder weights were not pretrained by volpre: cite their source.")
    references = list(metadata.get("references", []))
    if objective:
        references.append(objective_paper(objective, cfg.model.encoder))
    tags = [task, values["modality"], network, f"{cfg.model.encoder} encoder",
            f"self-supervised pretraining ({objective})" if objective else "public encoder weights", "volpre"]
    fields = {
        "authors": metadata.get("authors", "not recorded"),
        "tags": ", ".join(tags),
        "citation": citation,
        "references": "\n".join(f"- {reference}" for reference in references),
        "network": network,
        "encoder": cfg.model.encoder,
        "weights_origin": _weights_origin(pretrained, provenance),
        "objective": cfg.objective.name if pretrained.pretrained_by_volpre else "none (not pretrained by volpre)",
        "pretrain_manifest": provenance.manifest.get("file", "not recorded"),
        "pretrain_manifest_sha256": provenance.manifest.get("sha256", "not recorded"),
        "encoder_config": _json_block(encoder_config),
        "objective_config": (_json_block(cfg.to_dict()["objective"][cfg.objective.name])
                             if pretrained.pretrained_by_volpre else "{}"),
        "preprocess_config": _json_block(cfg.to_dict()["preprocess"]),
        "pretrain_versions": _json_block(pretrained.versions),
        "bundle_versions": _json_block(metadata["required_packages_version"]),
        "bundle": "BUNDLE",
        "manifest": "MANIFEST",
        "manifest_note": (
            "This bundle was exported without one, so `--manifest` is required."
            if values["manifest"] is None else
            f"The configs name the manifest given at export (`{Path(values['manifest']).name}`, key `manifest` of "
            "`train.json` and `inference.json`); `--manifest` replaces it."),
        "modality": values["modality"],
        "roi_size": ", ".join(str(r) for r in values["roi_size"]),
        "roi_note": values["roi_note"],
        "in_channels": str(values["in_channels"]),
        "ct_window": json.dumps(values["ct_window"]),
        "pretraining_ct_window": json.dumps(list(cfg.preprocess.ct_window)),
    }
    return string.Template(template_path.read_text()).substitute(fields)
