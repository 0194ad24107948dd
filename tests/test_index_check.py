"""volpre index (tree -> manifest) and volpre check (manifest -> problems, exit status)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from child_processes import run_command
import SimpleITK as sitk

from volpre.cli import main
from volpre.data.check import check_entries
from volpre.data.dicom_writer import deterministic_uid, write_dicom_series
from volpre.data.index import index_paths
from volpre.data.manifest import load_manifest

PYDICOM_DATA = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def _volume(shape=(16, 16, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)


def _write_sitk(path: Path, data: np.ndarray) -> None:
    image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).astype(np.int16))
    image.SetSpacing((0.9, 0.9, 2.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A messy archive: a study folder with two CT series and a localizer, an MR series, NIfTI
    with a label, NRRD, MetaImage, a truncated .nii.gz, a 4D NIfTI, a report and junk."""
    root = tmp_path_factory.mktemp("archive")
    study = root / "patient1" / "study1"
    study_uid = deterministic_uid("study1")
    write_dicom_series(_volume(seed=1).astype(np.float32), AFFINE, study, modality="CT", patient_id="P1",
                       study_uid=study_uid, series_uid=deterministic_uid("ct-a"), series_number=2,
                       series_description="soft tissue", rescale_intercept=-1024.0,
                       file_names=[f"IM{i:04d}" for i in range(8)])
    write_dicom_series(_volume(seed=2).astype(np.float32), AFFINE, study, modality="CT", patient_id="P1",
                       study_uid=study_uid, series_uid=deterministic_uid("ct-b"), series_number=3,
                       series_description="lung", rescale_intercept=-1024.0,
                       file_names=[f"IN{i:04d}.dcm" for i in range(8)])
    write_dicom_series(_volume((16, 16, 1), seed=3).astype(np.float32), AFFINE, study, modality="CT",
                       patient_id="P1", study_uid=study_uid, series_uid=deterministic_uid("scout"),
                       series_number=1, series_description="scout", rescale_intercept=-1024.0,
                       file_names=["SCOUT"])
    mr = root / "patient2" / "mr"
    write_dicom_series(np.abs(_volume(seed=4)).astype(np.float32), AFFINE, mr, modality="MR", patient_id="P2")
    nifti = root / "nifti"
    nifti.mkdir()
    nib.save(nib.Nifti1Image(_volume((20, 18, 10), seed=5), AFFINE), nifti / "ct.nii.gz")
    nib.save(nib.Nifti1Image((_volume((20, 18, 10), seed=6) > 0).astype(np.uint8), AFFINE), nifti / "ct_label.nii.gz")
    nib.save(nib.Nifti1Image(_volume((8, 8, 4, 3), seed=7), AFFINE), nifti / "fmri.nii.gz")
    broken = nifti / "broken.nii.gz"
    nib.save(nib.Nifti1Image(_volume((20, 18, 10), seed=8), AFFINE), broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    _write_sitk(root / "other.nrrd", _volume(seed=9))
    _write_sitk(root / "other.mha", _volume(seed=10))
    (root / "report.txt").write_text("not an image")
    (root / "nifti" / "notes.json").write_text("{}")
    return root


def test_index_tree_gives_one_entry_per_series_and_file(tree, tmp_path):
    out = tmp_path / "m.json"
    summary = index_paths([tree], out, modality="CT", progress=False)
    manifest = load_manifest(out)
    by_id = {e.id: e for e in manifest.entries}
    rel = os.path.relpath(tree, tmp_path)
    study = f"{rel}/patient1/study1"
    assert f"{study}#{deterministic_uid('ct-b')}" in by_id
    mr = next(e for e in manifest.entries if e.modality == "MR")
    assert mr.subject == "P2" and mr.shape == (16, 16, 8) and mr.spacing == pytest.approx((1.5, 1.5, 3.0))
    ct_a = by_id[f"{study}#{deterministic_uid('ct-a')}"]
    assert ct_a.subject == "P1" and ct_a.modality == "CT" and ct_a.image == (tree / "patient1" / "study1",)
    for name in ("ct.nii.gz", "ct_label.nii.gz", "broken.nii.gz"):
        assert f"{rel}/nifti/{name}" in by_id  # headers of a truncated file are fine: check finds it
    assert by_id[f"{rel}/nifti/ct.nii.gz"].shape == (20, 18, 10)
    nrrd = by_id[f"{rel}/other.nrrd"]
    assert nrrd.shape == (16, 16, 8) and nrrd.spacing == pytest.approx((0.9, 0.9, 2.0)) and nrrd.modality == "CT"
    assert f"{rel}/other.mha" in by_id
    reasons = {Path(r.path).name: r.reason for r in manifest.rejected}
    assert "4D image with 3 frames" in reasons["fmri.nii.gz"]
    assert "SCOUT" in reasons and "single" in reasons["SCOUT"].lower()
    assert summary.entries == len(manifest.entries) == 8
    assert summary.ignored == 2  # report.txt, notes.json
    assert summary.files_seen == 8 + 8 + 1 + 8 + 4 + 2 + 2


def test_index_real_pydicom_tree(tmp_path):
    """pydicom's dicomdirtests: several studies, CR images (2D), DICOMDIR files, CT series."""
    out = tmp_path / "m.json"
    index_paths([PYDICOM_DATA / "dicomdirtests"], out, progress=False)
    manifest = load_manifest(out)
    ct5n = [e for e in manifest.entries if e.image[0].name == "CT5N"]
    assert len(ct5n) == 1 and ct5n[0].shape == (16, 16, 5) and ct5n[0].modality == "CT"
    reasons = " | ".join(r.reason for r in manifest.rejected)
    assert "missing slice" in reasons  # 77654033/CT2 has a 202 mm gap
    assert "Media Storage Directory" in reasons  # DICOMDIR files are not images
    assert check_entries(manifest.entries).ok


def test_index_streams_entries_and_is_deterministic(tree, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    index_paths([tree], a, progress=False)
    index_paths([tree], b, progress=False)
    assert a.read_text() == b.read_text()


def test_index_missing_path(tmp_path, capsys):
    assert main(["index", str(tmp_path / "absent"), "--out", str(tmp_path / "m.json"), "--quiet"]) == 2
    assert "absent: no such file or folder" in capsys.readouterr().err


def test_check_names_every_bad_entry_and_exits_1(tree, tmp_path, capsys):
    out = tmp_path / "m.json"
    index_paths([tree], out, modality="CT", progress=False)
    data = json.loads(out.read_text())
    rel = os.path.relpath(tree, tmp_path)
    entries = data["entries"]
    ct = next(e for e in entries if e["image"].endswith("nifti/ct.nii.gz"))
    ct["label"] = f"{rel}/nifti/ct_label.nii.gz"
    entries.append({"image": f"{rel}/nifti/ct.nii.gz", "id": "wrong-grid", "modality": "CT",
                    "label": f"{rel}/other.nrrd"})
    entries.append({"image": f"{rel}/nifti/missing.nii.gz", "id": "missing", "modality": "CT"})
    entries.append({"image": f"{rel}/other.mha", "id": "no-modality"})
    entries.append({"image": f"{rel}/other.nrrd", "id": "stale-shape", "modality": "CT", "shape": [1, 2, 3]})
    entries.append({"image": f"{rel}/patient1/study1", "id": "two-series", "modality": "CT"})
    out.write_text(json.dumps(data))

    assert main(["check", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    def line_of(entry_id):
        return next(line for line in lines if line.startswith(entry_id + ":"))
    assert "truncated" in line_of(f"{rel}/nifti/broken.nii.gz")
    assert "grid-mismatch" in line_of("wrong-grid") and "other.nrrd" in line_of("wrong-grid")
    assert "missing" in line_of("missing")
    assert "modality: no modality; preprocessing presets exist for CT, MR" in line_of("no-modality")
    assert "manifest says shape [1, 2, 3], the file has [16, 16, 8]" in line_of("stale-shape")
    assert "multiple-series" in line_of("two-series")
    summary_line = next(line for line in lines if line.startswith("checked "))
    assert summary_line == f"checked {len(entries)} entries: {len(entries) - 6} ok, 6 with problems"
    assert not any(line.startswith(f"{rel}/nifti/ct.nii.gz:") for line in lines)  # image + label good


def test_check_passes_on_a_good_manifest_and_exits_0(tree, tmp_path, capsys):
    out = tmp_path / "m.json"
    index_paths([tree / "patient1", tree / "patient2"], out, progress=False)
    assert main(["check", str(out), "--quiet"]) == 0
    assert "0 with problems" in capsys.readouterr().out


def test_check_label_values(tmp_path):
    nib.save(nib.Nifti1Image(_volume(), AFFINE), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 0.5, np.float32), AFFINE), tmp_path / "lab.nii.gz")
    (tmp_path / "m.json").write_text(json.dumps({"entries": [
        {"image": "img.nii.gz", "label": "lab.nii.gz", "modality": "CT", "id": "half"}]}))
    report = check_entries(load_manifest(tmp_path / "m.json").entries)
    assert [p.kind for p in report.problems] == ["label"]
    assert "non-integer values" in report.problems[0].reason


def test_check_bad_manifest_is_a_usage_error(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"entries": [{"imag": "x"}]}))
    proc = run_command([sys.executable, "-m", "volpre", "check", str(bad)], timeout=300)
    assert proc.returncode == 2
    assert "'image' is a required property" in proc.stderr and "Traceback" not in proc.stderr


def test_modality_rules_by_path(tree, tmp_path, capsys):
    out = tmp_path / "m.json"
    index_paths([tree], out, modality=["nifti/*label*=SEG", "nifti/*=CT", "*.nrrd=MR"], progress=False)
    by_name = {e.image[0].name: e.modality for e in load_manifest(out).entries}
    assert by_name["ct.nii.gz"] == "CT" and by_name["ct_label.nii.gz"] == "SEG" and by_name["other.nrrd"] == "MR"
    assert by_name["other.mha"] is None and by_name["study1"] == "CT"  # no rule; DICOM uses its header
    assert main(["index", str(tree), "--out", str(out), "--quiet", "--modality", "ct"]) == 2
    assert "expected a DICOM modality code (CT, MR, PT, ...) or PATTERN=CODE" in capsys.readouterr().err
