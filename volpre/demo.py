"""``volpre demo``: the main job end to end on the embedded demo data, in a few minutes on a CPU.

demo data -> ``volpre index`` (of the image folders) -> ``volpre check`` (of both manifests)
-> pretrain a tiny encoder -> export a segmentation and a survival bundle -> fine-tune each with
``python -m monai.bundle run``, from the pretrained encoder and from scratch -> score each on the
held-out ``test`` split with the bundle's ``evaluate.json`` -> a summary table, printed and
written to ``OUT/report.md``.

It is a smoke run: tiny models, a few steps, a handful of synthetic subjects. Its numbers show
that every piece runs and connects, not that pretraining helps (``volpre evaluate
label-efficiency`` measures that, with seeds and error bars).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import volpre
from volpre.config import load_config
from volpre.data.check import check_entries
from volpre.data.index import index_paths
from volpre.data.manifest import load_manifest
from volpre.data.synthetic import write_demo_data
from volpre.engine.trainer import pretrain
from volpre.export import export_bundle

MARKER = ".volpre-demo"
"""File that marks a folder as a demo output, which a new demo run may replace."""
PRETRAIN_CONFIG = "resnet-dae-tiny"
SEGMENTATION_CLASSES = 3  # background, liver, lesion (volpre.data.synthetic.CT_LABELS)
DEFAULT_EPOCHS = {"segmentation": 10, "survival": 30}
"""Fine-tuning epochs per task: a survival epoch is one optimiser step on the demo data, a
segmentation epoch several."""
FINETUNE_LR = 2e-3
"""Fine-tuning learning rate of the demo's short CPU runs (the bundles default to 1e-4; the
encoder gets a tenth of it in the pretrained arm)."""


BUNDLE_RUN_TIMEOUT_S = 1800
"""One ``monai.bundle run`` of the demo takes seconds to a few minutes; past this it is hung."""


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and where its log is."""


@dataclass
class ArmResult:
    task: str
    arm: str
    metric: str
    value: float | None
    epochs: int
    seconds: float


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(f"{out} exists and is not a volpre demo folder; choose another --out")
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
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=_bundle_env(),
                                  timeout=BUNDLE_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DemoError(f"bundle run did not finish within {BUNDLE_RUN_TIMEOUT_S} s and was killed; "
                            f"log: {log}") from None
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise DemoError(f"bundle run failed (exit {proc.returncode}); log: {log}\n{tail}")


def _read_metric(output_dir: Path, metric: str) -> float | None:
    """The value MONAI's MetricsSaver wrote to ``metrics.csv`` (None if it could not be computed)."""
    path = output_dir / "metrics.csv"
    if not path.exists():
        return None
    for row in csv.reader(path.read_text().splitlines()):
        if row and row[0] == metric:
            try:
                return float(row[1])
            except (IndexError, ValueError):
                return None
    return None


def _fine_tune(task: str, bundle: Path, manifest: Path, arm: str, epochs: int, work: Path) -> ArmResult:
    metric = "val_mean_dice" if task == "segmentation" else "val_cindex"
    arm_dir = work / task / arm
    arm_dir.mkdir(parents=True)
    common = {"manifest": str(manifest), "pretrained": str(arm == "pretrained"), "learning_rate": str(FINETUNE_LR),
              "ckpt_dir": str(arm_dir / "models"), "output_dir": str(arm_dir / "eval"), "num_workers": "0"}
    start = time.perf_counter()
    # validate once, after the last epoch (its CheckpointSaver writes models/model.pt then)
    _run_bundle(bundle, ["train.json"], {**common, "max_epochs": str(epochs), "val_interval": str(epochs)},
                arm_dir / "train.log", cwd=work)
    _run_bundle(bundle, ["train.json", "evaluate.json"], common, arm_dir / "evaluate.log", cwd=work)
    value = _read_metric(arm_dir / "eval", metric)
    n_test = len([e for e in load_manifest(manifest).by_split("test") if e.modality == "CT"])
    name = f"Dice (test, {n_test} CT)" if task == "segmentation" else f"C-index (test, {n_test} CT)"
    return ArmResult(task, arm, name, value, epochs, time.perf_counter() - start)


