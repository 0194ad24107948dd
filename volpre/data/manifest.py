"""Manifests: the JSON files that list the volumes volpre works on.

Format (JSON Schema: ``data_manifests/manifest.schema.json``)::

    {"format_version": 1,
     "entries": [{"image": "ct/case001.nii.gz", "id": "case001", "subject": "p001",
                  "modality": "CT", "label": "labels/case001.nii.gz",
                  "time": 412.0, "event": 1, "split": "train",
                  "series_uid": "1.2.826...", "shape": [512, 512, 120], "spacing": [0.7, 0.7, 2.5]}],
     "rejected": [{"path": "broken/scan.nii.gz", "reason": "truncated gzip stream"}]}

Only ``image`` is required. Paths are relative to the manifest file (absolute paths are kept
as they are). ``image`` is a volume file, a DICOM series directory (with ``series_uid`` when it
holds several series), or a list of files on one grid that become channels. Entries without an
``id`` get one derived from the image path; without a ``subject`` an entry is its own subject.

In Python, :class:`ManifestEntry` holds absolute paths; :func:`save_manifest` writes them back
relative to the manifest's folder. MONAI decathlon-style datalists convert both ways
(:func:`from_decathlon`, :func:`to_decathlon`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import jsonschema

from volpre import __version__
from volpre.errors import UserInputError
from volpre.files import atomic_write_text, fsync_folder

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
FORMAT_VERSION = 1

# Split names the bundles and the evaluation read; other names are allowed and left alone.
TRAIN, VAL, TEST = "train", "val", "test"

MODALITY_SOURCES: dict[str, str] = {
    "dicom-header": "the DICOM series' Modality (0008,0060)",
    "rule": "a --modality rule of volpre index",
    "json-sidecar": "the Modality field of the JSON sidecar beside the file (dcm2niix, BIDS)",
    "bids-suffix": "the BIDS suffix of the file name (_T1w, _T2w, _FLAIR, _ct, ...)",
    "image-header": "the modality field of the NRRD/MetaImage header",
    "voxel-values": "the voxel values (air at -1000 HU: calibrated CT)",
}
"""Values of an entry's ``modality_source`` -> what decided its modality (see :mod:`volpre.data.modality`)."""


class ManifestError(UserInputError, ValueError):
    """A manifest file is missing, not JSON, or does not follow the schema."""


@dataclass
class ManifestEntry:
    """One volume (one scan, or several co-registered channels) and what is known about it.

    Paths are absolute. ``image`` has one path per channel. ``shape`` and ``spacing`` are the
    RAS-oriented voxel grid as read from the header (``volpre index`` fills them).
    """

    image: tuple[Path, ...]
    id: str
    subject: str | None = None
    modality: str | None = None
    sequence: str | None = None
    """MR sequence (``T1``, ``T1CE``, ``T2``, ``FLAIR``, ...), when known."""
    modality_source: str | None = None
    """How ``modality`` was decided (``volpre index`` records it; see :data:`MODALITY_SOURCES`)."""
    label: Path | None = None
    time: float | None = None
    event: int | None = None
    covariates: dict[str, float] | None = None
    split: str | None = None
    series_uid: str | None = None
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None

    @property
    def subject_or_id(self) -> str:
        """The subject, or the entry's own id when no subject is recorded."""
        return self.subject if self.subject is not None else self.id

    @property
    def modality_class(self) -> str:
        """``modality``, refined by ``sequence`` when one is given (``CT``, ``MR``, ``MR/T2``); the
        classes of the disruptive autoencoder's cross-modal contrastive loss. ``?`` when neither is known."""
        modality = self.modality or "?"
        return modality if self.sequence is None else f"{modality}/{self.sequence}"

    def to_record(self) -> dict[str, Any]:
        """A plain dict for MONAI dictionary transforms: absolute path strings, absent keys omitted.

        ``image`` is a string for one channel and a list of strings for several.
        """
        record = _entry_to_json(self, base_dir=None)
        record["id"] = self.id
        return record


