"""Contrastive objectives (SimCLR, MICLe): pair roles, 3D views, the objective, its configs, the
loss and BatchNorm under DDP, and the data rules of subject-level runs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch.nn.modules.batchnorm import _BatchNorm

from child_processes import SPAWN, join_or_kill, run_command, spawned
from volpre.cli import main
from volpre.config import ConfigError, config_from_dict, load_config
from volpre.data.manifest import load_manifest
from volpre.engine.checkpoint import load_checkpoint
from volpre.engine.distributed import DistContext, setup_distributed, sync_batchnorm, teardown_distributed
from volpre.engine.trainer import Pretraining
from volpre.objectives import ContrastivePretrainer, build_pretrainer, draw_and_forward
from volpre.objectives.losses import multi_positive_info_nce, pair_roles
from volpre.objectives.views import draw_views, make_views


SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[1]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run_cfg(encoder: str = "resnet", objective: str = "simclr", section=None, data=None):
    return config_from_dict({
        "data": {"roi": [32, 32, 32], **(data or {})},
        "model": {"encoder": encoder, "decoder_channels": 8, "swin": {"feature_size": 12, "window_size": 4},
                  "resnet": {"depth": 10}},
        "objective": {"name": objective, objective: section or {}},
    })


def _volume(batch: int, shape=(32, 32, 32), seed: int = 0) -> torch.Tensor:
    x = torch.rand(batch, 1, *(s // 4 for s in shape), generator=_gen(seed))
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def _roles(groups: torch.Tensor, neutral: torch.Tensor | None) -> torch.Tensor:
    """(N, N) int: +1 positive, -1 negative, 0 neither (the anchor itself included)."""
    positive, negative = pair_roles(groups, groups, torch.arange(len(groups)), neutral, neutral)
    assert not (positive & negative).any()
    return positive.long() - negative.long()


# ----------------------------------------------------------------------------- who is whose positive


def test_simclr_pairs_views_of_one_crop_and_never_contrasts_crops_of_one_subject():
    pretrainer = build_pretrainer(_run_cfg("resnet", "simclr"))
    # crops 0 and 1: two crops of one volume (subject 0); crop 2: subject 1. Rows: view 0 of crops 0-2, view 1.
    batch = {"image": _volume(3), "subject": torch.tensor([0, 0, 1])}
    expected = torch.tensor([
        [0, 0, -1, 1, 0, -1],
        [0, 0, -1, 0, 1, -1],
        [-1, -1, 0, -1, -1, 1],
        [1, 0, -1, 0, 0, -1],
        [0, 1, -1, 0, 0, -1],
        [-1, -1, 1, -1, -1, 0],
    ])
    assert torch.equal(_roles(*pretrainer.pair_ids(batch)), expected)


def test_micle_pairs_scans_of_one_subject_and_modality():
    pretrainer = build_pretrainer(_run_cfg("resnet", "micle"))
    # items: 0 = subject 0's CTs (crops 0, 1: two scans), 1 = subject 0's MR (crops 2, 3), 2 = subject 1 (crops 4, 5)
    batch = {"image": _volume(6), "subject": torch.tensor([0, 0, 0, 0, 1, 1]), "item": torch.tensor([0, 0, 1, 1, 2, 2])}
    expected = torch.tensor([
        [0, 1, 0, 0, -1, -1],
        [1, 0, 0, 0, -1, -1],
        [0, 0, 0, 1, -1, -1],
        [0, 0, 1, 0, -1, -1],
        [-1, -1, -1, -1, 0, 1],
        [-1, -1, -1, -1, 1, 0],
    ])
    assert torch.equal(_roles(*pretrainer.pair_ids(batch)), expected)


def test_info_nce_leaves_neutral_candidates_out_of_the_softmax():
    z = torch.randn(6, 8, generator=_gen(3))
    groups, neutral = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([5, 5, 6, 5, 5, 6])
    loss = multi_positive_info_nce(z, groups, 0.2, neutral_groups=neutral)
    zn = F.normalize(z, dim=1)
    terms = []
    for i in range(6):
        positives = [j for j in range(6) if j != i and groups[j] == groups[i]]
        negatives = [j for j in range(6) if groups[j] != groups[i] and neutral[j] != neutral[i]]
        log_denominator = torch.logsumexp(torch.stack([zn[i] @ zn[a] / 0.2 for a in positives + negatives]), dim=0)
        terms.append(-torch.stack([zn[i] @ zn[p] / 0.2 - log_denominator for p in positives]).mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert not torch.isclose(loss, multi_positive_info_nce(z, groups, 0.2))  # the neutral pairs mattered


def test_pair_ids_need_integer_ids_of_every_crop():
    simclr, micle = build_pretrainer(_run_cfg("resnet", "simclr")), build_pretrainer(_run_cfg("resnet", "micle"))
    with pytest.raises(KeyError, match=r"objective.simclr: the batch has no 'subject' ids"):
        draw_and_forward(simclr, {"image": _volume(2)}, _gen())
    with pytest.raises(KeyError, match=r"objective.micle: the batch has no 'item' ids"):
        draw_and_forward(micle, {"image": _volume(2), "subject": torch.tensor([0, 1])}, _gen())
    with pytest.raises(ValueError, match=r"batch\['subject'\] must be an integer tensor of shape \(2,\), got \(3,\)"):
        draw_and_forward(simclr, {"image": _volume(2), "subject": torch.tensor([0, 1, 2])}, _gen())


# ----------------------------------------------------------------------------- views


def _draws(n: int, **overrides) -> dict[str, torch.Tensor]:
    """View parameters that leave crops unchanged, with ``overrides``."""
    draws = {"box_volume": torch.ones(n), "box_log_aspect": torch.zeros(n, 3), "box_position": torch.full((n, 3), 0.5),
             "flip": torch.zeros(n, 3, dtype=torch.bool), "jitter": torch.zeros(n, dtype=torch.bool),
             "contrast": torch.ones(n), "brightness": torch.zeros(n), "blur": torch.zeros(n, dtype=torch.bool),
             "blur_sigma": torch.ones(n)}
    return {**draws, **overrides}


def test_full_box_views_are_the_crop_or_its_flips():
    cfg = load_config("swin-simclr-tiny").objective.simclr
    x = torch.rand(3, 1, 16, 12, 8, generator=_gen())
    flip = torch.tensor([[False, False, False], [True, False, True], [False, True, False]])
    views, geometric = make_views(x, _draws(3, flip=flip), cfg)
    torch.testing.assert_close(views, geometric)
    torch.testing.assert_close(views[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(views[1], x[1].flip(1, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(views[2], x[2].flip(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("position", [0.0, 1.0])
def test_box_view_resamples_that_part_of_the_crop_like_interpolate(axis, position):
    """A box of half the crop along one axis, at either end, is that half upsampled trilinearly
    (voxels next to the box's edge sample their outer neighbour, which interpolate clamps)."""
    cfg = load_config("swin-simclr-tiny").objective.simclr
    shape = (16, 12, 8)
    x = torch.rand(1, 1, *shape, generator=_gen(axis))
    log_aspect = torch.zeros(1, 3)
    log_aspect[0, axis] = math.log(0.5)
    box_position = torch.full((1, 3), 0.5)
    box_position[0, axis] = position
    views, _ = make_views(x, _draws(1, box_volume=torch.tensor([0.5]), box_log_aspect=log_aspect,
                                    box_position=box_position), cfg)
    half = shape[axis] // 2
    start = 0 if position == 0.0 else half
    part = x.narrow(2 + axis, start, half)
    expected = F.interpolate(part, size=shape, mode="trilinear", align_corners=False)
    inner = shape[axis] - 2
    torch.testing.assert_close(views.narrow(2 + axis, 1, inner), expected.narrow(2 + axis, 1, inner),
                               atol=1e-5, rtol=0)


def test_jitter_blur_and_noise_apply_where_drawn():
    cfg = config_from_dict({"objective": {"simclr": {"noise_std": [0.1, 0.1]}}}).objective.simclr
    x = torch.rand(3, 2, 16, 16, 16, generator=_gen())
    draws = _draws(3, jitter=torch.tensor([True, False, False]), contrast=torch.tensor([0.7, 1.3, 1.0]),
                   brightness=torch.tensor([0.2, -0.3, 0.0]), blur=torch.tensor([False, True, False]),
                   blur_sigma=torch.tensor([1.0, 1.5, 1.0]), noise_std=torch.tensor([0.1, 0.1, 0.1]),
                   noise=torch.randn(3, 2, 16, 16, 16, generator=_gen(1)))
    views, geometric = make_views(x, draws, cfg)
    torch.testing.assert_close(geometric, x, atol=1e-5, rtol=0)
    noise = 0.1 * draws["noise"]
    mean = x[0].mean(dim=(1, 2, 3), keepdim=True)  # per channel
    torch.testing.assert_close(views[0], (x[0] - mean) * 0.7 + mean + 0.2 + noise[0], atol=1e-5, rtol=0)
    from volpre.objectives.perturbations import gaussian_blur

    blurred = gaussian_blur(x[1:2], torch.tensor([1.5]), max_sigma=cfg.blur_sigma[1])[0]
    torch.testing.assert_close(views[1], blurred + noise[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(views[2], x[2] + noise[2], atol=1e-5, rtol=0)


def test_drawn_boxes_fit_the_crop_and_the_documented_ranges():
    cfg = config_from_dict({"objective": {"simclr": {"flip_axes": [0, 2]}}}).objective.simclr
    n = 20000
    draws = draw_views((n, 1, 32, 32, 32), cfg, _gen())
    assert all(t.shape[0] == n and t.device.type == "cpu" for t in draws.values()) and "noise" not in draws
    aspect = draws["box_log_aspect"] - draws["box_log_aspect"].mean(dim=1, keepdim=True)
    side = (draws["box_volume"].unsqueeze(1) ** (1 / 3) * aspect.exp())
    ratios = side.unsqueeze(2) / side.unsqueeze(1)
    assert ratios.min() >= 0.75 - 1e-5 and ratios.max() <= 4 / 3 + 1e-5
    unclipped = (side <= 1).all(dim=1)
    torch.testing.assert_close(side[unclipped].prod(dim=1), draws["box_volume"][unclipped])
    assert 0.08 <= draws["box_volume"].min() and draws["box_volume"].max() <= 1.0
    frequencies = draws["flip"].float().mean(dim=0)
    assert abs(frequencies[0] - 0.5) < 0.02 and frequencies[1] == 0 and abs(frequencies[2] - 0.5) < 0.02
    assert abs(draws["jitter"].float().mean() - 0.8) < 0.02 and abs(draws["blur"].float().mean() - 0.5) < 0.02
    assert draws["contrast"].min() >= 0.2 and draws["contrast"].max() <= 1.8  # 1 -+ 0.8 (ImageNet strength)
    assert draws["brightness"].abs().max() <= 0.8
    assert draws["blur_sigma"].min() >= 0.1 and draws["blur_sigma"].max() <= 2.0
    from volpre.objectives.views import box_affine

    theta = box_affine(draws["box_volume"], draws["box_log_aspect"], draws["box_position"], draws["flip"])
    reach = theta[:, :, :3].abs().sum(dim=2) + theta[:, :, 3].abs()  # furthest normalised coordinate sampled
    assert reach.max() <= 1 + 1e-5


def test_views_are_a_function_of_the_generator_state():
    cfg = load_config("swin-simclr-tiny").objective.simclr
    x = _volume(4)
    a, _ = make_views(x, draw_views(x.shape, cfg, _gen(7)), cfg)
    b, _ = make_views(x, draw_views(x.shape, cfg, _gen(7)), cfg)
    c, _ = make_views(x, draw_views(x.shape, cfg, _gen(8)), cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("encoder, objective, reconstruction_weight",
                         [("swin", "simclr", 0.0), ("resnet", "simclr", 0.0), ("swin", "micle", 0.5),
                          ("resnet", "micle", 0.5)])
def test_every_trainable_parameter_gets_a_gradient_under_bf16(encoder, objective, reconstruction_weight):
    # Gradients are checked finite in float32 only: PyTorch 2.13's CPU bf16 kernels are
    # nondeterministic (the same inputs and weights sometimes give NaN/Inf convolution weight
    # gradients, measured in tests/test_objectives.py's twin of this test); a CPU kernel fault.
    torch.manual_seed(0)
    pretrainer = build_pretrainer(_run_cfg(encoder, objective, {"reconstruction_weight": reconstruction_weight}))
    assert isinstance(pretrainer, ContrastivePretrainer)
    assert (pretrainer.decoder is None) == (reconstruction_weight == 0)
    image = _volume(4)
    batch = {"image": image, "subject": torch.tensor([0, 0, 1, 1]), "item": torch.tensor([0, 0, 1, 1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = draw_and_forward(pretrainer, batch, _gen())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    expected_parts = {"contrastive"} | ({"reconstruction"} if reconstruction_weight else set())
    assert set(out.parts) == expected_parts
    total = out.parts["contrastive"] + reconstruction_weight * out.parts.get("reconstruction", 0)
    torch.testing.assert_close(out.loss.detach(), total)
    assert {"input", "view_a", "view_b"} <= set(out.images)
    assert all(v.shape == image.shape and not v.requires_grad for v in out.images.values())
    out.loss.backward()
    missing = [name for name, p in pretrainer.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [name for name, p in pretrainer.named_parameters() if not p.requires_grad]
    assert frozen == [f"projection.layers.{3 * (pretrainer.cfg.projection_layers - 1) + 1}.bias"]  # no shift, as SimCLR
    pretrainer.zero_grad(set_to_none=True)
    draw_and_forward(pretrainer, batch, _gen()).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in pretrainer.parameters() if p.grad is not None)


def test_the_decoder_exists_exactly_when_reconstruction_counts():
    pretrainer = build_pretrainer(_run_cfg("resnet", "simclr", {"reconstruction_weight": 0.5}))
    with pytest.raises(ValueError, match=r"objective.simclr.reconstruction_weight 0.5 needs a decoder exactly when"):
        ContrastivePretrainer(pretrainer.encoder, None, pretrainer.cfg, positives="crop")


@pytest.mark.parametrize("objective", ["simclr", "micle"])
def test_a_few_adam_steps_on_fixed_views_lower_their_loss(objective):
    """The whole objective is differentiable the right way: six Adam steps on one batch and one
    draw of views cut that loss by more than half (learning across draws is for the measured runs
    in the README, not for a test)."""
    torch.manual_seed(0)
    pretrainer = build_pretrainer(_run_cfg("resnet", objective))
    if objective == "simclr":  # three volumes, three subjects, two views each
        batch = {"image": _volume(3, seed=2), "subject": torch.arange(3)}
    else:  # three items of two crops (two volumes) each, one view per crop
        pairs = torch.arange(3).repeat_interleave(2)
        batch = {"image": _volume(6, seed=2), "subject": pairs, "item": pairs}
    draws = pretrainer.draw(batch, _gen(0))
    optimizer = torch.optim.Adam([p for p in pretrainer.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = pretrainer(batch, draws).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = pretrainer(batch, draws).loss.item()
    assert after < 0.5 * losses[0], losses + [after]


# ----------------------------------------------------------------------------- configs


SIMCLR_IMAGENET = {  # the numbers volpre/objectives/contrastive.py, views.py and config.py document
    "crop_scale": (0.08, 1.0), "crop_aspect": (0.75, 4 / 3), "flip_axes": (0, 1, 2), "jitter_probability": 0.8,
    "brightness": 0.8, "contrast": 0.8, "blur_probability": 0.5, "blur_sigma": (0.1, 2.0), "noise_std": (0.0, 0.0),
    "projection_layers": 2, "projection_dim": 128, "temperature": 0.1, "reconstruction_weight": 0.0,
}
SIMCLR_CIFAR10 = {**SIMCLR_IMAGENET, "brightness": 0.4, "contrast": 0.4, "blur_probability": 0.0, "temperature": 0.5}


@pytest.mark.parametrize("name", ["swin-simclr", "resnet-simclr", "swin-micle", "resnet-micle"])
@pytest.mark.parametrize("tiny", ["", "-tiny"])
def test_shipped_contrastive_configs_hold_the_documented_recipe(name, tiny):
    cfg = load_config(name + tiny)
    encoder, objective = name.split("-")
    section = getattr(cfg.objective, objective)
    assert cfg.objective.name == objective and cfg.model.encoder == encoder
    for key, value in (SIMCLR_CIFAR10 if tiny else SIMCLR_IMAGENET).items():
        assert getattr(section, key) == pytest.approx(value), key
    if not tiny:
        assert section == type(section)()  # the full configs spell out exactly the dataclass defaults
    assert cfg.train.weight_decay == 1e-6 and cfg.train.sync_batchnorm
    assert cfg.train.lr == (2e-4 if encoder == "swin" else 3e-4)  # the tiny profiles keep the full rate
    if objective == "simclr":  # SimCLR: two views of one crop of each image
        assert section.views_per_crop == 2 and cfg.data.crops_per_volume == 1
    else:  # MICLe: one view of each of two crops from two distinct scans of one subject and modality
        assert section.views_per_crop == 1 and cfg.data.crops_per_volume == 2
        assert not section.positives_across_modalities
    if tiny:
        assert cfg.data.roi == (32, 32, 32) and cfg.preprocess.spacing == (4.0, 4.0, 4.0) and cfg.train.amp == "none"
    else:
        assert cfg.data.roi == (96, 96, 96) and cfg.preprocess.spacing == (1.5, 1.5, 1.5) and cfg.train.amp == "bf16"


@pytest.mark.parametrize(
    "objective, values, data, message",
    [
        ("simclr", {"views_per_crop": 1}, None, r"objective.simclr.views_per_crop must be >= 2"),
        ("micle", {"views_per_crop": 0}, None, r"objective.micle.views_per_crop must be >= 1, got 0"),
        ("micle", {"views_per_crop": 1}, {"crops_per_volume": 1},
         r"objective.micle.views_per_crop \(1\) x data.crops_per_volume \(1\) is 1 view per subject"),
        ("simclr", {"crop_scale": [0.0, 1.0]}, None, r"objective.simclr.crop_scale must be \[low, high\] with 0 < low"),
        ("simclr", {"crop_scale": [0.5, 1.5]}, None, r"objective.simclr.crop_scale .* high <= 1, got \[0.5, 1.5\]"),
        ("micle", {"crop_aspect": [1.2, 1.5]}, None,
         r"objective.micle.crop_aspect must be \[low, high\] with 0 < low <= 1"),
        ("simclr", {"flip_axes": [0, 3]}, None, r"objective.simclr.flip_axes must list distinct axes among 0, 1, 2"),
        ("simclr", {"flip_axes": [1, 1]}, None, r"objective.simclr.flip_axes must list distinct axes"),
        ("simclr", {"jitter_probability": 1.5}, None, r"objective.simclr.jitter_probability must be in \[0, 1\]"),
        ("micle", {"blur_probability": -0.1}, None, r"objective.micle.blur_probability must be in \[0, 1\]"),
        ("simclr", {"brightness": -0.1}, None, r"objective.simclr.brightness must be >= 0"),
        ("simclr", {"contrast": 1.0}, None, r"objective.simclr.contrast must be in \[0, 1\), got 1.0"),
        ("simclr", {"blur_sigma": [0.0, 1.0]}, None, r"objective.simclr.blur_sigma must be \[low, high\] with 0 < low"),
        ("simclr", {"noise_std": [0.2, 0.1]}, None, r"objective.simclr.noise_std must be \[low, high\] with 0 <= low"),
        ("simclr", {"projection_layers": 0}, None, r"objective.simclr.projection_layers must be >= 1, got 0"),
        ("micle", {"projection_dim": 0}, None, r"objective.micle.projection_dim must be >= 1, got 0"),
        ("simclr", {"temperature": 0}, None, r"objective.simclr.temperature must be > 0, got 0.0"),
        ("micle", {"reconstruction_weight": -1}, None, r"objective.micle.reconstruction_weight must be >= 0"),
        ("micle", {"positives_across_modalities": "yes"}, None,
         r"objective.micle.positives_across_modalities: got 'yes', expected bool"),
        ("simclr", {"positives_across_modalities": True}, None,
         r"unknown config key objective.simclr.positives_across_modalities"),
        ("simclr", {"views": 2}, None,
         r"unknown config key objective.simclr.views; allowed keys under objective.simclr"),
    ],
)
def test_contrastive_config_errors_name_the_key(objective, values, data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": data or {}, "objective": {"name": objective, objective: values}})


def test_sync_batchnorm_is_a_checked_switch():
    assert config_from_dict({"train": {"sync_batchnorm": False}}).train.sync_batchnorm is False
    with pytest.raises(ConfigError, match=r"train.sync_batchnorm: got 1, expected bool"):
        config_from_dict({"train": {"sync_batchnorm": 1}})


# ----------------------------------------------------------------------------- BatchNorm across ranks


def _ctx(world_size: int, device: str, rank: int = 0) -> DistContext:
    return DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device(device),
                       backend=None if world_size == 1 else ("nccl" if device.startswith("cuda") else "gloo"))


def test_sync_batchnorm_converts_for_cuda_ranks_only_and_keeps_the_keys(caplog):
    torch.manual_seed(0)
    pretrainer = build_pretrainer(_run_cfg("resnet", "simclr"))
    reference = {k: v.clone() for k, v in pretrainer.state_dict().items()}
    norms = sum(isinstance(m, _BatchNorm) for m in pretrainer.modules())
    # one process, or the switch off: unchanged
    assert sync_batchnorm(pretrainer, _ctx(1, "cuda:0"), enabled=True) == (pretrainer, False)
    assert sync_batchnorm(pretrainer, _ctx(2, "cuda:0"), enabled=False) == (pretrainer, False)
    # CPU processes (gloo): torch's SyncBatchNorm cannot run there; plain BatchNorm, and rank 0 says so
    with caplog.at_level(logging.WARNING, logger="volpre.engine.distributed"):
        assert sync_batchnorm(pretrainer, _ctx(2, "cpu"), enabled=True) == (pretrainer, False)
        assert sync_batchnorm(pretrainer, _ctx(2, "cpu", rank=1), enabled=True) == (pretrainer, False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train.sync_batchnorm: BatchNorm layers keep per-process statistics on 2 cpu processes "
                     "(torch.nn.SyncBatchNorm runs on CUDA only); on GPUs they reduce across ranks"]
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in pretrainer.modules())
    # CUDA ranks: every BatchNorm (encoder and projection head) becomes a SyncBatchNorm, same keys and values
    converted, done = sync_batchnorm(pretrainer, _ctx(2, "cuda:0"), enabled=True)
    assert done is True
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == norms > 0
    assert not any(isinstance(m, _BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
                   for m in converted.modules())
    assert list(converted.state_dict()) == list(reference)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in reference.items())
    assert [n for n, p in converted.named_parameters() if not p.requires_grad] == ["projection.layers.4.bias"]
    swin = build_pretrainer(_run_cfg("swin", "simclr"))  # LayerNorm encoder: only the head converts
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in sync_batchnorm(swin, _ctx(2, "cuda:0"), True)[0].modules()) == 2


def _on_rank(rank: int, world: int, init_file: str, payloads: list[dict], queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for payload in payloads:
            torch.manual_seed(0)
            pretrainer = build_pretrainer(_run_cfg("resnet", payload["objective"])).eval()  # BN: running statistics
            n = payload["image"].shape[0] // world
            crops = slice(rank * n, (rank + 1) * n)
            batch = {key: payload[key][crops] for key in ("image", "subject", "item")}
            total = payload["image"].shape[0]
            view_rows = torch.cat([torch.arange(rank * n, (rank + 1) * n) + v * total for v in range(payload["views"])])
            loss = pretrainer(batch, {k: v[view_rows] for k, v in payload["draws"].items()}).loss
            loss.backward()
            # numpy arrays travel by value (tensors would share memory this process frees when it exits)
            results.append({"loss": loss.detach().numpy(), "grad": pretrainer.projection.layers[0].weight.grad.numpy()})
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_loss_over_two_ranks_is_the_one_process_loss_of_the_whole_batch(tmp_path):
    """Two gloo processes, each with half of one batch: every rank's anchors meet every rank's
    candidates (the embeddings are gathered with gradients), so the mean of the ranks' losses is the
    one-process loss of the whole batch, and the mean of their gradients (what DDP applies) is its
    gradient. BatchNorm in eval mode, so per-rank statistics play no part; the pair ids (SimCLR's
    crop ids made global, subject and item ids) mean the same on both ranks."""
    image = _volume(4, seed=5)
    payloads = []
    for objective, ids in (("simclr", [0, 0, 1, 2]),  # crops 0 and 1: one subject, neither positives nor negatives
                           ("micle", [0, 1, 0, 1])):  # every crop's positive (its item's other crop) on the other rank
        section = getattr(_run_cfg("resnet", objective).objective, objective)
        views = section.views_per_crop
        payloads.append({"objective": objective, "image": image, "subject": torch.tensor(ids),
                         "item": torch.tensor(ids), "views": views,
                         "draws": draw_views((views * 4, *image.shape[1:]), section, _gen(6))})
    queue = SPAWN.Queue()
    ranks = [SPAWN.Process(target=_on_rank, args=(r, 2, str(tmp_path / "pg"), payloads, queue)) for r in range(2)]
    with spawned(ranks):
        results = dict(queue.get(timeout=120) for _ in ranks)
        assert join_or_kill(ranks, timeout=60) == [0, 0]
    for k, payload in enumerate(payloads):
        torch.manual_seed(0)
        whole_model = build_pretrainer(_run_cfg("resnet", payload["objective"])).eval()
        whole = whole_model({key: payload[key] for key in ("image", "subject", "item")}, payload["draws"]).loss
        whole.backward()
        r0, r1 = ({key: torch.from_numpy(v) for key, v in results[r][k].items()} for r in (0, 1))
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, whole.detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close((r0["grad"] + r1["grad"]) / 2, whole_model.projection.layers[0].weight.grad,
                                   atol=1e-4, rtol=1e-3)


def test_torchrun_two_processes_run_simclr_and_micle(demo_manifest, tmp_path):
    """The real trainer under torchrun (2 gloo processes): each contrastive tiny config runs 2 steps,
    the loss gathers both ranks' embeddings, the weights stay equal, BatchNorm stays per process on
    the CPU (one log line says so) and the checkpoint records it."""
    names = ["resnet-simclr-tiny", "resnet-micle-tiny"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = run_command([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPTS / "ddp_contrastive.py"),
                        str(demo_manifest), str(tmp_path), "2", *names], timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("train.sync_batchnorm: BatchNorm layers keep per-process statistics on 2 cpu") == 2
    report = json.loads((tmp_path / "ddp_contrastive.json").read_text())
    for name in names:
        rank0, rank1 = sorted(report[name]["ranks"], key=lambda r: r["rank"])
        assert report[name]["final_step"] == 2 and len(report[name]["losses"]) == 2
        assert all(math.isfinite(loss) for loss in report[name]["losses"])
        for rank in (rank0, rank1):
            assert rank["gathered_rows"] and all(total == 2 * local for local, total in rank["gathered_rows"])
            assert rank["norm_types"] == ["BatchNorm1d", "BatchNorm3d"] and rank["sync_batchnorm"] is False
        assert rank0["weights"] == rank1["weights"]
        state = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
        assert state["world_size"] == 2 and state["sync_batchnorm"] is False and state["step"] == 2


def test_contrastive_objectives_refuse_the_nnunet_encoder():
    cfg = config_from_dict({"model": {"encoder": "nnunet"}, "objective": {"name": "micle"}})
    with pytest.raises(ConfigError, match=r"objective.name 'micle' supports model.encoder resnet or swin, got 'nnunet'"):
        build_pretrainer(cfg)


# ----------------------------------------------------------------------------- subject-level data


def _manifest_copy(demo_manifest, path, keep=lambda entry: True, **changes):
    """The demo manifest's entries (absolute paths) that ``keep`` accepts, with ``changes(entry)`` applied."""
    data = json.loads(demo_manifest.read_text())
    base = demo_manifest.parent
    entries = []
    for e in data["entries"]:
        if keep(e):
            entry = {**e, "image": str(base / e["image"]), "label": str(base / e["label"])}
            entries.append({**entry, **{k: f(entry) for k, f in changes.items()}})
    path.write_text(json.dumps({"entries": entries}))
    return path


def _error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("volpre pretrain: error:"))


def test_micle_refuses_a_manifest_without_a_subject_of_two_scans(demo_manifest, tmp_path, capsys):
    manifest = _manifest_copy(demo_manifest, tmp_path / "single.json", subject=lambda e: e["id"])
    args = ["pretrain", "--config", "resnet-micle-tiny", "--manifest", str(manifest), "--output", str(tmp_path / "run"),
            "--device", "cpu", "--max-steps", "1", "data.num_workers=0"]
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert "error: objective.name micle takes its positives from several scans of one subject" in line
    assert f"no subject in {manifest} has two scans of one modality; give the scans of one patient the same" in line
    assert "objective.name=simclr" in line and "objective.micle.positives_across_modalities=true" in line
    # the even demo subjects have one CT and one MR: two scans, but of two modalities
    even = _manifest_copy(demo_manifest, tmp_path / "even.json", keep=lambda e: e["subject"] in ("s000", "s002"))
    assert main(args[:4] + [str(even)] + args[5:]) == 2
    assert "has two scans of one modality" in _error_line(capsys.readouterr().err)


def test_micle_warns_when_no_positive_can_come_from_another_scan(demo_manifest, tmp_path, caplog):
    cfg = load_config("resnet-micle-tiny", ["data.num_workers=0", "data.crops_per_volume=1",
                                            "objective.micle.views_per_crop=2"])
    ctx = setup_distributed("cpu")
    with caplog.at_level(logging.WARNING, logger="volpre.engine.trainer"):
        run = Pretraining(cfg, demo_manifest, tmp_path, ctx)
    assert "objective micle with data.crops_per_volume=1" in caplog.text
    assert "set data.crops_per_volume=2" in caplog.text
    del run
    teardown_distributed(ctx)


def test_micle_positives_in_training_batches_come_from_different_files(demo_manifest, tmp_path, monkeypatch):
    """The real trainer on the demo data (CT baseline + follow-up for odd subjects, one MR each):
    every positive of a crop whose subject has two scans of its modality is a crop of the other one."""
    seen: list[dict] = []
    forward = ContrastivePretrainer.forward

    def recording(self, batch, draws):
        groups, neutral = self.pair_ids(batch)
        seen.append({"scan": batch["scan"].clone(), "roles": _roles(groups, neutral)})
        return forward(self, batch, draws)

    monkeypatch.setattr(ContrastivePretrainer, "forward", recording)
    cfg = load_config("resnet-micle-tiny", ["data.num_workers=0"])
    ctx = setup_distributed("cpu")
    run = Pretraining(cfg, demo_manifest, tmp_path, ctx)
    run.run(max_steps=4)
    entries = load_manifest(demo_manifest).entries
    scans_of = {}
    for item in run.groups.scan_index:
        for scan in item:
            scans_of[scan] = item
    del run
    teardown_distributed(ctx)
    cross_file = 0
    for step in seen:
        scan = step["scan"].tolist()
        for i, row in enumerate(step["roles"].tolist()):
            positives = [j for j, role in enumerate(row) if role == 1]
            assert positives  # crops_per_volume = 2: every crop has one
            for j in positives:
                a, b = entries[scan[i]], entries[scan[j]]
                assert a.subject == b.subject and a.modality == b.modality
                if len(scans_of[scan[i]]) >= 2:
                    assert scan[i] != scan[j] and a.image != b.image
                    cross_file += 1
            for j, role in enumerate(row):
                if role == -1:
                    assert entries[scan[j]].subject != entries[scan[i]].subject
    assert cross_file > 0  # the follow-up CTs were drawn


def test_contrastive_runs_refuse_a_step_without_negatives(demo_manifest, tmp_path, capsys):
    def args(config, manifest, *overrides):
        return ["pretrain", "--config", config, "--manifest", str(manifest), "--output", str(tmp_path / "run"),
                "--device", "cpu", "--max-steps", "1", "data.num_workers=0", *overrides]

    assert main(args("resnet-simclr-tiny", demo_manifest, "data.batch_size=1")) == 2
    line = _error_line(capsys.readouterr().err)
    assert ("error: objective.name simclr takes its negatives from the other items of a step: data.batch_size 1 x 1 "
            "process(es) is one item per step, so there is none and the loss is 0; set data.batch_size >= 2") in line
    one = _manifest_copy(demo_manifest, tmp_path / "one.json", keep=lambda e: e["subject"] == "s001")
    for config in ("resnet-simclr-tiny", "resnet-micle-tiny"):
        assert main(args(config, one)) == 2
        objective = config.split("-")[1]
        assert (f"error: objective.name {objective} takes its negatives from other subjects, but the entries of "
                f"{one} are all of one subject") in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()
