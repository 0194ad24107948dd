"""Frozen-feature probes (volpre.evaluate.probe): the pieces against references, the command, its errors,
and the probe inside pretraining (logging, best_by, EMA, exact losses, resume, DDP).

Everything runs on the 4-subject demo (``demo_manifest``; splits: train s000 s001 (3 CT scans), val s002
(1 CT scan), test s003) preprocessed at 8 mm, with a ResNet-10 checkpoint from two pretraining steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from child_processes import run_command
from volpre.cli import main
from volpre.config import ConfigError, load_config
from volpre.data.manifest import Manifest, load_manifest, save_manifest
from volpre.engine.checkpoint import load_checkpoint, with_checksum
from volpre.engine.trainer import pretrain
from volpre.evaluate.probe import TrainingProbe, segmentation
from volpre.evaluate.probe.compare import random_encoder
from volpre.evaluate.errors import EvaluationError
from volpre.evaluate.probe import compare
from volpre.evaluate.probe.features import (check_levels, encoder_features, features_at, pooled_features,
                                            recompute_batchnorm_statistics)
from volpre.evaluate.probe.segmentation import LinearHead, predict_volume, sample_voxels
from volpre.evaluate.probe.survival import fit_cox
from volpre.models import build_encoder

TINY = ["preprocess.spacing=[8.0,8.0,8.0]", "data.num_workers=0"]
REPO = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def quick_fits(monkeypatch):
    """Fewer L-BFGS iterations (the fits are the same code, converged less far): keeps the suite fast."""
    monkeypatch.setattr(segmentation, "MAX_ITERATIONS", 15)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def with_entries(manifest: Path, out: Path, change) -> Path:
    """A copy of ``manifest`` at ``out`` with ``change(entry) -> entry or None (dropped)`` applied."""
    entries = [e for e in (change(e) for e in load_manifest(manifest).entries) if e is not None]
    return save_manifest(Manifest(entries=entries), out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_manifest) -> Path:
    cfg = load_config("resnet-dae-tiny", TINY + ["train.ema_decay=0.5"])
    return pretrain(cfg, demo_manifest, tmp_path_factory.mktemp("probe_pretrain"), max_steps=2, device="cpu").checkpoint


@pytest.fixture(scope="module")
def survival_manifest(tmp_path_factory, demo_manifest) -> Path:
    """The demo with s003 in ``val`` too, fixed outcomes in ``val`` (s002 dies first) and an ``age`` covariate."""
    outcomes = {"s002": (100.0, 1), "s003": (300.0, 0)}

    def change(entry):
        entry = dataclasses.replace(entry, covariates={"age": 50.0 + 3 * int(entry.subject[1:])})
        if entry.subject in outcomes and entry.modality == "CT":
            time, event = outcomes[entry.subject]
            entry = dataclasses.replace(entry, split="val", time=time, event=event)
        return entry

    return with_entries(demo_manifest, tmp_path_factory.mktemp("probe_survival") / "manifest.json", change)


# ----------------------------------------------------------------------------- pieces against references


def test_features_at_voxels_equal_upsampled_maps():
    grid = (64, 32, 96)
    maps = [torch.randn(3 + i, *(g // 2 ** (i + 1) for g in grid)) for i in range(5)]
    points = torch.stack([torch.randint(0, g, (200,)) for g in grid], dim=1)
    points[:3] = torch.tensor([[0, 0, 0], [63, 31, 95], [0, 31, 50]])  # corners: border clamping
    upsampled = torch.cat([F.interpolate(m[None], size=grid, mode="trilinear", align_corners=False)[0] for m in maps])
    expected = upsampled[:, points[:, 0], points[:, 1], points[:, 2]].T
    torch.testing.assert_close(features_at(maps, points, grid), expected, rtol=1e-5, atol=1e-5)


def test_head_on_coarse_maps_equals_head_on_upsampled_features():
    """A 1x1x1 convolution commutes with trilinear upsampling: prediction on whole volumes is exact."""
    grid, shape = (64, 32, 32), (50, 30, 17)
    maps = [torch.randn(2 + i, *(g // 2 ** (i + 1) for g in grid)) for i in range(5)]
    width = sum(m.shape[0] for m in maps)
    head = LinearHead(weight=torch.randn(3, width), bias=torch.randn(3))
    points = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), dim=-1).reshape(-1, 3)
    logits = features_at(maps, points, grid) @ head.weight.T + head.bias
    expected = logits.argmax(dim=1).reshape(shape)
    predicted = predict_volume(head, maps, grid, shape)
    assert predicted.shape == shape
    assert (predicted == expected).float().mean() > 0.999  # ties in float rounding aside


def test_voxel_sample_is_stratified_weighted_and_reproducible():
    label = torch.zeros(20, 10, 10, dtype=torch.int64)
    label[:10] = 1
    label[0, 0, :3] = 2
    sample = sample_voxels(label, 3, per_class=50, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(sample.classes, minlength=3)
    assert counts.tolist() == [50, 50, 3]
    assert (label[tuple(sample.points.T)] == sample.classes).all()
    totals = torch.zeros(3).index_add_(0, sample.classes, sample.weights)
    assert totals.tolist() == pytest.approx([1000, 1000 - 3, 3])  # weights restore the voxel counts
    assert len({tuple(p) for p in sample.points.tolist()}) == len(sample.points)  # without replacement
    again = sample_voxels(label, 3, per_class=50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.points, sample.points)


def test_pooled_features_cover_only_the_unpadded_volume():
    grid, shape = (64, 64, 32), (33, 64, 20)
    maps = [torch.zeros(1, *(g // 2 ** (i + 1) for g in grid)) for i in range(5)]
    maps[0][:, :17, :, :10] = 1.0  # the part over the volume (stride 2: ceil(33/2) = 17, ceil(20/2) = 10)
    maps[0][:, 17:] = 100.0  # padding only
    pooled = pooled_features(maps, shape, grid)
    assert pooled.shape == (5,) and pooled[0] == 1.0


def test_encoder_features_of_chosen_levels_are_those_maps():
    torch.manual_seed(0)
    encoder = build_encoder(load_config("resnet-dae-tiny").model).eval()
    image = torch.randn(1, 32, 64, 32)
    with torch.no_grad():
        every = encoder_features(encoder, image, torch.device("cpu"))
        chosen = encoder_features(encoder, image, torch.device("cpu"), (1, 3))
    assert [tuple(m.shape[1:]) for m in every] == [tuple(n >> (i + 1) for n in (32, 64, 32)) for i in range(5)]
    assert len(chosen) == 2 and torch.equal(chosen[0], every[1]) and torch.equal(chosen[1], every[3])
    assert check_levels([3, 1]) == (1, 3)
    for bad in ([], [1, 1], [5], [-1], [True]):
        with pytest.raises(EvaluationError, match=r"levels: got .*, expected distinct levels among 0, 1, 2, 3, 4 "
                           r"\(level i is the encoder's map at stride 2\^\(i\+1\)\)"):
            check_levels(bad)


def test_recomputed_batchnorm_statistics_are_the_volumes_averages():
    """running_mean: the mean over volumes of each channel's mean; running_var: the mean of the volumes'
    unbiased variances; dropout stays off, and flags, momentum and weights are as before."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)
    dropout, norm = torch.nn.Dropout(0.5), torch.nn.BatchNorm3d(4, momentum=0.3)
    encoder = torch.nn.Sequential(conv, dropout, norm).train()
    norm.eval()  # a mixed state, to see it restored
    images = [torch.randn(1, 32, 32, 32) * 2 + 1, torch.rand(1, 32, 64, 32) - 3]
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k and "batches" not in k}

    assert recompute_batchnorm_statistics(encoder, images, torch.device("cpu")) == 1

    with torch.no_grad():
        outputs = [conv(image[None]) for image in images]
    expected_mean = torch.stack([o.mean(dim=(0, 2, 3, 4)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.var(dim=(0, 2, 3, 4), unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert int(norm.num_batches_tracked) == 2 and norm.momentum == 0.3
    assert encoder.training and dropout.training and not norm.training
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in weights.items())


def test_recomputing_batchnorm_statistics_needs_batchnorm_and_volumes():
    with pytest.raises(EvaluationError, match="Sequential has no BatchNorm layer, so it keeps no running statistics"):
        recompute_batchnorm_statistics(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)), [torch.zeros(1, 32, 32, 32)],
                                       torch.device("cpu"))
    with pytest.raises(EvaluationError, match="no volumes to recompute the BatchNorm statistics on"):
        recompute_batchnorm_statistics(torch.nn.BatchNorm3d(1), [], torch.device("cpu"))


def test_cox_fit_matches_lifelines():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=(n, 3))
    time = rng.exponential(np.exp(-x @ np.array([0.8, -0.5, 0.0])))
    event = (rng.random(n) < 0.7).astype(float)
    x = (x - x.mean(0)) / x.std(0, ddof=1)  # lifelines standardises (ddof=1) before it penalises
    l2 = 0.3
    beta = fit_cox(torch.tensor(x), torch.tensor(time), torch.tensor(event), l2=l2)
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(T=time, E=event)
    fitter = CoxPHFitter(penalizer=l2 * event.sum() / n).fit(frame, duration_col="T", event_col="E")
    np.testing.assert_allclose(beta.numpy(), fitter.params_.to_numpy(), atol=2e-4)


