"""Pretraining data: manifest entries -> endless, resumable, sharded stream of random crops.

- :class:`CropSource` cuts an entry's random crops: :class:`OnTheFlyCrops` runs the MONAI
  presets of :mod:`volpre.data.transforms` on every visit; ``volpre.data.cache.CachedCrops``
  preprocesses each volume once and reads only the crops' regions afterwards. Both cut the
  same crops for the same generator (corners from :func:`~volpre.data.transforms.draw_crop_starts`).
- :class:`VolumeGroups` lists what one dataset item draws from: one entry, or (for the
  multi-instance contrastive objective, ``micle``) all scans of one subject (of one modality).
- :class:`PretrainDataset` turns an item into ``crops_per_volume`` random crops. Its randomness
  is a pure function of ``(seed, epoch, item)``, never of worker state, so a run resumed at any
  step sees exactly the crops the uninterrupted run saw. A volume that fails its checks is
  recorded (once, in ``bad_entries.jsonl``, however many workers and ranks meet it) and replaced
  by the next item (``on_bad_entry: skip``) or stops the run (``fail``). Only bad data is
  skipped (see :func:`volpre.data.errors.as_bad_data`): a full cache disk, a memory error or a
  bug in volpre stops the run whatever ``on_bad_entry`` says.
- :class:`InfiniteShardSampler` yields ``(epoch, item)`` forever: a fresh permutation per epoch,
  one disjoint shard per rank, resumable from any position.
- :func:`crop_loader` is the ``DataLoader`` the trainer (and the benchmarks) feed from; an error
  that stops the run leaves its workers as itself (:class:`volpre.data.errors.StopRun`), not as
  torch's re-raise.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from monai.data import list_data_collate
from monai.transforms import Compose

from volpre.config import DataConfig, PreprocessConfig
from volpre.data.errors import CacheError, StopRun, VolumeError, as_bad_data
from volpre.data.manifest import ManifestEntry, entry_record
from volpre.data.transforms import check_modality, crops_at, draw_crop_starts, preprocess_transforms

log = logging.getLogger(__name__)


class CropSource(Protocol):
    """Cuts ``count`` random crops of one entry's preprocessed volume.

    ``source(entry, count, rng)`` -> ``count`` float16 tensors ``(C, *data.roi)`` (CT in HU, MR
    z-scores; :data:`~volpre.data.transforms.CROP_DTYPE`, windowed later on the training device by
    :class:`~volpre.data.transforms.CropWindow`), whose corners come from ``draw_crop_starts(shape, roi, count, rng)``:
    a pure function of ``rng``'s state and the volume. Raises (typically
    :class:`~volpre.data.errors.VolumeError`) when the entry cannot be read or preprocessed.
    """

    def __call__(self, entry: ManifestEntry, count: int, rng: np.random.Generator) -> list[torch.Tensor]: ...


class OnTheFlyCrops:
    """A :class:`CropSource` that runs :func:`preprocess_transforms` on every visit (no cache)."""

    def __init__(self, preprocess: PreprocessConfig, data: DataConfig):
        self.preprocess, self.data = preprocess, data
        self._presets: dict[str, Compose] = {}

    def __call__(self, entry: ManifestEntry, count: int, rng: np.random.Generator) -> list[torch.Tensor]:
        modality = check_modality(entry.modality, entry.id)
        if modality not in self._presets:
            self._presets[modality] = preprocess_transforms(self.preprocess, modality)
        image = self._presets[modality](entry_record(entry))["image"]
        starts = draw_crop_starts(image.shape[1:], self.data.roi, count, rng)
        return crops_at(image, starts, self.preprocess, self.data, modality)


@dataclass(frozen=True)
class VolumeGroups:
    """Dataset items: each a tuple of entries the item's crops are drawn from, and a subject index.

    ``modality_classes`` are the sorted distinct :attr:`~volpre.data.manifest.ManifestEntry.modality_class`
    values of all entries; a crop's ``modality`` id is its entry's index in them (the same on every
    rank, which reads the same manifest). ``scan_index`` holds, parallel to ``groups``, each entry's
    position in the sequence given to :meth:`build` (the ``scan`` id of its crops).
    """

    groups: tuple[tuple[ManifestEntry, ...], ...]
    subject_index: tuple[int, ...]
    modality_classes: tuple[str, ...]
    scan_index: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, entries: Sequence[ManifestEntry], by_subject: bool, by_modality: bool = False) -> "VolumeGroups":
        """One item per entry, or (``by_subject``) one item per subject holding all of that subject's
        scans, or (``by_subject`` and ``by_modality``) one item per subject and modality class.

        Items are in entry order, or sorted by subject (then modality class); subject indices number
        the sorted subject names (an entry without a subject is its own subject).
        """
        subject_ids = {name: i for i, name in enumerate(sorted({e.subject_or_id for e in entries}))}
        classes = tuple(sorted({e.modality_class for e in entries}))
        if not by_subject:
            return cls(tuple((e,) for e in entries), tuple(subject_ids[e.subject_or_id] for e in entries), classes,
                       tuple((k,) for k in range(len(entries))))
        items: dict[tuple[str, str], list[int]] = defaultdict(list)
        for position, entry in enumerate(entries):
            items[(entry.subject_or_id, entry.modality_class if by_modality else "")].append(position)
        keys = sorted(items)
        return cls(tuple(tuple(entries[k] for k in items[key]) for key in keys),
                   tuple(subject_ids[subject] for subject, _ in keys), classes,
                   tuple(tuple(items[key]) for key in keys))

    def modality_id(self, entry: ManifestEntry) -> int:
        """Index of ``entry``'s modality class in :attr:`modality_classes`."""
        return self.modality_classes.index(entry.modality_class)

    def __len__(self) -> int:
        return len(self.groups)

    def items_with_several_scans(self) -> int:
        """How many items hold two scans or more."""
        return sum(len(scans) >= 2 for scans in self.scan_index)


