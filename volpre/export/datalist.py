"""Bundle datalists from a volpre manifest: the entries of one split and one modality, as MONAI records.

A bundle names its data with a top-level ``manifest`` (a volpre manifest JSON; override it with
``--manifest PATH``) and picks entries by their ``split`` (``train`` / ``val`` / ``test``) and
``modality`` (``CT`` / ``MR``), e.g.::

    "train_records": "$volpre.export.datalist.segmentation_records(@manifest, @train_split, @modality)"

Records hold absolute paths and only the keys the bundle's transforms read: ``image`` (one
path, or a list of channel paths), ``series_uid`` (only for DICOM folders holding several
series), ``id``, and ``label`` (a label volume path) or ``outcome`` (``[time, event]``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from volpre.data.manifest import ManifestEntry, load_manifest
from volpre.export.errors import ExportError

log = logging.getLogger(__name__)


def manifest_dir(manifest: str | os.PathLike[str] | None) -> str:
    """The folder holding the manifest (a bundle's ``dataset_dir``), absolute.

    Raises:
        ExportError: the bundle's ``manifest`` was not set.
    """
    return str(Path(_require_manifest(manifest)).resolve().parent)


def _require_manifest(manifest: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if manifest is None or manifest == "":
        raise ExportError(
            "the bundle's `manifest` is not set: pass --manifest PATH (a volpre manifest JSON, e.g. from "
            "`volpre index` or `volpre demo-data`)"
        )
    return manifest


def _image_record(entry: ManifestEntry) -> dict[str, Any]:
    record = entry.to_record()
    kept = {"image": record["image"], "id": record["id"]}
    if "series_uid" in record:
        kept["series_uid"] = record["series_uid"]
    return kept


def _select(
    manifest: str | os.PathLike[str] | None,
    split: str,
    modality: str,
    needs: Callable[[ManifestEntry], bool],
    need_text: str,
    minimum: int,
) -> list[ManifestEntry]:
    path = _require_manifest(manifest)
    entries = [e for e in load_manifest(path).entries if e.split == split and e.modality == modality]
    usable = [e for e in entries if needs(e)]
    if len(entries) > len(usable):
        log.warning(
            "manifest %s: %d of the %d %s entries in split %r have no %s and are left out",
            path, len(entries) - len(usable), len(entries), modality, split, need_text,
        )
    if len(usable) < minimum:
        raise ExportError(
            f"manifest {path}: split {split!r} holds {len(usable)} {modality} entries with {need_text} "
            f"({len(entries)} {modality} entries in that split in all); expected at least {minimum}"
        )
    return usable


def segmentation_records(manifest: str | os.PathLike[str] | None, split: str, modality: str) -> list[dict[str, Any]]:
    """``[{"image", "label", "id"[, "series_uid"]}]`` for the labelled ``modality`` entries of ``split``.

    Entries without a label are left out (with a warning).

    Raises:
        ExportError: ``manifest`` is not set, or no labelled entry matches.
        ManifestError: the manifest cannot be read or does not follow the schema.
    """
    entries = _select(manifest, split, modality, lambda e: e.label is not None, "label", minimum=1)
    return [{**_image_record(e), "label": str(e.label)} for e in entries]


def image_records(manifest: str | os.PathLike[str] | None, split: str, modality: str) -> list[dict[str, Any]]:
    """``[{"image", "id"[, "series_uid"]}]`` for every ``modality`` entry of ``split`` (for inference).

    Raises:
        ExportError: ``manifest`` is not set, or no entry matches.
        ManifestError: the manifest cannot be read or does not follow the schema.
    """
    return [_image_record(e) for e in _select(manifest, split, modality, lambda e: True, "image", minimum=1)]


def survival_records(manifest: str | os.PathLike[str] | None, split: str, modality: str) -> list[dict[str, Any]]:
    """``[{"image", "outcome", "id"[, "series_uid"]}]`` for the ``modality`` entries of ``split`` with an outcome.

    ``outcome`` is float32 ``(2,)`` ``[time, event]`` (event 1 = observed, 0 = censored): the
    survival label layout of :mod:`volpre.survival.layout` once collated to ``(B, 2)``. It is not called
    ``label`` because volpre's reader loads a ``label`` key as a label volume. Entries without
    ``time`` and ``event`` are left out (with a warning).

    Raises:
        ExportError: ``manifest`` is not set, or fewer than two entries have an outcome.
        ManifestError: the manifest cannot be read or does not follow the schema.
    """
    entries = _select(
        manifest, split, modality, lambda e: e.time is not None and e.event is not None, "time and event", minimum=2
    )
    return [{**_image_record(e), "outcome": np.array([e.time, e.event], dtype=np.float32)} for e in entries]
