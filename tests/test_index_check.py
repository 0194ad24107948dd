"""volpre index (tree -> manifest) and volpre check (manifest -> problems, exit status)."""

from __future__ import annotations

import errno
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
from volpre.demo.dicom_writer import SeriesTags, deterministic_uid, write_dicom_series
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
    write_dicom_series(_volume(seed=1).astype(np.float32), AFFINE, study,
                       SeriesTags("CT", "P1", study_uid=study_uid, series_uid=deterministic_uid("ct-a"),
                                  series_number=2, series_description="soft tissue", rescale_intercept=-1024.0),
                       file_names=[f"IM{i:04d}" for i in range(8)])
    write_dicom_series(_volume(seed=2).astype(np.float32), AFFINE, study,
                       SeriesTags("CT", "P1", study_uid=study_uid, series_uid=deterministic_uid("ct-b"),
                                  series_number=3, series_description="lung", rescale_intercept=-1024.0),
                       file_names=[f"IN{i:04d}.dcm" for i in range(8)])
    write_dicom_series(_volume((16, 16, 1), seed=3).astype(np.float32), AFFINE, study,
                       SeriesTags("CT", "P1", study_uid=study_uid, series_uid=deterministic_uid("scout"),
                                  series_number=1, series_description="scout", rescale_intercept=-1024.0),
                       file_names=["SCOUT"])
    mr = root / "patient2" / "mr"
    write_dicom_series(np.abs(_volume(seed=4)).astype(np.float32), AFFINE, mr, SeriesTags("MR", "P2"))
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
    manifest = load_manifest(out)
    by_name = {e.image[0].name: e.modality for e in manifest.entries}
    assert by_name["ct.nii.gz"] == "CT" and by_name["ct_label.nii.gz"] == "SEG" and by_name["other.nrrd"] == "MR"
    assert by_name["study1"] == "CT"  # DICOM uses its header
    sources = {e.image[0].name: e.modality_source for e in manifest.entries}
    assert sources["study1"] == sources["mr"] == "dicom-header"
    assert {sources[name] for name in ("ct.nii.gz", "ct_label.nii.gz", "other.nrrd")} == {"rule"}
    # no rule matches other.mha, and nothing else decides its modality (uniform noise: 4.4% at air, under 5%)
    reasons = {Path(r.path).name: r.reason for r in manifest.rejected}
    assert "other.mha" not in by_name
    assert reasons["other.mha"].startswith("modality: cannot decide: no JSON sidecar other.json; ")
    assert "4.4% of voxels in [-1100, -900] HU" in reasons["other.mha"]
    assert main(["index", str(tree), "--out", str(out), "--quiet", "--modality", "ct"]) == 2
    assert "expected a DICOM modality code (CT, MR, PT, ...) or PATTERN=CODE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile trees


@pytest.fixture
def deny(monkeypatch):
    """``deny(path)`` makes a file or folder unreadable: ``chmod 000`` for an ordinary user; as
    root, who reads anything, the Python-level opens and folder listings volpre makes raise the
    PermissionError the operating system would (its C readers are never reached: volpre opens a
    file itself before handing it to one)."""
    denied: set[str] = set()
    chmodded: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        import builtins

        real_open, real_scandir = builtins.open, os.scandir

        def refuse(path):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) in denied:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

        def guarded_open(file, *args, **kwargs):
            refuse(file)
            return real_open(file, *args, **kwargs)

        def guarded_scandir(path="."):
            refuse(path)
            return real_scandir(path)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "scandir", guarded_scandir)

    def deny_path(path: Path) -> None:
        if os.geteuid() == 0:
            denied.add(str(path))
        else:
            chmodded.append((path, path.stat().st_mode))
            path.chmod(0)

    yield deny_path
    for path, mode in chmodded:
        path.chmod(mode)