def item_seed(seed: int, epoch: int, item: int) -> int:
    """The seed of one item's random crops: a pure function of (run seed, epoch, item)."""
    return int(np.random.SeedSequence([seed, epoch, item]).generate_state(1)[0])


class BadEntryLog:
    """One JSON line per bad entry in a file shared by all workers and ranks (and resumed runs).

    An entry is recorded once: the writer holds an exclusive ``flock`` on the file while it checks
    that the entry's id is not there yet and appends its line (one ``write`` with ``O_APPEND``).
    :meth:`read` also drops repeats, for filesystems whose locks do not reach across nodes.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def record(self, entry: ManifestEntry, error: VolumeError) -> None:
        """Record ``entry`` as bad because of ``error`` (and warn), unless it is recorded already."""
        reason = str(error)
        if self.path is None:
            log.warning("skipping entry %s (%s): %s", entry.id, entry.image[0], reason)
            return
        line = json.dumps({"id": entry.id, "image": str(entry.image[0]), "kind": error.kind, "reason": reason}) + "\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            if entry.id in {r["id"] for r in self._records()}:
                return
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        log.warning("skipping entry %s (%s): %s", entry.id, entry.image[0], reason)

    def _records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def read(self) -> list[dict]:
        """The recorded entries, each once, in the order first recorded."""
        if self.path is None or not self.path.exists():
            return []
        unique: dict[str, dict] = {}
        for record in self._records():
            unique.setdefault(record["id"], record)
        return list(unique.values())


class PretrainDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, item)]`` -> list of ``crops_per_volume`` crop dicts.

    Each crop: ``image`` float16 tensor ``(C, *roi)`` (CT in HU, MR z-scored: the intensities as
    cached; :class:`~volpre.data.transforms.CropWindow` windows a batch of them on the training
    device, the trainer's :class:`~volpre.engine.batches.DevicePrefetcher` calls it) and four int64
    scalar tensors: ``subject`` (index of the item's subject), ``modality`` (its entry's modality
    class id, :meth:`VolumeGroups.modality_id`, for the DAE's cross-modal contrastive loss),
    ``item`` (the dataset item it belongs to) and ``scan`` (the entry it was cut from: its position
    in the manifest's selected entries), the last two for the contrastive objectives. When an
    item's group holds several scans (by-subject items), its crops come from
    ``min(scans, crops_per_volume)`` distinct scans drawn at random without replacement, shared out
    in turn (so ``crops_per_volume >= 2`` always gives crops of two different scans of an item that
    has them). ``crops`` cuts them (default: :class:`OnTheFlyCrops`; the trainer passes the cache's
    ``CachedCrops``).
    """

    def __init__(
        self,
        groups: VolumeGroups,
        preprocess: PreprocessConfig,
        data: DataConfig,
        seed: int,
        crops: CropSource | None = None,
        bad_entries: BadEntryLog | None = None,
    ):
        if len(groups) == 0:
            raise ValueError("no entries to pretrain on: the manifest (or its selected split) is empty")
        self.groups, self.preprocess, self.data, self.seed = groups, preprocess, data, seed
        self.crops = crops if crops is not None else OnTheFlyCrops(preprocess, data)
        self.bad_entries = bad_entries if bad_entries is not None else BadEntryLog(None)
        self._known_bad: set[str] = set()  # per process: entries that already failed here

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: tuple[int, int]) -> list[dict] | StopRun:
        epoch, item = key
        try:
            for attempt in range(len(self.groups)):
                index = (item + attempt) % len(self.groups)
                crops = self._try_item(epoch, index)
                if crops is not None:
                    return crops
        except (CacheError, VolumeError) as error:  # a cache that cannot be written; bad data with on_bad_entry: fail
            if torch.utils.data.get_worker_info() is None:
                raise
            return StopRun(error)  # raised as itself by crop_loader's iterator in the main process
        raise RuntimeError(f"every one of the {len(self.groups)} dataset items failed its checks; see the log above")

    def _try_item(self, epoch: int, index: int) -> list[dict] | None:
        rng = np.random.default_rng(item_seed(self.seed, epoch, index))
        group = [(e, scan) for e, scan in zip(self.groups.groups[index], self.groups.scan_index[index])
                 if e.id not in self._known_bad]
        if not group:
            return None
        # distinct scans at random (a one-scan group draws nothing here, so its stream is unchanged)
        order = [group[k] for k in rng.permutation(len(group))[: self.data.crops_per_volume]]
        per_entry = [self.data.crops_per_volume // len(order) + (k < self.data.crops_per_volume % len(order))
                     for k in range(len(order))]
        crops: list[torch.Tensor] = []
        modalities: list[int] = []
        scans: list[int] = []
        for (entry, scan), count in zip(order, per_entry):
            try:
                entry_rng = np.random.default_rng(int(rng.integers(2**31)))
                crops.extend(_checked_finite(entry, self.crops(entry, count, entry_rng)))
                modalities.extend([self.groups.modality_id(entry)] * count)
                scans.extend([scan] * count)
            except Exception as error:  # noqa: BLE001 - narrowed at once: bad data is recorded, the rest raised
                bad = as_bad_data(error, str(entry.image[0]))
                if bad is None:
                    raise
                if self.data.on_bad_entry == "fail":
                    raise bad from error
                self._known_bad.add(entry.id)
                self.bad_entries.record(entry, bad)
                return None
        subject = torch.tensor(self.groups.subject_index[index], dtype=torch.int64)
        item = torch.tensor(index, dtype=torch.int64)
        return [{"image": c, "subject": subject, "modality": torch.tensor(m, dtype=torch.int64), "item": item,
                 "scan": torch.tensor(k, dtype=torch.int64)} for c, m, k in zip(crops, modalities, scans)]


