"""volpre demo, the main job, end to end at the smallest size that still has every split."""

from __future__ import annotations

import json

import pytest

from volpre.cli import build_parser, main
from volpre.demo.run import (DEFAULT_EPOCHS, DEFAULT_PRETRAIN_STEPS, DEFAULT_SUBJECTS, FINETUNE_CT_WINDOW, FINETUNE_LR,
                             MARKER, SURVIVAL_SUBJECTS, run_demo)
from volpre.data.manifest import load_manifest
from volpre.demo.synthetic import DemoInputError


def test_demo_runs_the_whole_path(tmp_path, capsys):
    out = tmp_path / "demo"
    # small settings (make demo keeps the real ones): both cohorts --size small, 8 mm voxels, 1-2 epochs, probes on
    # 4 entries per split; 16 survival subjects (seed 1): 8 train, 2 val (a comparable pair), 6 test
    report = run_demo(out, subjects=8, pretrain_steps=3, epochs={"segmentation": 1, "survival": 2},
                      survival_subjects=16, pretrain_overrides=["preprocess.spacing=[8.0,8.0,8.0]"],
                      probe_max_entries=4, segmentation_size="small")
    text = report.read_text()
    assert "synthetic" in text.lower() and "not a measurement of what pretraining" in text
    rows = [line for line in text.splitlines() if line.startswith("| segmentation") or line.startswith("| survival")]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        ("segmentation", "pretrained"), ("segmentation", "scratch"), ("survival", "pretrained"), ("survival", "scratch")]

    # report.json: the keys the README promises, the same numbers as the table
    results = json.loads((out / "report.json").read_text())
    assert set(results) == {"segmentation", "survival", "probe", "demo"}
    test_ct = [e for e in load_manifest(out / "data" / "manifest.json").by_split("test") if e.modality == "CT"]
    for arm, row in zip(("pretrained", "scratch"), rows[:2]):
        seg = results["segmentation"][arm]
        assert {"dice", "dice_per_class", "n"} <= set(seg) and set(seg["dice_per_class"]) == {"liver", "lesion"}
        assert seg["n"] == len(test_ct) and 0.0 <= seg["dice"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in seg["dice_per_class"].values())
        assert f"| {seg['dice']:.3f} |" in row and f"liver {seg['dice_per_class']['liver']:.3f}" in row
        assert (out / "finetune" / "segmentation" / arm / "models" / "model.pt").is_file()
    survival_test = [e for e in load_manifest(out / "survival_data" / "manifest.json").by_split("test")
                     if e.modality == "CT"]
    for arm, row in zip(("pretrained", "scratch"), rows[2:]):
        surv = results["survival"][arm]
        assert {"cindex", "ci95", "n"} <= set(surv)
        assert surv["n"] == len({e.subject for e in survival_test}) == 6
        assert surv["n_entries"] == len(survival_test)
        low, high = surv["ci95"]
        assert 0.0 <= low <= surv["cindex"] <= high <= 1.0
        assert f"| {surv['cindex']:.3f} | [{low:.3f}, {high:.3f}] | 6 subjects" in row
    # the rates each arm trained at, as the bundle evaluates them: a pretrained encoder gets a tenth of the head's
    for task in ("segmentation", "survival"):
        rates = {arm: (results[task][arm]["learning_rate"], results[task][arm]["encoder_learning_rate"])
                 for arm in ("pretrained", "scratch")}
        assert rates == {"pretrained": (FINETUNE_LR, pytest.approx(FINETUNE_LR / 10)),
                         "scratch": (FINETUNE_LR, FINETUNE_LR)}
        assert f"{task} pretrained {FINETUNE_LR:g} / {FINETUNE_LR / 10:g}" in text
    assert results["demo"]["synthetic"] is True and results["demo"]["finetune_ct_window"] == list(FINETUNE_CT_WINDOW)
    assert results["demo"]["survival_data"]["test_subjects"] == 6
    # the learning-rate schedule ends with the demo's pretraining (its cosine reaches min_lr on step 3)
    assert results["demo"]["pretrain_schedule"]["total_steps"] == 3
    assert results["demo"]["pretrain_schedule"]["warmup_steps"] == 0
    logged = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in logged if "lr" in row and "event" not in row]
    assert lrs and lrs[-1] < results["demo"]["pretrain_schedule"]["lr"] / 2

    # the probes: volpre evaluate probe's own results.json, pretrained vs random init, on each cohort's val split
    for task, metric in (("segmentation", "dice"), ("survival", "cindex")):
        probe = results["probe"][task]
        assert probe == json.loads((out / "probe" / task / "results.json").read_text())
        assert (probe["task"], probe["metric"], probe["seeds"]) == (task, metric, [0])
        assert 1 <= len(probe["data"]["train"]) <= 4 and 1 <= len(probe["data"]["val"]) <= 4
        for arm in ("pretrained", "random_init"):
            assert 0.0 <= probe["arms"][arm]["mean"] <= 1.0
        assert f"{task} probe of" in text

    # the bundles fine-tune at the soft-tissue window, and say so in their metadata
    for task in ("segmentation", "survival"):
        meta = json.loads((out / "bundles" / task / "configs" / "metadata.json").read_text())
        assert meta["volpre_finetuning"]["ct_window"] == list(FINETUNE_CT_WINDOW)
    printed = capsys.readouterr().out
    assert "volpre check" in printed and "0 with problems" in printed and "indexed" in printed

    # a second run replaces the earlier demo; any other non-empty folder is refused
    assert (out / MARKER).exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    with pytest.raises(DemoInputError, match="is not a volpre demo folder"):
        run_demo(other)


def test_demo_command_reports_the_users_input_in_one_line_exit_2(tmp_path, capsys):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    assert main(["demo", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("volpre demo: error: ") and "is not a volpre demo folder" in err
    assert (other / "thesis.tex").read_text() == "..."
    assert main(["demo", "--out", str(tmp_path / "new"), "--subjects", "0"]) == 2
    assert "volpre demo: error: demo data: subjects must be a positive integer, got 0" in capsys.readouterr().err


def test_demo_command_defaults_are_the_demo_defaults(capsys):
    args = build_parser().parse_args(["demo"])
    assert (args.subjects, args.survival_subjects, args.pretrain_steps) == (
        DEFAULT_SUBJECTS, SURVIVAL_SUBJECTS, DEFAULT_PRETRAIN_STEPS)
    assert str(args.out) == "demo_run"
    # the epochs default inside run_demo (None here); the help states them by hand
    assert (args.segmentation_epochs, args.survival_epochs) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for task in ("segmentation", "survival"):
        assert f"fine-tuning epochs of each {task} arm (default {DEFAULT_EPOCHS[task]};" in help_text
