"""Loss terms shared by the objectives: masked reconstruction, per-patch target normalisation and
multi-positive InfoNCE over the global batch. All reduce on the device (no host sync) and compute
in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

PATCH_NORM_EPS = 1e-6
"""Added to each patch's variance before the square root (as in MAE)."""

_LOGIT_OF_SELF = -1e9
"""Stands in for the similarity of an anchor to itself (and to candidates that are neither positive
nor negative) so they drop out of the softmax without -inf."""


def reconstruction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    kind: Literal["l1", "l2"],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean L1 or squared error, over all voxels or over masked voxels only.

    Args:
        prediction: ``(B, C, X, Y, Z)`` float.
        target: same shape.
        kind: ``"l1"`` (absolute error) or ``"l2"`` (squared error).
        mask: optional ``(B, 1, X, Y, Z)`` bool, ``True`` where the loss counts; voxels outside it
            do not change the loss or receive gradient. ``None`` counts every voxel.

    Returns:
        Scalar float32 tensor (0 if the mask selects nothing).
    """
    difference = prediction.float() - target.float()
    error = difference.abs() if kind == "l1" else difference.square()
    if mask is None:
        return error.mean()
    weight = mask.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def normalize_patches(x: torch.Tensor, patch: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise every ``patch^3`` block (or ``px x py x pz`` block) to zero mean and unit variance, as
    MAE and SparK normalise their targets (``(p - mean) / sqrt(var + 1e-6)`` with the unbiased
    variance over all of the block's voxels and channels, like their ``patchify`` then ``var(dim=-1)``).

    Args:
        x: ``(B, C, X, Y, Z)`` float, X/Y/Z divisible by ``patch`` (per axis).
        patch: edge of a cubic block in voxels, or its three edges.

    Returns:
        ``(normalised, mean, std)``: ``normalised`` like ``x`` (float32); ``mean`` and ``std`` are
        ``(B, C, X, Y, Z)`` float32 holding each voxel's block statistics (``std`` the square root
        of the variance plus :data:`PATCH_NORM_EPS`), so ``x == normalised * std + mean``.
    """
    batch, channels, *spatial = x.shape
    px, py, pz = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    if any(size % edge for size, edge in zip(spatial, (px, py, pz))):
        raise ValueError(f"spatial size {tuple(spatial)} must be divisible by the patch edge {patch}")
    gx, gy, gz = (size // edge for size, edge in zip(spatial, (px, py, pz)))
    blocks = x.float().reshape(batch, channels, gx, px, gy, py, gz, pz)
    per_block = (1, 3, 5, 7)  # channels and the three in-block axes
    mean = blocks.mean(dim=per_block, keepdim=True)
    var = blocks.var(dim=per_block, keepdim=True)
    std = (var + PATCH_NORM_EPS).sqrt()
    shape = (batch, channels, *spatial)
    return (
        ((blocks - mean) / std).reshape(shape),
        mean.expand_as(blocks).reshape(shape),
        std.expand_as(blocks).reshape(shape),
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` in rank order, with gradients flowing back to each rank.

    Args:
        x: ``(N, ...)`` with the same shape on every rank.

    Returns:
        ``(world_size * N, ...)``; rows ``[rank * N, (rank + 1) * N)`` are this rank's ``x``. In one
        process (or without an initialised process group) ``x`` itself. The backward pass sums the
        gradient every rank computes for a row (``torch.distributed.nn.functional.all_gather``),
        so with DDP averaging the result is the gradient of the mean of the ranks' losses.
    """
    if not _distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def rank_offset(rows: int) -> int:
    """Index of this rank's first row in a batch of ``rows`` rows per rank gathered by
    :func:`gather_across_ranks` (0 in one process): add it to local row indices to make ids that
    mean the same on every rank."""
    return dist.get_rank() * rows if _distributed() else 0


def pair_roles(
    groups: torch.Tensor,
    candidate_groups: torch.Tensor,
    own_index: torch.Tensor,
    neutral_groups: torch.Tensor | None = None,
    candidate_neutral_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates are an anchor's positives and which its negatives.

    Anchor ``i`` and candidate ``j`` (not the anchor itself, ``j != own_index[i]``) are a positive
    pair when ``groups[i] == candidate_groups[j]``; otherwise a negative pair, unless the neutral ids
    are given and equal (``neutral_groups[i] == candidate_neutral_groups[j]``): then they are
    neither, and the candidate drops out of the anchor's softmax. The anchor itself is neither.

    Args:
        groups: ``(N,)`` integer ids of the anchors; ``candidate_groups``: ``(M,)`` of the candidates.
        own_index: ``(N,)`` long, each anchor's own row among the candidates.
        neutral_groups, candidate_neutral_groups: optional ``(N,)`` and ``(M,)`` integer ids.

    Returns:
        ``(positive, negative)``, two disjoint ``(N, M)`` bool masks.
    """
    self_pair = torch.arange(candidate_groups.shape[0], device=groups.device).view(1, -1) == own_index.view(-1, 1)
    same = groups.view(-1, 1) == candidate_groups.view(1, -1)
    negative = ~same
    if neutral_groups is not None:
        negative = negative & (neutral_groups.view(-1, 1) != candidate_neutral_groups.view(1, -1))
    return same & ~self_pair, negative


def multi_positive_info_nce(
    embeddings: torch.Tensor,
    groups: torch.Tensor,
    temperature: float,
    neutral_groups: torch.Tensor | None = None,
    *,
    need_negative: bool = False,
) -> torch.Tensor:
    """InfoNCE with any number of positives per anchor (SupCon's "L_out" form), over the global batch.

    Every local row is an anchor. Its candidates are all rows of every rank (gathered with
    :func:`gather_across_ranks`, so under DDP the negatives are the global batch, not this rank's
    few crops) except itself; :func:`pair_roles` says which are positives (same group id) and
    which negatives (another group id and, when ``neutral_groups`` is given, another neutral id);
    candidates that are neither are left out of the softmax. With two views per group and no
    neutral ids this is NT-Xent (SimCLR). Anchors without a positive are left out; if no local
    anchor has one, the loss is 0 (finite, with zero gradient). Ids must mean the same on every
    rank (e.g. global subject indices, or local indices plus :func:`rank_offset`).
    With ``need_negative``, anchors without a negative are left out too (with class-like groups
    such as modalities, a batch of one class has nothing to contrast, and its term would only
    equalise the similarities).

    Args:
        embeddings: ``(N, D)`` float, this rank's rows (normalised to unit length here).
        groups: ``(N,)`` integer group ids on the same device.
        temperature: softmax temperature, > 0.
        neutral_groups: optional ``(N,)`` integer ids; rows that share one but not a group id are
            neither positives nor negatives of each other.
        need_negative: also leave out anchors without a negative.

    Returns:
        Scalar float32: mean over local anchors with positives of
        ``-mean_p log(exp(s_ip / t) / sum_{a in P(i) or N(i)} exp(s_ia / t))``.
    """
    z = F.normalize(embeddings.float(), dim=1)
    n = z.shape[0]
    candidates = gather_across_ranks(z)
    candidate_groups = gather_across_ranks(groups.detach())
    candidate_neutral = None if neutral_groups is None else gather_across_ranks(neutral_groups.detach())
    own = torch.arange(n, device=z.device) + rank_offset(n)
    positive, negative = pair_roles(groups, candidate_groups, own, neutral_groups, candidate_neutral)
    with torch.autocast(device_type=z.device.type, enabled=False):  # similarities in float32, also under autocast
        similarity = z @ candidates.T
    logits = (similarity / temperature).masked_fill(~(positive | negative), _LOGIT_OF_SELF)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive_count = positive.sum(dim=1)
    anchor_loss = -(log_prob * positive).sum(dim=1) / positive_count.clamp_min(1)
    counted = positive_count > 0
    if need_negative:
        counted = counted & negative.any(dim=1)
    counted = counted.to(anchor_loss.dtype)
    return (anchor_loss * counted).sum() / counted.sum().clamp_min(1.0)
