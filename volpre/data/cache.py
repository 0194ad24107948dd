"""Preprocess once, then read random crops from one on-disk cache shared by every process.

The deterministic stage (:func:`~volpre.data.transforms.preprocess_transforms`: checked read,
RAS, resampling, foreground crop, MR z-score) runs once per volume; the result is stored so that
a random crop reads only the region under it, never the whole volume.

**Layout.** ``<cache_dir>/<config_hash>/<name>-<key>.h5``, one HDF5 file per distinct source:

- ``config_hash`` is :func:`volpre.config.config_hash` of the ``preprocess`` section, so runs with
  other preprocessing never see each other's entries;
- ``key`` hashes the entry's image paths, ``series_uid`` and modality (manifest entries that name
  the same files under different ids share one cache entry; ``name`` is the first image's name,
  for people browsing the folder);
- dataset ``image``: ``(C, X, Y, Z)`` int16 for CT (Hounsfield units rounded to the nearest
  integer) or float16 for MR (z-scores rounded to the nearest float16), stored contiguously and
  uncompressed (exactly the int16 size, plus a few KiB of metadata): a crop is one strided read
  from the page cache. Measured against the earlier layout (32^3 chunks, byte shuffle, LZF,
  Fletcher-32; 0.59x the int16 size), the warm crop stream ran 1.5x faster on 2 CPU cores
  (``volpre bench data``, 64^3 crops; the README has the figures): inflating and checksumming 27
  chunks was most of a 64^3 crop's cost. File metadata is checksummed by HDF5 (>= 1.10
  format), the voxels by the record's ``voxels_crc32`` (see **Validity**);
- attribute ``volpre_cache``: the entry's record (JSON) -- the sidecar: cache format, volpre and
  MONAI versions, preprocessing config and its hash, the entry (paths, series, modality), the
  source's identity (per file: size, mtime, SHA-256 of its first :data:`HEAD_BYTES` bytes; a DICOM
  series directory lists every file under it; a ``.mhd``/``.nhdr`` header adds its data file),
  shape, dtype and affine. Keeping the record inside the data file lets one ``rename`` commit
  both: there is never a record without its voxels or voxels under a stale record.

**nnU-Net plans.** With a :class:`~volpre.data.nnunet_plan.NNUNetPlan` (``model.encoder: nnunet``)
the deterministic stage is the plan's own preprocessing instead (nnU-Net's normalisation and
resampling, in the plan's axis order), stored as float16 whatever the modality; the folder is keyed
by the plan's preprocessing record instead of the ``preprocess`` section, and crops are padded with 0
(as nnU-Net's data loader pads) and not windowed.

**Rounding** (the only difference from the volume the presets compute in memory): CT HU are
rounded to integers (|error| <= 0.5 HU, i.e. <= 0.5 / (window high - window low) after the
window: 2.5e-4 for the default [-1000, 1000]); MR z-scores to float16 (relative error <= 2^-11).
Crops leave :func:`read_crop` as float16 (:data:`~volpre.data.transforms.CROP_DTYPE`, exact for
these values within [-2048, 2048] HU) and are windowed on the training device.

**Validity.** An entry is used only if its file opens, its record matches the current format,
versions, config and entry, its shape and dtype match the record, its voxels' CRC-32 equals the
record's ``voxels_crc32``, and its source files still have the recorded identity (checked once
per process per entry file, see :class:`VolumeCache`: the first read of an entry in a process
reads all of it, about 20 ms for a 20 MB volume); any mismatch invalidates that entry only, which
is rebuilt in place and the crop cut from the rebuilt volume, never from damaged data. A read
that fails later (an I/O error) also marks the entry corrupt. What the per-process check cannot
see is a file changed in place after a process validated it; volpre never writes an entry in
place (see **Concurrency**), so that takes another program or a failing disk.

**Concurrency.** A builder writes a private temporary file in the entry's folder, ``fsync``\\ s
it and ``os.replace``\\ s it onto the entry's name (then ``fsync``\\ s the folder). Readers open
the file once per crop read, so they see either the old complete file or the new one; a reader
with the old one open keeps reading it. Two processes that build the same entry at once (other
workers, DDP ranks, or nodes) both write complete files and the last rename wins: one valid
entry, some work done twice. This holds on local filesystems and on shared ones whose rename is
atomic within a directory (NFSv3/v4, Lustre, GPFS, BeeGFS); HDF5 file locking is switched off
because NFS locks are unreliable, and no lock is needed since nothing is ever written in place.
A builder killed mid-write leaves only its temporary file, which ``volpre cache`` deletes once
it is an hour old.

**Write failures.** An entry is built as an HDF5 image in memory and written to disk with plain
file writes, so a full disk (or a quota, or a read-only filesystem) fails a ``write`` of ours,
never HDF5's own flush: a file HDF5 cannot close stays open inside the library and crashes the
process at exit. Such a failure raises :class:`CacheError`, which stops ``volpre cache`` and
``volpre pretrain`` with one line: writing the cache is not a property of the source volume.

**Memory.** Nothing is held per volume: each crop read opens the file, reads the region under
the crop (through the page cache, shared by every worker and rank of a node) and closes it. A
process remembers only which entry files it has validated (a few numbers per entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import secrets
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import monai
import numpy as np
import torch

from volpre import __version__
from volpre.config import ConfigError, DataConfig, PreprocessConfig, config_hash
from volpre.data.errors import CacheError, EntryProblem, StopRun, VolumeError, as_bad_data
from volpre.data.manifest import ManifestEntry, entry_record
from volpre.data.nnunet_plan import NNUNetPlan
from volpre.data.readers import source_files
from volpre.data.transforms import (
    CROP_DTYPE,
    check_modality,
    draw_crop_starts,
    padding_before,
    preprocess_transforms,
)
from volpre.files import describe_write_error, fsync_folder
from volpre.progress import Progress
from volpre.text import one_line, printable

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
"""Version of the layout and of what it holds; entries of another format are rebuilt (1: LZF-compressed
chunks; 2: resampled by MONAI's ``grid_sample``, voxels within float rounding of format 3's, which
are resampled by :class:`volpre.data.resample.AxisAlignedSpacingd`)."""
HEAD_BYTES = 8192
"""Bytes of each source file hashed into the source identity (headers sit at the start)."""
RECORD_ATTR = "volpre_cache"
DEFAULT_DIR_NAME = ".volpre_cache"
STALE_TEMP_AGE_S = 3600.0
"""Temporary files older than this are leftovers of killed builders
(see :meth:`VolumeCache.remove_stale_temporaries`)."""
_TEMP_SUFFIX = ".tmp"
_INT16 = np.iinfo(np.int16)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def cache_dir_for(data: DataConfig, manifest_path: Path) -> Path:
    """``data.cache_dir``, or ``<manifest dir>/.volpre_cache`` when it is None."""
    if data.cache_dir is not None:
        return Path(data.cache_dir).expanduser()
    return Path(manifest_path).resolve().parent / DEFAULT_DIR_NAME


# ----------------------------------------------------------------------------- source identity


def source_identity(entry: ManifestEntry) -> list[dict]:
    """Per source file of ``entry``: ``path``, ``size``, ``mtime_ns`` and ``head_sha256`` (of its
    first :data:`HEAD_BYTES` bytes). Raises ``VolumeError(kind="missing")`` for a missing image."""
    identity = []
    for image in entry.image:
        if not Path(image).exists():
            raise VolumeError(image, "missing", "no such file or directory")
        for path in source_files(Path(image)):
            stat = path.stat()
            with open(path, "rb") as handle:
                head = hashlib.sha256(handle.read(HEAD_BYTES)).hexdigest()
            identity.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                             "head_sha256": head})
    return identity


def _identity_change(recorded: list[dict], current: list[dict]) -> str | None:
    """What differs between two source identities (None when equal), naming the first file."""
    if recorded == current:
        return None
    old = {f["path"]: f for f in recorded}
    new = {f["path"]: f for f in current}
    for path in sorted(set(old) | set(new)):
        if path not in new:
            return f"source file {path} is gone"
        if path not in old:
            return f"source file {path} is new"
        changed = [k for k in ("size", "mtime_ns", "head_sha256") if old[path].get(k) != new[path][k]]
        if changed:
            return f"source file {path} changed ({', '.join(changed)})"
    return "source files changed"


# ----------------------------------------------------------------------------- storage


def to_storage(image: np.ndarray, modality: str | None, where: str) -> np.ndarray:
    """The cached form of a preprocessed volume: CT HU rounded to int16 (saturating at its limits),
    anything else (MR z-scores; ``None``: a volume normalised by an nnU-Net plan) float16. Raises
    ``VolumeError(kind="non-finite")`` if a float16 value would exceed float16's range."""
    if modality == "CT":
        return np.clip(np.rint(image), _INT16.min, _INT16.max).astype(np.int16)
    peak = float(np.abs(image).max()) if image.size else 0.0
    if peak > _FLOAT16_MAX:
        kind = "MR" if modality == "MR" else "normalised"
        raise VolumeError(where, "non-finite", f"preprocessed {kind} value {peak:.4g} exceeds float16's range "
                                               f"(+-{_FLOAT16_MAX:.0f}) used by the cache; expected z-scores")
    return image.astype(np.float16)