# ----------------------------------------------------------------------------- the command


def test_segmentation_probe_command(tmp_path, checkpoint, demo_manifest):
    out = tmp_path / "probe"
    status, stdout, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", demo_manifest,
                                     "--out", out, "--seeds", "2", "--device", "cpu", "--max-entries", "2")
    assert status == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "segmentation" and results["metric"] == "dice" and results["seeds"] == [0, 1]
    assert set(results["arms"]) == {"pretrained", "random_init"}
    for arm in results["arms"].values():
        assert {"mean", "sd", "values", "per_class"} <= set(arm)
        assert len(arm["values"]) == 2 and all(0.0 <= v <= 1.0 for v in arm["values"])
        assert arm["mean"] == pytest.approx(np.mean(arm["values"]))
        assert arm["sd"] == pytest.approx(np.std(arm["values"], ddof=1))
        assert set(arm["per_class"]) == {"class1", "class2"}  # CT: liver, lesion
        for seed, value in enumerate(arm["values"]):  # the headline is the mean of the classes' Dice
            assert value == pytest.approx(np.mean([arm["per_class"][c]["values"][seed] for c in ("class1", "class2")]))
    differences = [p - r for p, r in zip(results["arms"]["pretrained"]["values"], results["arms"]["random_init"]["values"])]
    assert results["difference"]["values"] == pytest.approx(differences)
    assert results["data"]["train"] == ["s000-ct0", "s001-ct0"] and results["data"]["val"] == ["s002-ct0"]
    assert results["data"]["num_classes"] == 3 and results["checkpoint"]["step"] == 2
    assert results["settings"]["voxels_per_class"] == segmentation.VOXELS_PER_CLASS
    assert results["settings"]["bn_stats"] == "checkpoint" and "BatchNorm statistics: checkpoint" in stdout
    assert results["settings"]["levels"] == [0, 1, 2, 3, 4] and "levels 0,1,2,3,4)" in stdout
    pretrained_row = next(line for line in stdout.splitlines() if line.startswith("| pretrained |"))
    assert f"{results['arms']['pretrained']['mean']:.4f} ± {results['arms']['pretrained']['sd']:.4f}" in pretrained_row
    assert "| pretrained - random_init |" in stdout