def format_report(results: list[ArmResult], pretrain_steps: int, subjects: int) -> str:
    """The summary table as Markdown, labelled as the smoke run it is."""
    lines = [
        "# volpre demo: tiny smoke run",
        "",
        f"Synthetic demo data ({subjects} subjects), a `{PRETRAIN_CONFIG}` encoder pretrained for {pretrain_steps} "
        "steps, each bundle fine-tuned for a few epochs and scored on the few subjects of the `test` split.",
        "These numbers show that every step runs and connects; they are not evidence that pretraining helps",
        "(see `volpre evaluate label-efficiency`).",
        "",
        "| task | arm | metric | value | epochs | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        lines.append(f"| {r.task} | {r.arm} | {r.metric} | {value} | {r.epochs} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def run_demo(out: Path, subjects: int = 16, seed: int = 0, pretrain_steps: int = 60,
             epochs: dict[str, int] | None = None) -> Path:
    """Run the whole path into ``out`` (replacing an earlier demo there); return the report's path.

    ``epochs``: fine-tuning epochs per task (missing tasks: :data:`DEFAULT_EPOCHS`).
    """
    epochs = {**DEFAULT_EPOCHS, **(epochs or {})}
    out = Path(out).resolve()
    _prepare(out)
    _say(f"[1/6] demo data: {subjects} subjects -> {out / 'data'}")
    manifest = write_demo_data(out / "data", subjects=subjects, seed=seed)

    _say("[2/6] volpre index of the image folders (DICOM series, NIfTI, NRRD, MetaImage)")
    summary = index_paths([out / "data" / "images"], out / "indexed.json", progress=False,
                          modality=["*/ct*=CT", "*/mr*=MR"])
    _say("      " + summary.describe())

    _say("[3/6] volpre check of the demo manifest and the indexed one")
    for path in (manifest, out / "indexed.json"):
        report = check_entries(load_manifest(path).entries, on_problem=lambda p: _say("      " + p.line()))
        _say(f"      {path.name}: " + report.summary().replace("\n", "\n      "))
        if not report.ok:
            raise DemoError(f"volpre check found problems in {path}")

    _say(f"[4/6] pretrain {PRETRAIN_CONFIG} for {pretrain_steps} steps (train and val splits)")
    cfg = load_config(PRETRAIN_CONFIG, ["train.checkpoint_every=1000"])
    result = pretrain(cfg, manifest, out / "pretrain", max_steps=pretrain_steps, splits=("train", "val"))
    losses = result.losses
    _say(f"      loss {sum(losses[:10]) / min(10, len(losses)):.3f} (first 10 steps) -> "
         f"{sum(losses[-10:]) / min(10, len(losses)):.3f} (last 10); {result.samples_per_s:.1f} samples/s")

    _say("[5/6] export a segmentation bundle and a survival bundle")
    checkpoint = out / "pretrain" / "checkpoints" / "last.pt"
    bundles = {
        "segmentation": export_bundle(checkpoint, "segmentation", out / "bundles" / "segmentation",
                                      manifest=manifest, out_channels=SEGMENTATION_CLASSES),
        "survival": export_bundle(checkpoint, "survival", out / "bundles" / "survival", manifest=manifest),
    }

    _say("[6/6] fine-tune each bundle with `python -m monai.bundle run`, pretrained and from scratch")
    results = []
    for task, bundle in bundles.items():
        for arm in ("pretrained", "scratch"):
            results.append(_fine_tune(task, bundle, manifest, arm, epochs[task], out / "finetune"))
            r = results[-1]
            _say(f"      {task} {arm}: {r.metric} {'n/a' if r.value is None else f'{r.value:.3f}'} ({r.seconds:.0f} s)")
    report_path = out / "report.md"
    report_path.write_text(format_report(results, pretrain_steps, subjects))
    _say("\n" + report_path.read_text())
    _say(f"report: {report_path}")
    return report_path