def test_index_rejects_what_it_cannot_read_with_the_true_reason_and_finishes(tmp_path, deny, capsys):
    root = tmp_path / "archive"
    (root / "ok").mkdir(parents=True)
    nib.save(nib.Nifti1Image(_volume(), AFFINE), root / "ok" / "ct.nii.gz")
    (root / "loop").mkdir()
    os.symlink("b.nii.gz", root / "loop" / "a.nii.gz")  # a -> b -> a
    os.symlink("a.nii.gz", root / "loop" / "b.nii.gz")
    os.symlink("missing.nii.gz", root / "loop" / "gone.nii.gz")
    os.mkfifo(root / "loop" / "pipe.nii")  # would block whoever opens it: never opened
    _write_sitk(root / "secret.nrrd", _volume(seed=1))
    deny(root / "secret.nrrd")
    (root / "locked").mkdir()
    nib.save(nib.Nifti1Image(_volume(), AFFINE), root / "locked" / "hidden.nii.gz")
    deny(root / "locked")
    series = root / "series"
    write_dicom_series(_volume(seed=2).astype(np.float32), AFFINE, series,
                       SeriesTags("CT", "P9", rescale_intercept=-1024.0), file_names=[f"IM{i:04d}" for i in range(8)])
    deny(series / "IM0003")  # suffix-less, as scanners write them

    out = tmp_path / "m.json"
    assert main(["index", str(root), "--out", str(out), "--quiet", "--modality", "CT"]) == 0
    assert "indexed 14 files" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert [e.image[0].name for e in manifest.entries] == ["ct.nii.gz"]
    reasons = {r.path: r.reason for r in manifest.rejected}
    assert reasons == {
        "archive/locked": "unreadable: permission denied; folder not read",
        "archive/loop/a.nii.gz": "unreadable: symbolic link loop (too many levels of symbolic links); file not followed",
        "archive/loop/b.nii.gz": "unreadable: symbolic link loop (too many levels of symbolic links); file not followed",
        "archive/loop/gone.nii.gz": "missing: broken symbolic link (its target does not exist); file not read",
        "archive/secret.nrrd": "unreadable: permission denied; file not read",
        "archive/series/IM0003": "unreadable: permission denied; file not read",
        "archive/series": reasons["archive/series"],
    }
    assert reasons["archive/series"].startswith("dicom-series: DICOM series ")
    assert "missing slices" in reasons["archive/series"]
    assert reasons["archive/series"].endswith(
        "(1 file(s) of this folder could not be read, e.g. IM0003: unreadable: permission denied; file not read; "
        "missing slices may be among them)")