@dataclass
class RejectedFile:
    """A file or series ``volpre index`` found and could not use."""

    path: str
    reason: str


@dataclass
class Manifest:
    entries: list[ManifestEntry]
    rejected: list[RejectedFile] = field(default_factory=list)
    description: str | None = None
    path: Path | None = None
    """The file this manifest was loaded from (None when built in memory)."""

    def by_split(self, split: str) -> list[ManifestEntry]:
        return [e for e in self.entries if e.split == split]

    def splits(self) -> list[str]:
        """The distinct ``split`` values of the entries, sorted."""
        return sorted({e.split for e in self.entries if e.split is not None})

    def select_splits(self, splits: Iterable[str] | None, option: str = "--splits") -> list[ManifestEntry]:
        """The entries of ``splits`` (every entry when None), in manifest order.

        Raises:
            ManifestError: a name in ``splits`` that no entry has (a typo like ``tran`` would
                otherwise select nothing, or silently less), naming the splits the manifest has.
        """
        if splits is None:
            return list(self.entries)
        wanted = list(splits)
        unknown = [s for s in wanted if s not in self.splits()]
        if unknown or not wanted:
            raise ManifestError(f"{option}: {self.describe_splits(unknown or [''])}")
        chosen = set(wanted)
        return [e for e in self.entries if e.split in chosen]

    def describe_splits(self, unknown: Sequence[str]) -> str:
        """``unknown split 'tran'; manifest M has splits train (3 entries), val (1 entry)``."""
        names = ", ".join(repr(s) for s in unknown)
        where = f"manifest {self.path}" if self.path is not None else "the manifest"
        counts = {s: sum(e.split == s for e in self.entries) for s in self.splits()}
        unsplit = sum(e.split is None for e in self.entries)
        has = ", ".join(f"{s} ({n} {'entry' if n == 1 else 'entries'})" for s, n in counts.items())
        text = f"unknown split {names}; {where} has splits {has}" if counts else (
            f"unknown split {names}; {where} has no splits (no entry sets 'split')")
        if counts and unsplit:
            text += f" and {unsplit} {'entry' if unsplit == 1 else 'entries'} without a split"
        return text