def test_bn_stats_train_recomputes_both_arms_on_the_train_images(tmp_path, checkpoint, demo_manifest, monkeypatch):
    calls = []

    def recording(encoder, images, device):
        calls.append((encoder, [tuple(i.shape) for i in images]))
        return recompute_batchnorm_statistics(encoder, images, device)

    monkeypatch.setattr(compare, "recompute_batchnorm_statistics", recording)
    out = tmp_path / "probe"
    status, stdout, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", demo_manifest,
                                     "--out", out, "--seeds", "2", "--device", "cpu", "--max-entries", "2",
                                     "--bn-stats", "train")
    assert status == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["bn_stats"] == "train" and "BatchNorm statistics: train" in stdout
    assert len(calls) == 3 and len({id(encoder) for encoder, _ in calls}) == 3  # pretrained, random seeds 0 and 1
    assert all(len(shapes) == len(results["data"]["train"]) == 2 for _, shapes in calls)
    for encoder, _ in calls:  # statistics of the two train volumes, not the initial or pretraining ones
        assert all(int(m.num_batches_tracked) == 2 for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_bn_stats_train_on_an_encoder_without_batchnorm_exits_2(tmp_path, demo_manifest):
    swin = pretrain(load_config("swin-dae-tiny", TINY), demo_manifest, tmp_path / "swin", max_steps=1,
                    device="cpu").checkpoint
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", swin, "--manifest", demo_manifest,
                                "--out", tmp_path / "out", "--max-entries", "1", "--bn-stats", "train")
    assert status == 2, stderr
    error = stderr.strip().splitlines()[-1]  # after the line on the entries read
    assert "bn_stats: SwinEncoder has no BatchNorm layer" in error and "use the default, checkpoint" in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvaluationError, match="bn_stats: got 'both', expected one of checkpoint, train"):
        compare.compare_with_random_init(swin, demo_manifest, tmp_path / "out", bn_stats="both")