CRC_SLAB_BYTES = 1 << 24
""":func:`voxels_crc32` reads a stored volume in slabs of about this many bytes."""


def voxels_crc32(image: np.ndarray | h5py.Dataset) -> int:
    """CRC-32 (zlib) of a stored volume's ``(C, X, Y, Z)`` bytes in C order.

    Read slab by slab along ``X`` (contiguous runs of the C-order bytes), so that checking a large
    volume holds about :data:`CRC_SLAB_BYTES` in memory, not the volume.
    """
    _, x, *rest = image.shape
    step = max(1, CRC_SLAB_BYTES // max(1, int(np.prod(rest)) * image.dtype.itemsize))
    crc = 0
    for channel in range(image.shape[0]):
        for first in range(0, x, step):
            slab = np.ascontiguousarray(image[channel, first : first + step])
            crc = zlib.crc32(memoryview(slab).cast("B"), crc)
    return crc


def write_entry(path: Path, image: np.ndarray, record: dict) -> None:
    """Write one entry file atomically: a private temporary file, fsync, rename onto ``path``.

    The HDF5 file is built in memory and written with plain writes (see "Write failures" above).

    Raises:
        CacheError: the file cannot be written (full disk, quota, read-only filesystem, ...).
    """
    token = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    temp = path.with_name(f"{path.name}.{token}{_TEMP_SUFFIX}")
    image = np.ascontiguousarray(image)
    record = {**record, "voxels_crc32": voxels_crc32(image)}
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=("v110", "latest"), locking=False) as f:
        f.create_dataset("image", data=image)  # contiguous, unfiltered: see "Layout" above
        f.attrs[RECORD_ATTR] = json.dumps(record)
    try:
        with open(temp, "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        fsync_folder(path.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise CacheError(f"cannot write cache entry {path}: {describe_write_error(exc)}; data.cache_dir sets "
                         "where the cache goes") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@dataclass