# ----------------------------------------------------------------------------- reading


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _format_schema_error(path: Path, error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"manifest {path}: {where or 'top level'}: {error.message}"


def validate_manifest_json(data: Any, path: Path) -> None:
    """Raise ManifestError listing every schema violation in ``data`` (at most 20)."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    lines = [_format_schema_error(path, e) for e in errors] + _non_finite_numbers(data, path)
    if lines:
        more = f"\n... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise ManifestError("\n".join(lines[:20]) + more)


def _non_finite_numbers(data: Any, path: Path) -> list[str]:
    """One line per NaN or infinite number in the entries (JSON Schema's ``number`` admits them).

    Python's ``json`` reads the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity``
    (and overflows like ``1e999`` to infinity); a survival time of ``Infinity`` or a ``NaN``
    covariate would pass every ``minimum`` check and poison the Cox loss and the C-index.
    """
    entries = data.get("entries") if isinstance(data, dict) else None
    lines = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        values = [(key, entry.get(key)) for key in ("time", "spacing")]
        covariates = entry.get("covariates")
        if isinstance(covariates, dict):
            values += [(f"covariates.{name}", value) for name, value in covariates.items()]
        for key, value in values:
            for number in value if isinstance(value, list) else [value]:
                if isinstance(number, float) and not math.isfinite(number):
                    where = f"entries[{i}].{key}"
                    lines.append(f"manifest {path}: {where}: {json.dumps(number)} is not a finite number")
    return lines


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))


def derive_entry_id(image: str, series_uid: str | None) -> str:
    """An id from the image path as written in the manifest (plus the series UID's tail)."""
    stem = image.rstrip("/")
    return f"{stem}#{series_uid}" if series_uid else stem


def _entry_from_json(item: dict[str, Any], base_dir: Path) -> ManifestEntry:
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    first = images[0]
    return ManifestEntry(
        image=tuple(_resolve(base_dir, p) for p in images),
        id=item.get("id") or derive_entry_id(first, item.get("series_uid")),
        subject=item.get("subject"),
        modality=item.get("modality"),
        sequence=item.get("sequence"),
        modality_source=item.get("modality_source"),
        label=_resolve(base_dir, item["label"]) if "label" in item else None,
        time=float(item["time"]) if "time" in item else None,
        event=int(item["event"]) if "event" in item else None,
        covariates={k: float(v) for k, v in item["covariates"].items()} if "covariates" in item else None,
        split=item.get("split"),
        series_uid=item.get("series_uid"),
        shape=tuple(item["shape"]) if "shape" in item else None,
        spacing=tuple(float(s) for s in item["spacing"]) if "spacing" in item else None,
    )


def check_unique_ids(entries: Iterable[ManifestEntry], where: str) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.id in seen:
            raise ManifestError(
                f"manifest {where}: entries[{seen[entry.id]}] and entries[{i}] share the id {entry.id!r}; "
                "ids must be unique (set 'id' explicitly)"
            )
        seen[entry.id] = i


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, schema-check and resolve a manifest. Raises :class:`ManifestError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path}: not valid JSON ({exc})") from exc
    validate_manifest_json(data, path)
    base_dir = path.resolve().parent
    entries = [_entry_from_json(item, base_dir) for item in data["entries"]]
    check_unique_ids(entries, str(path))
    rejected = [RejectedFile(r["path"], r["reason"]) for r in data.get("rejected", [])]
    return Manifest(entries=entries, rejected=rejected, description=data.get("description"), path=path)


# ----------------------------------------------------------------------------- writing


def relative_path(path: Path, base_dir: Path | None) -> str:
    """``path`` as written in a manifest in ``base_dir`` (POSIX, relative; absolute if no base)."""
    if base_dir is None:
        return str(path)
    try:
        return Path(os.path.relpath(path, base_dir)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)


def _entry_to_json(entry: ManifestEntry, base_dir: Path | None) -> dict[str, Any]:
    images = [relative_path(p, base_dir) for p in entry.image]
    out: dict[str, Any] = {"image": images[0] if len(images) == 1 else images, "id": entry.id}
    for key in ("subject", "modality", "sequence", "modality_source", "time", "event", "covariates", "split",
                "series_uid"):
        value = getattr(entry, key)
        if value is not None:
            out[key] = value
    if entry.label is not None:
        out["label"] = relative_path(entry.label, base_dir)
    if entry.shape is not None:
        out["shape"] = [int(s) for s in entry.shape]
    if entry.spacing is not None:
        out["spacing"] = [round(float(s), 6) for s in entry.spacing]
    return out


class ManifestWriter:
    """Stream entries into a manifest file without holding them all in memory.

    The file appears atomically (written under a temporary name, renamed on close), so a crash
    mid-index never leaves a half-written manifest behind::

        with ManifestWriter(out_path, description="...") as writer:
            for entry in entries:
                writer.add(entry)
            writer.reject(path, reason)
    """

    def __init__(self, path: str | os.PathLike, description: str | None = None):
        self.path = Path(path)
        self.base_dir = self.path.resolve().parent
        self.description = description
        self.n_entries = 0
        self.rejected: list[RejectedFile] = []
        self._ids: set[str] = set()
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")

    def __enter__(self) -> "ManifestWriter":
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "w")
        header: dict[str, Any] = {"format_version": FORMAT_VERSION, "created_by": f"volpre {__version__}"}
        if self.description:
            header["description"] = self.description
        self._file.write(json.dumps(header)[:-1] + ', "entries": [\n')
        return self

    def add(self, entry: ManifestEntry) -> None:
        if entry.id in self._ids:
            raise ManifestError(f"manifest {self.path}: duplicate entry id {entry.id!r}")
        self._ids.add(entry.id)
        prefix = ",\n" if self.n_entries else ""
        self._file.write(prefix + "  " + json.dumps(_entry_to_json(entry, self.base_dir)))
        self.n_entries += 1

    def reject(self, path: str | os.PathLike, reason: str) -> None:
        self.rejected.append(RejectedFile(relative_path(Path(path), self.base_dir), reason))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                rejected = [dataclasses.asdict(r) for r in self.rejected]
                self._file.write('\n],\n"rejected": ' + json.dumps(rejected, indent=1) + "\n}\n")
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
            fsync_folder(self.path.parent)
        else:
            self._tmp.unlink(missing_ok=True)


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write ``manifest`` to ``path`` (atomically), paths relative to its folder."""
    path = Path(path)
    with ManifestWriter(path, description=manifest.description) as writer:
        for entry in manifest.entries:
            writer.add(entry)
        for rejected in manifest.rejected:
            writer.rejected.append(rejected)
    return path


# ----------------------------------------------------------------------------- decathlon

_DECATHLON_SPLITS = {"training": TRAIN, "validation": VAL, "test": TEST}


def from_decathlon(datalist_path: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                   modality: str | None = None) -> Manifest:
    """Convert a MONAI decathlon-style datalist (``training``/``validation``/``test`` lists).

    Paths resolve against ``base_dir`` (default: the datalist's folder), as in MONAI's
    ``load_decathlon_datalist``, which does the reading.
    """
    from monai.data import load_decathlon_datalist

    datalist_path = Path(datalist_path)
    try:
        raw = json.loads(datalist_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"datalist {datalist_path}: cannot read JSON ({exc})") from exc
    keys = [k for k in _DECATHLON_SPLITS if raw.get(k)]
    if not keys:
        raise ManifestError(
            f"datalist {datalist_path}: found keys {sorted(raw)}, expected at least one non-empty "
            f"list among {', '.join(_DECATHLON_SPLITS)}"
        )
    id_base = Path(base_dir) if base_dir is not None else datalist_path.parent
    entries: list[ManifestEntry] = []
    for key in keys:
        items = load_decathlon_datalist(
            datalist_path, is_segmentation=True, data_list_key=key, base_dir=base_dir
        )
        for item in items:
            images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
            image = tuple(Path(p) for p in images)
            entry_id = item.get("id") or relative_path(image[0], id_base.resolve())
            entries.append(
                ManifestEntry(
                    image=image,
                    id=str(entry_id),
                    modality=modality,
                    label=Path(item["label"]) if item.get("label") else None,
                    split=_DECATHLON_SPLITS[key],
                )
            )
    check_unique_ids(entries, str(datalist_path))
    return Manifest(entries=entries, description=f"imported from {datalist_path.name}")


def to_decathlon(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write a decathlon-style datalist: train -> training, val -> validation, test -> test.

    Entries without a split go to ``training``; entries of other splits are left out. Paths are
    written relative to the datalist's folder.
    """
    path = Path(path)
    base_dir = path.resolve().parent
    out: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    target = {None: "training", TRAIN: "training", VAL: "validation", TEST: "test"}
    for entry in manifest.entries:
        key = target.get(entry.split)
        if key is None:
            continue
        images = [relative_path(p, base_dir) for p in entry.image]
        item: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
        if entry.label is not None:
            item["label"] = relative_path(entry.label, base_dir)
        out[key].append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(out, indent=2) + "\n")


def entry_record(entry: ManifestEntry) -> dict:
    """The MONAI record the deterministic stage reads for pretraining (image only, no label)."""
    record = entry.to_record()
    record.pop("label", None)
    return record