def test_levels_choose_the_maps_the_head_reads(tmp_path, checkpoint, demo_manifest, survival_manifest):
    """One level alone: the probe reads only that map (head width = its channels), for both tasks."""
    widths = []
    fit = segmentation.fit_linear_head

    def recording(features, *args):
        widths.append(features.shape[1])
        return fit(features, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segmentation, "fit_linear_head", recording)
        status, stdout, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", demo_manifest,
                                         "--out", tmp_path / "seg", "--seeds", "1", "--max-entries", "2",
                                         "--levels", "3,1")
    assert status == 0, stderr
    results = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert results["settings"]["levels"] == [1, 3] and "levels 1,3)" in stdout
    channels = [m.shape[0] for m in encoder_features(build_encoder(load_config("resnet-dae-tiny").model).eval(),
                                                      torch.zeros(1, 32, 32, 32), torch.device("cpu"))]
    assert widths == [channels[1] + channels[3]] * 2  # pretrained, random init seed 0
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", survival_manifest,
                                "--out", tmp_path / "surv", "--task", "survival", "--seeds", "1", "--levels", "4")
    assert status == 0, stderr
    assert json.loads((tmp_path / "surv" / "results.json").read_text())["settings"]["levels"] == [4]


def test_random_init_arm_is_the_runs_own_initialisation_at_its_seed(demo_manifest, tmp_path):
    """Seed s of the random-init arm is the encoder volpre builds after torch.manual_seed(s): for s =
    train.seed, the weights the pretraining run started from."""
    cfg = load_config("resnet-dae-tiny", TINY)
    state = torch.get_rng_state()
    encoder = random_encoder(cfg.model, 0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(cfg.train.seed)
    reference = build_encoder(cfg.model)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reference.state_dict().values()))


def test_survival_probe_command_with_covariates(tmp_path, checkpoint, survival_manifest):
    out = tmp_path / "probe"
    status, stdout, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", survival_manifest,
                                     "--out", out, "--task", "survival", "--seeds", "2", "--weights", "ema")
    assert status == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "survival" and results["metric"] == "cindex"
    assert results["data"]["covariates"] == ["age"] and results["checkpoint"]["weights"] == "ema"
    assert results["data"]["val"] == ["s002-ct0", "s003-ct0", "s003-ct1"]
    pretrained = results["arms"]["pretrained"]["values"]
    assert pretrained[0] == pretrained[1]  # no randomness in the survival probe of one encoder
    for arm in results["arms"].values():
        assert "per_class" not in arm and all(v in (0.0, 0.5, 1.0) for v in arm["values"])  # 2 comparable pairs
    assert "| random_init |" in stdout


@pytest.mark.parametrize("change, task, message", [
    (lambda e: dataclasses.replace(e, label=None), "segmentation",
     "split 'train' holds no CT entries with a label"),
    (lambda e: dataclasses.replace(e, time=None, event=None), "survival",
     "split 'train' holds no CT entries with time and event"),
    (lambda e: None if e.split == "val" else e, "segmentation", "split 'val' holds no CT entries with a label"),
    (None, "survival", "have no comparable pair"),
])
def test_manifests_without_usable_labels_exit_2(tmp_path, checkpoint, demo_manifest, change, task, message):
    manifest = demo_manifest if change is None else with_entries(demo_manifest, tmp_path / "m.json", change)
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", manifest,
                                "--out", tmp_path / "out", "--task", task)
    assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_labels_with_only_background_exit_2(tmp_path, checkpoint, demo_manifest):
    import nibabel as nib

    def blank(entry):
        if entry.label is None:
            return entry
        image = nib.load(entry.label)
        path = tmp_path / entry.label.name
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), path)
        return dataclasses.replace(entry, label=path)

    manifest = with_entries(demo_manifest, tmp_path / "m.json", blank)
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", manifest,
                                "--out", tmp_path / "out")
    assert status == 2 and "hold only background (0) after preprocessing" in stderr, stderr


