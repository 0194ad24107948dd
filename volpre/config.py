"""Run configuration: one typed schema, loaded from YAML, overridden with ``key=value``.

A run config has six sections, each a dataclass below:

- ``preprocess``: the deterministic part of the data pipeline (orientation, spacing,
  intensity normalisation, foreground crop). Its hash keys the preprocessed cache.
- ``data``: random crop sampling and loading (crop size, crops per volume, batch, workers,
  what to do with a bad entry).
- ``model``: the encoder (``swin``, ``resnet`` or ``nnunet``) and its pretraining decoder.
- ``objective``: ``dae`` (disruptive autoencoder), ``mvm`` (masked volume modeling), ``simclr``
  or ``micle`` (contrastive learning of augmented views, or of several scans of one subject).
- ``train``: optimiser, schedule, precision, checkpoints and logging.
- ``probe``: an optional frozen-feature probe of the encoder on a labelled manifest, run every
  few steps during pretraining (disabled unless ``probe.manifest`` is set).

Shipped configs live in ``volpre/configs/NAME.yaml``; a YAML file may name ``base: OTHER`` to
start from another config and change only some keys (the ``*-tiny`` CPU profiles do this).
Every key is checked: an unknown key or a bad value raises :class:`ConfigError` naming the
key and what is allowed. Every float must be finite; numeric fields also take numbers written
as text (``1e-4``, which YAML 1.1 leaves a string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from volpre.errors import UserInputError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(UserInputError, ValueError):
    """A config key is unknown or holds a value outside what is allowed."""


# ----------------------------------------------------------------------------- sections


@dataclass
class PreprocessConfig:
    """Deterministic, per-volume preprocessing (run once, then cached).

    CT is kept in Hounsfield units up to the crop and windowed after it (so the cache can hold
    int16 HU); MR is clipped to intensity percentiles and z-scored over the foreground.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    """Target voxel spacing in mm (RAS axes order)."""
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    """CT HU window: values are clipped to it and scaled linearly to [0, 1]."""
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    """MR intensities are clipped to these percentiles of the foreground, then z-scored."""
    crop_foreground: bool = True
    """Crop each volume to the bounding box of its foreground (CT: HU > -500; MR: > 0)."""

    def validate(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ConfigError(f"preprocess.spacing must be positive millimetres, got {list(self.spacing)}")
        lo, hi = self.ct_window
        if not lo < hi:
            raise ConfigError(f"preprocess.ct_window must be [low, high] with low < high, got {[lo, hi]}")
        plo, phi = self.mr_percentiles
        if not 0.0 <= plo < phi <= 100.0:
            raise ConfigError(
                f"preprocess.mr_percentiles must satisfy 0 <= low < high <= 100, got {[plo, phi]}"
            )


@dataclass
class DataConfig:
    """Random crops and loading."""

    roi: tuple[int, int, int] | None = (96, 96, 96)
    """Crop size in voxels (X, Y, Z). Swin and ResNet encoders need multiples of 32. ``null`` only with
    the ``nnunet`` encoder: the plan's patch size (in the plan's axis order)."""
    crops_per_volume: int = 2
    """Random crops drawn from each volume each time it is visited."""
    batch_size: int = 2
    """Dataset items (volumes) per micro-batch per process; each gives ``crops_per_volume`` crops, so a
    micro-batch holds ``batch_size * crops_per_volume`` crops and a step ``grad_accum`` micro-batches
    (the global batch is that times the world size)."""
    num_workers: int = 4
    """DataLoader worker processes per training process, at most its share of the node's CPUs
    (``volpre.data.dataset.loader_workers``)."""
    on_bad_entry: Literal["skip", "fail"] = "skip"
    """A volume that fails its checks mid-run: skip it and record it, or stop the run."""
    cache_dir: str | None = None
    """Where preprocessed volumes are cached (shared by all workers and ranks of a node);
    ``None`` means ``<manifest dir>/.volpre_cache``."""

    def validate(self) -> None:
        if self.roi is not None and any(r <= 0 for r in self.roi):
            raise ConfigError(f"data.roi must be positive voxel counts, got {list(self.roi)}")
        for key in ("crops_per_volume", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class SwinConfig:
    """SwinViT of MONAI's SwinUNETR (keys identical to ``SwinUNETR(...).swinViT``)."""

    feature_size: int = 48
    """Channels of the patch embedding; stage ``i`` has ``feature_size * 2**i`` (a multiple of 12)."""
    depths: tuple[int, ...] = (2, 2, 2, 2)
    """Swin blocks in each of the 4 stages."""
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    """Attention heads in each of the 4 stages (each must divide that stage's channels)."""
    window_size: int = 7
    """Edge of the cubic attention window, in tokens."""
    use_v2: bool = True
    """SwinUNETR-v2: a residual convolution block before each Swin stage."""
    use_checkpoint: bool = False
    """Gradient checkpointing (saves memory for 96^3+ crops at some speed)."""
    drop_path_rate: float = 0.0
    """Stochastic depth: drop-path probability rising linearly to this value over the blocks."""

    def validate(self) -> None:
        if self.feature_size < 12 or self.feature_size % 12 != 0:
            raise ConfigError(f"model.swin.feature_size must be a positive multiple of 12, got {self.feature_size}")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(
                f"model.swin.depths and model.swin.num_heads need 4 stages each, "
                f"got {list(self.depths)} and {list(self.num_heads)}"
            )
        if any(d < 1 for d in self.depths):
            raise ConfigError(f"model.swin.depths must be >= 1 in every stage, got {list(self.depths)}")
        for stage, heads in enumerate(self.num_heads):
            channels = self.feature_size * 2**stage
            if heads < 1 or channels % heads:
                raise ConfigError(
                    f"model.swin.num_heads[{stage}] must divide the stage's {channels} channels "
                    f"(feature_size * 2**{stage}), got {heads}"
                )
        if self.window_size < 1:
            raise ConfigError(f"model.swin.window_size must be >= 1, got {self.window_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.swin.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class ResNetConfig:
    """3D ResNet in MONAI's ``ResNetFeatures`` layout (keys of ``FlexibleUNet(...).encoder``)."""

    depth: Literal[10, 18, 34, 50] = 50
    """ResNet depth: ``resnet10``/``18``/``34`` (basic blocks) or ``resnet50`` (bottlenecks)."""


@dataclass
class NNUNetConfig:
    """The network nnU-Net v2 builds from a plans file (``volpre.models.nnunet``; needs ``volpre[nnunet]``).

    Pretraining then also preprocesses as the plan says (its target spacing and per-channel
    normalisation, ``volpre.data.nnunet_plan``), so pretraining and fine-tuning see the same intensities.
    """

    plans: str | None = None
    """The plans file ``nnUNetv2_plan_and_preprocess`` wrote (``nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json``);
    required with ``model.encoder: nnunet``."""
    configuration: str = "3d_fullres"
    """The plan's configuration whose network and preprocessing to use (a 3D one)."""


@dataclass
class ModelConfig:
    encoder: Literal["swin", "resnet", "nnunet"] = "swin"
    """Encoder family (the name in ``volpre.models.ENCODERS``); its section below sets its shape."""
    in_channels: int = 1
    """Input channels (1 for CT or a single MR sequence; more for stacked MR sequences)."""
    decoder_channels: int = 32
    """Width of the light pretraining decoder's finest stage (dropped at export); the stage at stride
    ``2**(i+1)`` has ``decoder_channels * 2**i`` channels. A multiple of 8 (GroupNorm with 8 groups).
    Not used by the ``nnunet`` encoder, which reconstructs through nnU-Net's own decoder."""
    swin: SwinConfig = field(default_factory=SwinConfig)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    nnunet: NNUNetConfig = field(default_factory=NNUNetConfig)

    def validate(self) -> None:
        if self.in_channels < 1:
            raise ConfigError(f"model.in_channels must be >= 1, got {self.in_channels}")
        if self.decoder_channels < 8 or self.decoder_channels % 8:
            raise ConfigError(f"model.decoder_channels must be a positive multiple of 8, got {self.decoder_channels}")


DAE_IMAGE_DISRUPTIONS = ("noise", "downsample", "blur", "block_mask")
"""Disruptions of the image itself, applied in the order ``objective.dae.disruptions`` lists them."""
DAE_DISRUPTIONS = (*DAE_IMAGE_DISRUPTIONS, "local_mask")
"""Every disruption name; ``local_mask`` acts on the patch embedding, after the image disruptions."""


@dataclass
class DAEConfig:
    """Disruptive autoencoder (Valanarasu et al. 2023): disrupt, reconstruct the clean crop, plus the
    cross-modal contrastive loss. The defaults are the paper's and its official code's combined
    recipe ("all"): noise of variance 0.1, downsampling by 4 (nearest), local masking of 60% of
    the embedding channels, L1 over all voxels, CMCL at weight 0.03 and temperature 0.5
    (:mod:`volpre.objectives.dae` lists where volpre follows and where it differs).
    """

    disruptions: tuple[Literal["noise", "downsample", "blur", "block_mask", "local_mask"], ...] = (
        "noise",
        "downsample",
        "local_mask",
    )
    """Disruptions, each at most once: the image disruptions (``noise``, ``downsample``, and volpre's
    variations ``blur`` and ``block_mask``) in the order listed, then ``local_mask`` (which must come
    last: it zeroes channels of the patch embedding inside the encoder)."""
    noise_variance: tuple[float, float] = (0.1, 0.1)
    """Additive Gaussian noise: variance drawn uniformly from this range per crop (equal ends: fixed,
    as the official code's ``--variance 0.1``)."""
    downsample_factors: tuple[int, ...] = (4,)
    """Downsample then upsample back by one of these factors, drawn per crop (official: 4)."""
    downsample_mode: Literal["nearest", "area"] = "nearest"
    """``nearest``: nearest-neighbour down and up (``F.interpolate``'s default, as the official code);
    ``area`` (volpre's variation): average pooling down, trilinear up."""
    local_mask_ratio: float = 0.6
    """Local masking: share of each crop's patch-embedding channels zeroed, at every token
    (``floor(ratio * channels)`` of them, as the official code's ``int(0.6 * C)``)."""
    block_mask_ratio: float = 0.5
    """``block_mask`` (volpre's variation): share of the crop's cubic voxel blocks set to zero
    (exactly ``round(ratio * blocks)`` per crop)."""
    block_mask_size: int = 16
    """``block_mask``: edge of a masked cubic block, in voxels (must divide the crop size)."""
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    """``blur`` (volpre's variation): Gaussian blur sigma in voxels, drawn uniformly per crop."""
    loss: Literal["l1", "l2"] = "l1"
    """Reconstruction loss over all voxels of the clean crop (official: L1, ``all_img``)."""
    cmcl_weight: float = 0.03
    """Weight of the cross-modal contrastive loss (official ``--mm_con 0.03``; 0 disables it)."""
    cmcl_temperature: float = 0.5
    """Temperature of the cross-modal contrastive loss (official ``--temperature 0.5``)."""

    def validate(self) -> None:
        if not self.disruptions:
            raise ConfigError(f"objective.dae.disruptions must name at least one of {', '.join(DAE_DISRUPTIONS)}")
        if len(set(self.disruptions)) != len(self.disruptions):
            raise ConfigError(f"objective.dae.disruptions names a disruption twice: {list(self.disruptions)}")
        if "local_mask" in self.disruptions and self.disruptions[-1] != "local_mask":
            raise ConfigError(
                "objective.dae.disruptions must list local_mask last (it masks the patch embedding, after the "
                f"image disruptions), got {list(self.disruptions)}"
            )
        for key in ("local_mask_ratio", "block_mask_ratio"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"objective.dae.{key} must be in (0, 1), got {getattr(self, key)}")
        if self.block_mask_size < 1:
            raise ConfigError(f"objective.dae.block_mask_size must be >= 1 voxel, got {self.block_mask_size}")
        lo, hi = self.noise_variance
        if not 0.0 <= lo <= hi:
            raise ConfigError(
                f"objective.dae.noise_variance must be [low, high] with 0 <= low <= high, got {[lo, hi]}"
            )
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ConfigError(f"objective.dae.blur_sigma must be [low, high] with 0 < low <= high, got {[lo, hi]}")
        if not self.downsample_factors or any(f not in (2, 4) for f in self.downsample_factors):
            raise ConfigError(
                f"objective.dae.downsample_factors allows 2 and 4 (at least one), got {list(self.downsample_factors)}"
            )
        if len(set(self.downsample_factors)) != len(self.downsample_factors):
            raise ConfigError(
                f"objective.dae.downsample_factors names a factor twice: {list(self.downsample_factors)}"
            )
        if self.cmcl_weight < 0:
            raise ConfigError(f"objective.dae.cmcl_weight must be >= 0, got {self.cmcl_weight}")
        if self.cmcl_temperature <= 0:
            raise ConfigError(f"objective.dae.cmcl_temperature must be > 0, got {self.cmcl_temperature}")


@dataclass
class MVMConfig:
    """Masked volume modeling: SimMIM for Swin, SparK for the ResNet.

    The dataclass defaults are SimMIM's (raw target, L1); ``resnet-mvm`` sets SparK's
    (``norm_target: true``, ``loss: l2``, ``resnet_densify: spark``).
    """

    mask_ratio: float = 0.6
    """Fraction of the crop's patches masked (exactly ``round(ratio * patches)`` per sample)."""
    mask_patch: int | None = 16
    """Edge of a masked cubic patch, in voxels (Swin: a multiple of 2; ResNet: a multiple of 32; nnU-Net: a
    multiple of the encoder's total stride on every axis). ``null`` only with the ``nnunet`` encoder: one
    cell per position of its deepest feature map (its total stride on each axis, SparK's choice)."""
    norm_target: bool = False
    """Normalise each target patch to zero mean and unit variance, as MAE and SparK do (SimMIM
    predicts the raw voxels)."""
    loss: Literal["l1", "l2"] = "l1"
    """Reconstruction loss, over masked voxels only (SimMIM: L1; SparK: L2)."""
    resnet_densify: Literal["spark", "embedding"] = "spark"
    """ResNet only (the Swin SimMIM variant has one way): ``spark`` fills and decodes as SparK does
    (per scale: masked BatchNorm, the mask token in empty positions, a projection convolution, then
    SparK's light hierarchical decoder); ``embedding`` (volpre's variation) fills masked positions of
    each of the five maps with a learned per-level embedding and decodes with ``model``'s UNet decoder."""

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mvm.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch is not None and self.mask_patch < 1:
            raise ConfigError(f"objective.mvm.mask_patch must be >= 1 voxel, got {self.mask_patch}")


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al. 2020): two augmented views of every crop, a projection head, NT-Xent.

    The defaults are the paper's ImageNet recipe in its official code (google-research/simclr)
    where a 3D grayscale analogue exists; the ``-tiny`` profiles take the official CIFAR-10 recipe
    (temperature 0.5, colour strength 0.5, no blur) for their small crops and batches.
    ``volpre.objectives.contrastive`` lists each number and each deviation.
    Views are made on the training device by ``volpre.objectives.views``, in this order: random
    resized crop of the crop with random flips, intensity jitter, Gaussian blur, Gaussian noise.
    """

    SECTION = "objective.simclr"

    views_per_crop: int = 2
    """Augmented views made of each crop per step (SimCLR: 2)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: the view covers a sub-box of the crop holding this fraction of its volume,
    drawn uniformly per view (SimCLR: area fraction [0.08, 1]), resized back to ``data.roi``."""
    crop_aspect: tuple[float, float] = (0.75, 4.0 / 3.0)
    """Random resized crop: range of the side ratios of the sub-box (SimCLR: [3/4, 4/3]); with a
    range ``[1/a, a]`` every ratio of two of its three sides lies in it."""
    flip_axes: tuple[int, ...] = (0, 1, 2)
    """Axes (0, 1, 2 = X, Y, Z of the RAS volume) each flipped with probability 1/2 (SimCLR flips
    2D images horizontally; we flip every listed axis)."""
    jitter_probability: float = 0.8
    """Probability of the intensity jitter (brightness and contrast) per view (SimCLR's colour jitter: 0.8)."""
    brightness: float = 0.8
    """Jitter: add a shift uniform in ``[-brightness, brightness]`` (SimCLR: 0.8 * colour strength s,
    s = 1 for ImageNet, 0.5 for CIFAR-10)."""
    contrast: float = 0.8
    """Jitter: scale deviations from each channel's mean by a factor uniform in ``[1 - contrast,
    1 + contrast]`` (SimCLR: 0.8 * s)."""
    blur_probability: float = 0.5
    """Probability of a Gaussian blur per view (SimCLR: 0.5 on ImageNet, none on CIFAR-10)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Blur sigma in voxels, uniform per view (SimCLR: [0.1, 2.0] pixels)."""
    noise_std: tuple[float, float] = (0.0, 0.0)
    """Additive Gaussian noise, std uniform in this range per view (ours, not SimCLR's; [0, 0] = off)."""
    projection_layers: int = 2
    """Linear layers of the projection head, each followed by BatchNorm, ReLU between them (SimCLR: 2)."""
    projection_dim: int = 128
    """Output width of the projection head (SimCLR: 128); hidden layers keep the encoder's deepest width."""
    temperature: float = 0.1
    """NT-Xent temperature (SimCLR: 0.1 on ImageNet with batches of 4096, 0.5 on CIFAR-10 with 512)."""
    reconstruction_weight: float = 0.0
    """Weight of an L1 term in which the pretraining decoder restores each view's un-jittered,
    un-blurred, noise-free crop (ours; 0 disables it and no decoder is built)."""

    def validate(self) -> None:
        key = self.SECTION
        if self.views_per_crop < 1:
            raise ConfigError(f"{key}.views_per_crop must be >= 1, got {self.views_per_crop}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"{key}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {[lo, hi]}")
        lo, hi = self.crop_aspect
        if not 0.0 < lo <= 1.0 <= hi:
            raise ConfigError(f"{key}.crop_aspect must be [low, high] with 0 < low <= 1 <= high, got {[lo, hi]}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ConfigError(f"{key}.flip_axes must list distinct axes among 0, 1, 2, got {list(self.flip_axes)}")
        for name in ("jitter_probability", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.brightness < 0:
            raise ConfigError(f"{key}.brightness must be >= 0, got {self.brightness}")
        if not 0.0 <= self.contrast < 1.0:
            raise ConfigError(f"{key}.contrast must be in [0, 1), got {self.contrast}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ConfigError(f"{key}.blur_sigma must be [low, high] with 0 < low <= high, got {[lo, hi]}")
        lo, hi = self.noise_std
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"{key}.noise_std must be [low, high] with 0 <= low <= high, got {[lo, hi]}")
        if self.projection_layers < 1:
            raise ConfigError(f"{key}.projection_layers must be >= 1, got {self.projection_layers}")
        if self.projection_dim < 1:
            raise ConfigError(f"{key}.projection_dim must be >= 1, got {self.projection_dim}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature must be > 0, got {self.temperature}")
        if self.reconstruction_weight < 0:
            raise ConfigError(f"{key}.reconstruction_weight must be >= 0, got {self.reconstruction_weight}")


@dataclass
class MICLeConfig(SimCLRConfig):
    """MICLe (Azizi et al. 2021): SimCLR whose positives are crops of several scans of one subject.

    Each dataset item holds the scans of one subject (of one modality class, ``modality`` refined by
    ``sequence``, unless ``positives_across_modalities``); its ``data.crops_per_volume`` crops come from that many
    distinct scans when the item has them, and each crop gives ``views_per_crop`` augmented views
    (MICLe: one view of each of two images of the patient).
    """

    SECTION = "objective.micle"

    views_per_crop: int = 1
    """Augmented views of each crop (MICLe: 1, the positive pair being crops of two distinct scans;
    a subject with one scan gets its pair from two crops of that scan)."""
    positives_across_modalities: bool = False
    """False: a subject's scans of one modality class are positives of each other, its scans of another
    class neither positives nor negatives (ours: MICLe's images of a patient are all of one kind).
    True: every scan of the subject is a positive (a CT and an MR of one patient too)."""


@dataclass
class ObjectiveConfig:
    name: Literal["dae", "mvm", "simclr", "micle"] = "dae"
    """Pretraining objective: disruptive autoencoder (``dae``), masked volume modeling (``mvm``),
    contrastive learning of augmented views (``simclr``) or of several scans of one subject (``micle``)."""
    dae: DAEConfig = field(default_factory=DAEConfig)
    mvm: MVMConfig = field(default_factory=MVMConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    micle: MICLeConfig = field(default_factory=MICLeConfig)


@dataclass
class TrainConfig:
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    total_steps: int = 100_000
    """Length of the schedule: linear warmup, then cosine decay to ``min_lr`` at this step.
    ``volpre pretrain --max-steps N`` may stop earlier (and ``--resume`` continue the same
    schedule); it defaults to ``total_steps``."""
    warmup_steps: int = 500
    """Steps of linear warmup from 0 to ``lr``."""
    grad_accum: int = 1
    clip_grad_norm: float = 1.0
    """Max global gradient norm (0 disables); unscaled first under fp16."""
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    """Autocast dtype; ``fp16`` adds a GradScaler. On the CPU only ``none``/``bf16`` make sense."""
    compile: bool = False
    """``torch.compile`` the pretrainer (the step's random draws stay outside it; no graph breaks)."""
    channels_last: bool = False
    """Batches and weights in ``channels_last_3d`` memory format, for the convolutions of the ``resnet`` and
    ``nnunet`` encoders on CUDA; refused for ``swin`` (its tokens are permuted from the patch embedding on, and
    MONAI's SwinViT makes its input contiguous: the format would only add copies)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (0 disables; e.g. 0.999)."""
    sync_batchnorm: bool = True
    """With several CUDA processes, every BatchNorm layer (the ResNet encoder's, the contrastive
    projection head's) becomes a ``torch.nn.SyncBatchNorm`` and normalises with the statistics of the
    global batch (SimCLR's global BN), so that two contrastive views on one rank cannot recognise each
    other through their local batch statistics. ``SyncBatchNorm`` runs on CUDA only: CPU processes
    (gloo) keep per-process BatchNorm and the run logs it. No effect in one process."""
    seed: int = 0
    log_every: int = 10
    image_every: int = 200
    checkpoint_every: int = 500
    keep_last: int = 3
    best_by: Literal["loss", "probe"] = "loss"
    """What ``best.pt`` holds: the checkpoint with the lowest mean training loss since the previous
    checkpoint (``loss``), or the one with the highest probe metric (``probe``: needs ``probe.manifest``;
    a checkpoint is also written at every probe step that improves on the best so far)."""

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr, got {self.lr}, {self.min_lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        for key in ("total_steps", "grad_accum", "log_every", "image_every", "checkpoint_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup_steps < 0 or self.clip_grad_norm < 0:
            raise ConfigError("train.warmup_steps and train.clip_grad_norm must be >= 0")
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be below train.total_steps ({self.total_steps})"
            )


@dataclass
class ProbeConfig:
    """Frozen-feature probe of the encoder during pretraining (``volpre.evaluate.probe``).

    Rank 0 probes the current encoder (and the EMA, when ``train.ema_decay > 0``) at step 0 (the
    random-initialisation baseline of the run) and every ``every`` steps: frozen features of the
    labelled ``train`` entries of ``manifest`` fit a light head (segmentation: a linear 1x1x1 head
    on all five feature maps; survival: an L2-penalised Cox model on pooled features), scored on
    its ``val`` entries (mean foreground Dice, or Harrell's C-index), logged as ``probe/<metric>``.
    """

    manifest: str | None = None
    """Labelled volpre manifest (splits ``train`` and ``val``) to probe on; ``None`` disables the probe.
    A relative path is read from the working directory."""
    task: Literal["segmentation", "survival"] = "segmentation"
    """Which probe: segmentation (entries with a ``label``) or survival (entries with ``time`` and ``event``)."""
    modality: Literal["CT", "MR"] = "CT"
    """Only entries of this modality are probed."""
    every: int = 500
    """Optimiser steps between probes (and a probe at step 0 of a new run)."""
    max_entries: int = 16
    """At most this many labelled entries of each split (``train``, ``val``), in manifest order; a
    probe's cost grows with them."""

    def validate(self) -> None:
        for key in ("every", "max_entries"):
            if getattr(self, key) < 1:
                raise ConfigError(f"probe.{key} must be >= 1, got {getattr(self, key)}")
        if self.manifest is not None and not self.manifest.strip():
            raise ConfigError("probe.manifest must be a manifest path, or null to disable the probe")


@dataclass
class RunConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        """Check every section, then the rules that span sections.

        Long because it is a list of independent cross-section rules, each a condition and its
        message, read top to bottom; splitting it would only scatter them.
        """
        for section in _walk_sections(self):
            check = getattr(section, "validate", None)
            if check is not None and section is not self:
                check()
        if self.train.best_by == "probe" and self.probe.manifest is None:
            raise ConfigError("train.best_by 'probe' needs a probe: set probe.manifest to a labelled manifest")
        if self.train.channels_last and self.model.encoder == "swin":
            raise ConfigError("train.channels_last does not help model.encoder swin: SwinViT permutes its patch "
                              "embedding to tokens and MONAI makes its input contiguous, so the format only adds "
                              "copies; use it with the resnet or nnunet encoders")
        if self.model.encoder == "nnunet":
            # crop size and mask cells depend on the plan: volpre.data.nnunet_plan.resolve_run_config checks them
            return
        if self.data.roi is None:
            raise ConfigError(f"data.roi: null (the plan's patch size) is only for model.encoder nnunet; give the "
                              f"crop size in voxels for the {self.model.encoder} encoder, e.g. [96, 96, 96]")
        if any(r % 32 for r in self.data.roi):  # both encoders downsample 5 times by 2
            raise ConfigError(
                f"data.roi must be multiples of 32 for the {self.model.encoder} encoder, got {list(self.data.roi)}"
            )
        if self.objective.name == "mvm":
            patch = self.objective.mvm.mask_patch
            if patch is None:
                raise ConfigError(
                    "objective.mvm.mask_patch: null (the encoder's total stride per axis) is only for model.encoder "
                    f"nnunet; give the cell edge in voxels for the {self.model.encoder} encoder"
                )
            if patch % 32 and self.model.encoder == "resnet":
                raise ConfigError(
                    f"objective.mvm.mask_patch must be a multiple of 32 (the ResNet's total stride), got {patch}"
                )
            if patch % 2 and self.model.encoder == "swin":
                raise ConfigError(f"objective.mvm.mask_patch must be a multiple of 2 (Swin patch size), got {patch}")
            if any(r % patch for r in self.data.roi):
                raise ConfigError(
                    f"data.roi {list(self.data.roi)} must be divisible by objective.mvm.mask_patch {patch}"
                )
            patches = math.prod(r // patch for r in self.data.roi)
            masked = round(self.objective.mvm.mask_ratio * patches)
            if not 0 < masked < patches:
                raise ConfigError(
                    f"objective.mvm.mask_ratio {self.objective.mvm.mask_ratio} masks {masked} of the {patches} "
                    f"patches of {patch}^3 in a data.roi crop of {list(self.data.roi)}; it must mask at least one "
                    "and leave at least one visible (use a larger roi or a smaller mask_patch)"
                )
        if self.objective.name in ("simclr", "micle"):
            section = getattr(self.objective, self.objective.name)
            if self.objective.name == "simclr" and section.views_per_crop < 2:
                raise ConfigError(
                    f"objective.simclr.views_per_crop must be >= 2 (a crop's positives are its other views), "
                    f"got {section.views_per_crop}"
                )
            if section.views_per_crop * self.data.crops_per_volume < 2:
                raise ConfigError(
                    f"objective.micle.views_per_crop ({section.views_per_crop}) x data.crops_per_volume "
                    f"({self.data.crops_per_volume}) is 1 view per subject, which has no positive: raise either"
                )
        if self.objective.name == "dae" and "block_mask" in self.objective.dae.disruptions:
            block = self.objective.dae.block_mask_size
            if any(r % block for r in self.data.roi):
                raise ConfigError(
                    f"data.roi {list(self.data.roi)} must be divisible by objective.dae.block_mask_size {block}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _walk_sections(obj: Any):
    yield obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk_sections(value)


# ----------------------------------------------------------------------------- building


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple,):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _parse_number(text: str, kind: type) -> Any:
    """``text`` as a number of ``kind`` (``int`` or ``float``) if it spells one, else ``text`` unchanged."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp``, or raise ConfigError naming ``key`` and what is allowed.

    Numeric fields also take a string that spells a number of their type (YAML 1.1, which
    PyYAML follows, reads ``1e-4`` as text: it wants a dot in a float), so ``train.lr=1e-4``
    works on the command line and in YAML files. Float fields must be finite: ``.inf``, ``.nan``
    and the strings ``inf`` or ``nan`` are refused.
    """
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, str):  # a number YAML left as text; only integer literals (``1000``, ``-3``)
            value = _parse_number(value, int)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads ``1e-4`` (no dot) as text
            value = _parse_number(value, float)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: got {value!r}, expected a finite float")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    raise TypeError(f"config field {key} has unsupported type {tp}")  # a bug in this module


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; allowed keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {name: _coerce(prefix + name, values[name], hints[name]) for name in names if name in values}
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``volpre/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r} not found: give a YAML file path or one of {', '.join(shipped_configs())}"
        )
    if str(path.resolve()) in seen:
        raise ConfigError(f"config {path} names itself as a base (cycle: {' -> '.join(seen)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_ref = str(path.parent / base) if Path(base).suffix else base
    return _deep_merge(_read_yaml(base_ref, seen + (str(path.resolve()),)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a (partial) nested dict."""
    config = _build(RunConfig, values)
    config.validate()
    return config


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a shipped config by name (``swin-dae-tiny``) or a YAML path, apply overrides, validate."""
    values = _read_yaml(name_or_path)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return config_from_dict(values)


def config_hash(section: Any) -> str:
    """Stable short hash of a config section (used to key caches)."""
    payload = json.dumps(dataclasses.asdict(section), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
