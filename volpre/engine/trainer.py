"""The pretraining run: data stream -> pretrainer (encoder + decoder + objective) -> AdamW, on an
Ignite ``Engine``, with AMP, gradient accumulation and clipping, EMA, DDP, logs and checkpoints.

Under DDP on CUDA every BatchNorm layer of the pretrainer (the ResNet encoder's, the contrastive
projection heads') becomes a ``torch.nn.SyncBatchNorm`` (``train.sync_batchnorm``, on by default;
:func:`volpre.engine.distributed.sync_batchnorm`), and the checkpoint records it
(``sync_batchnorm``). CPU processes (gloo) keep per-process BatchNorm, with a log line.

One Ignite iteration is one optimiser step over ``train.grad_accum`` micro-batches. The
learning rate follows a linear warmup over ``train.warmup_steps`` and a cosine decay to
``train.min_lr`` at ``train.total_steps``; ``max_steps`` only says where this invocation stops,
so a run stopped at step 20 and resumed to 40 follows the very schedule, crops, masks and losses
of an uninterrupted 40-step run (on the same hardware, world size and data: a resume on other
data is refused unless ``new_data``, see :mod:`volpre.engine.provenance`).

A non-finite loss (or gradient norm, or weights) stops the run with :class:`DivergenceError`,
without writing a checkpoint, so the last checkpoint on disk is the last finite one. The check
costs no host sync of its own: each step updates a flag on the device, read at log and checkpoint
steps, where the step's values reach the host anyway.

With a ``probe`` config section, rank 0 probes the encoder's frozen features at step 0 and every
``probe.every`` steps through a :class:`Probe` that the caller supplies (``volpre pretrain`` passes
``volpre.evaluate.probe.TrainingProbe``; the engine does not import the evaluation layer). A probe
draws no training random numbers (the RNG states are restored around it) and leaves the model's
modes as they were, so a run with probes trains exactly as one without.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from volpre.config import RunConfig, config_from_dict
from volpre.data.cache import CachedCrops, VolumeCache, cache_dir_for
from volpre.data.dataset import BadEntryLog, InfiniteShardSampler, PretrainDataset, crop_loader
from volpre.data.manifest import ManifestError, load_manifest
from volpre.data.nnunet_plan import NNUNetPlan, resolve_run_config
from volpre.data.transforms import CropWindow
from volpre.engine.batches import DevicePrefetcher, StepBatches
from volpre.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    load_checkpoint,
    newest_readable,
    restore_rng,
)
from volpre.engine.distributed import DistContext, setup_distributed, sync_batchnorm, teardown_distributed
from volpre.engine.ema import build_ema, update_ema
from volpre.engine.logging import RunLogger
from volpre.engine.provenance import RunData, compare, describe_splits
from volpre.errors import UserInputError
from volpre.files import file_sha256
from volpre.objectives import build_items, build_pretrainer, check_items_fit_objective
from volpre.versions import installed_versions

log = logging.getLogger(__name__)

RESUME_SAFE_KEYS = (
    "train.log_every",
    "train.image_every",
    "train.checkpoint_every",
    "train.keep_last",
    "data.num_workers",
    "data.cache_dir",
    "probe.every",
)
"""Config keys that may change when resuming; any other change would break exact resume."""


def _no_mark(_phase: str) -> None:
    """The training step's phase clock when nobody times it."""