def _checked_finite(entry: ManifestEntry, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    for crop in crops:
        if not torch.isfinite(crop).all():
            raise VolumeError(str(entry.image[0]), "non-finite", "preprocessed crop holds NaN/Inf values")
    return crops


class InfiniteShardSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, item)`` forever: each epoch a new permutation, rank ``r`` of ``world``
    taking positions ``r, r + world, ...`` (the tail that does not divide evenly is dropped, so
    every rank sees the same number of items per epoch and shards are disjoint).

    ``start`` is how many items this rank has already consumed; iteration resumes there.
    """

    def __init__(self, n_items: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if n_items < world:
            raise ValueError(f"{n_items} dataset items cannot be sharded over {world} processes")
        self.n_items, self.seed, self.rank, self.world, self.start = n_items, seed, rank, world, start
        self.per_rank = n_items // world

    def epoch_items(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_items, generator=generator)[: self.per_rank * self.world]
        return order[self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for item in self.epoch_items(epoch)[offset:]:
                yield epoch, item
            epoch, offset = epoch + 1, 0


def _collate_crops(items: list[list[dict] | StopRun]) -> dict | StopRun:
    stop = next((item for item in items if isinstance(item, StopRun)), None)
    return stop if stop is not None else list_data_collate(items)


class CropLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose iterator raises a worker's :class:`StopRun` error as itself."""

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            if isinstance(batch, StopRun):
                raise batch.error
            yield batch


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``: a SLURM or container CPU set), else ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, processes_per_node: int = 1) -> int:
    """DataLoader workers for one training process: ``requested`` (``data.num_workers``), at most
    this process's share of :func:`available_cpus` among the ``processes_per_node`` training
    processes of its node (at least 1; 0 stays 0, crops in the main process).

    More workers than CPUs only take turns on them: the shipped ``swin-dae`` config asks for 8,
    which on a 2-core machine made 8 processes (and their memory) for the throughput of 2.
    """
    if requested == 0:
        return 0
    return max(1, min(requested, available_cpus() // max(1, processes_per_node)))


def crop_loader(dataset: PretrainDataset, sampler: Iterable[tuple[int, int]], data: DataConfig,
                pin_memory: bool, processes_per_node: int = 1) -> CropLoader:
    """The pretraining ``DataLoader``: :func:`loader_workers` persistent workers (``data.num_workers``
    at most) cut the crops (each reads only its crops' regions from the cache), 4 batches
    prefetched per worker. The number of workers never changes the crops (see :class:`PretrainDataset`).

    Each batch: ``image`` float32 ``(data.batch_size * crops_per_volume, C, *roi)``; ``subject``,
    ``modality``, ``item`` and ``scan`` int64 ``(data.batch_size * crops_per_volume,)``; an item's
    crops are consecutive.
    """
    workers = loader_workers(data.num_workers, processes_per_node)
    if workers != data.num_workers:
        log.info("data.num_workers %d: using %d DataLoader workers (%d CPUs available to %d process(es) "
                 "of this node)", data.num_workers, workers, available_cpus(), processes_per_node)
    return CropLoader(
        dataset, batch_size=data.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=_collate_crops, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
