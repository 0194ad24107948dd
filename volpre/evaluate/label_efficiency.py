"""``volpre evaluate label-efficiency``: does the pretrained encoder help at a given amount of labels?

For every seed and every fraction of the labelled training subjects, one subset of subjects is
drawn (:mod:`volpre.evaluate.sampling`), and the bundle exported from the checkpoint is
fine-tuned twice on it with identical settings, once from the pretrained encoder and once from
scratch (:mod:`volpre.evaluate.runs`); each run's final weights are scored on the fixed ``val``
split. The default protocol (:data:`DEFAULT_FRACTIONS`, :data:`DEFAULT_SEEDS`): fractions 0.05,
0.1, 0.25 and 1.0 of the labelled subjects (at least one subject each, two for survival), 3 seeds,
and per fraction the paired difference pretrained − scratch per seed with its 95% Student t
interval over seeds (:mod:`volpre.evaluate.summary`).

Learning rates: the bundles give a pretrained encoder a tenth of the head's learning rate and a
scratch encoder the full rate; ``encoder_learning_rate=VALUE`` (a bundle override) puts both arms
at one rate. Every record states both rates and ``encoder_rate`` (``"lower"``, ``"equal"`` or
``"higher"`` than the head's).

When two fractions of a seed draw the same subjects (e.g. 0.05 and 0.1 of 10 subjects are both
one subject), the runs of the first are not repeated: the later fraction's records repeat its
result, with ``same_run_as_fraction`` naming it.

Output folder::

    OUT/bundle/                        the bundle exported once from the checkpoint (volpre export)
    OUT/runs/seedS/fractionF/manifest.json      the run's subjects (split train) + the val entries
    OUT/runs/seedS/fractionF/{pretrained,scratch}/models/model.pt   final weights of each run
    OUT/runs/seedS/fractionF/{pretrained,scratch}/eval/             the bundle's TensorBoard logs
    OUT/results.json                   config, subsets, one record per run, summary (rewritten after every run)
    OUT/label_efficiency.png           metric vs fraction (both arms) and the paired difference, 95% intervals

``results.json``::

    {"config": {..., "ci_method": "Student t interval over seeds (n - 1 degrees of freedom)"}, "complete": true,
     "subsets": [{"seed": 0, "fraction": 0.25, "subjects": ["s001", ...], "entries": ["s001-ct0", ...]}],
     "records": [{"fraction": 0.25, "seed": 0, "arm": "pretrained", "metric": 0.41, "steps": 200,
                  "train_subjects": 2, "train_entries": 3, "learning_rate": 1e-04, "encoder_learning_rate": 1e-05,
                  "encoder_rate": "lower", "run_dir": "runs/seed0/fraction0.25/pretrained"}, ...],
     "summary": [see volpre.evaluate.summary.summarize]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from monai.bundle import ConfigParser

from volpre.data.manifest import Manifest, save_manifest
from volpre.evaluate.errors import EvaluationError
from volpre.evaluate.runs import FinetuneRun, check_bundle_overrides, finetune_and_validate
from volpre.evaluate.sampling import (MIN_SUBJECTS, Task, check_fractions, fraction_name, sample_subjects,
                                     select_evaluation_data)
from volpre.evaluate.summary import ARMS, CI_METHOD, format_table, plot_label_efficiency, summarize
from volpre.export import export_bundle
from volpre.export.templates import templates_root
from volpre.files import atomic_write_text, check_new_output, file_sha256
from volpre.versions import installed_versions

RESULTS_FILE = "results.json"
PLOT_FILE = "label_efficiency.png"
BUNDLE_DIR = "bundle"
RUNS_DIR = "runs"

DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 1.0)
"""Fractions of the labelled training subjects of the standard protocol."""
DEFAULT_SEEDS = 3
"""Seeds of the standard protocol: the fewest that give a t interval with some width to it."""

METRIC_LABELS: dict[str, str] = {
    "segmentation": "Dice (mean over foreground classes)",
    "survival": "C-index (Harrell)",
}
"""What each task's key validation metric is, for the table and the plot."""


