"""``volpre evaluate probe``: a checkpoint's frozen encoder against the same encoder at random initialisation.

Both arms go through the very same probe (:mod:`~volpre.evaluate.probe.segmentation` or
:mod:`~volpre.evaluate.probe.survival`) on the same preprocessed volumes, with the same seeds:

- ``pretrained``: the checkpoint's encoder (``model`` or ``ema`` weights), loaded strictly; its
  features are extracted once and every seed fits its own head on them (seeds change the voxel
  sample of the segmentation probe; the survival probe has no randomness, so all its seeds agree);
- ``random_init``: for seed ``s``, the checkpoint's encoder architecture initialised as volpre
  initialises it after ``torch.manual_seed(s)`` (so seed ``train.seed`` is the very initialisation
  the checkpoint's run started from), probed like the pretrained arm with seed ``s``.

Both arms use their BatchNorm layers' running statistics as they are (``bn_stats="checkpoint"``:
the pretraining's, or the initial zero mean and unit variance), or both first recompute them on
the probe's ``train`` images (``bn_stats="train"``, see
:func:`~volpre.evaluate.probe.features.recompute_batchnorm_statistics`).

``OUT/results.json``::

    {"task": "segmentation", "metric": "dice", "metric_label": "mean foreground Dice (val)",
     "arms": {"pretrained": {"mean": 0.61, "sd": 0.01, "values": [...], "per_class": {"class1": {...}}},
              "random_init": {...}},
     "difference": {"mean": ..., "sd": ..., "values": [...]},      pretrained - random_init, paired by seed
     "seeds": [0, 1, 2], "checkpoint": {...}, "data": {...}, "settings": {...}, "seconds": {...}, "versions": {...}}

``sd`` is the sample standard deviation over seeds (null with one seed); a value that cannot be
computed (e.g. a class no ``val`` label holds) is null.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from volpre.config import ModelConfig
from volpre.evaluate.errors import EvaluationError
from volpre.evaluate.probe import segmentation, survival
from volpre.evaluate.probe.data import ProbeData, load_probe_data
from volpre.evaluate.probe.features import LEVELS, check_levels, recompute_batchnorm_statistics
from volpre.evaluate.probe.segmentation import SegmentationProbe
from volpre.evaluate.probe.survival import SurvivalProbe
from volpre.evaluate.sampling import Task
from volpre.export.source import read_pretrained_encoder
from volpre.files import atomic_write_text, check_new_output
from volpre.models import build_encoder
from volpre.versions import installed_versions

RESULTS_FILE = "results.json"
ARMS = ("pretrained", "random_init")
METRIC_LABELS = {"dice": "mean foreground Dice (val)", "cindex": "Harrell's C-index (val)"}
BN_STATS = ("checkpoint", "train")
"""Where the encoders' BatchNorm running statistics come from: as they are, or the probe's ``train`` images."""


def build_probe(data: ProbeData, seeds: Sequence[int], device: torch.device,
                levels: Sequence[int] = LEVELS) -> SegmentationProbe | SurvivalProbe:
    """The probe of ``data.task`` for ``seeds`` on ``device``, reading the encoder's maps of ``levels``."""
    if data.task == "segmentation":
        return SegmentationProbe(data, seeds, device, levels)
    return SurvivalProbe(data, seeds, device, levels)


