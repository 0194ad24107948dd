"""The reference arm of ``volpre bench step --reference monai-swin-ssl``: the pretraining step of
MONAI's public Swin-UNETR self-supervised recipe (Tang et al., "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", CVPR 2022; Project-MONAI research-contributions
``SwinUNETR/Pretrain``), written here from the MONAI API so that volpre's step and the recipe's run
at the same crop, batch and precision on one machine in one command.

The recipe, as its ``main.py``, ``models/ssl_head.py``, ``losses/loss.py`` and ``utils/ops.py`` have it:

- model (:class:`SwinSSLHead`): MONAI's ``SwinTransformer`` (patch 2, window 7, depths 2-2-2-2,
  heads 3-6-12-24, MLP ratio 4, qkv bias, no v2 blocks); on its stride-32 map of ``dim =
  16 * feature_size`` channels, token 0 feeds a ``Linear(dim, 4)`` rotation head and token 1 a
  ``Linear(dim, 512)`` contrastive head, and the whole map a "vae" decoder (five times: 3^3 conv,
  InstanceNorm, LeakyReLU, trilinear x2 upsampling with the channels halving, the fifth keeping
  ``dim // 16``; then a 1^3 conv to the input channels);
- step (:func:`reference_loss`, :class:`ReferenceStep`): two views of the batch, each rotated by a
  random multiple of 90 degrees in the last two axes (:func:`rotate_views`), each then cut by random patch drops
  (:func:`drop_patches`); both views through the model; the loss is cross-entropy on the rotation
  + NT-Xent (temperature 0.5) between the two views' contrastive outputs + L1 between the
  reconstructions and the rotated, uncut views, all with weight 1; AdamW.

The random draws use a ``torch.Generator`` instead of NumPy's global state (the recipe's), with the
same distributions. Only the cost of a step is compared; the recipe's own training script is
not run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from volpre.objectives.losses import multi_positive_info_nce

NAME = "monai-swin-ssl"
ROTATIONS = 4
CONTRASTIVE_DIM = 512
TEMPERATURE = 0.5


def crop_problem(roi: tuple[int, ...] | list[int]) -> str | None:
    """Why the recipe cannot run on crops of ``roi`` voxels, or None: its heads read tokens 0 and 1
    of the stride-32 map, and its rotations turn the last two axes into each other."""
    if max(roi) < 64:
        return f"the {NAME} reference needs two tokens at stride 32 (a crop side of 64 or more), got crops of {roi}"
    if roi[1] != roi[2]:
        return (f"the {NAME} reference rotates crops in their last two axes, which must be equal; got crops of "
                f"{roi}")
    return None


class SwinSSLHead(nn.Module):
    """The recipe's ``SSLHead`` with its default "vae" decoder: ``(B, C, X, Y, Z)`` ->
    ``(rotation logits (B, 4), contrastive (B, 512), reconstruction (B, C, X, Y, Z))``.

    Needs at least two tokens at stride 32 (token 0 and token 1 feed the two heads), so one crop
    side of at least 64 voxels.
    """

    def __init__(self, in_channels: int, feature_size: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        dim = 16 * feature_size
        self.swin_vit = SwinTransformer(
            in_chans=in_channels, embed_dim=feature_size, window_size=(7, 7, 7), patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
            attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        self.rotation_head = nn.Linear(dim, ROTATIONS)
        self.contrastive_head = nn.Linear(dim, CONTRASTIVE_DIM)
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv3d(cin, cout, kernel_size=3, padding=1), nn.InstanceNorm3d(cout), nn.LeakyReLU(),
                       nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
        layers.append(nn.Conv3d(widths[-1], in_channels, kernel_size=1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deepest = self.swin_vit(x.contiguous())[4]  # (B, dim, X/32, Y/32, Z/32)
        tokens = deepest.flatten(2).transpose(1, 2)  # (B, tokens, dim)
        if tokens.shape[1] < 2:
            raise ValueError(crop_problem(list(x.shape[2:])))
        return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), self.decoder(deepest)


def rotate_views(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample rotated by ``k * 90`` degrees in its last two axes, ``k`` uniform in 0..3:
    ``(B, C, X, Y, Z)`` (Y == Z) -> the rotated batch and ``k`` as ``(B,)`` int64 on ``x``'s device."""
    if x.shape[3] != x.shape[4]:
        raise ValueError(crop_problem(list(x.shape[2:])))
    turns = torch.randint(0, ROTATIONS, (x.shape[0],), generator=generator, device=generator.device)
    rotated = torch.stack([sample.rot90(int(k), (2, 3)) for sample, k in zip(x, turns.tolist())])
    return rotated, turns.to(x.device)


