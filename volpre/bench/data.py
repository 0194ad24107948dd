"""``volpre bench data``: random-crop throughput of four pipelines on the same CT files.

- ``reference``: the MONAI pipeline a user writes today -- ``LoadImaged``, ``EnsureChannelFirstd``,
  ``Orientationd`` (RAS), ``Spacingd``, ``ScaleIntensityRanged`` (the CT window), ``CropForegroundd``,
  ``SpatialPadd``, ``RandSpatialCropSamplesd`` -- in a MONAI ``Dataset`` and ``DataLoader``;
- ``persistent``: the same with MONAI's ``PersistentDataset`` once its cache is built (its first,
  cache-building pass is reported as ``persistent_cold``);
- ``volpre_cold``: volpre's pretraining loader on an empty cache (the first pass builds it);
- ``volpre_warm``: the same loader once the cache is built.

Every pipeline reads the same entries with the same preprocessing config, crop size, crops per
volume, batch size and number of workers, and runs in a fresh process (see
:mod:`volpre.bench.isolated`), after the source files were read once so that every pipeline finds
them in the page cache. Cold pipelines make exactly one pass; the others make passes until
``min_seconds`` have elapsed. Reported per pipeline: ``crops``, ``passes``, ``seconds``,
``crops_per_s``, ``peak_rss_main_bytes`` (the process that collates), ``peak_rss_worker_bytes``
(the largest DataLoader worker), ``cache_bytes`` (its cache on disk); overall ``cache_bytes``
(volpre's) and ``int16_bytes`` (the preprocessed voxels at 2 bytes each). ``volpre_warm`` also
holds ``stages_ms_per_crop`` (:func:`warm_stage_times`): where a warm crop's time goes.

What a crop is at the end differs as the pipelines are built: MONAI's pipelines hand out float32
crops windowed in the workers; volpre's hand out float16 HU crops, which the training process
windows on its device (:class:`~volpre.data.transforms.CropWindow`; its CPU cost per crop is
``stages_ms_per_crop["window_in_step"]``, not counted in volpre's crops/s).

The reference reads files with MONAI's ``LoadImaged``, which reads NIfTI without ITK: the
benchmark uses the manifest's CT entries stored as one NIfTI file (others are listed as skipped).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from volpre.bench.errors import BenchError
from volpre.bench.isolated import run_isolated
from volpre.config import DataConfig, PreprocessConfig, RunConfig
from volpre.data.cache import CachedCrops, VolumeCache, build_cache, entries_to_cache, read_crop
from volpre.data.dataset import PretrainDataset, VolumeGroups, available_cpus, crop_loader, loader_workers
from volpre.data.errors import VolumeError
from volpre.data.manifest import ManifestEntry, load_manifest
from volpre.data.transforms import CROP_DTYPE, CropWindow, draw_crop_starts
from volpre.text import printable
from volpre.versions import installed_versions

PIPELINES = ("reference", "persistent", "volpre_cold", "volpre_warm")
"""The pipelines ``volpre bench data`` measures, in the order it runs them."""
DEFAULT_MIN_SECONDS = 3.0


@dataclass(frozen=True)
class DataBenchSetup:
    """What every measured pipeline gets (pickled into its process)."""

    entries: tuple[ManifestEntry, ...]
    preprocess: PreprocessConfig
    data: DataConfig
    """Crop size, crops per volume, batch size and ``num_workers`` shared by all pipelines."""
    workdir: Path
    """Where the pipelines' caches are written (an empty temporary folder)."""
    min_seconds: float
    seed: int

    @property
    def records(self) -> list[dict]:
        return [{"image": str(e.image[0])} for e in self.entries]

    @property
    def persistent_dir(self) -> Path:
        return self.workdir / "monai_persistent"

    @property
    def volpre_dir(self) -> Path:
        return self.workdir / "volpre_cache"


def reference_transforms(preprocess: PreprocessConfig, data: DataConfig) -> Compose:
    """The MONAI CT pipeline a user writes today (as in MONAI's self-supervised tutorials)."""
    low, high = preprocess.ct_window
    return Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS", labels=None),
        Spacingd("image", pixdim=preprocess.spacing, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd("image", source_key="image", allow_smaller=True),
        SpatialPadd("image", spatial_size=data.roi),
        RandSpatialCropSamplesd("image", roi_size=data.roi, num_samples=data.crops_per_volume, random_size=False),
    ])