def random_encoder(model: ModelConfig, seed: int) -> nn.Module:
    """The encoder ``model`` describes, initialised after ``torch.manual_seed(seed)`` (the caller's RNG
    states are left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(model)


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    clean = [_finite(v) for v in values]
    usable = [v for v in clean if v is not None]
    complete = len(usable) == len(clean) and usable
    return {
        "mean": statistics.fmean(usable) if complete else None,
        "sd": statistics.stdev(usable) if complete and len(usable) >= 2 else None,
        "values": clean,
    }


def _arm_summary(scores: Sequence[dict[str, float]], metric: str, class_names: Sequence[str]) -> dict[str, Any]:
    summary = _stats([s[metric] for s in scores])
    if class_names:
        summary["per_class"] = {name: _stats([s[f"{metric}/{name}"] for s in scores]) for name in class_names}
    return summary


def _settings(task: str, bn_stats: str, levels: Sequence[int]) -> dict[str, Any]:
    if task == "segmentation":
        return {
            "bn_stats": bn_stats,
            "levels": list(levels),
            "head": "linear 1x1x1 conv on the frozen maps of these levels, trilinearly upsampled to the input grid",
            "loss": "cross-entropy + soft Dice (all classes), from a class-stratified, inverse-weighted voxel sample",
            "voxels_per_class": segmentation.VOXELS_PER_CLASS,
            "l2_penalty": segmentation.L2_PENALTY,
            "max_iterations": segmentation.MAX_ITERATIONS,
            "optimizer": "L-BFGS (strong Wolfe), zero initialisation",
        }
    return {
        "bn_stats": bn_stats,
        "levels": list(levels),
        "model": "linear Cox (Breslow) on the pooled frozen maps of these levels (+ covariates), standardised, "
                 "blocks scaled 1/sqrt(width)",
        "l2_penalty": survival.COX_L2_PENALTY,
        "max_iterations": survival.MAX_ITERATIONS,
        "optimizer": "L-BFGS (strong Wolfe), zero initialisation",
    }


def compare_with_random_init(
    checkpoint: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    task: Task = "segmentation",
    seeds: int = 3,
    modality: Literal["CT", "MR"] = "CT",
    weights: Literal["model", "ema"] = "model",
    device: str | None = None,
    max_entries: int | None = None,
    bn_stats: Literal["checkpoint", "train"] = "checkpoint",
    levels: Sequence[int] = LEVELS,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Probe the checkpoint's encoder and random initialisations of it; write and return ``OUT/results.json``.

    Args:
        checkpoint: a volpre pretraining checkpoint.
        manifest: a manifest with labelled ``train`` (fit) and ``val`` (score) entries.
        out: a new or empty folder.
        task: ``"segmentation"`` (Dice) or ``"survival"`` (C-index).
        seeds: number of seeds ``0 .. seeds-1``.
        modality: entries of this modality are probed.
        weights: the checkpoint's trained weights or their moving average.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        max_entries: at most this many entries of each split (None: all).
        bn_stats: ``"checkpoint"``: every encoder's BatchNorm running statistics as they are;
            ``"train"``: both arms' recomputed on the probe's ``train`` images first.
        levels: which of the encoder's five maps the head reads (level ``i`` at stride ``2**(i+1)``).
        say: receives progress lines.

    Raises:
        FileExistsError: ``out`` is a file or a non-empty directory.
        EvaluationError: bad seeds, task, levels or bn_stats (``"train"`` for an encoder without BatchNorm);
            a manifest without usable labels for the task (see
            :func:`volpre.evaluate.probe.data.load_probe_data`).
        ManifestError, VolumeError: the manifest or one of its volumes cannot be read.
        CheckpointError, WeightsError: the checkpoint cannot be read or its encoder does not fit its config.

    Long because it is the comparison in order (data, the checkpoint's arm, one random-init arm per
    seed, paired differences, results.json); the probes themselves are in segmentation and survival.
    """
    out = Path(out)
    check_new_output(out, "probe output", " (remove it or choose another --out)")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise EvaluationError(f"seeds: got {seeds!r}, expected an integer >= 1 (the number of seeds)")
    if task not in ("segmentation", "survival"):
        raise EvaluationError(f"task: got {task!r}, expected one of segmentation, survival")
    if bn_stats not in BN_STATS:
        raise EvaluationError(f"bn_stats: got {bn_stats!r}, expected one of {', '.join(BN_STATS)}")
    levels = check_levels(levels)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise EvaluationError("device: cuda was asked for, but torch sees no CUDA device")
    run_device = torch.device("cuda" if use_cuda else "cpu")
    pretrained = read_pretrained_encoder(checkpoint, weights)
    cfg = pretrained.config
    started = time.perf_counter()
    data = load_probe_data(manifest, task, modality, cfg.preprocess, cfg.model.in_channels, max_entries)
    seconds = {"load": time.perf_counter() - started}
    say(f"read {len(data.train)} train and {len(data.val)} val {modality} entries ({seconds['load']:.0f} s)")
    seed_list = list(range(seeds))
    probe = build_probe(data, seed_list, run_device, levels)

    def prepared(encoder: nn.Module) -> nn.Module:
        encoder = encoder.to(run_device)
        if bn_stats == "train":
            recompute_batchnorm_statistics(encoder, [v.image for v in data.train], run_device)
        return encoder

    encoder = build_encoder(cfg.model)
    encoder.load_state_dict(pretrained.state, strict=True)
    started = time.perf_counter()
    scores: dict[str, list[dict[str, float]]] = {"pretrained": probe.score(prepared(encoder))}
    seconds["pretrained"] = time.perf_counter() - started
    say(f"pretrained: {probe.metric} {', '.join(f'{s[probe.metric]:.4f}' for s in scores['pretrained'])} "
        f"({seconds['pretrained']:.0f} s)")
    started = time.perf_counter()
    scores["random_init"] = []
    for seed in seed_list:
        scores["random_init"] += probe.score(prepared(random_encoder(cfg.model, seed)), [seed])
        say(f"random_init seed {seed}: {probe.metric} {scores['random_init'][-1][probe.metric]:.4f}")
    seconds["random_init"] = time.perf_counter() - started

    names = probe.class_names()
    metric = probe.metric
    differences = [p[metric] - r[metric] for p, r in zip(scores["pretrained"], scores["random_init"])]
    results: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "metric_label": METRIC_LABELS[metric],
        "arms": {arm: _arm_summary(scores[arm], metric, names) for arm in ARMS},
        "difference": _stats(differences),
        "seeds": seed_list,
        "checkpoint": {
            "path": str(Path(checkpoint).resolve()),
            "weights": weights,
            "step": pretrained.step,
            "encoder": pretrained.encoder,
            "model": cfg.to_dict()["model"],
            "preprocess": cfg.to_dict()["preprocess"],
        },
        "data": {
            "manifest": str(Path(manifest).resolve()),
            "modality": modality,
            "train": [v.entry.id for v in data.train],
            "val": [v.entry.id for v in data.val],
            "num_classes": data.num_classes if task == "segmentation" else None,
            "covariates": list(data.covariates),
        },
        "settings": _settings(task, bn_stats, levels),
        "device": str(run_device),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "versions": installed_versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results