def drop_patches(x: torch.Tensor, generator: torch.Generator, noise: torch.Generator, max_drop: float = 0.3,
                 max_block: float = 0.25, tolerance: float = 0.05) -> torch.Tensor:
    """The recipe's ``aug_rand``: in a copy of each sample, random boxes covering a share
    ``U(0, max_drop)`` of its voxels are filled with min-max scaled Gaussian noise; then, if a randomly
    chosen other sample is drawn, as many boxes again are copied from it. ``(B, C, X, Y, Z)``.
    ``generator`` (host) draws the boxes, ``noise`` (on ``x``'s device) the noise."""
    out = x.detach().clone()
    n = x.shape[0]
    for i in range(n):
        _fill_boxes(out[i], generator, max_drop, max_block, tolerance, source=None, noise=noise)
        other = int(torch.randint(0, n, (1,), generator=generator, device=generator.device))
        if other != i:
            _fill_boxes(out[i], generator, max_drop, max_block, tolerance, source=out[other], noise=noise)
    return out


def _fill_boxes(sample: torch.Tensor, generator: torch.Generator, max_drop: float, max_block: float,
                tolerance: float, source: torch.Tensor | None, noise: torch.Generator) -> None:
    shape = sample.shape[1:]

    def uniform_int(low: int, high: int) -> int:
        return int(torch.randint(low, max(high, low + 1), (1,), generator=generator, device=generator.device))

    target = float(torch.rand((), generator=generator, device=generator.device)) * max_drop * shape.numel()
    tol = [int(tolerance * s) for s in shape]
    biggest = [int(max_block * s) for s in shape]
    covered = 0
    while covered < target:
        start = [uniform_int(0, s - t) for s, t in zip(shape, tol)]
        stop = [min(uniform_int(t, b) + a, s) for a, t, b, s in zip(start, tol, biggest, shape)]
        box = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
        if sample[box].numel() == 0:  # a side of 0 (crops under 20 voxels: the tolerance rounds to 0)
            pass
        elif source is None:
            values = torch.empty_like(sample[box]).normal_(generator=noise)
            sample[box] = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
        else:
            sample[box] = source[box]
        covered += max(1, torch.Size([b - a for a, b in zip(start, stop)]).numel())


def reference_loss(model: nn.Module, image: torch.Tensor, generator: torch.Generator,
                   noise: torch.Generator) -> torch.Tensor:
    """The recipe's loss on one batch ``(B, C, X, Y, Z)``: rotation CE + NT-Xent + L1 (scalar)."""
    first, turns_first = rotate_views(image, generator)
    second, turns_second = rotate_views(image, generator)
    rot_first, contrast_first, rec_first = model(drop_patches(first, generator, noise))
    rot_second, contrast_second, rec_second = model(drop_patches(second, generator, noise))
    rotation = F.cross_entropy(torch.cat([rot_first, rot_second]).float(), torch.cat([turns_first, turns_second]))
    pairs = torch.arange(image.shape[0], device=image.device).repeat(2)
    contrast = multi_positive_info_nce(torch.cat([contrast_first, contrast_second]), pairs, TEMPERATURE)
    reconstruction = F.l1_loss(torch.cat([rec_first, rec_second]).float(), torch.cat([first, second]).float())
    return rotation + contrast + reconstruction


class ReferenceStep:
    """The recipe's model, AdamW and GradScaler at a run config's crop, width and precision."""

    def __init__(self, in_channels: int, feature_size: int, lr: float, weight_decay: float, amp: str,
                 device: torch.device, use_checkpoint: bool = False, compile_model: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        self.module = SwinSSLHead(in_channels, feature_size, use_checkpoint).to(device)
        self.model = torch.compile(self.module) if compile_model else self.module
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr, weight_decay=weight_decay)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.device = device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        """Host generator: the recipe draws its rotations and boxes on the host (NumPy)."""
        self.noise = torch.Generator(device=device).manual_seed(seed + 1)
        """Device generator for the patch drops' noise (the recipe draws it on the GPU)."""

    def step(self, image: torch.Tensor, mark: Callable[[str], None]) -> torch.Tensor:
        """One optimiser step on ``(B, C, X, Y, Z)``; ``mark`` as in ``Pretraining.train_step``.
        Returns the loss (0-dim, detached)."""
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = reference_loss(self.model, image, self.generator, self.noise)
        mark("forward")
        self.scaler.scale(loss).backward()
        mark("backward")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss.detach()