class StoredVolume:
    """A validated cache entry: ``image`` ``(C, X, Y, Z)`` int16 (CT HU) or float16 (MR), either
    the open HDF5 dataset (slicing reads only the region needed) or, right after a build, the
    array in memory."""

    image: h5py.Dataset | np.ndarray
    path: Path
    built: bool
    """True when this call built the entry (``image`` is then in memory)."""
    _file: h5py.File | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StoredVolume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class EntryStatus:
    """What :meth:`VolumeCache.ensure` did for one entry."""

    entry_id: str
    path: Path
    built: bool
    reason: str
    """Why it was (re)built (``missing``, ``source file ... changed``, ``corrupt: ...``), or ``up to date``."""
    voxels: int
    """Voxels of the stored volume (all channels)."""
    file_bytes: int


class VolumeCache:
    """Preprocessed volumes on disk, keyed by source, for one preprocessing config.

    Build with :meth:`create` (which checks the folder is writable). :meth:`load` returns a
    valid entry, building it first when it is missing, stale or corrupt. Each process remembers
    the ``(device, inode, size, mtime)`` of the entry files it has validated, so a validated file
    costs one ``open`` per read; another process's rebuild gives the file a new inode, which is
    validated again. A source file changed after its entry was validated in a process is noticed
    by processes started afterwards (every new run, every restarted worker).
    """

    def __init__(self, root: Path, preprocess: PreprocessConfig, plan: NNUNetPlan | None = None):
        self.root, self.preprocess, self.plan = Path(root), preprocess, plan
        if plan is None:
            self.config_hash = config_hash(preprocess)
        else:
            payload = json.dumps({"nnunet": plan.preprocessing_record()}, sort_keys=True)
            self.config_hash = "nnunet-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
        self.directory = self.root / self.config_hash
        self._validated: dict[str, tuple[int, int, int, int]] = {}

    @classmethod
    def create(cls, root: Path, preprocess: PreprocessConfig, plan: NNUNetPlan | None = None) -> VolumeCache:
        """A cache under ``root`` (preprocessing as ``plan`` says when given); raises :class:`CacheError` if its
        folder cannot be written and :class:`~volpre.config.ConfigError` if the CT window does not fit the int16
        cache."""
        low, high = preprocess.ct_window
        if plan is None and (low < _INT16.min or high > _INT16.max):
            raise ConfigError(f"preprocess.ct_window {[low, high]} must lie within [{_INT16.min}, {_INT16.max}] HU: "
                              "the cache stores CT as int16 Hounsfield units")
        cache = cls(root, preprocess, plan)
        probe = cache.directory / f".write-test.{socket.gethostname()}.{os.getpid()}{_TEMP_SUFFIX}"
        try:
            cache.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CacheError(f"data.cache_dir: cannot write the cache folder {cache.directory}: "
                             f"{exc.strerror or exc}; set data.cache_dir to a writable folder") from exc
        return cache

    # ------------------------------------------------------------------ naming

    @staticmethod
    def entry_spec(entry: ManifestEntry) -> dict:
        """What a cache entry is built from: image paths, series and modality."""
        return {"image": [str(p) for p in entry.image], "series_uid": entry.series_uid, "modality": entry.modality}

    def entry_path(self, entry: ManifestEntry) -> Path:
        """``<directory>/<first image name>-<key>.h5``."""
        key = hashlib.sha256(json.dumps(self.entry_spec(entry), sort_keys=True).encode()).hexdigest()[:24]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(entry.image[0]).name)[:40]
        return self.directory / f"{name}-{key}.h5"

    # ------------------------------------------------------------------ reading

    def load(self, entry: ManifestEntry) -> StoredVolume:
        """A valid entry for ``entry`` (built now if missing, stale or corrupt); close it after use.

        Raises whatever preprocessing raises for a bad source (``VolumeError`` and the like).
        """
        path = self.entry_path(entry)
        opened = self._open_valid(entry, path)
        if isinstance(opened, StoredVolume):
            return opened
        return self.build(entry, reason=opened)

    def _open_valid(self, entry: ManifestEntry, path: Path) -> StoredVolume | str:
        """The open entry, or why it cannot be used."""
        try:
            handle = h5py.File(path, "r", locking=False)
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"corrupt: {path.name} does not open as HDF5 ({one_line(exc)})"
        try:
            stat = os.fstat(handle.id.get_vfd_handle())
            fingerprint = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            image = handle["image"]
            if self._validated.get(str(path)) != fingerprint:
                problem = self._record_problem(entry, handle, image)
                if problem is not None:
                    handle.close()
                    return problem
                self._validated[str(path)] = fingerprint
            return StoredVolume(image=image, path=path, built=False, _file=handle)
        except VolumeError:  # the source itself is unusable (e.g. gone): a bad entry, not a bad cache file
            handle.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            handle.close()
            return f"corrupt: {path.name}: {one_line(exc)}"

    def _record_problem(self, entry: ManifestEntry, handle: h5py.File, image: h5py.Dataset) -> str | None:
        record = json.loads(handle.attrs[RECORD_ATTR])
        expected = {"format": CACHE_FORMAT, "volpre": __version__, "monai": monai.__version__,
                    "config_hash": self.config_hash, "entry": self.entry_spec(entry)}
        for key, value in expected.items():
            if record.get(key) != value:
                return f"stale: built with {key} {record.get(key)!r}, now {value!r}"
        if list(image.shape) != record["shape"] or str(image.dtype) != record["dtype"]:
            return (f"corrupt: {handle.filename} holds {image.dtype} {list(image.shape)}, its record says "
                    f"{record['dtype']} {record['shape']}")
        change = _identity_change(record["source"], source_identity(entry))
        if change is not None:
            return f"stale: {change}"
        if voxels_crc32(image) != record.get("voxels_crc32"):
            return f"corrupt: {Path(handle.filename).name}: its voxels do not match their checksum (voxels_crc32)"
        return None

    # ------------------------------------------------------------------ building

    def build(self, entry: ManifestEntry, reason: str = "missing") -> StoredVolume:
        """Run the deterministic stage on ``entry``, store it, and return it in memory."""
        path = self.entry_path(entry)
        if reason.startswith("corrupt"):
            log.warning("cache entry %s for %s is %s; rebuilding it", path, entry.id, reason)
        elif reason.startswith("stale"):
            log.info("rebuilding cache entry %s for %s (%s)", path, entry.id, reason)
        source = source_identity(entry)  # before reading: a change during the build shows next time
        if self.plan is None:
            modality = check_modality(entry.modality, entry.id)
            volume = preprocess_transforms(self.preprocess, modality)(entry_record(entry))["image"]
            stored = to_storage(np.asarray(volume.detach().cpu().numpy()), modality, str(entry.image[0]))
            affine = np.asarray(volume.affine, dtype=np.float64).tolist()
            preprocess = dataclasses.asdict(self.preprocess)
        else:  # the plan's axis order; nnU-Net keeps no affine for its preprocessed arrays either
            self.plan.check_modality(entry.modality, entry.id)
            stored = to_storage(self.plan.preprocess_entry(entry), None, str(entry.image[0]))
            affine, preprocess = None, {"nnunet": self.plan.preprocessing_record()}
        record = {
            "format": CACHE_FORMAT, "volpre": __version__, "monai": monai.__version__,
            "config_hash": self.config_hash, "preprocess": preprocess,
            "entry": self.entry_spec(entry), "source": source,
            "shape": list(stored.shape), "dtype": str(stored.dtype),
            "affine": affine,
            "built_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()},
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder {self.directory}: {describe_write_error(exc)}") from exc
        write_entry(path, stored, record)
        self._validated.pop(str(path), None)
        return StoredVolume(image=stored, path=path, built=True)

    def ensure(self, entry: ManifestEntry) -> EntryStatus:
        """Make ``entry`` valid, checking an existing entry in full (its voxels against their
        checksum, even if this process validated it before); rebuild it if anything is wrong."""
        path = self.entry_path(entry)
        self._validated.pop(str(path), None)
        opened = self._open_valid(entry, path)
        if isinstance(opened, StoredVolume):
            with opened:
                return EntryStatus(entry.id, path, False, "up to date", int(np.prod(opened.shape)),
                                   path.stat().st_size)
        with self.build(entry, reason=opened) as stored:
            return EntryStatus(entry.id, path, True, opened, int(np.prod(stored.shape)), path.stat().st_size)

    def remove_stale_temporaries(self, max_age_s: float = STALE_TEMP_AGE_S) -> int:
        """Delete temporary files older than ``max_age_s`` (left by killed builders); return how many."""
        removed, now = 0, time.time()
        for temp in self.directory.glob(f"*{_TEMP_SUFFIX}"):
            try:
                if now - temp.stat().st_mtime > max_age_s:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:  # another process removed it first
                continue
        return removed


# ----------------------------------------------------------------------------- crops


def read_crop(image: h5py.Dataset | np.ndarray, start: Sequence[int], roi: Sequence[int], modality: str | None,
              preprocess: PreprocessConfig, plan: NNUNetPlan | None = None,
              mark: Callable[[str], None] | None = None) -> torch.Tensor:
    """One crop of a stored volume, reading only the region under it, as the random stage cuts it.

    Args:
        image: ``(C, X, Y, Z)`` stored volume (int16 CT HU or float16 MR).
        start: the crop's corner in the volume padded to ``roi`` (from ``draw_crop_starts``).
        roi: crop size ``(X, Y, Z)``.

    Returns:
        plain :data:`~volpre.data.transforms.CROP_DTYPE` tensor ``(C, *roi)``: CT in HU, MR z-scores
        (windowed later, on the training device: :class:`~volpre.data.transforms.CropWindow`). Voxels
        outside the volume are padded as ``crops_at`` pads (CT: the window's low end; MR: the nearest
        border voxel), which reproduces MONAI's symmetric ``SpatialPad`` followed by the crop. With an
        nnU-Net ``plan``: the stored values as they are, padded with 0.

    ``mark`` (benchmarks) is called with ``"read"`` and ``"convert"`` as each stage ends: the region
    read from the stored volume, its float16 copy (and padding).
    """
    shape = np.asarray(image.shape[1:], dtype=np.int64)
    size = np.asarray(roi, dtype=np.int64)
    first = np.asarray(start, dtype=np.int64) - padding_before(shape, size)  # in volume voxels; < 0 in padding
    lo, hi = np.maximum(first, 0), np.minimum(first + size, shape)
    stored = image[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if mark is not None:
        mark("read")
    region = torch.from_numpy(np.asarray(stored)).to(CROP_DTYPE).numpy()  # then padded as the window's low end
    pad = [(0, 0)] + [(int(a), int(b)) for a, b in zip(lo - first, first + size - hi)]
    if any(p != (0, 0) for p in pad):
        if plan is not None:
            region = np.pad(region, pad, mode="constant", constant_values=0.0)
        elif modality == "CT":
            region = np.pad(region, pad, mode="constant", constant_values=preprocess.ct_window[0])
        else:
            region = np.pad(region, pad, mode="edge")
    crop = torch.from_numpy(np.ascontiguousarray(region))
    if mark is not None:
        mark("convert")
    return crop


class CachedCrops:
    """A :class:`~volpre.data.dataset.CropSource` reading crops from a :class:`VolumeCache`.

    The first visit of a volume builds its entry (and cuts the crops from the volume in memory);
    later visits read only the region under each crop. The crops equal those of
    :class:`~volpre.data.dataset.OnTheFlyCrops` for the same generator, up to the cache's
    rounding (see the module docstring).
    """

    def __init__(self, cache: VolumeCache, data: DataConfig):
        self.cache, self.data = cache, data

    def __call__(self, entry: ManifestEntry, count: int, rng: np.random.Generator) -> list[torch.Tensor]:
        if self.cache.plan is None:
            modality = check_modality(entry.modality, entry.id)
        else:
            self.cache.plan.check_modality(entry.modality, entry.id)
            modality = entry.modality
        state = rng.bit_generator.state
        with self.cache.load(entry) as stored:
            try:
                return self._cut(stored, modality, count, rng)
            except OSError as exc:  # the file could not be read
                if stored.built:
                    raise
                reason = f"corrupt: {stored.path.name}: {one_line(exc)}"
        rng.bit_generator.state = state  # the same corners, from the rebuilt volume
        with self.cache.build(entry, reason=reason) as rebuilt:
            return self._cut(rebuilt, modality, count, rng)

    def _cut(self, stored: StoredVolume, modality: str | None, count: int,
             rng: np.random.Generator) -> list[torch.Tensor]:
        starts = draw_crop_starts(stored.shape[1:], self.data.roi, count, rng)
        return [read_crop(stored.image, start, self.data.roi, modality, self.cache.preprocess, self.cache.plan)
                for start in starts]


def entries_to_cache(entries: Sequence[ManifestEntry]) -> Iterator[ManifestEntry]:
    """``entries`` without repeats of the same source (entries that would share one cache entry)."""
    seen: set[str] = set()
    for entry in entries:
        spec = json.dumps(VolumeCache.entry_spec(entry), sort_keys=True)
        if spec not in seen:
            seen.add(spec)
            yield entry


# ----------------------------------------------------------------------------- building a whole manifest


@dataclass
class CacheReport:
    """What :func:`build_cache` found and did."""

    directory: Path
    n_entries: int
    statuses: list[EntryStatus]
    failures: list[EntryProblem]
    removed_temporaries: int

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of this manifest's entries."""
        return sum(s.file_bytes for s in self.statuses)

    @property
    def int16_bytes(self) -> int:
        """Bytes the stored voxels take uncompressed (2 per voxel: int16 CT, float16 MR)."""
        return 2 * sum(s.voxels for s in self.statuses)

    @classmethod
    def merge(cls, reports: Sequence[CacheReport]) -> CacheReport:
        """One report for the shards of one manifest that several ranks built (:func:`build_cache`)."""
        first = reports[0]
        return cls(first.directory, first.n_entries, [s for r in reports for s in r.statuses],
                   [f for r in reports for f in r.failures], sum(r.removed_temporaries for r in reports))

    def summary(self) -> str:
        built = sum(s.built for s in self.statuses)
        n_sources = len(self.statuses) + len(self.failures)
        lines = [
            f"cache {printable(self.directory)}: {n_sources} sources ({self.n_entries} entries): {built} built, "
            f"{len(self.statuses) - built} up to date, {len(self.failures)} failed",
            f"{self.file_bytes / 2**20:.1f} MiB on disk for {self.int16_bytes / 2**20:.1f} MiB of voxels at 2 bytes "
            f"each ({self.file_bytes / max(self.int16_bytes, 1):.2f}x)",
        ]
        if self.removed_temporaries:
            lines.append(f"removed {self.removed_temporaries} temporary files left by interrupted builds")
        return "\n".join(lines)


class _EnsureEach(torch.utils.data.Dataset):
    """``dataset[i]`` makes source ``i``'s entry valid: its :class:`EntryStatus` or :class:`EntryProblem`."""

    def __init__(self, cache: VolumeCache, entries: Sequence[ManifestEntry]):
        self.cache, self.entries = cache, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> EntryStatus | EntryProblem | StopRun:
        """The entry's status, its problem if its source is bad data, or (a write failure of the
        cache) a :class:`StopRun`; anything else is raised (a bug, a memory error)."""
        entry = self.entries[index]
        try:
            return self.cache.ensure(entry)
        except CacheError as error:
            return StopRun(error)  # out of a worker as itself; build_cache raises it
        except Exception as error:  # noqa: BLE001 - narrowed at once: bad data is reported, the rest raised
            bad = as_bad_data(error, str(entry.image[0]))
            if bad is None:
                raise
            return EntryProblem.from_error(entry.id, bad)


def _as_is(item):
    return item


def shard(sources: Sequence[ManifestEntry], rank: int, world_size: int) -> list[ManifestEntry]:
    """The sources rank ``rank`` of ``world_size`` builds: every ``world_size``-th, from the ``rank``-th.

    Every rank computes the same ``sources`` from the same manifest, so the shards are disjoint
    and together hold every source: each is built exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(sources[rank::world_size])


def build_cache(entries: Sequence[ManifestEntry], cache: VolumeCache, workers: int,
                on_result: Callable[[EntryStatus | EntryProblem], None] | None = None,
                rank: int = 0, world_size: int = 1, progress: Progress | None = None) -> CacheReport:
    """Make every distinct source of ``entries`` (of this rank's :func:`shard`) a valid cache
    entry, ``workers`` processes at a time.

    Existing entries are read in full (their voxels checked against their checksum); missing, stale or corrupt
    ones are built, so after a killed run (or rank) a relaunch builds only what is missing.
    Temporary files left by killed builders are removed first. A source that is bad data becomes a
    failure in the report; a cache that cannot be written raises :class:`CacheError` at once (the
    entries built so far stay valid). Several ranks (torchrun, SLURM) each call this with their
    ``rank``; :meth:`CacheReport.merge` joins their reports. ``progress`` counts this rank's
    sources as they are done.
    """
    removed = cache.remove_stale_temporaries()
    sources = shard(list(entries_to_cache(entries)), rank, world_size)
    if progress is not None:
        progress.total = len(sources)
    loader = torch.utils.data.DataLoader(_EnsureEach(cache, sources), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is)
    statuses: list[EntryStatus] = []
    failures: list[EntryProblem] = []
    built = 0
    for result in loader:
        if isinstance(result, StopRun):
            raise result.error
        (statuses if isinstance(result, EntryStatus) else failures).append(result)
        built += isinstance(result, EntryStatus) and result.built
        if on_result is not None:
            on_result(result)
        if progress is not None:
            progress.update(1, built=built, failed=len(failures))
    return CacheReport(cache.directory, len(entries), statuses, failures, removed)
