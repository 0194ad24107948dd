"""Deciding the modality of a NIfTI/NRRD/MetaImage file from what the archive already says.

DICOM series carry their ``Modality``; other formats lose it on conversion, but archives keep
it beside the file or in its name. :func:`decide_modality` asks, in this order, and the first
answer wins (its ``source`` is recorded in the manifest entry as ``modality_source``):

1. ``json-sidecar``: the ``Modality`` field of the JSON file beside the volume with the same
   stem (``scan.nii.gz`` -> ``scan.json``), as dcm2niix and BIDS write it (``"MR"``, ``"CT"``,
   ``"PT"``).
2. ``bids-suffix``: the last ``_``-separated part of the file name, matched case-insensitively
   against the BIDS suffixes in :data:`BIDS_SUFFIXES` (``sub-01_T1w.nii.gz`` -> MR,
   ``sub-01_ct.nii.gz`` -> CT; ``_ct`` is BIDS extension proposal BEP024's suffix).
3. ``image-header``: the modality the file's own header states: a MetaImage ``Modality`` field
   (``MET_MOD_CT``, ``MET_MOD_MR``, ...) or an NRRD key-value pair ``modality:=CT``
   (:attr:`volpre.data.readers.VolumeHeader.modality`). NIfTI headers have no such field.
4. ``voxel-values``, the last resort, which reads the whole volume: :func:`modality_from_voxels`
   decides **CT only**, by its air: calibrated CT stores Hounsfield units, in which air is
   -1000. A volume is CT when

   - at least :data:`AIR_MIN_FRACTION` (5%) of its voxels lie in the air window
     :data:`AIR_WINDOW_HU` = [-1100, -900] (both ends included; air around the body, lungs'
     airways, and the -1024 padding many scanners put outside the reconstruction circle), and
   - the air window holds at least :data:`AIR_PEAK_RATIO` (2) times as many voxels as the
     equally wide window just below it, [-1300, -1100): the low values pile up at air instead
     of continuing downwards (signed data spread evenly, such as MR phase maps in
     [-4096, 4095], fails this).

   Voxel values never decide MR (MR has no calibrated scale, and an uncalibrated CT, stored
   with air at 0, looks the same), nor CT without air (a volume cropped to an organ): such a
   file stays undecided, with the numbers in the reason.

``volpre index --modality`` rules come before all of these (they override), and DICOM series
keep their header's Modality. A file none of these decide is reported by ``volpre index`` with
every reason and left out of the entries (listed under ``rejected``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from volpre.data.readers import FILE_FORMATS, MODALITY_CODE

AIR_WINDOW_HU = (-1100.0, -900.0)
"""Hounsfield units counted as air (both ends included)."""
BELOW_AIR_WINDOW_HU = (-1300.0, -1100.0)
"""The equally wide window just below air (low end included, high end excluded)."""
AIR_MIN_FRACTION = 0.05
"""Fraction of voxels that must lie in :data:`AIR_WINDOW_HU` for the voxel values to say CT."""
AIR_PEAK_RATIO = 2.0
"""The air window must hold at least this many times the voxels of :data:`BELOW_AIR_WINDOW_HU`."""

SIDECAR_MAX_BYTES = 1 << 20
"""JSON sidecars larger than this are not read (dcm2niix writes a few KiB)."""

_MR_SUFFIXES = (
    # anatomical (BIDS anat), parametric maps and quantitative MRI file collections
    "T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio", "T2star", "FLASH", "PD",
    "T1map", "R1map", "T2map", "R2map", "T2starmap", "R2starmap", "PDmap", "MTRmap", "MTsat", "UNIT1", "T1rho",
    "MWFmap", "MTVmap", "Chimap", "S0map", "M0map", "VFA", "IRT1", "MP2RAGE", "MESE", "MEGRE", "MTR", "MTS", "MPM",
    "TB1map", "RB1map",
    # diffusion, functional, field maps, perfusion
    "dwi", "sbref", "bold", "cbv", "phase", "phasediff", "phase1", "phase2", "magnitude", "magnitude1",
    "magnitude2", "fieldmap", "epi", "asl", "m0scan",
)
BIDS_SUFFIXES: dict[str, str] = {**{s.lower(): "MR" for s in _MR_SUFFIXES}, "ct": "CT", "pet": "PT"}
"""Lower-case BIDS suffix -> modality code (BIDS 1.9 MRI and PET suffixes; ``ct`` from BEP024)."""



@dataclass(frozen=True)
class ModalityDecision:
    """What decided a file's modality, or why nothing did."""

    modality: str | None
    """A DICOM modality code, or None when undecided."""
    source: str | None
    """A :data:`volpre.data.manifest.MODALITY_SOURCES` key, or None when undecided."""
    reason: str
    """What decided it (``sidecar scan.json: Modality 'MR'``) or, undecided, what every source said."""


