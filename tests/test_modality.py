"""Modality of NIfTI/NRRD/MetaImage files without hand-written rules: sidecars, BIDS names, headers, voxels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volpre.cli import main
from volpre.data.index import index_paths
from volpre.data.manifest import MODALITY_SOURCES, SCHEMA_PATH, load_manifest
from volpre.data.modality import (
    AIR_MIN_FRACTION,
    decide_modality,
    modality_from_name,
    modality_from_sidecar,
    modality_from_voxels,
    sidecar_path,
)
from volpre.data.readers import read_header

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
"""A real T1-weighted MR volume shipped by nibabel (33 x 41 x 25)."""

DCM2NIIX_CT = {"Modality": "CT", "Manufacturer": "SIEMENS", "ConvolutionKernel": "Br40f", "XRayExposure": 115,
               "ConversionSoftware": "dcm2niix", "ConversionSoftwareVersion": "v1.0.20230411"}
DCM2NIIX_MR = {"Modality": "MR", "MagneticFieldStrength": 3, "Manufacturer": "Philips", "EchoTime": 0.0046,
               "RepetitionTime": 8.1, "ConversionSoftware": "dcm2niix", "ConversionSoftwareVersion": "v1.0.20230411"}


def _ct_niftis(demo_manifest: Path) -> list[Path]:
    return [e.image[0] for e in load_manifest(demo_manifest).entries
            if e.modality == "CT" and e.image[0].name.endswith(".nii.gz")]


def _never(*_):
    raise AssertionError("voxels were read, though an earlier source decides")


# ----------------------------------------------------------------------------- the acceptance case


def test_dcm2niix_folder_indexes_into_a_manifest_that_check_passes(tmp_path, demo_manifest, capsys):
    """NIfTI files with dcm2niix sidecars, no BIDS names, no --modality: index, then check passes."""
    folder = tmp_path / "converted"
    folder.mkdir()
    ct = _ct_niftis(demo_manifest)[0]
    for i in range(2):
        shutil.copyfile(ct, folder / f"scan{i:02d}.nii.gz")
        (folder / f"scan{i:02d}.json").write_text(json.dumps(DCM2NIIX_CT, indent=2))
    shutil.copyfile(ANATOMICAL, folder / "scan10.nii")
    (folder / "scan10.json").write_text(json.dumps(DCM2NIIX_MR, indent=2))
    out = tmp_path / "m.json"

    assert main(["index", str(folder), "--out", str(out), "--quiet"]) == 0
    manifest = load_manifest(out)
    assert [(e.image[0].name, e.modality, e.modality_source) for e in manifest.entries] == [
        ("scan00.nii.gz", "CT", "json-sidecar"), ("scan01.nii.gz", "CT", "json-sidecar"),
        ("scan10.nii", "MR", "json-sidecar")]
    assert manifest.rejected == []
    assert main(["check", str(out), "--quiet"]) == 0
    assert "checked 3 entries: 3 ok, 0 with problems" in capsys.readouterr().out


def test_schema_and_code_name_the_same_modality_sources():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["entry"]["properties"]["modality_source"]["enum"] == list(MODALITY_SOURCES)


# ----------------------------------------------------------------------------- each source


def test_sidecar(tmp_path):
    volume = tmp_path / "sub-01_T1w.nii.gz"
    assert sidecar_path(volume) == tmp_path / "sub-01_T1w.json"
    assert sidecar_path(tmp_path / "a.b.nrrd") == tmp_path / "a.b.json"
    assert modality_from_sidecar(volume) == (None, "no JSON sidecar sub-01_T1w.json")
    (tmp_path / "sub-01_T1w.json").write_text('{"Modality": "mr"}')
    assert modality_from_sidecar(volume) == ("MR", "sidecar sub-01_T1w.json: Modality 'MR'")
    (tmp_path / "sub-01_T1w.json").write_text('{"Modality": "magnetic resonance"}')
    assert modality_from_sidecar(volume)[1] == ("sidecar sub-01_T1w.json: Modality 'magnetic resonance' is not a "
                                                "DICOM modality code")
    (tmp_path / "sub-01_T1w.json").write_text('{"EchoTime": 0.01}')
    assert modality_from_sidecar(volume) == (None, "sidecar sub-01_T1w.json has no Modality field")
    (tmp_path / "sub-01_T1w.json").write_text('{"Modality": ')
    assert modality_from_sidecar(volume) == (None, "sidecar sub-01_T1w.json is not valid JSON")


@pytest.mark.parametrize("name, expected", [
    ("sub-01_ses-1_T1w.nii.gz", ("MR", "file name suffix _T1w")),
    ("sub-01_FLAIR.nii", ("MR", "file name suffix _FLAIR")),
    ("sub-01_acq-lowdose_ct.nii.gz", ("CT", "file name suffix _ct")),
    ("case12_CT.nrrd", ("CT", "file name suffix _CT")),
    ("sub-01_pet.nii.gz", ("PT", "file name suffix _pet")),
    ("sub-01_dwi.nii.gz", ("MR", "file name suffix _dwi")),
    ("sub-01_dseg.nii.gz", (None, "file name suffix _dseg is not a BIDS image suffix")),
    ("liver.nii.gz", (None, "file name has no _SUFFIX")),
])
def test_bids_suffix(name, expected):
    assert modality_from_name(Path(name)) == expected


def test_nrrd_and_metaimage_headers(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    image.SetMetaData("modality", "MR")
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))  # writes the key-value pair modality:=MR
    assert "modality:=MR" in (tmp_path / "a.nrrd").read_bytes().decode("latin-1")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "b.mha"))
    data = (tmp_path / "b.mha").read_bytes()
    (tmp_path / "c.mha").write_bytes(data.replace(b"ElementSpacing", b"Modality = MET_MOD_CT\nElementSpacing", 1))
    assert read_header(tmp_path / "a.nrrd").modality == "MR"
    assert read_header(tmp_path / "b.mha").modality is None  # ITK reports MET_MOD_UNKNOWN: no modality
    assert read_header(tmp_path / "c.mha").modality == "CT"
    decision = decide_modality(tmp_path / "c.mha", "CT", _never)
    assert (decision.modality, decision.source, decision.reason) == ("CT", "image-header", "header modality 'CT'")


# ----------------------------------------------------------------------------- the voxel rule and its edges


def _volume(n: int = 10_000, **counts: int) -> np.ndarray:
    """``n`` voxels: ``counts`` maps a value (as ``v_1000`` for -1000) to how many voxels hold it; the rest 40 HU."""
    values = np.full(n, 40.0, np.float32)
    start = 0
    for name, count in counts.items():
        values[start:start + count] = -float(name[2:].replace("_", "."))
        start += count
    return values.reshape(10, 10, -1)


def test_voxel_rule_needs_five_percent_air():
    assert AIR_MIN_FRACTION == 0.05
    assert modality_from_voxels(_volume(v_1000=500))[0] == "CT"  # exactly 5%
    code, note = modality_from_voxels(_volume(v_1000=499))
    assert code is None and note == ("voxel values: 5.0% of voxels in [-1100, -900] HU, 0.0% in [-1300, -1100): CT "
                                     "needs >= 5% in the air window and >= 2x the window below; voxel values never "
                                     "decide MR")


def test_voxel_rule_window_ends_are_included():
    assert modality_from_voxels(_volume(v_1100=250, v_900=250))[0] == "CT"
    assert modality_from_voxels(_volume(v_1100_5=250, v_900=250))[0] is None  # -1100.5 is below the window
    assert modality_from_voxels(_volume(v_1100=250, v_899_5=250))[0] is None  # -899.5 is above it


def test_voxel_rule_needs_a_peak_at_air():
    assert modality_from_voxels(_volume(v_1000=1000, v_1200=500))[0] == "CT"  # exactly twice the window below
    assert modality_from_voxels(_volume(v_1000=1000, v_1200=501))[0] is None
    assert modality_from_voxels(_volume(v_1000=1000, v_1300=5000))[0] is None  # -1300 is in the window below
    assert modality_from_voxels(_volume(v_1000=1000, v_1300_5=5000, v_2048=2000))[0] == "CT"  # padding far below


def test_voxel_rule_rejects_mr_phase_and_uncalibrated_ct():
    rng = np.random.default_rng(0)
    phase = rng.integers(-4096, 4096, size=(40, 40, 20)).astype(np.float32)  # signed MR phase
    assert modality_from_voxels(phase)[0] is None
    magnitude = np.abs(rng.normal(300, 100, size=(40, 40, 20)))  # MR magnitude: never MR from voxels
    assert modality_from_voxels(magnitude)[0] is None
    uncalibrated = np.where(rng.random((40, 40, 20)) < 0.5, 0.0, 1064.0)  # CT stored with air at 0
    assert modality_from_voxels(uncalibrated)[0] is None


def test_real_volumes_by_voxels(demo_manifest):
    from volpre.data.readers import read_volume

    ct = read_volume(_ct_niftis(demo_manifest)[0]).numpy()
    assert modality_from_voxels(ct)[0] == "CT"
    code, note = modality_from_voxels(read_volume(ANATOMICAL).numpy())
    assert code is None and note.startswith("voxel values: 0.0% of voxels in [-1100, -900] HU")


# ----------------------------------------------------------------------------- order, rules, reports


def test_order_sidecar_then_name_then_header_then_voxels(tmp_path):
    volume = tmp_path / "sub-01_T1w.nii.gz"
    (tmp_path / "sub-01_T1w.json").write_text(json.dumps({"Modality": "CT"}))
    decision = decide_modality(volume, "PT", _never)
    assert (decision.modality, decision.source) == ("CT", "json-sidecar")  # sidecar before the name
    (tmp_path / "sub-01_T1w.json").unlink()
    assert decide_modality(volume, "PT", _never).source == "bids-suffix"
    assert decide_modality(tmp_path / "x.nrrd", "PT", _never).source == "image-header"
    decision = decide_modality(tmp_path / "x.nrrd", None, lambda: _volume(v_1000=600))
    assert (decision.modality, decision.source) == ("CT", "voxel-values")
    undecided = decide_modality(tmp_path / "x.nrrd", None, lambda: _volume())
    assert undecided.modality is None and undecided.reason.startswith(
        "no JSON sidecar x.json; file name has no _SUFFIX; header states no modality; voxel values: 0.0% ")


def test_index_decides_by_voxels_rules_override_and_undecided_files_are_reported(tmp_path, demo_manifest, capsys):
    folder = tmp_path / "archive"
    folder.mkdir()
    shutil.copyfile(_ct_niftis(demo_manifest)[0], folder / "abdomen.nii.gz")  # HU values: CT by its air
    shutil.copyfile(ANATOMICAL, folder / "head.nii")  # MR without sidecar or BIDS name: undecided
    shutil.copyfile(ANATOMICAL, folder / "brain_T2w.nii")
    (folder / "brain_T2w.json").write_text(json.dumps({"Modality": "CT"}))  # a wrong sidecar
    out = tmp_path / "m.json"
    assert main(["index", str(folder), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    manifest = load_manifest(out)
    assert [(e.image[0].name, e.modality, e.modality_source) for e in manifest.entries] == [
        ("abdomen.nii.gz", "CT", "voxel-values"), ("brain_T2w.nii", "CT", "json-sidecar")]
    [rejected] = manifest.rejected
    assert rejected.path == "archive/head.nii"
    assert rejected.reason.startswith("modality: cannot decide: no JSON sidecar head.json; file name has no "
                                      "_SUFFIX; header states no modality; voxel values: 0.0% of voxels in")
    assert printed[0].startswith("archive/head.nii: modality: cannot decide: no JSON sidecar head.json;")
    assert printed[1] == ("1 volume file has no modality (rejected; see 'rejected' in the manifest): give it "
                          "with --modality CODE or --modality 'PATTERN=CODE'")
    assert printed[2].startswith("indexed 4 files in ") and "2 entries, 1 rejected, 1 ignored" in printed[2]

    # --modality rules come first: they override the sidecar and decide what nothing else could
    assert main(["index", str(folder), "--out", str(out), "--quiet", "--modality", "*_T2w*=MR",
                 "--modality", "head*=MR"]) == 0
    assert [(e.image[0].name, e.modality, e.modality_source) for e in load_manifest(out).entries] == [
        ("abdomen.nii.gz", "CT", "voxel-values"), ("brain_T2w.nii", "MR", "rule"), ("head.nii", "MR", "rule")]


def test_index_with_a_modality_for_everything_reads_no_voxels(tmp_path, demo_manifest, monkeypatch):
    import volpre.data.index as index

    shutil.copyfile(_ct_niftis(demo_manifest)[0], tmp_path / "a.nii.gz")
    monkeypatch.setattr(index, "read_volume", _never)
    summary = index_paths([tmp_path], tmp_path / "m.json", modality="CT", progress=False)
    assert summary.entries == 1 and load_manifest(tmp_path / "m.json").entries[0].modality_source == "rule"