def test_other_user_errors_exit_2(tmp_path, checkpoint, demo_manifest):
    base = ["evaluate", "probe", "--pretrained", checkpoint, "--manifest", demo_manifest]
    status, _, stderr = run_cli(*base, "--out", tmp_path / "a", "--seeds", "0")
    assert status == 2 and "seeds: got 0, expected an integer >= 1" in stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    status, _, stderr = run_cli(*base, "--out", tmp_path / "full")
    assert status == 2 and "is a non-empty directory" in stderr
    status, _, stderr = run_cli(*base, "--out", tmp_path / "f", "--levels", "1,x")
    assert status == 2 and "--levels: got '1,x'; expected comma-separated levels among 0-4, e.g. 0,1,2,3,4" in stderr
    status, _, stderr = run_cli(*base, "--out", tmp_path / "g", "--levels", "5")
    assert status == 2 and "levels: got [5], expected distinct levels among 0, 1, 2, 3, 4" in stderr
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    status, _, stderr = run_cli(*base, "--out", tmp_path / "b", "--max-entries", "0")
    assert status == 2 and "max_entries: got 0, expected an integer >= 1" in stderr
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", tmp_path / "nope.pt", "--manifest", demo_manifest,
                                "--out", tmp_path / "c")
    assert status == 2 and "nope.pt: no such file" in stderr
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", checkpoint, "--manifest", tmp_path / "no.json",
                                "--out", tmp_path / "d")
    assert status == 2 and "no.json" in stderr
    plain = tmp_path / "plain.pt"
    torch.save(with_checksum({**torch.load(checkpoint, weights_only=True), "ema": None}), plain)
    status, _, stderr = run_cli("evaluate", "probe", "--pretrained", plain, "--manifest", demo_manifest,
                                "--out", tmp_path / "e", "--weights", "ema")
    assert status == 2 and "the run kept no moving average" in stderr


# ----------------------------------------------------------------------------- inside pretraining


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _probe_overrides(manifest: Path, every: int = 2) -> list[str]:
    return [f"probe.manifest={manifest}", f"probe.every={every}", "probe.max_entries=1"]


PROBED = TINY + ["train.ema_decay=0.5", "train.checkpoint_every=1000", "train.log_every=1"]
"""The probed runs' config (plus :func:`_probe_overrides` and ``train.best_by=probe``); the plain run's without the probe."""


@pytest.fixture(scope="module")
def probed_runs(tmp_path_factory, demo_manifest) -> dict:
    """Two steps with a probe at every step (and the EMA's), best_by probe; and the same two steps without a probe."""
    root = tmp_path_factory.mktemp("probed_runs")
    with pytest.MonkeyPatch.context() as patch:  # the module fixture outlives the function-scoped quick_fits
        patch.setattr(segmentation, "MAX_ITERATIONS", 15)
        plain = pretrain(load_config("resnet-dae-tiny", PROBED), demo_manifest, root / "plain", max_steps=2,
                         device="cpu")
        cfg = load_config("resnet-dae-tiny", PROBED + _probe_overrides(demo_manifest, every=1) + ["train.best_by=probe"])
        probed = pretrain(cfg, demo_manifest, root / "probed", max_steps=2, device="cpu", probe_factory=TrainingProbe)
    return {"plain": plain, "probed": probed, "config": cfg}