def bench_entries(entries: Sequence[ManifestEntry]) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """``(used, skipped)``: CT entries stored as one NIfTI file, which every pipeline can read."""
    used, skipped = [], []
    for entry in entries:
        single_nifti = len(entry.image) == 1 and entry.image[0].name.lower().endswith((".nii", ".nii.gz"))
        (used if entry.modality == "CT" and single_nifti else skipped).append(entry)
    return used, skipped


# ----------------------------------------------------------------------------- measured in their own process


class _PassSampler:
    """``(epoch, item)`` for every item once, in order; ``epoch`` is set before each pass."""

    def __init__(self, n_items: int):
        self.n_items, self.epoch = n_items, 0

    def __len__(self) -> int:
        return self.n_items

    def __iter__(self):
        return ((self.epoch, item) for item in range(self.n_items))


def _timed_passes(loader, before_pass: Callable[[int], None], min_seconds: float | None) -> dict:
    """Iterate ``loader`` once (``min_seconds`` None) or until ``min_seconds`` have elapsed."""
    crops = passes = 0
    start = time.perf_counter()
    while True:
        before_pass(passes)
        for batch in loader:
            crops += int(batch["image"].shape[0])
        passes += 1
        elapsed = time.perf_counter() - start
        if min_seconds is None or elapsed >= min_seconds:
            break
    return {"crops": crops, "passes": passes, "seconds": elapsed, "crops_per_s": crops / elapsed}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def measure_monai(setup: DataBenchSetup, persistent: bool, cold: bool) -> dict:
    """The reference pipeline (``persistent=False``) or the same over MONAI's PersistentDataset."""
    transform = reference_transforms(setup.preprocess, setup.data)
    if persistent:
        dataset = PersistentDataset(setup.records, transform=transform, cache_dir=setup.persistent_dir)
    else:
        dataset = Dataset(setup.records, transform=transform)
    workers = setup.data.num_workers
    loader = MonaiDataLoader(dataset, batch_size=setup.data.batch_size, shuffle=False, num_workers=workers,
                             persistent_workers=workers > 0)
    result = _timed_passes(loader, lambda _: None, None if cold else setup.min_seconds)
    del loader
    gc.collect()
    result["cache_bytes"] = _folder_bytes(setup.persistent_dir) if persistent else 0
    return result


def measure_volpre(setup: DataBenchSetup, cold: bool) -> dict:
    """volpre's pretraining loader (the trainer's dataset, crop source and DataLoader settings)."""
    cache = VolumeCache.create(setup.volpre_dir, setup.preprocess)
    groups = VolumeGroups.build(list(setup.entries), by_subject=False)
    dataset = PretrainDataset(groups, setup.preprocess, setup.data, setup.seed, crops=CachedCrops(cache, setup.data))
    sampler = _PassSampler(len(dataset))
    loader = crop_loader(dataset, sampler, setup.data, pin_memory=False)
    first_epoch = 0 if cold else 1  # the warm passes draw other crops than the cold one

    def before_pass(index: int) -> None:
        sampler.epoch = first_epoch + index

    result = _timed_passes(loader, before_pass, None if cold else setup.min_seconds)
    del loader
    gc.collect()
    result["cache_bytes"] = _folder_bytes(setup.volpre_dir)
    if not cold:
        result["stages_ms_per_crop"] = warm_stage_times(setup, result)
    return result


STAGE_CROPS = 64
"""Crops :func:`warm_stage_times` times (after as many untimed ones)."""
WINDOW_BATCH = 8
"""Crops per batch when :func:`warm_stage_times` times the training process's CT window."""