class DivergenceError(UserInputError, RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite: the run stopped unsaved."""


@dataclass
class PretrainResult:
    output: Path
    final_step: int
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    """The loss of each step this invocation ran (rank 0)."""
    bad_entries: list[dict] = field(default_factory=list)
    samples_per_s: float = 0.0
    data_wait_fraction: float = 0.0
    peak_memory_bytes: int = 0
    probes: list[dict] = field(default_factory=list)
    """Each probe this invocation ran (rank 0): ``{"step": s, "probe/<metric>": value, ...}``."""


class Probe(Protocol):
    """A frozen-feature probe of an encoder, built once per run on rank 0 (see ``volpre.evaluate.probe``)."""

    metric: str
    """The headline score's name (higher is better; ``train.best_by: probe`` ranks checkpoints by it)."""

    def __call__(self, encoder: torch.nn.Module) -> dict[str, float]:
        """Scores of ``encoder`` (its modes restored afterwards), the headline under :attr:`metric`."""


ProbeFactory = Callable[[RunConfig, torch.device], Probe]
"""Builds the run's probe from its config on a device (``volpre.evaluate.probe.TrainingProbe``)."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate after ``step`` optimiser steps: linear warmup, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


NO_WEIGHT_DECAY_NAMES = ("relative_position_bias_table", "mask_token")
"""Parameter names (substrings) never decayed, whatever their shape: Swin's relative position bias
tables (Swin's ``no_weight_decay_keywords``) and mask tokens (SimMIM's ``no_weight_decay``, SparK's
``mask_tokens``)."""


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Whether AdamW decays parameter ``name``: not biases, norm weights or other 1D parameters (Swin's,
    SimMIM's and SparK's rule ``ndim == 1 or name.endswith('.bias')``), nor :data:`NO_WEIGHT_DECAY_NAMES`."""
    return p.ndim > 1 and not name.endswith("bias") and not any(key in name for key in NO_WEIGHT_DECAY_NAMES)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: ``weight_decay`` on the parameters :func:`decays` names, 0 on the others."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def resumed_config(saved: dict, requested: RunConfig | None) -> RunConfig:
    """The checkpoint's config, with only :data:`RESUME_SAFE_KEYS` taken from ``requested``."""
    if requested is None:
        return config_from_dict(saved)
    new = requested.to_dict()
    changed = _changed_keys(config_from_dict(saved).to_dict(), new)  # keys added since then at their defaults
    unsafe = [k for k in changed if k not in RESUME_SAFE_KEYS]
    if unsafe:
        raise CheckpointError(
            "--resume continues the checkpoint's run exactly, but these config keys differ from it: "
            f"{', '.join(unsafe)} (only {', '.join(RESUME_SAFE_KEYS)} may change on resume)"
        )
    return requested


class StopRequest:
    """SIGTERM/SIGINT -> stop after the current step, checkpointed, on every rank together.

    The signal handler only sets a flag. One process acts on it at once; several processes
    compare flags (all-reduce MAX) at log steps, so every rank stops at the same step.
    """

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device
        self.signal: int | None = None

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    @contextlib.contextmanager
    def handling_signals(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, at_log_step: bool) -> bool:
        """Whether every rank should stop now (collective at log steps when distributed)."""
        if self.world_size == 1:
            return self.signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Pretraining:
    """Everything one process needs for a pretraining run; :meth:`run` drives it."""

    def __init__(self, cfg: RunConfig, manifest_path: Path, output: Path, ctx: DistContext,
                 resume: bool = False, splits: tuple[str, ...] | None = None,
                 init: tuple[Path, str] | None = None, new_data: bool = False,
                 probe_factory: ProbeFactory | None = None):
        """``splits``: the manifest splits to train on (None: every entry; on resume, None means the
        checkpoint's). ``init``: ``(PATH, FORMAT)`` of weights to start the encoder from. ``new_data``:
        with ``resume``, continue even if the data differ from the run's. ``probe_factory``: builds
        the probe a ``probe`` config section asks for.

        Long because building a run is a sequence that must stay in this order (config and resume
        checks, data, model, optimiser, schedule, EMA, DDP, checkpoints, probe), each step a few
        lines.
        """
        self.ctx, self.output = ctx, Path(output)
        self.checkpoints = CheckpointManager(self.output / "checkpoints", keep_last=1)
        if new_data and not resume:
            raise ValueError("--new-data continues a run on changed data: it needs --resume")
        if ctx.is_main:
            self.checkpoints.remove_stale_temporaries()
        saved = None
        if resume:
            saved = self._load_for_resume()
            cfg = resumed_config(saved["config"], cfg)
            if saved["world_size"] != ctx.world_size:
                raise CheckpointError(
                    f"--resume: the checkpoint was written by {saved['world_size']} processes, this run has "
                    f"{ctx.world_size}; exact resume needs the same number"
                )
        elif self.checkpoints.holds_a_run():
            raise CheckpointError(
                f"{self.output} already holds a run ({self.checkpoints.folder}); pass --resume to continue it, "
                "or choose another --output"
            )
        self.cfg = cfg
        # the nnunet encoder's plan decides its preprocessing; the checkpoint keeps a copy for export
        self.plan = NNUNetPlan.load(cfg.model.nnunet) if cfg.model.encoder == "nnunet" else None
        if saved is not None and self.plan is not None and saved.get("nnunet_plans") != self.plan.plans:
            raise CheckpointError(
                f"--resume: the nnU-Net plans {self.plan.source} differ from those the run started with (kept in "
                f"{self.checkpoints.last}); exact resume needs the same plans"
            )
        self.checkpoints.keep_last = cfg.train.keep_last
        self.manifest_path = Path(manifest_path)
        manifest = load_manifest(self.manifest_path)
        saved_data = saved.get("data") if saved is not None else None
        if splits is None and saved_data is not None:
            splits = None if saved_data["splits"] is None else tuple(saved_data["splits"])
        entries = manifest.select_splits(splits)  # an unknown split is an error naming the manifest's splits
        if not entries:
            raise ManifestError(f"manifest {manifest_path}: no entries to pretrain on")
        self.data = RunData.of(self.manifest_path, file_sha256(self.manifest_path), entries, splits)
        self.data_history, self.data_event = self._data_history(saved, new_data)
        self.groups = build_items(cfg, entries)
        for warning in check_items_fit_objective(cfg, self.groups, str(manifest_path), ctx.world_size):
            if ctx.is_main:
                log.warning(warning)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.module = build_pretrainer(cfg)
        self.init = None
        if init is not None:
            if saved is not None:
                raise CheckpointError("--init starts a new run from other weights; --resume continues this run's own")
            self.init = _initialise_encoder(self.module.encoder, cfg, *init)
        self.module = self.module.to(ctx.device)
        self.module, self.sync_batchnorm = sync_batchnorm(self.module, ctx, cfg.train.sync_batchnorm)
        """Whether this run's BatchNorm layers reduce their statistics across ranks (train.sync_batchnorm)."""
        if cfg.train.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last_3d)
        self.ema = None
        if cfg.train.ema_decay > 0:
            self.ema = build_ema(self.module, ctx.device)
        # self.model is what the step calls (DDP and/or compiled); self.ddp keeps the DDP wrapper itself,
        # whose no_sync() skips the all-reduce of non-final micro-batches even when compile wraps it
        self.model: torch.nn.Module = self.module
        self.ddp: DistributedDataParallel | None = None
        if ctx.world_size > 1:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = self.ddp = DistributedDataParallel(self.module, device_ids=ids)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, cfg.train.weight_decay), lr=cfg.train.lr,
                                           betas=(0.9, 0.95))
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.total_steps, t.lr, t.min_lr) / t.lr)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=t.amp == "fp16")
        if ctx.device.type == "cpu" and t.amp == "bf16" and ctx.is_main:
            log.warning("train.amp=bf16 on the CPU: PyTorch's CPU bf16 kernels gave intermittent non-finite gradients "
                        "in volpre's tests (MONAI's UnetResBlock on small maps), which stop the run as divergence; "
                        "the -tiny CPU profiles use train.amp=none")
        self.generator = torch.Generator(device=ctx.device)
        torch.manual_seed(t.seed + 1 + ctx.rank)
        np.random.seed((t.seed + 1 + ctx.rank) % 2**32)
        self.generator.manual_seed(t.seed + 10_000 + ctx.rank)

        self.step, self.best_loss, self.best_probe = 0, math.inf, -math.inf
        if saved is not None:
            self._restore(saved)
        self.last_saved_step = self.step if saved is not None else None
        # first step whose loss (or gradient norm) was not finite, 0 while all were: kept on the device
        self._first_nonfinite = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self.probe = self._build_probe(probe_factory)

    def _build_probe(self, probe_factory: ProbeFactory | None) -> Probe | None:
        """Rank 0's probe (None elsewhere, or without ``probe.manifest``); a failure stops every rank."""
        if self.cfg.probe.manifest is None:
            return None
        if probe_factory is None:
            raise ValueError("the config sets probe.manifest, but no probe_factory was given to pretrain(); pass "
                             "probe_factory=volpre.evaluate.probe.TrainingProbe (volpre pretrain does)")
        probe, error = None, None
        if self.ctx.is_main:
            try:
                probe = probe_factory(self.cfg, self.ctx.device)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = exc
        if self.ctx.world_size > 1:  # the other ranks wait here for rank 0 to read the probe's volumes
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and error is None:
                raise RuntimeError(f"rank 0 could not build the probe: {message[0]}")
        if error is not None:
            raise error
        return probe

    # ------------------------------------------------------------------ resume

    def _load_for_resume(self) -> dict[str, Any]:
        """last.pt, or the newest readable step_*.pt when last.pt is missing, unreadable or damaged."""
        last = self.checkpoints.last
        if not self.checkpoints.holds_a_run():
            raise CheckpointError(f"--resume: no checkpoint to resume at {last}")
        try:
            return load_checkpoint(last, suggest_fallback=False)
        except CheckpointError as error:
            found = newest_readable(self.checkpoints.folder, exclude=last if last.exists() else None)
            if found is None:
                raise CheckpointError(f"--resume: {error}; there is no readable checkpoint to fall back to") from error
            if self.ctx.is_main:
                log.warning("--resume: %s; resuming from %s (step %d), the newest readable checkpoint, instead",
                            error, found.path, found.step)
            return found.state

    def _data_history(self, saved: dict | None, new_data: bool) -> tuple[list[dict[str, Any]], dict | None]:
        """The checkpoint's data history extended for this invocation, and the metrics.jsonl event of a
        change of data (None if none); refuses changed data unless ``new_data``."""
        if saved is None:
            return [self.data.history_record(0, new_data=False)], None
        step = int(saved["step"])
        recorded = saved.get("data")
        if recorded is None:
            raise CheckpointError(
                "--resume: the checkpoint does not record which entries it was trained on, so an exact resume "
                "cannot be checked; pass --new-data to continue anyway (no longer an exact resume)"
            )
        history = list(recorded["history"])
        change = compare(recorded, self.data)
        if change:
            if not new_data:
                raise CheckpointError(
                    f"--resume: the data differ from those the run was trained on: {change.describe()}. "
                    "--resume continues a run exactly only on its own data; pass --new-data to continue on these "
                    "(no longer an exact resume; recorded in metrics.jsonl and the checkpoints)"
                )
            if self.ctx.is_main:
                log.warning("--resume --new-data: continuing at step %d on other data: %s; from here on the run is "
                            "not what an uninterrupted run would have been", step, change.describe())
            history.append(self.data.history_record(step, new_data=True, change=change))
            event = {"event": "new_data", "step": step, "manifest": self.data.manifest,
                     "splits": describe_splits(self.data.splits), "entries": len(self.data.entries),
                     "added": change.added, "removed": change.removed, "changed": change.changed,
                     "reordered": change.reordered, "exact_resume": False}
            return history, event
        if history and history[-1]["manifest"] != self.data.manifest:
            log.info("--resume: the manifest file is now %s (sha256 %s); the entries trained on are the same",
                     self.data.manifest["path"], self.data.manifest["sha256"])
            history.append(self.data.history_record(step, new_data=False))
        return history, None

    # ------------------------------------------------------------------ state

    def _restore(self, saved: dict) -> None:
        self.module.load_state_dict(saved["model"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"], strict=True)
        restore_rng(saved["rng"][self.ctx.rank], self.generator)
        self.step, self.best_loss = int(saved["step"]), float(saved["best_loss"])
        self.best_probe = float(saved.get("best_probe", -math.inf))

    @property
    def items_per_step(self) -> int:
        return self.cfg.train.grad_accum * self.cfg.data.batch_size

    def state_dict(self, rng_all_ranks: list) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_all_ranks,
            "step": self.step,
            "items_seen": self.step * self.items_per_step,
            "world_size": self.ctx.world_size,
            "sync_batchnorm": self.sync_batchnorm,
            "best_loss": self.best_loss,
            "best_probe": self.best_probe,
            "config": self.cfg.to_dict(),
            "encoder": self.cfg.model.encoder,
            "versions": installed_versions(),
            "manifest": self.data.manifest,
            "data": self.data.record(self.data_history),
            "nnunet_plans": None if self.plan is None else self.plan.plans,
            "init": self.init,
        }

    def _gather_rng(self) -> list:
        state = capture_rng(self.generator)
        if self.ctx.world_size == 1:
            return [state]
        gathered: list = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    # ------------------------------------------------------------------ data

    def step_batches(self) -> StepBatches:
        """The run's crop stream, from this step on: per step, ``grad_accum`` micro-batches on the device."""
        cfg, ctx = self.cfg, self.ctx
        bad_log = BadEntryLog(self.output / "bad_entries.jsonl")
        # preprocessed once per volume into the node's shared cache (built on first use), crops read from it
        cache = VolumeCache.create(cache_dir_for(cfg.data, self.manifest_path), cfg.preprocess, self.plan)
        dataset = PretrainDataset(self.groups, cfg.preprocess, cfg.data, cfg.train.seed,
                                  crops=CachedCrops(cache, cfg.data), bad_entries=bad_log)
        sampler = InfiniteShardSampler(len(self.groups), cfg.train.seed, ctx.rank, ctx.world_size,
                                       start=self.step * self.items_per_step)
        loader = crop_loader(dataset, sampler, cfg.data, pin_memory=ctx.device.type == "cuda",
                             processes_per_node=ctx.processes_per_node)
        window = CropWindow(cfg.preprocess, self.groups.modality_classes, windowed=self.plan is None)
        return StepBatches(DevicePrefetcher(iter(loader), ctx.device, cfg.train.channels_last, window),
                           cfg.train.grad_accum)

    # ------------------------------------------------------------------ step

    def train_step(self, micro_batches: list[dict], mark: Callable[[str], None] | None = None) -> dict[str, Any]:
        """One optimiser step over ``grad_accum`` micro-batches already on the device.

        ``mark`` (``volpre bench step``'s clock) is called with the name of each phase as it ends:
        ``"forward"`` (the draws and the forward of a micro-batch), ``"backward"`` (its backward),
        then once ``"optimizer"`` (clipping, the optimiser and scheduler steps, EMA). Returns
        ``{"values": {name: 0-dim tensor}, "lr": float, "images": {name: tensor}}``.
        """
        mark = mark or _no_mark
        t = self.cfg.train
        self.model.train()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        n = len(micro_batches)
        loss_sum, parts_sum, images = None, {}, {}
        want_images = self.ctx.is_main and (self.step + 1) % t.image_every == 0
        for i, batch in enumerate(micro_batches):
            # gradients of non-final micro-batches stay local (no all-reduce); the final one reduces them all
            sync = self.ddp is None or i == n - 1
            # the step's random numbers are drawn eagerly, outside the (compiled) model
            draws = self.module.draw(batch, self.generator)
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = self.model(batch, draws)
                mark("forward")
                self.scaler.scale(out.loss / n).backward()
                mark("backward")
            loss = out.loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            for k, v in out.parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v.detach().float()
            if want_images and i == n - 1:
                images = out.images
        grad_norm = None
        if t.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), t.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:  # updated once per step, so the first update is step 0's
            update_ema(self.ema, self.module, t.ema_decay, first=self.step == 0)
        mark("optimizer")
        self.step += 1
        values = {"loss": loss_sum / n, **{f"loss.{k}": v / n for k, v in parts_sum.items()}}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm.detach().float()
        if self.ctx.world_size > 1:  # mean over ranks: a device op, no host sync
            keys = list(values)
            stacked = torch.stack([values[k] for k in keys])
            dist.all_reduce(stacked)
            values = dict(zip(keys, stacked / self.ctx.world_size))
        self._track_nonfinite(values)
        return {"values": values, "lr": lr, "images": images}

    def _track_nonfinite(self, values: dict[str, torch.Tensor]) -> None:
        """Remember (on the device, no sync) the first step whose loss or gradient norm is not finite.

        Under fp16 an infinite gradient norm is the GradScaler's business (it skips that step and
        lowers the scale), so only the loss counts there. The values are the mean over ranks, so
        every rank sees the same flag and stops at the same step.
        """
        checked = [values["loss"]]
        if "grad_norm" in values and self.cfg.train.amp != "fp16":
            checked.append(values["grad_norm"])
        bad = ~torch.isfinite(torch.stack(checked)).all()
        self._first_nonfinite.masked_fill_(bad & (self._first_nonfinite == 0), self.step)

    def _check_finite(self, checkpointing: bool) -> None:
        """Raise :class:`DivergenceError` if a step since the start went non-finite (one host sync), and
        before a checkpoint also if any weight or float buffer is NaN/Inf."""
        first = int(self._first_nonfinite)
        problem = None
        if first:
            problem = f"the loss or gradient norm is not finite (NaN or Inf) since step {first}"
        elif checkpointing:
            tensors = [t for t in self.module.state_dict().values() if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
            if not bool(finite):
                problem = f"the weights hold NaN or Inf values after step {self.step}"
        if problem is None:
            return
        if self.last_saved_step is None:
            kept = "no checkpoint had been written"
        else:
            kept = (f"the last checkpoint, {self.checkpoints.folder / f'step_{self.last_saved_step:08d}.pt'} "
                    f"(step {self.last_saved_step}, also last.pt), is from before")
        raise DivergenceError(
            f"the run diverged: {problem}; it stopped at step {self.step} without writing a checkpoint, and "
            f"{kept}. Start again with a lower train.lr or a longer train.warmup_steps (see metrics.jsonl)"
        )

    # ------------------------------------------------------------------ run

    def run(self, max_steps: int) -> PretrainResult:
        """Train from the current step up to ``max_steps`` (nothing to do if already there).

        SIGTERM (preemption) or SIGINT stops the run after the current step with a checkpoint:
        at once in one process; under DDP at the next ``log_every`` boundary, where the ranks
        agree (one all-reduce) and stop together.

        Long because it sets up the Ignite engine and holds its one per-step handler, whose order
        matters (record the loss, probe, log, flush, agree on a stop, check for divergence,
        checkpoint, stop); the pieces it calls (``_flush``, ``_run_probe``, ``_checkpoint``) follow it.
        """
        cfg, ctx = self.cfg, self.ctx
        result = PretrainResult(output=self.output, final_step=self.step, checkpoint=None)
        if max_steps <= self.step:
            log.warning("the run in %s is already at step %d (--max-steps %d): nothing to do",
                        self.output, self.step, max_steps)
            return result
        logger = None
        if ctx.is_main:
            metrics = self.output / "metrics.jsonl"
            if self.step == 0 and metrics.exists() and metrics.stat().st_size > 0:
                log.warning("%s holds the log of a run that wrote no checkpoint; starting over", metrics)
            logger = RunLogger(self.output, purge_step=self.step)  # drops what was logged after the checkpoint
            if self.data_event is not None:
                logger.add_event(self.data_event)
        batches = self.step_batches()
        window = {"start": time.perf_counter(), "wait": 0.0, "steps": 0}
        checkpoint_window: list[torch.Tensor] = []
        samples_per_step = self.items_per_step * cfg.data.crops_per_volume * ctx.world_size

        engine = Engine(lambda _engine, group: self.train_step(group))
        # Ignite logs every exception leaving the run twice at ERROR; it leaves engine.run and the command
        # reports it once (one line for a user's error, a traceback for a bug)
        engine.logger = logging.getLogger(f"{__name__}.ignite")
        engine.logger.setLevel(logging.CRITICAL)
        engine.load_state_dict({"iteration": self.step, "epoch_length": max_steps, "max_epochs": 1})
        stop = StopRequest(ctx.world_size, ctx.device)
        probing = cfg.probe.manifest is not None
        if probing and self.step == 0:  # the random-initialisation baseline of this very run
            values, _ = self._run_probe(window, result)
            if logger is not None:
                logger.write_record(0, values)

        @engine.on(Events.ITERATION_COMPLETED)
        def record(engine: Engine) -> None:
            out = engine.state.output
            window["wait"] += batches.last_wait_s
            window["steps"] += 1
            checkpoint_window.append(out["values"]["loss"])
            probe_values, probe_improved = {}, False
            if probing and self.step % cfg.probe.every == 0:
                probe_values, headline = self._run_probe(window, result)
                probe_improved = headline > self.best_probe  # False for NaN
                if probe_improved:
                    self.best_probe = headline
            if logger is not None:
                logger.add_step(self.step, out["values"], {"lr": out["lr"], **probe_values})
                if out["images"]:
                    logger.add_images(self.step, out["images"])
            at_log_step = self.step % cfg.train.log_every == 0 or self.step == max_steps
            if at_log_step:
                self._flush(logger, window, samples_per_step, result)
            stopping = stop.agreed(at_log_step)
            best_by_probe = cfg.train.best_by == "probe"
            checkpointing = (self.step % cfg.train.checkpoint_every == 0 or self.step == max_steps or stopping
                             or (best_by_probe and probe_improved))
            if at_log_step or checkpointing:
                self._check_finite(checkpointing)
            if checkpointing:
                self._checkpoint(checkpoint_window, result, probe_is_best=probe_improved if best_by_probe else None)
            if stopping:
                log.warning("stopping at step %d on signal %s; resume with --resume", self.step, stop.signal)
                if not at_log_step:
                    self._flush(logger, window, samples_per_step, result)
                engine.terminate()

        if ctx.is_main and sys.stderr.isatty():
            from ignite.handlers import ProgressBar

            ProgressBar(persist=True).attach(engine, output_transform=lambda out: {"loss": out["values"]["loss"]})

        try:
            with stop.handling_signals():
                engine.run(batches, max_epochs=1, epoch_length=max_steps)
        finally:
            if logger is not None:
                logger.close()  # the steps logged up to a failure (a divergence: its NaN losses) are kept
        result.final_step = self.step
        result.bad_entries = BadEntryLog(self.output / "bad_entries.jsonl").read()
        if ctx.device.type == "cuda":
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(ctx.device)
        return result

    def _flush(self, logger: RunLogger | None, window: dict, samples_per_step: int, result: PretrainResult) -> None:
        elapsed = time.perf_counter() - window["start"]
        rates = {
            "samples_per_s": samples_per_step * window["steps"] / max(elapsed, 1e-9),
            "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
        }
        if self.ctx.device.type == "cuda":
            rates["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        if logger is not None:
            records = logger.flush(extra_for_last_step=rates)
            result.losses.extend(r["loss"] for r in records)
            if not sys.stderr.isatty():
                last = records[-1]
                print(f"step {last['step']}: loss {last['loss']:.4f} lr {last['lr']:.2e} "
                      f"{rates['samples_per_s']:.2f} samples/s, data wait {100 * rates['data_wait_fraction']:.0f}%",
                      file=sys.stderr, flush=True)
        result.samples_per_s, result.data_wait_fraction = rates["samples_per_s"], rates["data_wait_fraction"]
        window.update(start=time.perf_counter(), wait=0.0, steps=0)

    def _run_probe(self, window: dict, result: PretrainResult) -> tuple[dict[str, float], float]:
        """Rank 0 probes the encoder (and the EMA's); returns its ``probe/...`` values (empty on other
        ranks) and, on every rank, the headline metric of the encoder (a broadcast: the others wait there).

        The probe's time is left out of the throughput window; the RNG states are restored after it.
        """
        started = time.perf_counter()
        values: dict[str, float] = {}
        headline = torch.full((1,), math.nan, dtype=torch.float64, device=self.ctx.device)
        if self.probe is not None:
            rng = capture_rng(self.generator)
            try:
                scores = self.probe(self.module.encoder)
                values = {f"probe/{key}": value for key, value in scores.items()}
                if self.ema is not None:
                    values.update({f"probe/ema/{key}": value for key, value in self.probe(self.ema.module.encoder).items()})
            finally:
                restore_rng(rng, self.generator)
            headline.fill_(scores[self.probe.metric])
            result.probes.append({"step": self.step, **values})
        if self.ctx.world_size > 1:
            dist.broadcast(headline, src=0)
        window["start"] += time.perf_counter() - started
        return values, float(headline)

    def _checkpoint(self, checkpoint_window: list[torch.Tensor], result: PretrainResult,
                    probe_is_best: bool | None = None) -> None:
        """Write a checkpoint; ``best.pt`` too when it is the best by loss (``probe_is_best`` None:
        ``train.best_by: loss``) or when ``probe_is_best`` (``train.best_by: probe``)."""
        mean_loss = float(torch.stack(checkpoint_window).mean())
        checkpoint_window.clear()
        is_best = mean_loss < self.best_loss
        if is_best:
            self.best_loss = mean_loss
        if probe_is_best is not None:
            is_best = probe_is_best
        rng = self._gather_rng()  # a collective: every rank takes part
        if self.ctx.is_main:
            result.checkpoint = self.checkpoints.save(self.state_dict(rng), self.step, is_best)
        self.last_saved_step = self.step


def _initialise_encoder(encoder: torch.nn.Module, cfg: RunConfig, path: Path, fmt: str) -> dict[str, str]:
    """Load ``--init`` weights into the encoder strictly (:mod:`volpre.models.init_weights`); their record."""
    from volpre.models.weights import load_strictly
    from volpre.models.init_weights import read_init_state

    state, found, file = read_init_state(path, fmt)
    load_strictly(encoder, state, source=f"--init {file} ({found} layout)",
                  target=f"the run's {cfg.model.encoder} encoder (model section of the config)")
    log.info("encoder initialised from %s (%s layout)", file, found)
    return {"path": str(file.resolve()), "format": found, "sha256": file_sha256(file)}


def pretrain(cfg: RunConfig | None, manifest: Path, output: Path, max_steps: int | None = None,
             resume: bool = False, device: str | None = None, splits: tuple[str, ...] | None = None,
             init: tuple[Path, str] | None = None, new_data: bool = False,
             probe_factory: ProbeFactory | None = None) -> PretrainResult:
    """Run (or resume) pretraining; returns what rank 0 saw. ``cfg`` may be None only with ``resume``.

    ``splits``: manifest splits to train on (default every entry; on resume the checkpoint's).
    ``init``: ``(PATH, FORMAT)`` of weights to start the encoder from (``volpre.models.init_weights``).
    ``new_data``: with ``resume``, continue on data that differ from the checkpoint's (refused
    otherwise); no longer an exact resume, and recorded as such.
    ``probe_factory`` builds the probe a ``probe`` config section asks for (required then;
    ``volpre.evaluate.probe.TrainingProbe``).
    """
    ctx = setup_distributed(device)
    run = None
    try:
        if cfg is None and not resume:
            raise ValueError("a config is needed unless --resume takes it from the checkpoint")
        if cfg is not None:
            cfg = resolve_run_config(cfg)  # data.roi: null -> the nnU-Net plan's patch size
        run = Pretraining(cfg, manifest, output, ctx, resume=resume, splits=splits, init=init, new_data=new_data,
                          probe_factory=probe_factory)
        return run.run(max_steps if max_steps is not None else run.cfg.train.total_steps)
    finally:
        del run  # the DDP reducer must let go of the process group before teardown (see there)
        teardown_distributed(ctx)
