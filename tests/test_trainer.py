"""Unit tests of volpre.engine.trainer's pieces: schedule, AdamW groups, resumed config, stop request.

The end-to-end runs of the trainer (losses fall, resume is exact, DDP, signals from outside) are in
test_pretrain.py and test_resume.py.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn

from volpre.config import load_config
from volpre.engine.checkpoint import CheckpointError
from volpre.engine.trainer import RESUME_SAFE_KEYS, StopRequest, decays, param_groups, resumed_config, warmup_cosine


def test_warmup_is_linear_and_the_cosine_ends_at_min_lr():
    lr, min_lr, warmup, total = 1e-3, 1e-5, 4, 20
    rates = [warmup_cosine(step, warmup, total, lr, min_lr) for step in range(total + 5)]
    assert rates[:warmup] == pytest.approx([lr * k / warmup for k in (1, 2, 3, 4)])
    assert rates[warmup] == pytest.approx(lr)  # the cosine starts at the peak
    mid = warmup + (total - warmup) // 2
    assert rates[mid] == pytest.approx(min_lr + 0.5 * (lr - min_lr))  # halfway: cos(pi/2) = 0
    assert rates[total] == pytest.approx(min_lr) and rates[-1] == pytest.approx(min_lr)  # held after the end
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # never rises after warmup
    # a hand value inside the cosine
    step = warmup + 3
    expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * 3 / (total - warmup)))
    assert rates[step] == pytest.approx(expected)


def test_no_warmup_starts_at_the_peak():
    assert warmup_cosine(0, 0, 10, 2e-3, 0.0) == pytest.approx(2e-3)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.mask_token = nn.Parameter(torch.zeros(1, 4))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_parameter_groups_decay_only_weight_matrices():
    model = _Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"conv.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"conv.bias", "norm.weight", "norm.bias",
                                                          "relative_position_bias_table", "mask_token"}
    assert not decays("encoder.layers1.0.blocks.0.attn.relative_position_bias_table", nn.Parameter(torch.zeros(3, 3)))
    assert decays("encoder.layers1.0.blocks.0.attn.qkv.weight", nn.Parameter(torch.zeros(3, 3)))


def test_resume_takes_the_saved_config_and_only_safe_changes():
    saved = load_config("resnet-dae-tiny").to_dict()
    assert resumed_config(saved, None).to_dict() == saved
    safe = load_config("resnet-dae-tiny", ["train.log_every=7", "data.num_workers=0", "probe.every=3"])
    assert resumed_config(saved, safe).to_dict() == safe.to_dict()
    unsafe = load_config("resnet-dae-tiny", ["train.lr=0.5", "data.num_workers=0", "data.roi=[64,64,64]"])
    with pytest.raises(CheckpointError) as caught:
        resumed_config(saved, unsafe)
    message = str(caught.value)
    assert "data.roi, train.lr" in message and "data.num_workers" not in message.split("(only")[0]
    assert all(key in message for key in RESUME_SAFE_KEYS)


def test_a_stop_request_is_a_flag_set_by_sigterm_and_sigint_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequest(world_size=1, device=torch.device("cpu"))
    with stop.handling_signals():
        assert not stop.agreed(at_log_step=True)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before kill() returns
        assert stop.signal == signal.SIGTERM
        assert stop.agreed(at_log_step=False)  # one process acts at once, log step or not
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before


def test_several_processes_only_compare_flags_at_log_steps():
    stop = StopRequest(world_size=2, device=torch.device("cpu"))
    stop.signal = signal.SIGTERM
    assert not stop.agreed(at_log_step=False)  # no collective between log steps (no process group here)