def _encoder_rate(encoder_lr: float, lr: float) -> str:
    """How the encoder's learning rate compares with the head's: ``"lower"``, ``"equal"`` or ``"higher"``."""
    if abs(encoder_lr - lr) <= 1e-12 * max(abs(lr), 1.0):
        return "equal"
    return "lower" if encoder_lr < lr else "higher"


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"{what}: got {value!r}, expected an integer >= 1")
    return value


def evaluate_label_efficiency(
    checkpoint: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    task: Task,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = DEFAULT_SEEDS,
    max_steps: int | None = None,
    network: str | None = None,
    modality: Literal["CT", "MR"] = "CT",
    out_channels: int | None = None,
    roi_size: Sequence[int] | None = None,
    ct_window: Sequence[float] | None = None,
    overrides: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the evaluation into ``out``; return the content of ``OUT/results.json``.

    Args:
        checkpoint: a volpre pretraining checkpoint (``RUN/checkpoints/last.pt``).
        manifest: a volpre manifest with splits ``train`` (sampled) and ``val`` (fixed).
        out: a new or empty folder.
        task: ``"segmentation"`` (Dice) or ``"survival"`` (C-index).
        fractions: distinct fractions in (0, 1] of the labelled training subjects (default
            :data:`DEFAULT_FRACTIONS`).
        seeds: number of seeds (0 .. seeds-1; default :data:`DEFAULT_SEEDS`); each seed draws its own
            nested subsets and seeds its runs. With one seed there is no interval.
        max_steps: optimiser steps per run; ``None``: the bundle's ``max_epochs`` (then smaller
            subsets take fewer steps; the records say how many).
        network, modality, out_channels, roi_size, ct_window: as for :func:`volpre.export.export_bundle`
            (``ct_window``: the fine-tuning CT window in HU; default the pretraining one).
        overrides: bundle config overrides applied to every run alike (e.g. ``{"num_workers": 0}``).
        say: receives one progress line per run.

    Raises:
        FileExistsError: ``out`` is a file or a non-empty directory.
        EvaluationError: bad fractions, seeds, step budget or overrides; a manifest without
            labelled ``train`` or ``val`` entries, with subjects in both, or (survival) without a
            comparable pair in ``val``; an export argument that does not fit the checkpoint.
        ManifestError: the manifest cannot be read.
        CheckpointError, WeightsError: the checkpoint cannot be exported (from ``volpre export``).

    Long because it is the protocol end to end in order: checks, export, the (seed, fraction, arm)
    loop, statistics and the files written; the pieces are in sampling, runs and summary.
    """
    out = Path(out)
    check_new_output(out, "evaluation output", " (remove it or choose another --out)")
    fractions = check_fractions(fractions)
    seeds = _positive_int(seeds, "seeds (the number of seeds)")
    if max_steps is not None:
        _positive_int(max_steps, "max_steps (optimiser steps per run)")
    overrides = dict(overrides or {})
    if task not in METRIC_LABELS:
        raise EvaluationError(f"task: got {task!r}, expected one of {', '.join(METRIC_LABELS)}")
    check_bundle_overrides(templates_root() / task / "configs" / "train.json", overrides, max_steps)
    data = select_evaluation_data(manifest, task, modality)
    subsets = {seed: sample_subjects(data.train_subjects, fractions, seed, MIN_SUBJECTS[task]) for seed in range(seeds)}

    try:
        bundle = export_bundle(checkpoint, task, out / BUNDLE_DIR, network=network, manifest=manifest,
                               modality=modality, out_channels=out_channels, roi_size=roi_size,
                               ct_window=ct_window)
    except ValueError as error:  # an argument that does not fit the checkpoint or the task
        raise EvaluationError(f"cannot export {checkpoint} for the evaluation: {error}") from error
    bundle_config = ConfigParser()
    bundle_config.read_config(str(bundle / "configs" / "train.json"))
    metric_name = next(iter(bundle_config.get("validate#key_metric")))

    results: dict[str, Any] = {
        "config": {
            "task": task,
            "metric": metric_name,
            "metric_label": METRIC_LABELS[task],
            "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": file_sha256(Path(checkpoint)),
            "manifest": str(Path(manifest).resolve()),
            "manifest_sha256": file_sha256(Path(manifest)),
            "bundle": str(bundle.resolve()),
            "network_def": bundle_config.get("network_def#_target_"),
            "modality": modality,
            "roi_size": bundle_config.get("roi_size"),
            "ct_window": bundle_config.get("ct_window"),
            "out_channels": out_channels,
            "fractions": list(fractions),
            "ci_method": CI_METHOD,
            "seeds": list(range(seeds)),
            "max_steps": max_steps,
            "bundle_overrides": overrides,
            "train_pool": {"subjects": len(data.train_subjects), "entries": len(data.train)},
            "val": {"subjects": len(data.val_subjects), "entries": len(data.val), "ids": [e.id for e in data.val]},
            "versions": installed_versions(),
        },
        "complete": False,
        "subsets": [],
        "records": [],
        "summary": [],
    }
    results_path = out / RESULTS_FILE
    say(f"exported {bundle}; {2 * seeds * len(fractions)} runs ({seeds} seeds x {len(fractions)} fractions x "
        f"pretrained/scratch), each scored on {len(data.val)} val entries")
    for seed in range(seeds):
        done: dict[tuple[str, ...], float] = {}  # subjects -> the fraction whose runs trained on them
        for fraction in fractions:
            subjects = subsets[seed][fraction]
            entries = data.train_entries_of(subjects)
            run_root = out / RUNS_DIR / f"seed{seed}" / f"fraction{fraction_name(fraction)}"
            results["subsets"].append({"seed": seed, "fraction": fraction, "subjects": subjects,
                                       "entries": [e.id for e in entries]})
            same_as = done.get(tuple(subjects))
            if same_as is not None:
                earlier = [r for r in results["records"] if r["seed"] == seed and r["fraction"] == same_as]
                for record in earlier:
                    results["records"].append({**record, "fraction": fraction, "same_run_as_fraction": same_as})
                atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
                say(f"seed {seed}, fraction {fraction:g}: the same {len(subjects)} subjects as fraction {same_as:g}; "
                    "its runs count for this fraction too")
                continue
            done[tuple(subjects)] = fraction
            run_root.mkdir(parents=True)
            description = (f"label-efficiency subset: seed {seed}, fraction {fraction:g} ({len(subjects)} of "
                           f"{len(data.train_subjects)} training subjects) + the val split")
            run_manifest = save_manifest(Manifest(entries=[*entries, *data.val], description=description),
                                         run_root / "manifest.json")
            for arm in ARMS:
                run_dir = run_root / arm
                result = finetune_and_validate(FinetuneRun(bundle, run_manifest, arm == "pretrained", seed, run_dir,
                                                           max_steps, overrides))
                results["records"].append({
                    "fraction": fraction,
                    "seed": seed,
                    "arm": arm,
                    "metric": result.metric,
                    "steps": result.steps,
                    "train_subjects": len(subjects),
                    "train_entries": len(entries),
                    "learning_rate": result.learning_rate,
                    "encoder_learning_rate": result.encoder_learning_rate,
                    "encoder_rate": _encoder_rate(result.encoder_learning_rate, result.learning_rate),
                    "run_dir": run_dir.relative_to(out).as_posix(),
                })
                atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
                say(f"seed {seed}, fraction {fraction:g} ({len(subjects)} subjects, {len(entries)} entries), {arm}: "
                    f"{metric_name} {result.metric:.4f} after {result.steps} steps (encoder lr "
                    f"{result.encoder_learning_rate:g}, head lr {result.learning_rate:g})")

    results["summary"] = summarize(results["records"], fractions)
    results["complete"] = True
    atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
    steps = f"{max_steps} steps" if max_steps is not None else "the bundle's epochs"
    plot_label_efficiency(results["summary"], f"{metric_name}: {METRIC_LABELS[task]}",
                          f"{task} on {modality}, {steps} per run, val split", out / PLOT_FILE)
    return results


def results_table(results: Mapping[str, Any]) -> str:
    """The table of a ``results.json`` content (see :func:`volpre.evaluate.summary.format_table`)."""
    config = results["config"]
    return format_table(results["summary"], config["metric"], config["metric_label"])
