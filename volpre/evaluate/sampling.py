"""Which entries the label-efficiency evaluation trains and scores on, and its per-seed subject subsets.

The evaluation reads one manifest:

- **training pool**: the entries of split ``train`` of one modality that carry the task's labels
  (segmentation: a ``label`` volume; survival: ``time`` and ``event``);
- **validation set**: the labelled entries of split ``val`` of that modality. It is fixed: no
  sampling ever touches it, and no subject may have entries in both ``train`` and ``val``.

:func:`sample_subjects` draws, for one seed, a subset of the pool's *subjects* per fraction
(every scan of a chosen subject goes with it). One seeded permutation of the sorted subject ids
serves all fractions of a seed, and a fraction takes its first ``k`` subjects, so the subsets of
one seed are nested (a smaller fraction's subjects are inside every larger fraction's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from volpre.data.manifest import TRAIN, VAL, Manifest, ManifestEntry, load_manifest
from volpre.evaluate.errors import EvaluationError
from volpre.survival.concordance import concordance_index

Task = Literal["segmentation", "survival"]

TASK_LABELS: dict[str, str] = {"segmentation": "a label", "survival": "time and event"}
"""What an entry must carry to be labelled, per task (for messages)."""

MIN_SUBJECTS: dict[str, int] = {"segmentation": 1, "survival": 2}
"""Fewest training subjects of any subset: a Cox partial likelihood needs two subjects to compare."""

_PERMUTATION_TAG = 0x1AB5E7
"""Second word of the sampling generator's seed, so subsets do not reuse another stream of the same seed."""


def is_labeled(entry: ManifestEntry, task: Task) -> bool:
    """Whether ``entry`` carries the labels ``task`` trains on."""
    if task == "segmentation":
        return entry.label is not None
    return entry.time is not None and entry.event is not None


@dataclass(frozen=True)
class EvaluationData:
    """The training pool and the validation set of one manifest, task and modality."""

    manifest: Manifest
    task: Task
    modality: str
    train: tuple[ManifestEntry, ...]
    """Labelled ``modality`` entries of split ``train`` (the pool the subsets are drawn from)."""
    val: tuple[ManifestEntry, ...]
    """Labelled ``modality`` entries of split ``val`` (every run is scored on all of them)."""

    @property
    def train_subjects(self) -> list[str]:
        """Sorted distinct subjects of the training pool (``subject``, or the entry id without one)."""
        return sorted({e.subject_or_id for e in self.train})

    @property
    def val_subjects(self) -> list[str]:
        """Sorted distinct subjects of the validation set."""
        return sorted({e.subject_or_id for e in self.val})

    def train_entries_of(self, subjects: Sequence[str]) -> list[ManifestEntry]:
        """The pool's entries of ``subjects``, in manifest order."""
        chosen = set(subjects)
        return [e for e in self.train if e.subject_or_id in chosen]


def has_comparable_pair(entries: Sequence[ManifestEntry]) -> bool:
    """Whether Harrell's C-index is defined on these entries' ``time`` and ``event``: at least one
    observed event earlier than another entry's time (:func:`volpre.survival.concordance_index`)."""
    times = torch.tensor([e.time for e in entries], dtype=torch.float64)
    events = torch.tensor([e.event for e in entries], dtype=torch.float64)
    try:
        concordance_index(torch.zeros_like(times), times, events)
    except ZeroDivisionError:
        return False
    return True