def _mean_sd(stats: dict[str, Any], signed: bool = False) -> str:
    if stats["mean"] is None:
        return "n/a"
    mean = f"{stats['mean']:+.4f}" if signed else f"{stats['mean']:.4f}"
    return mean if stats["sd"] is None else f"{mean} ± {stats['sd']:.4f}"


def _values(stats: dict[str, Any]) -> str:
    return ", ".join("n/a" if v is None else f"{v:.4f}" for v in stats["values"])


def probe_table(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table (mean ± sd over seeds, per-class columns, per-seed values)."""
    arms = results["arms"]
    names = list(arms["pretrained"].get("per_class", {}))
    data = results["data"]
    lines = [
        f"{results['task']} probe of {results['checkpoint']['path']} (step {results['checkpoint']['step']}, "
        f"{results['checkpoint']['weights']} weights, BatchNorm statistics: {results['settings']['bn_stats']}, "
        f"levels {','.join(map(str, results['settings']['levels']))}): "
        f"{results['metric_label']}, fitted on {len(data['train'])} "
        f"train / scored on {len(data['val'])} val {data['modality']} entries, {len(results['seeds'])} seeds",
        "",
        "| arm | " + " | ".join([results["metric"], *names, "per seed"]) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for arm in ARMS:
        cells = [_mean_sd(arms[arm]), *(_mean_sd(arms[arm]["per_class"][n]) for n in names), _values(arms[arm])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    diff = results["difference"]
    lines.append("| pretrained - random_init | " + " | ".join(
        [_mean_sd(diff, signed=True), *("" for _ in names), _values(diff)]) + " |")
    return "\n".join(lines)
