"""``volpre demo``: the main job end to end on the embedded demo data, in minutes on a CPU.

demo data -> ``volpre index`` (of the image folders) -> ``volpre check`` (of the manifests)
-> pretrain a tiny encoder -> export a segmentation and a survival bundle -> fine-tune each with
``python -m monai.bundle run``, from the pretrained encoder and from scratch -> score each on the
held-out ``test`` split with the bundle's ``evaluate.json`` -> a summary table, printed and
written to ``OUT/report.md``, and the same numbers in ``OUT/report.json``. Beside fine-tuning,
``volpre evaluate probe`` (:func:`volpre.evaluate.probe.compare_with_random_init`) probes the
frozen pretrained encoder against the same encoder at random initialisation, on each cohort's
``train`` (fit) and ``val`` (score) splits.

Two synthetic cohorts (:mod:`volpre.demo.synthetic`, realistic HU values and anatomy; never
tuned for this demo):

- ``OUT/data``: :data:`DEFAULT_SUBJECTS` subjects of full-size torso CTs and head MRs. Their
  ``train`` and ``val`` scans pretrain the encoder (no labels); their CT liver and lesion labels
  are the segmentation task (scored on the ``test`` split).
- ``OUT/survival_data``: :data:`SURVIVAL_SUBJECTS` other subjects (another seed) with small,
  liver-targeted CTs whose outcome is driven by the lesion's volume; :data:`SURVIVAL_TEST_FRACTION`
  of them are the ``test`` split, so the C-index comes with a usable interval.

Fine-tuning uses the soft-tissue window :data:`FINETUNE_CT_WINDOW` (``volpre export --ct-window``),
not the full profiles' [-1000, 1000] HU, in which liver and the tissue around it differ by about
0.01 (see :func:`run_demo`); the demo's ``resnet-dae-tiny`` pretrains at the same soft window.
The numbers are one run per arm on synthetic phantoms: they show that every piece works
together, not how much pretraining helps (``volpre evaluate label-efficiency`` measures that,
with seeds and intervals).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser

import volpre
from volpre.config import load_config
from volpre.data.check import check_entries
from volpre.data.index import index_paths
from volpre.data.manifest import TEST, load_manifest
from volpre.demo.synthetic import CT_LABELS, DemoInputError, write_demo_data
from volpre.engine.trainer import pretrain
from volpre.errors import VolpreError
from volpre.evaluate.probe import compare_with_random_init, probe_table
from volpre.export import export_bundle
from volpre.files import atomic_write_text
from volpre.processes import CommandTimeout, run_logged
from volpre.survival.interval import METHOD as CINDEX_INTERVAL_METHOD
from volpre.survival.interval import bootstrap_concordance

MARKER = ".volpre-demo"
"""File that marks a folder as a demo output, which a new demo run may replace."""
PRETRAIN_CONFIG = "resnet-dae-tiny"
DEFAULT_SUBJECTS = 16
"""Subjects of the full-size cohort (pretraining and segmentation)."""
SURVIVAL_SUBJECTS = 80
"""Subjects of the small survival cohort."""
SURVIVAL_TEST_FRACTION = 0.4
SURVIVAL_VAL_FRACTION = 0.1
"""Splits of the survival cohort: 32 test, 8 val, 40 train subjects of 80."""
SURVIVAL_SEED_OFFSET = 1
"""The survival cohort is drawn with seed ``seed + 1``: other subjects than the ones pretraining saw."""
SEGMENTATION_CLASSES = 3  # background, liver, lesion (volpre.demo.synthetic.CT_LABELS)
CLASS_NAMES = {value: name for name, value in CT_LABELS.items()}
FINETUNE_CT_WINDOW = (-175.0, 250.0)
"""HU window of fine-tuning (MONAI's Swin UNETR BTCV recipe), given to the exported bundles; the
pretraining window is the config's (``resnet-dae-tiny``: the same)."""
SURVIVAL_ROI = (32, 32, 64)
"""Survival input, voxels at the pretraining spacing (4 mm): 128 x 128 x 256 mm about the liver."""
DEFAULT_EPOCHS = {"segmentation": 24, "survival": 10}
"""Fine-tuning epochs per task: a segmentation epoch is 8 optimiser steps on the demo data (16 CT
scans of 10 subjects, 2 per step), a survival epoch 3 (about 60 scans, 16 per step). Segmentation
gets most of the demo's time: its 192 steps take about two minutes per arm here, and it is the
task whose score rises with steps (pretrained arm, test liver Dice, one run each on these data:
0.665 after 64 steps at a constant rate, 0.733 after 192, 0.795 after 192 with the bundle's cosine
decay, 0.861 after 360 at a constant rate, the best of validations every 40 steps; README); a
survival model given four times its 30 steps scored no better (README)."""
FINETUNE_LR = 2e-3
"""Fine-tuning learning rate of the demo's short CPU runs (the bundles default to 1e-4; the
encoder gets a tenth of it in the pretrained arm)."""
DEFAULT_PRETRAIN_STEPS = 30
"""Pretraining steps. These defaults (30 steps; 24 and 10 fine-tuning epochs) are sized so that the
whole demo ends within 10 minutes on 2 quiet CPU cores (README: the time measured); they are far
from trained models."""
BOOTSTRAP_RESAMPLES = 2000
PROBE_SEEDS = 1
"""Seeds of the frozen-feature probes (``volpre evaluate probe --seeds``): one keeps the demo's CPU
time down (each seed of a probe costs about a minute here); its ``sd`` is then null."""

BUNDLE_RUN_TIMEOUT_S = 3600
"""One ``monai.bundle run`` of the demo takes seconds to minutes (ten times that on a busy machine);
past this it is hung."""


class DemoError(VolpreError, RuntimeError):
    """A step of the demo failed; the message names the step and where its log is."""


@dataclass
class ArmResult:
    """One fine-tuned arm, scored on its cohort's ``test`` split."""

    task: str
    arm: str
    epochs: int
    seconds: float
    learning_rate: float
    """The head's learning rate (the bundle's ``learning_rate``; the segmentation bundle's cosine
    decays it from there)."""
    encoder_learning_rate: float
    """The encoder's (the bundle's ``encoder_learning_rate``: a tenth of the head's for a pretrained encoder)."""
    scores: dict[str, Any] = field(default_factory=dict)
    """Segmentation: ``dice``, ``dice_per_class``, ``n``; survival: ``cindex``, ``ci95``, ``n``, ... (report.json)."""


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoInputError(f"{out} exists and is not a volpre demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by volpre demo; a new demo run replaces this folder\n")


def _say(text: str) -> None:
    print(text, flush=True)


def _bundle_env() -> dict[str, str]:
    """The runner's environment: the volpre being run here is the one the bundle imports."""
    package_parent = str(Path(volpre.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path}


def _run_bundle(bundle: Path, configs: list[str], overrides: dict[str, str], log: Path, cwd: Path) -> None:
    """``python -m monai.bundle run`` as a user types it; raise DemoError pointing at the log."""
    config_file = str(bundle / "configs" / configs[0]) if len(configs) == 1 else str(
        [str(bundle / "configs" / c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file,
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    try:
        returncode = run_logged(cmd, log, BUNDLE_RUN_TIMEOUT_S, cwd=cwd, env=_bundle_env())
    except CommandTimeout:
        raise DemoError(f"bundle run did not finish within {BUNDLE_RUN_TIMEOUT_S} s and was killed; "
                        f"log: {log}") from None
    if returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise DemoError(f"bundle run failed (exit {returncode}); log: {log}\n{tail}")


def segmentation_scores(eval_dir: Path) -> dict[str, Any]:
    """``{"dice", "dice_per_class": {"liver", "lesion"}, "n"}`` from the files MONAI's ``MetricsSaver`` wrote.

    ``dice``: the key metric (``val_mean_dice``, MONAI ``MeanDice`` over the foreground classes
    and test scans); ``dice_per_class``: the mean over test scans per class
    (``val_mean_dice_summary.csv``); ``n``: test scans (rows of ``val_mean_dice_raw.csv``).

    Raises:
        DemoError: a file is missing or unreadable.
    """
    try:
        metrics = dict(csv.reader((eval_dir / "metrics.csv").read_text().splitlines()))
        summary = {row["class"]: row for row in csv.DictReader((eval_dir / "val_mean_dice_summary.csv").open())}
        raw = list(csv.DictReader((eval_dir / "val_mean_dice_raw.csv").open()))
        per_class = {CLASS_NAMES[c]: float(summary[f"class{c - 1}"]["mean"]) for c in sorted(CLASS_NAMES)}
        return {"dice": float(metrics["val_mean_dice"]), "dice_per_class": per_class, "n": len(raw)}
    except (OSError, KeyError, ValueError) as error:
        raise DemoError(f"cannot read the segmentation scores in {eval_dir}: {error!r}") from error


def survival_scores(eval_dir: Path, manifest: Path, seed: int) -> dict[str, Any]:
    """``{"cindex", "ci95", "n", "n_entries", ...}`` of the risks ``evaluate.json`` wrote for the test scans.

    The risks (``risks.csv``, MONAI's ``ClassificationSaver``: image path, risk) are matched to
    the manifest's ``test`` CT entries by image path; Harrell's C and its 95% percentile
    bootstrap interval over subjects come from :func:`volpre.survival.interval.bootstrap_concordance`.
    ``n`` counts subjects, ``n_entries`` scans.

    Raises:
        DemoError: ``risks.csv`` is missing, or does not hold one risk per test CT entry.
    """
    path = eval_dir / "risks.csv"
    try:
        risks = {row[0]: float(row[1]) for row in csv.reader(path.read_text().splitlines()) if row}
    except (OSError, IndexError, ValueError) as error:
        raise DemoError(f"cannot read the risks in {path}: {error!r}") from error
    entries = [e for e in load_manifest(manifest).by_split(TEST) if e.modality == "CT"]
    missing = [e.id for e in entries if str(e.image[0]) not in risks]
    if missing or len(risks) != len(entries):
        raise DemoError(f"{path} holds {len(risks)} risks for {len(entries)} test CT entries "
                        f"(missing: {', '.join(missing[:5]) or 'none'})")
    risk = np.array([risks[str(e.image[0])] for e in entries])
    interval = bootstrap_concordance(risk, np.array([e.time for e in entries]), np.array([e.event for e in entries]),
                                     [e.subject_or_id for e in entries], n_resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return {"cindex": interval.cindex, "ci95": [interval.low, interval.high], "n": interval.n_subjects,
            "n_entries": interval.n_entries, "events": int(sum(e.event for e in entries)),
            "ci_method": f"{CINDEX_INTERVAL_METHOD}, {interval.n_resamples} resamples, seed {seed}"}


def _learning_rates(bundle: Path, pretrained: bool) -> tuple[float, float]:
    """``(learning_rate, encoder_learning_rate)`` of a demo arm, evaluated from the bundle's ``train.json``."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "pretrained": pretrained, "learning_rate": FINETUNE_LR})
    return float(parser.get_parsed_content("learning_rate")), float(parser.get_parsed_content("encoder_learning_rate"))


def _fine_tune(task: str, bundle: Path, manifest: Path, arm: str, epochs: int, work: Path, seed: int) -> ArmResult:
    arm_dir = work / task / arm
    arm_dir.mkdir(parents=True)
    common = {"manifest": str(manifest), "pretrained": str(arm == "pretrained"), "learning_rate": str(FINETUNE_LR),
              "ckpt_dir": str(arm_dir / "models"), "output_dir": str(arm_dir / "eval"), "num_workers": "0"}
    start = time.perf_counter()
    # validate once, after the last epoch (its CheckpointSaver writes models/model.pt then)
    _run_bundle(bundle, ["train.json"], {**common, "max_epochs": str(epochs), "val_interval": str(epochs)},
                arm_dir / "train.log", cwd=work)
    _run_bundle(bundle, ["train.json", "evaluate.json"], common, arm_dir / "evaluate.log", cwd=work)
    scores = (segmentation_scores(arm_dir / "eval") if task == "segmentation"
              else survival_scores(arm_dir / "eval", manifest, seed))
    return ArmResult(task, arm, epochs, time.perf_counter() - start, *_learning_rates(bundle, arm == "pretrained"),
                     scores)


def _describe(result: ArmResult) -> str:
    s = result.scores
    if result.task == "segmentation":
        classes = ", ".join(f"{name} {value:.3f}" for name, value in s["dice_per_class"].items())
        return f"Dice {s['dice']:.3f} ({classes}; {s['n']} test scans)"
    return f"C-index {s['cindex']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] ({s['n']} test subjects)"


def report_json(results: list[ArmResult], probes: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """``{"segmentation": {arm: scores}, "survival": {arm: scores}, "probe": {task: results.json}, "demo": info}``
    (see :func:`run_demo`)."""
    out: dict[str, Any] = {}
    for r in results:
        out.setdefault(r.task, {})[r.arm] = {**r.scores, "epochs": r.epochs, "seconds": round(r.seconds, 1),
                                             "learning_rate": r.learning_rate,
                                             "encoder_learning_rate": r.encoder_learning_rate}
    out["probe"] = probes
    out["demo"] = info
    return out


def _rates(results: list[ArmResult]) -> str:
    return "; ".join(f"{r.task} {r.arm} {r.learning_rate:g} / {r.encoder_learning_rate:g}" for r in results)


def format_report(results: list[ArmResult], probes: dict[str, dict[str, Any]], info: dict[str, Any]) -> str:
    """The summary table as Markdown, with what the numbers are and what they are not."""
    seg, surv = info["segmentation_data"], info["survival_data"]
    lines = [
        "# volpre demo",
        "",
        "Synthetic phantoms (volpre's demo data: CT torsos with realistic HU values and anatomy), a "
        f"`{PRETRAIN_CONFIG}` encoder pretrained for {info['pretrain_steps']} steps without labels, and each bundle "
        "fine-tuned once per arm with `python -m monai.bundle run`, from the pretrained encoder and from scratch, "
        f"at the CT window [{FINETUNE_CT_WINDOW[0]:g}, {FINETUNE_CT_WINDOW[1]:g}] HU (pretraining: "
        f"[{info['pretrain_ct_window'][0]:g}, {info['pretrain_ct_window'][1]:g}]).",
        "",
        "| task | arm | metric (test split) | value | 95% CI | n | epochs | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.scores
        if r.task == "segmentation":
            per_class = ", ".join(f"{name} {value:.3f}" for name, value in s["dice_per_class"].items())
            lines.append(f"| segmentation | {r.arm} | Dice, mean of liver and lesion ({per_class}) | {s['dice']:.3f} "
                         f"| - | {s['n']} CT scans | {r.epochs} | {r.seconds:.0f} |")
        else:
            lines.append(f"| survival | {r.arm} | Harrell's C-index | {s['cindex']:.3f} | "
                         f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {s['n']} subjects ({s['n_entries']} CT scans, "
                         f"{s['events']} events) | {r.epochs} | {r.seconds:.0f} |")
    lines += [
        "",
        "What these numbers are:",
        "",
        f"- Segmentation: {seg['train_subjects']} training subjects ({seg['train_entries']} CT scans) of "
        f"{seg['subjects']} synthetic subjects (`demo-data --size {seg['size']}`); Dice on the {seg['test_entries']} CT scans of the "
        f"{seg['test_subjects']} test subjects, per class and their mean (MONAI `MeanDice`). With so few test "
        "scans it has no interval here.",
        f"- Survival: {surv['subjects']} other synthetic subjects with small, liver-targeted CTs (seed "
        f"{surv['seed']}); the outcome is drawn from the liver lesion's volume (the lesion-volume C-index is about "
        f"0.75 over many subjects). Fine-tuned on {surv['train_subjects']} subjects ({surv['train_entries']} CT "
        f"scans), scored on the {surv['test_subjects']} test subjects. The 95% interval is a "
        f"{CINDEX_INTERVAL_METHOD}: intervals of the two arms that overlap do not tell the arms apart.",
        "- One run per arm and one seed. The difference between the arms is not a measurement of what pretraining "
        "is worth: that needs several seeds and label fractions (`volpre evaluate label-efficiency`), and real data.",
        f"- Learning rates as the bundles set them (head / encoder): {_rates(results)}; the segmentation bundle "
        "decays both by a cosine to 0 on its last step, the survival bundle keeps them. Where the encoder's rates "
        "differ, so do the arms in more than their starting weights (`encoder_learning_rate=VALUE` puts both at one "
        "rate).",
        "- The data are synthetic and the runs short (a few epochs on a CPU). Real CT is harder; these numbers say "
        "that the pieces work together, nothing about clinical performance.",
        "",
        "Frozen-feature probes (`volpre evaluate probe`: the pretrained encoder, frozen, against the same encoder at "
        "random initialisation; a light head fitted on each cohort's `train` split and scored on its `val` split, "
        f"{len(next(iter(probes.values()))['seeds'])} seed(s); the full results are under `probe` in report.json):",
    ]
    for probe_results in probes.values():
        lines += ["", probe_table(probe_results)]
    lines += [
        "",
        "The probes' `val` splits are small (the entry counts above): they show whether the frozen features carry "
        "the task at all, not a difference between the arms that other data would repeat.",
    ]
    return "\n".join(lines) + "\n"


def _schedule_overrides(pretrain_steps: int) -> list[str]:
    """Overrides that fit the learning-rate schedule into the demo's ``pretrain_steps``.

    The trainer's warm-up and cosine decay run to ``train.total_steps`` (``--max-steps`` only says
    where a run stops, so that a run continued with ``--resume`` keeps its schedule); the demo's
    run is the whole run, so its cosine ends at ``train.min_lr`` on its last step. The warm-up
    keeps the config's length, at most a fifth of the steps.
    """
    warmup = min(load_config(PRETRAIN_CONFIG).train.warmup_steps, pretrain_steps // 5)
    return [f"train.total_steps={pretrain_steps}", f"train.warmup_steps={warmup}"]


def _cohort(manifest: Path, seed: int | None = None) -> dict[str, Any]:
    entries = [e for e in load_manifest(manifest).entries if e.modality == "CT"]

    def of(split: str) -> tuple[int, int]:
        chosen = [e for e in entries if e.split == split]
        return len({e.subject_or_id for e in chosen}), len(chosen)

    (train_s, train_e), (test_s, test_e) = of("train"), of("test")
    info = {"manifest": str(manifest), "subjects": len({e.subject_or_id for e in entries}),
            "train_subjects": train_s, "train_entries": train_e, "test_subjects": test_s, "test_entries": test_e}
    if seed is not None:
        info["seed"] = seed
    return info


def run_demo(out: Path, subjects: int = DEFAULT_SUBJECTS, seed: int = 0, pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
             epochs: dict[str, int] | None = None, survival_subjects: int = SURVIVAL_SUBJECTS,
             pretrain_overrides: Sequence[str] = (), probe_seeds: int = PROBE_SEEDS,
             probe_max_entries: int | None = None, segmentation_size: str = "full") -> Path:
    """Run the whole path into ``out`` (replacing an earlier demo there); return the report's path.

    Args:
        out: output folder (a new one, or an earlier demo's).
        subjects: subjects of the full-size cohort (pretraining and segmentation).
        seed: seed of the full-size cohort; the survival cohort uses ``seed + 1``.
        pretrain_steps: pretraining steps.
        epochs: fine-tuning epochs per task (missing tasks: :data:`DEFAULT_EPOCHS`).
        survival_subjects: subjects of the small survival cohort (its test split is
            :data:`SURVIVAL_TEST_FRACTION` of them).
        pretrain_overrides: ``key=value`` overrides of the :data:`PRETRAIN_CONFIG` run config; its
            ``preprocess`` section is also the bundles' (e.g. ``preprocess.spacing=[8.0,8.0,8.0]``
            for coarser, faster volumes).
        probe_seeds: seeds of each frozen-feature probe (``volpre evaluate probe --seeds``).
        probe_max_entries: at most this many entries of each split per probe (None: all).
        segmentation_size: ``volpre demo-data --size`` of the first cohort (``"full"``; the tests
            take ``"small"``, liver-targeted CTs, to stay fast).

    Writes ``OUT/report.md`` and ``OUT/report.json``::

        {"segmentation": {"pretrained": {"dice", "dice_per_class": {"liver", "lesion"}, "n", "epochs", "seconds",
                                         "learning_rate", "encoder_learning_rate"},
                          "scratch": {...}},
         "survival": {"pretrained": {"cindex", "ci95": [low, high], "n", "n_entries", "events", "ci_method",
                                     "epochs", "seconds", "learning_rate", "encoder_learning_rate"},
                      "scratch": {...}},
         "probe": {"segmentation": {...}, "survival": {...}},   each volpre evaluate probe's results.json
         "demo": {how the run was made: data, splits, steps, windows, versions, wall time}}

    Why the fine-tuning window: in the full profiles' window [-1000, 1000] HU scaled to [0, 1], liver
    (55..66 HU) and the soft tissue around it (32..48 HU) differ by about 0.01, and the bundles'
    intensity augmentation (shifts of up to 0.1) moves every voxel by up to 200 HU, ten times
    that difference; at [-175, 250] HU the same tissues differ by 0.05 and a shift is at most 42 HU.

    Long because it is the demo's script: the steps of the whole path in order (data, index, check,
    pretrain, probes, export, fine-tunes, report), each a call and its timing; the work is in the
    functions it calls.
    """
    epochs = {**DEFAULT_EPOCHS, **(epochs or {})}
    started = time.perf_counter()
    out = Path(out).resolve()
    _prepare(out)
    survival_seed = seed + SURVIVAL_SEED_OFFSET
    _say(f"[1/7] demo data: {subjects} subjects -> {out / 'data'}; {survival_subjects} small survival subjects -> "
         f"{out / 'survival_data'}")
    manifest = write_demo_data(out / "data", subjects=subjects, seed=seed, size=segmentation_size)
    survival_manifest = write_demo_data(out / "survival_data", subjects=survival_subjects, seed=survival_seed,
                                        size="small", val_fraction=SURVIVAL_VAL_FRACTION,
                                        test_fraction=SURVIVAL_TEST_FRACTION)

    _say("[2/7] volpre index of the image folders (DICOM series, NIfTI, NRRD, MetaImage)")
    summary = index_paths([out / "data" / "images"], out / "indexed.json", progress=False,
                          modality=["*/ct*=CT", "*/mr*=MR"])
    _say("      " + summary.describe())

    _say("[3/7] volpre check of the demo manifests and the indexed one")
    for path in (manifest, survival_manifest, out / "indexed.json"):
        report = check_entries(load_manifest(path).entries, on_problem=lambda p: _say("      " + p.line()))
        _say(f"      {path.parent.name}/{path.name}: " + report.summary().replace("\n", "\n      "))
        if not report.ok:
            raise DemoError(f"volpre check found problems in {path}")

    _say(f"[4/7] pretrain {PRETRAIN_CONFIG} for {pretrain_steps} steps (train and val splits of {out / 'data'})")
    cfg = load_config(PRETRAIN_CONFIG, ["train.checkpoint_every=1000", *_schedule_overrides(pretrain_steps),
                                        *pretrain_overrides])
    result = pretrain(cfg, manifest, out / "pretrain", max_steps=pretrain_steps, splits=("train", "val"))
    losses = result.losses
    _say(f"      loss {sum(losses[:10]) / min(10, len(losses)):.3f} (first 10 steps) -> "
         f"{sum(losses[-10:]) / min(10, len(losses)):.3f} (last 10); {result.samples_per_s:.1f} samples/s")

    checkpoint = out / "pretrain" / "checkpoints" / "last.pt"
    _say(f"[5/7] frozen-feature probes (`volpre evaluate probe`, {probe_seeds} seed(s)): the pretrained encoder vs "
         "random initialisation, fitted on each cohort's train split, scored on its val split")
    probes = {}
    for task, cohort in (("segmentation", manifest), ("survival", survival_manifest)):
        probes[task] = compare_with_random_init(checkpoint, cohort, out / "probe" / task, task=task, seeds=probe_seeds,
                                                max_entries=probe_max_entries, say=lambda line: _say("      " + line))
        means = {arm: stats["mean"] for arm, stats in probes[task]["arms"].items()}
        _say(f"      {task} probe: {probes[task]['metric']} " + ", ".join(
            f"{arm} {'n/a' if mean is None else f'{mean:.4f}'}" for arm, mean in means.items()))

    _say(f"[6/7] export a segmentation bundle and a survival bundle (fine-tuning CT window "
         f"[{FINETUNE_CT_WINDOW[0]:g}, {FINETUNE_CT_WINDOW[1]:g}] HU)")
    bundles = {
        "segmentation": export_bundle(checkpoint, "segmentation", out / "bundles" / "segmentation",
                                      manifest=manifest, out_channels=SEGMENTATION_CLASSES,
                                      ct_window=FINETUNE_CT_WINDOW),
        "survival": export_bundle(checkpoint, "survival", out / "bundles" / "survival", manifest=survival_manifest,
                                  roi_size=SURVIVAL_ROI, ct_window=FINETUNE_CT_WINDOW),
    }
    manifests = {"segmentation": manifest, "survival": survival_manifest}

    _say("[7/7] fine-tune each bundle with `python -m monai.bundle run`, pretrained and from scratch; "
         "score on the test split")
    results = []
    for task, bundle in bundles.items():
        for arm in ("pretrained", "scratch"):
            results.append(_fine_tune(task, bundle, manifests[task], arm, epochs[task], out / "finetune", seed))
            _say(f"      {task} {arm}: {_describe(results[-1])} ({results[-1].seconds:.0f} s)")

    info = {
        "synthetic": True,
        "segmentation_data": {**_cohort(manifest, seed), "size": segmentation_size},
        "survival_data": _cohort(survival_manifest, survival_seed),
        "pretrain_config": PRETRAIN_CONFIG,
        "pretrain_steps": pretrain_steps,
        "pretrain_overrides": list(pretrain_overrides),
        "pretrain_schedule": {"total_steps": cfg.train.total_steps, "warmup_steps": cfg.train.warmup_steps,
                              "lr": cfg.train.lr, "min_lr": cfg.train.min_lr},
        "preprocess_spacing": list(cfg.preprocess.spacing),
        "pretrain_ct_window": list(cfg.preprocess.ct_window),
        "finetune_ct_window": list(FINETUNE_CT_WINDOW),
        "finetune_learning_rate": FINETUNE_LR,
        "survival_roi": list(SURVIVAL_ROI),
        "probe_seeds": probe_seeds,
        "probe_max_entries": probe_max_entries,
        "volpre_version": volpre.__version__,
    }
    report_path = out / "report.md"
    report_path.write_text(format_report(results, probes, info))
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "report.json", json.dumps(report_json(results, probes, info), indent=2) + "\n")
    _say("\n" + report_path.read_text())
    _say(f"report: {report_path} (and {out / 'report.json'}); {info['wall_seconds']:.0f} s in all")
    return report_path