def select_evaluation_data(manifest_path: str | os.PathLike[str], task: Task, modality: str) -> EvaluationData:
    """Read ``manifest_path`` and check it can support a label-efficiency evaluation.

    Raises:
        ManifestError: the manifest cannot be read or does not follow the schema.
        EvaluationError: no labelled training entry; fewer training subjects than the task needs
            (survival: 2); no labelled ``val`` entry; a subject with entries in both ``train``
            and ``val``; (survival) no comparable pair of subjects in ``val``, so no C-index.
    """
    path = Path(manifest_path)
    manifest = load_manifest(path)
    if task not in TASK_LABELS:
        raise EvaluationError(f"task: got {task!r}, expected one of {', '.join(TASK_LABELS)}")
    need = TASK_LABELS[task]

    # subjects are compared over every entry (any modality): a subject scanned twice must not leak
    train_all = {e.subject_or_id for e in manifest.entries if e.split == TRAIN}
    val_all = {e.subject_or_id for e in manifest.entries if e.split == VAL}
    shared = sorted(train_all & val_all)
    if shared:
        shown = ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
        raise EvaluationError(
            f"manifest {path}: {len(shared)} subjects have entries in both split 'train' and split 'val' "
            f"({shown}); expected every subject in one split only, so that validation scores subjects no run "
            "trained on (assign splits by subject)"
        )

    def pick(split: str) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
        of_modality = [e for e in manifest.entries if e.split == split and e.modality == modality]
        return of_modality, [e for e in of_modality if is_labeled(e, task)]

    train_modality, train = pick(TRAIN)
    if not train:
        raise EvaluationError(
            f"manifest {path}: split 'train' holds no {modality} entries with {need} ({len(train_modality)} "
            f"{modality} entries in that split in all); a {task} evaluation fine-tunes on labelled training "
            "entries: expected at least one"
        )
    subjects = {e.subject_or_id for e in train}
    if len(subjects) < MIN_SUBJECTS[task]:
        raise EvaluationError(
            f"manifest {path}: split 'train' holds {modality} entries with {need} of only {len(subjects)} "
            f"subject(s); a {task} evaluation needs at least {MIN_SUBJECTS[task]} (a Cox loss compares subjects)"
        )
    val_modality, val = pick(VAL)
    if not val:
        raise EvaluationError(
            f"manifest {path}: split 'val' holds no {modality} entries with {need} ({len(val_modality)} "
            f"{modality} entries in that split in all); every run is scored on the fixed 'val' split: "
            "assign some subjects (never trained on) to split 'val'"
        )
    if task == "survival" and not has_comparable_pair(val):
        raise EvaluationError(
            f"manifest {path}: the {len(val)} {modality} entries of split 'val' have no comparable pair "
            f"(events {sum(int(e.event) for e in val)}, distinct times {len({e.time for e in val})}), so no "
            "C-index can be computed; expected at least one observed event earlier than another entry's time"
        )
    return EvaluationData(manifest=manifest, task=task, modality=modality, train=tuple(train), val=tuple(val))


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions as floats in the given order, after checking them.

    Raises:
        EvaluationError: no fraction, a fraction outside (0, 1] (or not a number), a fraction twice, or two
            fractions that :func:`fraction_name` writes alike (their runs would share a folder).
    """
    if len(fractions) == 0:
        raise EvaluationError("fractions: got none; expected at least one number in (0, 1], e.g. 0.1,0.25,1.0")
    values = []
    for fraction in fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise EvaluationError(
                f"fractions: got {fraction!r}; expected numbers in (0, 1] (the share of labelled training subjects)"
            )
        values.append(float(fraction))
    repeated = sorted({f for f in values if values.count(f) > 1})
    if repeated:
        shown = ", ".join(f"{f:g}" for f in repeated)
        raise EvaluationError(f"fractions: {shown} given twice; expected distinct fractions")
    names = [fraction_name(f) for f in values]
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        alike = " and ".join(repr(f) for f, n in zip(values, names) if n == name)
        raise EvaluationError(
            f"fractions: {alike} both print as {name} (their runs' folder is named fraction{name}); "
            "expected fractions that differ within 6 significant digits"
        )
    return tuple(values)


def fraction_name(fraction: float) -> str:
    """How ``fraction`` is written in folder names and messages: 6 significant digits (0.25, 0.05, 1)."""
    return f"{fraction:g}"


def subset_size(fraction: float, n_subjects: int, minimum: int = 1) -> int:
    """Subjects in the subset of ``fraction``: the fewest that reach ``fraction * n_subjects``, at least ``minimum``.

    Never more than ``n_subjects``; non-decreasing in ``fraction`` (so nesting holds); 1.0 -> all.
    """
    wanted = math.ceil(round(fraction * n_subjects, 9))  # round: 0.1 * 30 is 3.0000000000000004
    return min(n_subjects, max(minimum, wanted))


def sample_subjects(
    subjects: Sequence[str], fractions: Sequence[float], seed: int, minimum: int = 1
) -> dict[float, list[str]]:
    """``{fraction: sorted subject ids}`` for one seed; nested across fractions, reproducible per seed.

    Args:
        subjects: the pool's subject ids (order and repeats do not matter).
        fractions: checked fractions in (0, 1] (see :func:`check_fractions`).
        seed: a non-negative integer; the same seed and subjects give the same subsets.
        minimum: fewest subjects per subset (see :data:`MIN_SUBJECTS`).

    Raises:
        EvaluationError: ``seed`` is negative, or the pool has fewer than ``minimum`` subjects.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EvaluationError(f"seed: got {seed!r}, expected a non-negative integer")
    pool = sorted(set(subjects))
    if len(pool) < minimum:
        raise EvaluationError(f"subjects: got {len(pool)}, expected at least {minimum} to sample from")
    order = [pool[i] for i in np.random.default_rng([int(seed), _PERMUTATION_TAG]).permutation(len(pool))]
    return {f: sorted(order[: subset_size(f, len(pool), minimum)]) for f in check_fractions(fractions)}
