"""Label-efficiency evaluation (volpre.evaluate): subject sampling, step budget, summaries, and the command.

The command runs on 8 demo subjects preprocessed at 8 mm with a ResNet-10 checkpoint from two
pretraining steps: FlexibleUNet on 32^3 crops, one optimiser step per run. The demo's splits
(seed 0): train s001 s002 s004 s005 (6 CT scans), val s003 (2 CT scans) and s006, test s000 s007.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from ignite.engine import Engine
from matplotlib.image import imread
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference

from volpre.cli import build_parser, main
from volpre.config import load_config
from volpre.data.manifest import Manifest, ManifestEntry, load_manifest, save_manifest
from volpre.evaluate import EvaluationError, StepBudget, parse_bundle_overrides, sample_subjects
from volpre.evaluate.label_efficiency import DEFAULT_FRACTIONS, DEFAULT_SEEDS
from volpre.evaluate.runs import FinetuneRun, check_bundle_overrides, run_workflow
from volpre.evaluate.sampling import check_fractions, select_evaluation_data, subset_size
from volpre.evaluate.summary import difference_verdict, format_table, plot_label_efficiency, summarize, t_interval
from volpre.export.templates import templates_root

TINY = ["preprocess.spacing=[8.0,8.0,8.0]", "data.num_workers=0", "train.checkpoint_every=2"]
FAST = ["num_workers=0", "batch_size=1", "num_samples=2"]
"""Bundle overrides for CPU tests: no worker processes, one volume (two 32^3 crops) per step."""


def run_cli(*args: str) -> tuple[int, str, str]:
    """``volpre ARGS`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def with_entries(manifest: Path, out: Path, change) -> Path:
    """A copy of ``manifest`` at ``out`` with ``change(entry) -> entry or None (dropped)`` applied."""
    entries = [e for e in (change(e) for e in load_manifest(manifest).entries) if e is not None]
    return save_manifest(Manifest(entries=entries), out)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    from volpre.demo.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("evaluate_demo") / "data", subjects=8, seed=0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, demo) -> Path:
    from volpre.engine.trainer import pretrain

    result = pretrain(load_config("resnet-dae-tiny", TINY), demo, tmp_path_factory.mktemp("evaluate_pretrain"),
                      max_steps=2, device="cpu")
    return result.checkpoint


@pytest.fixture(scope="session")
def segmentation_manifest(tmp_path_factory, demo) -> Path:
    """The demo with s003 moved to ``test``: one val scan (s006), so validation stays cheap."""
    return with_entries(demo, tmp_path_factory.mktemp("evaluate_seg") / "manifest.json",
                        lambda e: dataclasses.replace(e, split="test") if e.subject == "s003" else e)


@pytest.fixture(scope="session")
def segmentation_run(tmp_path_factory, checkpoint, segmentation_manifest):
    out = tmp_path_factory.mktemp("evaluate_seg_out") / "le"
    status, stdout, stderr = run_cli(
        "evaluate", "label-efficiency", "--pretrained", str(checkpoint), "--manifest", str(segmentation_manifest),
        "--fractions", "0.2,0.25,1.0", "--seeds", "1", "--max-steps", "1", "--out-channels", "3",
        "--roi", "32", "32", "32", "--ct-window", "-175", "250",
        "--out", str(out), *FAST)
    assert status == 0, stderr[-3000:]
    return out, stdout, stderr


# ----------------------------------------------------------------------------- sampling


def many_subjects_manifest(folder: Path, n_subjects: int = 60) -> Path:
    """``n_subjects`` subjects with 1-3 labelled CT scans each (files need not exist), splits by subject."""
    rng = np.random.default_rng(0)
    entries = []
    for k in range(n_subjects):
        split = "val" if k % 5 == 0 else "test" if k % 7 == 0 else "train"
        for scan in range(int(rng.integers(1, 4))):
            entries.append(ManifestEntry(image=(folder / f"p{k:03d}-{scan}.nii.gz",), id=f"p{k:03d}-{scan}",
                                         subject=f"p{k:03d}", modality="CT", label=folder / f"l{k:03d}-{scan}.nii.gz",
                                         time=float(10 + k), event=k % 2, split=split))
    entries.append(ManifestEntry(image=(folder / "mr.nii.gz",), id="mr", subject="p001", modality="MR", split="train"))
    return save_manifest(Manifest(entries=entries), folder / "manifest.json")


def test_subsets_are_whole_subjects_of_train_nested_and_reproducible(tmp_path):
    data = select_evaluation_data(many_subjects_manifest(tmp_path), "segmentation", "CT")
    pool, val = data.train_subjects, set(data.val_subjects)
    assert len(pool) == 41 and len(val) == 12 and not set(pool) & val
    fractions = (0.1, 0.25, 0.5, 1.0)
    subsets = {seed: sample_subjects(pool, fractions, seed) for seed in range(5)}
    for seed, by_fraction in subsets.items():
        assert [len(by_fraction[f]) for f in fractions] == [5, 11, 21, 41]  # ceil(f * 41)
        for small, large in zip(fractions, fractions[1:]):
            assert set(by_fraction[small]) < set(by_fraction[large])
        for fraction, subjects in by_fraction.items():
            assert set(subjects) <= set(pool) and not set(subjects) & val
            entries = data.train_entries_of(subjects)
            assert {e.subject for e in entries} == set(subjects)
            # every CT training scan of a chosen subject comes along, and nothing else
            expected = [e for e in data.manifest.entries
                        if e.subject in subjects and e.split == "train" and e.modality == "CT"]
            assert entries == expected
        assert sample_subjects(list(reversed(pool)) + pool[:3], fractions, seed) == by_fraction  # same seed, same draw
    assert len({tuple(s[0.25]) for s in subsets.values()}) == 5  # other seeds, other subjects


def test_subset_size_rounds_up_keeps_a_minimum_and_never_exceeds_the_pool():
    assert subset_size(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert subset_size(0.01, 30) == 1 and subset_size(0.01, 30, minimum=2) == 2
    assert subset_size(1.0, 7) == 7 and subset_size(0.5, 7) == 4
    assert subset_size(0.5, 1, minimum=2) == 1


@pytest.mark.parametrize("fractions, message", [
    ([], r"fractions: got none; expected at least one number in \(0, 1\]"),
    ([0.5, 0.0], r"fractions: got 0\.0; expected numbers in \(0, 1\]"),
    ([1.5], r"fractions: got 1\.5; expected numbers in \(0, 1\]"),
    ([float("nan")], r"fractions: got nan; expected numbers in \(0, 1\]"),
    ([0.25, 0.5, 0.25], r"fractions: 0\.25 given twice; expected distinct fractions"),
    ([0.25, 0.2500001, 1.0], r"fractions: 0\.25 and 0\.2500001 both print as 0\.25 \(their runs' folder is named "
                             r"fraction0\.25\); expected fractions that differ within 6 significant digits"),
])
def test_bad_fractions_are_refused(fractions, message):
    with pytest.raises(EvaluationError, match=message):
        check_fractions(fractions)


def test_sampler_refuses_a_negative_seed_and_a_too_small_pool():
    with pytest.raises(EvaluationError, match=r"seed: got -1, expected a non-negative integer"):
        sample_subjects(["a", "b"], [0.5], -1)
    with pytest.raises(EvaluationError, match=r"subjects: got 1, expected at least 2"):
        sample_subjects(["a", "a"], [0.5], 0, minimum=2)


def test_a_subject_in_both_train_and_val_is_refused(tmp_path, demo):
    manifest = with_entries(demo, tmp_path / "leak.json",
                            lambda e: dataclasses.replace(e, split="val") if e.id == "s001-mr0" else e)
    with pytest.raises(EvaluationError, match=r"leak\.json: 1 subjects have entries in both split 'train' and split "
                                              r"'val' \(s001\); expected every subject in one split only"):
        select_evaluation_data(manifest, "segmentation", "CT")


def test_survival_needs_a_comparable_pair_in_val(tmp_path, demo):
    # val keeps only s003 (two scans, one censored outcome): no pair to compare
    manifest = with_entries(demo, tmp_path / "one.json",
                            lambda e: dataclasses.replace(e, split="test") if e.subject == "s006" else e)
    with pytest.raises(EvaluationError, match=r"one\.json: the 2 CT entries of split 'val' have no comparable pair "
                                              r"\(events 0, distinct times 1\), so no C-index can be computed"):
        select_evaluation_data(manifest, "survival", "CT")
    assert len(select_evaluation_data(demo, "survival", "CT").val) == 3  # s003 x2, s006


def test_survival_needs_two_training_subjects(tmp_path, demo):
    manifest = with_entries(demo, tmp_path / "single.json",
                            lambda e: e if e.split != "train" or e.subject == "s005" else None)
    with pytest.raises(EvaluationError, match=r"single\.json: split 'train' holds CT entries with time and event of "
                                              r"only 1 subject\(s\); a survival evaluation needs at least 2"):
        select_evaluation_data(manifest, "survival", "CT")


# ----------------------------------------------------------------------------- step budget


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def test_step_budget_stops_after_the_optimiser_steps_actually_taken():
    model = _Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):  # every other iteration skips its step (as a GradScaler does after an overflow)
        optimizer.zero_grad()
        (model.weight - 1.0).pow(2).sum().backward()
        if engine.state.iteration % 2 == 0:
            optimizer.step()

    engine = Engine(step)
    budget = StepBudget(3)
    budget.attach(engine, optimizer)
    engine.run(range(4), max_epochs=10)
    assert budget.steps == 3 and engine.state.iteration == 6 and engine.state.epoch == 2

    counted = StepBudget(None)  # no budget: counts, runs every epoch
    engine = Engine(lambda e, b: optimizer.step())
    counted.attach(engine, optimizer)
    engine.run(range(4), max_epochs=2)
    assert counted.steps == 8 and engine.state.iteration == 8


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_step_budget_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=r"max_steps must be a positive integer or None, got"):
        StepBudget(bad)


# ----------------------------------------------------------------------------- summary


RECORDS = [
    {"fraction": f, "seed": s, "arm": arm, "metric": m, "train_subjects": n, "train_entries": e}
    for f, n, s, e, arm, m in [
        (0.5, 2, 0, 3, "pretrained", 0.60), (0.5, 2, 0, 3, "scratch", 0.50),
        (0.5, 2, 1, 4, "pretrained", 0.70), (0.5, 2, 1, 4, "scratch", 0.45),
        (0.5, 2, 2, 3, "pretrained", 0.65), (0.5, 2, 2, 3, "scratch", 0.55),
        (1.0, 4, 0, 6, "pretrained", 0.80), (1.0, 4, 0, 6, "scratch", 0.75),
    ]
]


T_975_2DF = 4.303
"""Student t, 97.5% quantile, 2 degrees of freedom, from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)."""


def test_summary_statistics_against_a_hand_computation():
    rows = summarize(RECORDS, [0.5, 1.0])
    half = rows[0]
    assert half["train_subjects"] == [2] and half["train_entries"] == [3, 4]
    for arm, values in {"pretrained": [0.60, 0.70, 0.65], "scratch": [0.50, 0.45, 0.55]}.items():
        assert half[arm]["mean"] == pytest.approx(np.mean(values))
        assert half[arm]["sd"] == pytest.approx(np.std(values, ddof=1))
        assert half[arm]["n_seeds"] == 3
    # by hand: both arms have sd 0.05, so mean -/+ 4.303 * 0.05 / sqrt(3) = mean -/+ 0.1242
    assert half["pretrained"]["ci95"] == pytest.approx([0.65 - 0.1242, 0.65 + 0.1242], abs=2e-4)
    assert half["scratch"]["ci95"] == pytest.approx([0.50 - 0.1242, 0.50 + 0.1242], abs=2e-4)
    # the paired differences 0.10, 0.25, 0.10: mean 0.15, sd 0.0866, half-width 4.303 * 0.0866 / sqrt(3) = 0.2152
    difference = half["difference"]
    assert difference["mean"] == pytest.approx(0.15) and difference["sd"] == pytest.approx(0.0866, abs=1e-4)
    assert difference["ci95"] == pytest.approx([0.15 - T_975_2DF * 0.0866025 / 3**0.5,
                                                0.15 + T_975_2DF * 0.0866025 / 3**0.5], abs=1e-4)
    assert difference["ci95"] == pytest.approx([-0.0652, 0.3652], abs=2e-4)
    # and as scipy's one-sample t test states it
    assert difference["ci95"] == pytest.approx(list(scipy_stats.ttest_1samp([0.10, 0.25, 0.10], 0.0)
                                                    .confidence_interval(0.95)))
    assert rows[1]["pretrained"] == {"mean": pytest.approx(0.80), "sd": None, "n_seeds": 1, "ci95": None}
    table = format_table(rows, "val_mean_dice", "Dice")
    assert "[95% Student t interval over seeds (n - 1 degrees of freedom)]" in table
    assert re.search(r"0\.5\s+2\s+3-4\s+0\.6500 \[0\.5258, 0\.7742\]\s+0\.5000 \[0\.3758, 0\.6242\]\s+"
                     r"\+0\.1500 \[-0\.0651, \+0\.3651\]\s+3", table), table
    assert re.search(r"1\s+4\s+6\s+0\.8000 \[n/a\]\s+0\.7500 \[n/a\]\s+\+0\.0500 \[n/a\]\s+1", table), table
    assert table.splitlines()[-1] == "pretrained - scratch, 95% interval: 0.5: contains 0; 1: no interval (1 seed)"


def test_t_interval_of_two_values_and_the_verdicts():
    # two values: t(0.975, 1) = 12.706 (table); mean 1, sd sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2)
    low, high = t_interval([0.0, 2.0])
    assert (low, high) == pytest.approx((1.0 - 12.706, 1.0 + 12.706), abs=1e-3)
    assert t_interval([0.3]) is None and t_interval([]) is None
    assert difference_verdict({"ci95": [0.01, 0.2], "n_seeds": 3}) == "above 0"
    assert difference_verdict({"ci95": [-0.2, -0.01], "n_seeds": 3}) == "below 0"
    assert difference_verdict({"ci95": [-0.2, 0.01], "n_seeds": 3}) == "contains 0"


def test_plot_has_both_arms_the_difference_and_95_percent_error_bars(tmp_path):
    rows = summarize(RECORDS, [0.5, 1.0])
    figure = plot_label_efficiency(rows, "Dice", "test", tmp_path / "plot.png")
    arms_axes, difference_axes = figure.axes
    assert [t.get_text() for t in arms_axes.get_legend().get_texts()] == ["pretrained (seeds: 1-3)",
                                                                          "scratch (seeds: 1-3)"]
    data_lines = [line for line in arms_axes.get_lines() if line.get_marker() in ("o", "s")]
    assert [list(line.get_xdata()) for line in data_lines] == [[0.5, 1.0], [0.5, 1.0]]
    assert list(data_lines[0].get_ydata()) == pytest.approx([0.65, 0.80])
    lower_caps, upper_caps = arms_axes.containers[0].lines[1]  # pretrained: the 95% interval at each fraction
    assert list(lower_caps.get_ydata()) == pytest.approx([0.5258, 0.80], abs=1e-4)  # one seed at 1.0: no bar
    assert list(upper_caps.get_ydata()) == pytest.approx([0.7742, 0.80], abs=1e-4)
    lower_caps, upper_caps = difference_axes.containers[0].lines[1]
    assert list(lower_caps.get_ydata()) == pytest.approx([-0.0652, 0.05], abs=1e-4)
    assert list(upper_caps.get_ydata()) == pytest.approx([0.3652, 0.05], abs=1e-4)
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in difference_axes.get_lines())  # the zero line
    assert arms_axes.get_xscale() == "log"
    image = imread(tmp_path / "plot.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_the_command_defaults_are_the_standard_protocol():
    args = build_parser().parse_args(["evaluate", "label-efficiency", "--pretrained", "c.pt", "--manifest", "m.json",
                                      "--out", "o"])
    assert tuple(float(f) for f in args.fractions.split(",")) == DEFAULT_FRACTIONS == (0.05, 0.1, 0.25, 1.0)
    assert args.seeds == DEFAULT_SEEDS == 3


# ----------------------------------------------------------------------------- bundle overrides


def test_bundle_overrides_are_parsed_as_json_or_kept_as_text():
    assert parse_bundle_overrides(["num_workers=0", "learning_rate=3e-4", "amp=false", "device=$torch.device('cpu')",
                                   "roi=[1, 2]", "name=abc=d"]) == {
        "num_workers": 0, "learning_rate": 3e-4, "amp": False, "device": "$torch.device('cpu')", "roi": [1, 2],
        "name": "abc=d"}
    with pytest.raises(EvaluationError, match=r"bundle override 'oops': expected key=value"):
        parse_bundle_overrides(["oops"])
    with pytest.raises(EvaluationError, match=r"bundle override 'a': given twice"):
        parse_bundle_overrides(["a=1", "a=2"])


@pytest.mark.parametrize("key, max_steps, message", [
    ("manifest", None, r"bundle override 'manifest': set by each run's subset manifest; remove the override"),
    ("network_def#backbone", None, r"bundle override 'network_def#backbone': set by the checkpoint and --network"),
    ("max_epochs", 10, r"bundle override 'max_epochs': set by --max-steps"),
    ("lr_scheduler#T_max", 10, r"bundle override 'lr_scheduler#T_max': set by --max-steps \(the learning-rate "
                               r"schedule ends on a run's last step\)"),
    ("ct_window", None, r"bundle override 'ct_window': set by --ct-window"),
    ("learning_rat", None, r"bundle override 'learning_rat': .*train\.json has no such key"),
])
def test_bundle_overrides_the_evaluation_sets_or_the_bundle_lacks_are_refused(key, max_steps, message):
    train_json = templates_root() / "segmentation" / "configs" / "train.json"
    with pytest.raises(EvaluationError, match=message):
        check_bundle_overrides(train_json, {key: 1}, max_steps)
    check_bundle_overrides(train_json, {"max_epochs": 5, "lr_scheduler#T_max": 5, "train#dataloader#num_workers": 0},
                           None)


# ----------------------------------------------------------------------------- the command


def test_command_writes_results_and_plot_for_both_arms_and_all_fractions(segmentation_run, segmentation_manifest):
    out, stdout, stderr = segmentation_run
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    config = results["config"]
    assert config["task"] == "segmentation" and config["metric"] == "val_mean_dice"
    assert config["fractions"] == [0.2, 0.25, 1.0] and config["seeds"] == [0] and config["max_steps"] == 1
    assert config["ci_method"] == "Student t interval over seeds (n - 1 degrees of freedom)"
    assert config["ct_window"] == [-175.0, 250.0]  # the fine-tuning window, also in the bundle's metadata
    metadata = json.loads((out / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata["volpre_finetuning"]["ct_window"] == [-175.0, 250.0]
    assert config["roi_size"] == [32, 32, 32] and config["bundle_overrides"] == {"num_workers": 0, "batch_size": 1,
                                                                               "num_samples": 2}
    assert config["train_pool"] == {"subjects": 4, "entries": 6}
    assert config["val"] == {"subjects": 1, "entries": 1, "ids": ["s006-ct0"]}
    records = results["records"]
    assert [(r["fraction"], r["arm"]) for r in records] == [(0.2, "pretrained"), (0.2, "scratch"),
                                                            (0.25, "pretrained"), (0.25, "scratch"),
                                                            (1.0, "pretrained"), (1.0, "scratch")]
    assert all(r["steps"] == 1 and 0.0 <= r["metric"] <= 1.0 and r["seed"] == 0 for r in records)
    assert [r["train_subjects"] for r in records] == [1, 1, 1, 1, 4, 4]
    assert [r["train_entries"] for r in records][4:] == [6, 6]
    # the bundle's per-arm learning rates, stated in every record
    assert [(r["learning_rate"], r["encoder_learning_rate"], r["encoder_rate"]) for r in records[:2]] == [
        (1e-4, 1e-5, "lower"), (1e-4, 1e-4, "equal")]
    # 0.2 and 0.25 of 4 subjects are both 1 subject: the same subset, so its runs are not repeated
    assert [r.get("same_run_as_fraction") for r in records] == [None, None, 0.2, 0.2, None, None]
    assert [{k: v for k, v in r.items() if k not in ("fraction", "same_run_as_fraction")} for r in records[2:4]] == [
        {k: v for k, v in r.items() if k != "fraction"} for r in records[:2]]
    assert not (out / "runs" / "seed0" / "fraction0.25").exists()
    for record in records:  # each run has its own folders with its final weights
        assert (out / record["run_dir"] / "models" / "model.pt").is_file()
    assert "seed 0, fraction 0.2 (1 subjects" in stderr and ", scratch: val_mean_dice " in stderr
    assert "seed 0, fraction 0.25: the same 1 subjects as fraction 0.2" in stderr

    # each subset manifest: the sampled subjects' CT training scans and the val scans, nothing else
    subsets = {s["fraction"]: s for s in results["subsets"]}
    assert subsets[0.2]["subjects"] == subsets[0.25]["subjects"]
    assert set(subsets[0.2]["subjects"]) < set(subsets[1.0]["subjects"]) == {"s001", "s002", "s004", "s005"}
    for fraction, subset in subsets.items():
        if fraction == 0.25:
            continue
        entries = load_manifest(out / "runs" / "seed0" / f"fraction{fraction:g}" / "manifest.json").entries
        assert sorted(e.id for e in entries if e.split == "train") == sorted(subset["entries"])
        assert {e.subject for e in entries if e.split == "train"} == set(subset["subjects"])
        assert [e.id for e in entries if e.split == "val"] == ["s006-ct0"]
        assert len(entries) == len(subset["entries"]) + 1

    image = imread(out / "label_efficiency.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert (out / "bundle" / "configs" / "train.json").is_file()


def test_table_numbers_equal_the_json(segmentation_run):
    out, stdout, _ = segmentation_run
    results = json.loads((out / "results.json").read_text())
    rows = re.findall(r"^\s*([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+) \[n/a\]\s+([\d.]+) \[n/a\]\s+([+-][\d.]+) \[n/a\]\s+1$",
                      stdout, flags=re.M)
    assert len(rows) == 3, stdout
    by_key = {(r["fraction"], r["arm"]): r for r in results["records"]}
    for row, summary in zip(rows, results["summary"]):
        fraction = float(row[0])
        assert fraction == summary["fraction"] and int(row[1]) == by_key[(fraction, "pretrained")]["train_subjects"]
        assert int(row[2]) == by_key[(fraction, "pretrained")]["train_entries"]
        pretrained, scratch = by_key[(fraction, "pretrained")]["metric"], by_key[(fraction, "scratch")]["metric"]
        assert float(row[3]) == round(pretrained, 4) == round(summary["pretrained"]["mean"], 4)
        assert float(row[4]) == round(scratch, 4) == round(summary["scratch"]["mean"], 4)
        assert float(row[5]) == pytest.approx(round(pretrained - scratch, 4), abs=1e-12)
    assert "wrote " + str(out / "results.json") in stdout


def _dice_reference(prediction: np.ndarray, label: np.ndarray, classes: int) -> float:
    """Mean over the foreground classes present in ``label`` of 2|P & G| / (|P| + |G|)."""
    scores = [2.0 * np.sum((prediction == c) & (label == c)) / (np.sum(prediction == c) + np.sum(label == c))
              for c in range(1, classes) if np.any(label == c)]
    return float(np.mean(scores))


def test_recorded_dice_is_the_mean_dice_of_the_final_weights(segmentation_run):
    out, _, _ = segmentation_run
    record = json.loads((out / "results.json").read_text())["records"][4]  # fraction 1.0, pretrained
    run_dir = out / record["run_dir"]
    parser = ConfigParser()
    parser.read_config(str(out / "bundle" / "configs" / "train.json"))
    parser.update({"manifest": str(run_dir.parent / "manifest.json"), "num_workers": 0, "pretrained": False,
                   "network_def#checkpoint": str(run_dir / "models" / "model.pt")})  # loads strictly
    network = parser.get_parsed_content("network_def").eval()
    (item,) = parser.get_parsed_content("validate#dataset")
    with torch.no_grad():
        logits = sliding_window_inference(item["image"][None], (32, 32, 32), 4, network, overlap=0.25)
    prediction = logits.argmax(1)[0].numpy()
    assert record["metric"] == pytest.approx(_dice_reference(prediction, item["label"][0].numpy(), 3), abs=1e-5)


def test_arms_of_a_seed_share_everything_but_the_encoder_weights(segmentation_run, tmp_path):
    out, _, _ = segmentation_run
    bundle, manifest = out / "bundle", out / "runs" / "seed0" / "fraction1" / "manifest.json"

    def network(pretrained: bool, seed: int) -> dict[str, torch.Tensor]:
        run = FinetuneRun(bundle, manifest, pretrained, seed, tmp_path / f"{pretrained}{seed}", max_steps=1,
                          overrides={})
        workflow = run_workflow(run)
        assert workflow.parser.get_parsed_content("train#trainer#max_epochs") == 1
        assert workflow.parser.get_parsed_content("val_interval") == 2  # no validation while training
        assert workflow.parser.get_parsed_content("lr_scheduler#T_max") == 1  # the cosine ends on the budget's step
        return workflow.parser.get_parsed_content("network_def").state_dict()

    pretrained, scratch, other_seed = network(True, 3), network(False, 3), network(False, 4)
    exported = torch.load(bundle / "models" / "pretrained_encoder.pt", weights_only=True)
    decoder = [k for k in pretrained if not k.startswith("encoder.") and pretrained[k].is_floating_point()]
    assert decoder and all(torch.equal(pretrained[k], scratch[k]) for k in decoder)  # same seed, same decoder init
    assert not all(torch.equal(scratch[k], other_seed[k]) for k in decoder)
    kernels = [k for k, v in exported.items() if v.ndim >= 2]
    assert all(torch.equal(pretrained[k], exported[k]) for k in exported)
    assert not any(torch.equal(scratch[k], exported[k]) for k in kernels)


def test_survival_task_runs_and_scores_the_c_index(tmp_path, checkpoint, demo):
    out = tmp_path / "survival"
    status, stdout, stderr = run_cli(
        "evaluate", "label-efficiency", "--pretrained", str(checkpoint), "--manifest", str(demo), "--task", "survival",
        "--fractions", "1.0", "--seeds", "1", "--max-steps", "1", "--out", str(out), "num_workers=0")
    assert status == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["metric"] == "val_cindex" and results["config"]["val"]["entries"] == 3
    assert [r["arm"] for r in results["records"]] == ["pretrained", "scratch"]
    assert all(r["steps"] == 1 and 0.0 <= r["metric"] <= 1.0 for r in results["records"])
    assert all(r["train_subjects"] == 4 and r["train_entries"] == 6 for r in results["records"])
    assert "val_cindex: C-index (Harrell) on the val split" in stdout


# ----------------------------------------------------------------------------- errors a user can hit


def evaluate_args(checkpoint: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "label-efficiency", "--pretrained", str(checkpoint), "--manifest", str(manifest),
            "--out-channels", "3", "--max-steps", "1", "--out", str(out), *extra]


def expect_user_error(args: list[str], message: str) -> None:
    status, stdout, stderr = run_cli(*args)
    assert status == 2, (stdout, stderr)
    assert re.search(message, stderr), stderr
    assert stderr.startswith("volpre evaluate: error: ") and "Traceback" not in stderr


def test_no_val_entries(tmp_path, checkpoint, demo):
    manifest = with_entries(demo, tmp_path / "noval.json", lambda e: None if e.split == "val" else e)
    expect_user_error(evaluate_args(checkpoint, manifest, tmp_path / "out", "--fractions", "1.0"),
                      r"noval\.json: split 'val' holds no CT entries with a label \(0 CT entries in that split in "
                      r"all\); every run is scored on the fixed 'val' split")
    assert not (tmp_path / "out").exists()  # nothing written


def test_no_labelled_train_entries(tmp_path, checkpoint, demo):
    manifest = with_entries(demo, tmp_path / "nolabels.json",
                            lambda e: dataclasses.replace(e, label=None) if e.split == "train" else e)
    expect_user_error(evaluate_args(checkpoint, manifest, tmp_path / "out", "--fractions", "1.0"),
                      r"nolabels\.json: split 'train' holds no CT entries with a label \(6 CT entries in that split "
                      r"in all\); .* expected at least one")


@pytest.mark.parametrize("fractions, message", [
    ("0.5,1.5", r"fractions: got 1\.5; expected numbers in \(0, 1\]"),
    ("0,1", r"fractions: got 0\.0; expected numbers in \(0, 1\]"),
    ("0.5,0.5", r"fractions: 0\.5 given twice; expected distinct fractions"),
    ("0.25,0.2500001", r"fractions: 0\.25 and 0\.2500001 both print as 0\.25"),
    ("0.5,half", r"--fractions: got '0\.5,half'; expected comma-separated numbers in \(0, 1\]"),
])
def test_bad_fractions(tmp_path, checkpoint, demo, fractions, message):
    expect_user_error(evaluate_args(checkpoint, demo, tmp_path / "out", "--fractions", fractions), message)


def test_seeds_below_one(tmp_path, checkpoint, demo):
    expect_user_error(evaluate_args(checkpoint, demo, tmp_path / "out", "--fractions", "1", "--seeds", "0"),
                      r"seeds \(the number of seeds\): got 0, expected an integer >= 1")


def test_step_budget_below_one(tmp_path, checkpoint, demo):
    expect_user_error(evaluate_args(checkpoint, demo, tmp_path / "out", "--fractions", "1") + ["--max-steps", "0"],
                      r"max_steps \(optimiser steps per run\): got 0, expected an integer >= 1")


def test_a_checkpoint_that_does_not_export(tmp_path, demo):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    expect_user_error(evaluate_args(broken, demo, tmp_path / "out", "--fractions", "1"),
                      r"error: checkpoint .*broken\.pt: cannot be read \(.*\); it may be truncated or not a volpre "
                      r"checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_arguments_that_do_not_fit_pass_through(tmp_path, checkpoint, demo):
    args = ["evaluate", "label-efficiency", "--pretrained", str(checkpoint), "--manifest", str(demo),
            "--fractions", "1", "--out", str(tmp_path / "out")]
    expect_user_error(args, r"cannot export .* for the evaluation: out_channels: got None; a segmentation bundle "
                            r"needs the number of classes including background")
    expect_user_error(args[:-2] + ["--out", str(tmp_path / "out2"), "--out-channels", "3", "--network", "swinunetr"],
                      r"network: got 'swinunetr'; a segmentation bundle of the resnet encoder .* can hold flexibleunet")


def test_an_existing_non_empty_out(tmp_path, checkpoint, demo):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "results.json").write_text("{}")
    expect_user_error(evaluate_args(checkpoint, demo, out, "--fractions", "1"),
                      r"evaluation output .*taken is a non-empty directory; expected a new or empty directory")
    assert (out / "results.json").read_text() == "{}"


def test_a_reserved_bundle_override(tmp_path, checkpoint, demo):
    expect_user_error(evaluate_args(checkpoint, demo, tmp_path / "out", "--fractions", "1", "pretrained=false"),
                      r"bundle override 'pretrained': set by the arm of each run; remove the override")