def volume_stem(path: Path) -> str:
    """The file name without its volume suffix: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = path.name
    for suffixes in FILE_FORMATS.values():
        for suffix in sorted(suffixes, key=len, reverse=True):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
    return path.stem


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar dcm2niix and BIDS write beside a volume: same stem, ``.json``."""
    return path.with_name(volume_stem(path) + ".json")


def normalise_code(value: object) -> str | None:
    """``"MR"``, ``"mr "`` -> ``"MR"``; None for anything that is no modality code."""
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    return text if MODALITY_CODE.match(text) else None


def modality_from_sidecar(path: Path) -> tuple[str | None, str]:
    """``(code, note)`` from the ``Modality`` of ``path``'s JSON sidecar; code None when it says nothing."""
    sidecar = sidecar_path(path)
    try:
        if sidecar.stat().st_size > SIDECAR_MAX_BYTES:
            return None, f"sidecar {sidecar.name} is larger than {SIDECAR_MAX_BYTES >> 20} MiB (not read)"
        data = json.loads(sidecar.read_bytes())
    except FileNotFoundError:
        return None, f"no JSON sidecar {sidecar.name}"
    except OSError as exc:
        return None, f"sidecar {sidecar.name} cannot be read ({exc.strerror or type(exc).__name__})"
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None, f"sidecar {sidecar.name} is not valid JSON"
    if not isinstance(data, dict) or "Modality" not in data:
        return None, f"sidecar {sidecar.name} has no Modality field"
    code = normalise_code(data["Modality"])
    if code is None:
        return None, f"sidecar {sidecar.name}: Modality {str(data['Modality'])[:40]!r} is not a DICOM modality code"
    return code, f"sidecar {sidecar.name}: Modality {code!r}"


def modality_from_name(path: Path) -> tuple[str | None, str]:
    """``(code, note)`` from the BIDS suffix of the file name (:data:`BIDS_SUFFIXES`)."""
    stem = volume_stem(path)
    suffix = stem.rsplit("_", 1)[-1] if "_" in stem else None
    if suffix is None:
        return None, "file name has no _SUFFIX"
    code = BIDS_SUFFIXES.get(suffix.lower())
    if code is None:
        return None, f"file name suffix _{suffix[:20]} is not a BIDS image suffix"
    return code, f"file name suffix _{suffix}"


def modality_from_header(header_modality: str | None) -> tuple[str | None, str]:
    """``(code, note)`` from the modality code an NRRD/MetaImage header states (``VolumeHeader.modality``)."""
    if header_modality is None:
        return None, "header states no modality"
    return header_modality, f"header modality {header_modality!r}"


def modality_from_voxels(volume: np.ndarray) -> tuple[str | None, str]:
    """``("CT", note)`` when the voxel values show calibrated CT's air (module docstring), else ``(None, note)``.

    Args:
        volume: the voxel values (any shape), Hounsfield units if CT; finite.
    """
    values = np.asarray(volume).ravel()
    if values.size == 0:
        return None, "voxel values: empty volume"
    low, high = AIR_WINDOW_HU
    below_low, below_high = BELOW_AIR_WINDOW_HU
    air = int(np.count_nonzero((values >= low) & (values <= high)))
    below = int(np.count_nonzero((values >= below_low) & (values < below_high)))
    fraction = air / values.size
    numbers = (f"{fraction:.1%} of voxels in [{low:g}, {high:g}] HU, {below / values.size:.1%} in "
               f"[{below_low:g}, {below_high:g})")
    if fraction >= AIR_MIN_FRACTION and air >= AIR_PEAK_RATIO * below:
        return "CT", f"voxel values: {numbers} (air of calibrated CT)"
    need = (f"CT needs >= {AIR_MIN_FRACTION:.0%} in the air window and >= {AIR_PEAK_RATIO:g}x the window below; "
            "voxel values never decide MR")
    return None, f"voxel values: {numbers}: {need}"


def decide_modality(path: Path, header_modality: str | None,
                    read_voxels: Callable[[], np.ndarray]) -> ModalityDecision:
    """The modality of the volume file ``path`` from its sidecar, name, header, then voxels (module docstring).

    Args:
        path: a NIfTI/NRRD/MetaImage file.
        header_modality: what its header states (``VolumeHeader.modality``), or None.
        read_voxels: reads the volume's voxels; called only when nothing else decides. Its
            errors (``VolumeError`` for a damaged file) propagate.
    """
    notes = []
    for source, ask in (("json-sidecar", lambda: modality_from_sidecar(path)),
                        ("bids-suffix", lambda: modality_from_name(path)),
                        ("image-header", lambda: modality_from_header(header_modality)),
                        ("voxel-values", lambda: modality_from_voxels(read_voxels()))):
        code, note = ask()
        if code is not None:
            return ModalityDecision(code, source, note)
        notes.append(note)
    return ModalityDecision(None, None, "; ".join(notes))
