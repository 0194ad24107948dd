"""A diverged run stops without overwriting its last finite checkpoint, and export refuses NaN weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from volpre.cli import main
from volpre.engine import trainer as trainer_module
from volpre.engine.checkpoint import load_checkpoint, with_checksum

NAN_FROM_STEP = 5


def _nan_from_step(monkeypatch, first: int) -> None:
    """Make the pretrainer's loss NaN from its ``first``-th forward on (one forward per step here)."""
    build = trainer_module.build_pretrainer
    calls = {"n": 0}

    def poisoned(output_module, _args, output):
        calls["n"] += 1
        return output._replace(loss=output.loss * math.nan) if calls["n"] >= first else output

    def build_poisoned(cfg):
        module = build(cfg)
        module.register_forward_hook(poisoned)
        return module

    monkeypatch.setattr(trainer_module, "build_pretrainer", build_poisoned)


def test_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(demo_manifest, tmp_path, monkeypatch, capsys):
    _nan_from_step(monkeypatch, NAN_FROM_STEP)
    out = tmp_path / "run"
    # log_every beyond the run: the divergence is caught by the flag read at the checkpoint step 6
    args = ["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output", str(out),
            "--device", "cpu", "--max-steps", "10", "--splits", "train", "data.num_workers=0",
            "train.checkpoint_every=2", "train.log_every=100", "train.keep_last=5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("volpre pretrain: error: the run diverged: the loss or gradient norm is not finite (NaN or "
                          "Inf) since step 5; it stopped at step 6 without writing a checkpoint, and the last "
                          "checkpoint, "), err
    assert "step_00000004.pt (step 4, also last.pt), is from before" in err
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    state = load_checkpoint(folder / "last.pt")
    assert state["step"] == 4
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses[:4]) and all(math.isnan(x) for x in losses[4:])


def test_export_refuses_non_finite_weights_naming_the_tensors(demo_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output", str(out),
                 "--device", "cpu", "--max-steps", "1", "--splits", "train", "data.num_workers=0"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    for key in ("encoder.conv1.weight", "encoder.layer1.0.bn1.running_var"):
        state["model"][key] = torch.full_like(state["model"][key], math.inf if "var" in key else math.nan)
    poisoned = tmp_path / "poisoned.pt"
    torch.save(with_checksum(state), poisoned)  # an intact file holding the weights of a diverged run
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    assert main(["export", str(poisoned), "--task", "segmentation", "--out-channels", "2", "--out", str(bundle)]) == 2
    err = capsys.readouterr().err
    n = sum(1 for k in state["model"] if k.startswith("encoder."))
    assert err == (f"volpre export: error: checkpoint {poisoned}: model weights (keys encoder.*): 2 of {n} encoder "
                   "tensors hold NaN or Inf values: conv1.weight, layer1.0.bn1.running_var; the run diverged "
                   "before this checkpoint was written: export an earlier one\n")
    assert not bundle.exists() and not list(Path(tmp_path).glob(".bundle.tmp*"))