def test_messages_quote_at_most_the_file_name_never_its_content(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:Jane Doe MRN123:/root:/bin/bash\nmore\n")
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("scan.nrrd", "scan.nhdr", "scan.nii", "scan.mha"):
        os.symlink(secret, archive / name)
    out = tmp_path / "m.json"
    assert main(["index", str(archive), "--out", str(out), "--quiet", "--modality", "CT"]) == 0
    reasons = {Path(r.path).name: r.reason for r in load_manifest(out).rejected}
    assert sorted(reasons) == ["scan.mha", "scan.nhdr", "scan.nii", "scan.nrrd"]
    assert reasons["scan.nrrd"].startswith("unreadable: not a readable nrrd file: ")
    assert 'couldn\'t parse "..." as magic' in reasons["scan.nrrd"]
    for reason in reasons.values():
        assert "Doe" not in reason and "root:x" not in reason and str(tmp_path) not in reason and "secret" not in reason
    # volpre check of an entry pointing at the link says the same, and nothing more
    (tmp_path / "c.json").write_text(json.dumps({"entries": [{"image": "archive/scan.nrrd", "modality": "CT"}]}))
    assert main(["check", str(tmp_path / "c.json"), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "unreadable: not a readable nrrd file" in printed and "Doe" not in printed and "root:x" not in printed


def test_control_characters_from_manifests_and_file_names_are_escaped(tmp_path, capsys):
    evil_id = "\x1b]0;pwned\x07case\x1b[2J"
    (tmp_path / "m.json").write_text(json.dumps({"entries": [{"image": "absent.nii.gz", "id": evil_id,
                                                              "modality": "CT"}]}))
    assert main(["check", str(tmp_path / "m.json"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.startswith("\\x1b]0;pwned\\x07case\\x1b[2J: ")
    # a file name with a terminal escape and a newline, undecided modality: reported escaped
    folder = tmp_path / "tree"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), AFFINE), folder / "x\x1b[31m\ny.nii.gz")
    assert main(["index", str(folder), "--out", str(tmp_path / "i.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.startswith("tree/x\\x1b[31m\\ny.nii.gz: modality: cannot decide: ")
    # the one-line errors of the command line too
    assert main(["index", str(tmp_path / "no\x1b]0;x\x07such"), "--out", str(tmp_path / "j.json")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "no\\x1b]0;x\\x07such: no such file or folder" in err


# ----------------------------------------------------------------------------- splits, workers, progress


def test_unknown_splits_are_errors_naming_the_splits_the_manifest_has(demo_manifest, tmp_path, capsys):
    assert main(["check", str(demo_manifest), "--split", "tran", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"volpre check: error: --split: unknown split 'tran'; manifest {demo_manifest} has splits "
                          "test (")
    assert "train (" in err and "val (" in err
    for splits in ("tran", "train,tset"):
        assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output",
                     str(tmp_path / "run"), "--splits", splits, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        wrong = "'tran'" if splits == "tran" else "'tset'"
        assert err.startswith(f"volpre pretrain: error: --splits: unknown split {wrong}; manifest ") and "train (" in err
    assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output",
                 str(tmp_path / "run"), "--splits", ","]) == 2
    assert "--splits: got ','; expected comma-separated split names" in capsys.readouterr().err
    assert main(["cache", str(demo_manifest), "--config", "resnet-dae-tiny", "--split", "tran"]) == 2
    assert "--split: unknown split 'tran'" in capsys.readouterr().err


def test_workers_give_the_same_manifest_and_the_same_report(tree, tmp_path, capsys):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["index", str(tree), "--out", str(one), "--quiet", "--modality", "CT"]) == 0
    assert main(["index", str(tree), "--out", str(two), "--quiet", "--modality", "CT", "--workers", "2"]) == 0
    assert one.read_text() == two.read_text()
    capsys.readouterr()
    assert main(["check", str(one), "--quiet"]) == 1
    serial = capsys.readouterr().out
    assert main(["check", str(one), "--quiet", "--workers", "2"]) == 1
    assert capsys.readouterr().out == serial
    assert main(["check", str(one), "--workers", "-1"]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err


def test_progress_lines_when_stderr_is_not_a_terminal(tree, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["index", str(tree), "--out", str(out), "--modality", "CT", "--progress-every", "1e-9"]) == 0
    err = capsys.readouterr().err  # not a terminal: lines, no bar
    lines = [line for line in err.splitlines() if line.startswith("indexing: ")]
    assert len(lines) >= 2 and "\r" not in err
    assert lines[-1].startswith("indexing: 33 files, ") and "files/s" in lines[-1]
    assert main(["check", str(out), "--progress-every", "1e-9"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("checking: ")]
    assert lines[0].startswith("checking: 1/8 entries (12.5%), ")
    assert lines[-1].startswith("checking: 8/8 entries (100.0%), ") and lines[-1].endswith("; 1 with problems")
    assert len(lines) == 8
    assert main(["check", str(out), "--progress-every", "0"]) == 2
    assert "--progress-every must be > 0 seconds, got 0.0" in capsys.readouterr().err


def test_progress_prints_a_line_every_interval():
    import io

    from volpre.progress import Progress

    now = [0.0]
    stream = io.StringIO()
    meter = Progress("checking", "entry", total=100, stream=stream, every=30, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.0
        meter.update(1, with_problems=2)
    meter.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("checking: 30/100 entries (30.0%), 1.0 entries/s, 30 s elapsed, about 70 s left; "
                        "2 with problems")
    assert [line.split(" ")[1] for line in lines] == ["30/100", "60/100", "90/100", "100/100"]
    quiet = io.StringIO()
    short = Progress("indexing", "file", stream=quiet, every=30, clock=lambda: 0.0)
    short.update(5)
    short.close()
    assert quiet.getvalue() == ""  # a run shorter than the interval prints nothing