def _window_seconds_per_crop(setup: DataBenchSetup, repeats: int = 4) -> float:
    """Seconds per crop of :class:`CropWindow` on a CPU batch of float16 HU crops (best of ``repeats``)."""
    window = CropWindow(setup.preprocess, ["CT"])
    crops = torch.linspace(-1024, 2048, WINDOW_BATCH * int(np.prod(setup.data.roi)), dtype=torch.float32)
    crops = crops.to(CROP_DTYPE).reshape(WINDOW_BATCH, 1, *setup.data.roi)
    modality = torch.zeros(WINDOW_BATCH, dtype=torch.int64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        window(crops, modality)
        best = min(best, time.perf_counter() - start)
    return best / WINDOW_BATCH


def warm_stage_times(setup: DataBenchSetup, warm: dict) -> dict[str, float]:
    """Milliseconds per crop of each stage of the warm crop path, timed in this process with one
    torch thread, as a DataLoader worker runs it.

    ``open``: :meth:`VolumeCache.load` of an entry this process has validated (an HDF5 open and an
    ``fstat``) and its close; ``read``, ``convert``: the stages of
    :func:`~volpre.data.cache.read_crop` (the region read, its float16 copy); ``stages``: their sum;
    ``loader_other``: what the DataLoader adds per crop, derived from the measured warm rate as
    ``max(workers, 1) / crops_per_s`` minus ``stages`` (collation, the transfer between processes,
    Python, and the main process's share of the CPUs: an estimate; without workers, the main
    process's own overhead). ``window_in_step``: not a worker's stage: the CT window that the
    training process applies to each batch on its device (:class:`~volpre.data.transforms.CropWindow`),
    timed here on the CPU with one thread per crop of a batch of :data:`WINDOW_BATCH`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = VolumeCache(setup.volpre_dir, setup.preprocess)
        sources = list(entries_to_cache(setup.entries))
        rng = np.random.default_rng(setup.seed)
        totals = dict.fromkeys(("open", "read", "convert"), 0.0)
        for index in range(2 * STAGE_CROPS):
            entry = sources[index % len(sources)]
            times = [time.perf_counter()]
            stored = cache.load(entry)
            times.append(time.perf_counter())
            start = draw_crop_starts(stored.shape[1:], setup.data.roi, 1, rng)[0]
            read_crop(stored.image, start, setup.data.roi, "CT", setup.preprocess,
                      mark=lambda _: times.append(time.perf_counter()))
            before_close = time.perf_counter()
            stored.close()
            if index >= STAGE_CROPS:  # the first ones warm the page cache and validate every entry
                totals["open"] += times[1] - times[0] + time.perf_counter() - before_close
                for name, (a, b) in zip(("read", "convert"), zip(times[1:], times[2:])):
                    totals[name] += b - a
        window_s = _window_seconds_per_crop(setup)
    finally:
        torch.set_num_threads(threads)
    stages = {name: 1000.0 * total / STAGE_CROPS for name, total in totals.items()}
    stages["stages"] = sum(stages.values())
    workers = max(setup.data.num_workers, 1)
    stages["loader_other"] = max(0.0, 1000.0 * workers / warm["crops_per_s"] - stages["stages"])
    stages["window_in_step"] = 1000.0 * window_s
    return {name: round(value, 3) for name, value in stages.items()}


# ----------------------------------------------------------------------------- driver


def _read_once(entries: Sequence[ManifestEntry], manifest_path: Path) -> None:
    """Read every entry's file once, so that no pipeline pays for the first read from disk.

    Raises:
        VolumeError: a file is missing or cannot be opened (the message names the entry).
    """
    for entry in entries:
        path = entry.image[0]
        advice = f"entry {printable(entry.id)}; volpre check {manifest_path} lists every bad entry"
        try:
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        except FileNotFoundError as error:
            raise VolumeError(path, "missing", f"no such file or directory ({advice})") from error
        except OSError as error:
            raise VolumeError(path, "unreadable", f"cannot be read: {error.strerror or error} ({advice})") from error


def _stored_voxels(cache: VolumeCache, entries: Sequence[ManifestEntry]) -> int:
    voxels = 0
    for entry in entries_to_cache(entries):
        path = cache.entry_path(entry)
        if path.exists():
            with h5py.File(path, "r", locking=False) as f:
                voxels += int(f["image"].size)
    return voxels


def run_data_bench(manifest_path: Path, cfg: RunConfig, roi: tuple[int, int, int], workers: int,
                   pipelines: Sequence[str] = PIPELINES, min_seconds: float = DEFAULT_MIN_SECONDS,
                   say: Callable[[str], None] = print) -> dict:
    """Measure ``pipelines`` on the CT NIfTI entries of a manifest; return the JSON-ready results.

    ``cfg`` gives the preprocessing and the crops per volume and batch size; ``roi`` and
    ``workers`` override its ``data.roi`` and ``data.num_workers`` (at most the CPUs available to
    this process: :func:`~volpre.data.dataset.loader_workers`, as in training).
    """
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise BenchError(f"unknown pipeline {unknown[0]!r}: choose from {', '.join(PIPELINES)}")
    manifest = load_manifest(manifest_path)
    entries, skipped = bench_entries(manifest.entries)
    if not entries:
        raise BenchError(f"manifest {manifest_path}: no CT entry stored as one NIfTI file to benchmark "
                         f"({len(skipped)} other entries)")
    if skipped:
        say(f"skipping {len(skipped)} entries that are not CT in one NIfTI file (e.g. {printable(skipped[0].id)})")
    # the workers volpre's loader would use (at most the CPUs available), given to every pipeline alike
    data = dataclasses.replace(cfg.data, roi=tuple(roi), num_workers=loader_workers(workers))
    sources = list(entries_to_cache(entries))
    _read_once(sources, Path(manifest_path))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="volpre-bench-") as tmp:
        setup = DataBenchSetup(tuple(entries), cfg.preprocess, data, Path(tmp), min_seconds, cfg.train.seed)
        for name in PIPELINES:
            if name not in pipelines:
                continue
            say(f"measuring {name} ...")
            if name == "reference":
                results[name] = run_isolated(measure_monai, setup, False, False)
            elif name == "persistent":
                results["persistent_cold"] = run_isolated(measure_monai, setup, True, True)
                results[name] = run_isolated(measure_monai, setup, True, False)
            elif name == "volpre_cold":
                results[name] = run_isolated(measure_volpre, setup, True)
            else:
                if "volpre_cold" not in pipelines:  # build the cache first, untimed
                    build_cache(entries, VolumeCache.create(setup.volpre_dir, cfg.preprocess), workers)
                results[name] = run_isolated(measure_volpre, setup, False)
        if "volpre_cold" in pipelines or "volpre_warm" in pipelines:
            cache = VolumeCache(setup.volpre_dir, cfg.preprocess)
            results["cache_bytes"] = _folder_bytes(setup.volpre_dir)
            results["int16_bytes"] = 2 * _stored_voxels(cache, entries)
        shutil.rmtree(setup.workdir, ignore_errors=True)
    results["setup"] = {
        "manifest": str(Path(manifest_path).resolve()), "entries": len(entries), "sources": len(sources),
        "roi": list(data.roi), "crops_per_volume": data.crops_per_volume, "batch_size": data.batch_size,
        "workers": data.num_workers, "workers_requested": workers, "available_cpus": available_cpus(),
        "min_seconds": min_seconds, "spacing": list(cfg.preprocess.spacing),
        "ct_window": list(cfg.preprocess.ct_window), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "versions": installed_versions(),
    }
    return results


def format_table(results: dict) -> str:
    """The measured pipelines as a text table, with ratios against the reference."""
    reference = results.get("reference", {}).get("crops_per_s")
    rows = [("pipeline", "crops/s", "x ref", "seconds", "crops", "passes", "RSS main", "RSS worker", "cache")]
    for name in ("reference", "persistent_cold", "persistent", "volpre_cold", "volpre_warm"):
        if name not in results:
            continue
        r = results[name]
        ratio = f"{r['crops_per_s'] / reference:.2f}" if reference else "-"
        rows.append((name, f"{r['crops_per_s']:.2f}", ratio, f"{r['seconds']:.1f}", str(r["crops"]), str(r["passes"]),
                     _mib(r["peak_rss_main_bytes"]), _mib(r["peak_rss_worker_bytes"]), _mib(r["cache_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    stages = results.get("volpre_warm", {}).get("stages_ms_per_crop")
    if stages:
        lines.append("volpre warm crop, ms per crop (one thread, as in a worker): " + ", ".join(
            f"{name} {value:.2f}" for name, value in stages.items()))
    if "int16_bytes" in results:
        lines.append(f"volpre cache: {_mib(results['cache_bytes'])} on disk = "
                     f"{results['cache_bytes'] / max(results['int16_bytes'], 1):.2f}x the int16 size of the "
                     f"preprocessed voxels ({_mib(results['int16_bytes'])})")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_json(results: dict, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