def test_probe_in_pretraining_logs_keeps_losses_and_picks_best(probed_runs):
    plain, probed = probed_runs["plain"], probed_runs["probed"]
    assert probed.losses == plain.losses  # the probe draws no training random numbers and restores the modes
    a = load_checkpoint(plain.output / "checkpoints" / "last.pt")
    b = load_checkpoint(probed.output / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])

    records = _records(probed.output)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert set(records[0]) == {"step", "probe/dice", "probe/dice/class1", "probe/dice/class2", "probe/ema/dice",
                               "probe/ema/dice/class1", "probe/ema/dice/class2"}
    assert {"loss", "lr", "probe/dice", "probe/ema/dice"} <= set(records[1]) and "probe/dice" in records[2]
    assert [r["loss"] for r in records[1:]] == pytest.approx(plain.losses)
    assert [p["step"] for p in probed.probes] == [0, 1, 2]
    assert [p["probe/dice"] for p in probed.probes] == [r["probe/dice"] for r in records]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(probed.output / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("probe/dice")] == [0, 1, 2]
    assert {"probe/ema/dice", "probe/dice/class1"} <= set(events.Tags()["scalars"])

    # best.pt: the probed step after step 0 with the highest Dice (the first of ties)
    dice = {r["step"]: r["probe/dice"] for r in records if r["step"] > 0}
    best_step = max(dice, key=lambda s: (dice[s], -s))
    best = load_checkpoint(probed.output / "checkpoints" / "best.pt")
    assert best["step"] == best_step and best["best_probe"] == dice[best_step]
    assert b["best_probe"] == max(dice.values())


def test_resume_with_a_probe_is_exact_and_keeps_the_best_probe(tmp_path, demo_manifest, probed_runs):
    straight, cfg = probed_runs["probed"], probed_runs["config"]
    pretrain(cfg, demo_manifest, tmp_path, max_steps=1, device="cpu", probe_factory=TrainingProbe)
    resumed = pretrain(cfg, demo_manifest, tmp_path, max_steps=2, resume=True, device="cpu",
                       probe_factory=TrainingProbe)
    assert [p["step"] for p in resumed.probes] == [2]  # no second step-0 probe on resume
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["loss"] == pytest.approx(straight.losses[-1], rel=1e-6, abs=0)
    assert resumed.probes[0]["probe/dice"] == pytest.approx(straight.probes[-1]["probe/dice"], abs=1e-6)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == load_checkpoint(straight.output / "checkpoints" / "best.pt")["step"]


def test_probe_config_errors(tmp_path, demo_manifest):
    with pytest.raises(ConfigError, match="train.best_by 'probe' needs a probe: set probe.manifest"):
        load_config("resnet-dae-tiny", ["train.best_by=probe"])
    with pytest.raises(ConfigError, match=r"probe.every must be >= 1, got 0"):
        load_config("resnet-dae-tiny", ["probe.every=0"])
    with pytest.raises(ConfigError, match=r"probe.task: got 'depth', expected one of 'segmentation', 'survival'"):
        load_config("resnet-dae-tiny", ["probe.task=depth"])
    cfg = load_config("resnet-dae-tiny", TINY + _probe_overrides(demo_manifest))
    with pytest.raises(ValueError, match="no probe_factory was given to pretrain"):
        pretrain(cfg, demo_manifest, tmp_path / "run", max_steps=1, device="cpu")
    unlabeled = with_entries(demo_manifest, tmp_path / "m.json", lambda e: dataclasses.replace(e, label=None))
    status, _, stderr = run_cli("pretrain", "--config", "resnet-dae-tiny", "--manifest", demo_manifest,
                                "--output", tmp_path / "cli", "--max-steps", "1", "--device", "cpu", *TINY,
                                f"probe.manifest={unlabeled}")
    assert status == 2 and "volpre pretrain: error: probe: manifest" in stderr
    assert "holds no CT entries with a label" in stderr


def test_probe_under_torchrun_two_processes(demo_manifest, tmp_path):
    """Rank 0 probes, rank 1 waits (no deadlock); both train on; rank 0 logs the probes."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = run_command([torchrun, "--standalone", "--nproc_per_node=2", "-m", "volpre", "pretrain",
                        "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output", str(tmp_path),
                        "--max-steps", "2", "--device", "cpu", *TINY, *_probe_overrides(demo_manifest),
                        "train.best_by=probe", "train.log_every=1"], timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert math.isfinite(records[0]["probe/dice"]) and math.isfinite(records[2]["probe/dice"])
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 2
