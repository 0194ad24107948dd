"""Manifest format: schema errors are named, paths resolve against the manifest, round trips."""

import json
from pathlib import Path

import pytest

from volpre.data.manifest import (
    Manifest,
    ManifestEntry,
    ManifestError,
    ManifestWriter,
    from_decathlon,
    load_manifest,
    save_manifest,
    to_decathlon,
)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_paths_resolve_relative_to_the_manifest_and_round_trip(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    m = _write(
        sub / "m.json",
        {
            "entries": [
                {"image": "../ct/a.nii.gz", "subject": "p1", "modality": "CT", "time": 10, "event": 1,
                 "label": "../lab/a.nii.gz", "split": "train", "shape": [4, 5, 6], "spacing": [1, 1, 2.5]},
                {"image": ["/abs/t1.nii.gz", "/abs/t2.nii.gz"], "id": "mr1", "covariates": {"age": 61},
                 "modality": "MR", "sequence": "T1+T2"},
                {"image": "../dicom/study", "series_uid": "1.2.3"},
            ]
        },
    )
    manifest = load_manifest(m)
    a, mr, dcm = manifest.entries
    assert a.image == (tmp_path / "ct" / "a.nii.gz",)
    assert a.id == "../ct/a.nii.gz" and a.subject_or_id == "p1" and a.shape == (4, 5, 6) and a.event == 1
    assert mr.image == (Path("/abs/t1.nii.gz"), Path("/abs/t2.nii.gz")) and mr.subject_or_id == "mr1"
    assert mr.covariates == {"age": 61.0} and mr.sequence == "T1+T2" and a.sequence is None
    assert (a.modality_class, mr.modality_class, dcm.modality_class) == ("CT", "MR/T1+T2", "?")
    assert dcm.id == "../dicom/study#1.2.3" and dcm.series_uid == "1.2.3"
    assert manifest.by_split("train") == [a]

    out = save_manifest(manifest, tmp_path / "copy.json")
    again = load_manifest(out)
    assert [e.image for e in again.entries] == [e.image for e in manifest.entries]
    assert [e.id for e in again.entries] == [e.id for e in manifest.entries]
    assert [e.sequence for e in again.entries] == [None, "T1+T2", None]
    assert json.loads(out.read_text())["entries"][0]["image"] == "ct/a.nii.gz"
    record = again.entries[1].to_record()
    assert record["image"] == ["/abs/t1.nii.gz", "/abs/t2.nii.gz"] and record["id"] == "mr1"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"entries": [{"imag": "a"}]}, r"entries\[0\]: 'image' is a required property"),
        ({"entries": [{"image": "a", "time": -1, "event": 1}]}, r"entries\[0\]\.time: -1 is less than the minimum of 0"),
        ({"entries": [{"image": "a", "time": 3}]}, r"entries\[0\]: 'event' is a dependency of 'time'"),
        ({"entries": [{"image": "a", "event": 2, "time": 1}]}, r"entries\[0\]\.event: 2 is not one of \[0, 1\]"),
        ({"entries": [{"image": "a", "shape": [1, 2]}]}, r"entries\[0\]\.shape: \[1, 2\] is too short"),
        ({"entries": [{"image": "a", "modality": "ct"}]}, r"entries\[0\]\.modality: 'ct' does not match"),
        ({"entries": [], "extra": 1}, r"top level: Additional properties are not allowed \('extra' was unexpected\)"),
        ({"entries": [{"image": "a"}, {"image": "a"}]}, r"entries\[0\] and entries\[1\] share the id 'a'"),
    ],
)
def test_schema_errors_name_the_entry_and_field(tmp_path, data, message):
    m = _write(tmp_path / "m.json", data)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(m)
    assert str(m) in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.json: no such file"):
        load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match=r"bad\.json: not valid JSON"):
        load_manifest(bad)


def test_writer_is_atomic_and_rejects_duplicate_ids(tmp_path):
    out = tmp_path / "m.json"
    entry = ManifestEntry(image=(tmp_path / "a.nii.gz",), id="a")
    with pytest.raises(ManifestError, match="duplicate entry id 'a'"):
        with ManifestWriter(out) as writer:
            writer.add(entry)
            writer.add(entry)
    assert not out.exists() and not list(tmp_path.glob(".m.json.tmp*"))
    with ManifestWriter(out, description="two") as writer:
        writer.add(entry)
        writer.reject(tmp_path / "junk" / "x.nii", "truncated")
    manifest = load_manifest(out)
    assert manifest.description == "two" and len(manifest.entries) == 1
    assert manifest.rejected[0].path == "junk/x.nii" and manifest.rejected[0].reason == "truncated"


def test_decathlon_round_trip(tmp_path):
    datalist = _write(
        tmp_path / "dataset.json",
        {
            "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
            "validation": [{"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}],
            "test": ["imagesTs/c.nii.gz"],
        },
    )
    manifest = from_decathlon(datalist, modality="CT")
    assert [(e.split, e.id, e.modality) for e in manifest.entries] == [
        ("train", "imagesTr/a.nii.gz", "CT"),
        ("val", "imagesTr/b.nii.gz", "CT"),
        ("test", "imagesTs/c.nii.gz", "CT"),
    ]
    assert manifest.entries[0].label == tmp_path / "labelsTr" / "a.nii.gz"
    out = to_decathlon(manifest, tmp_path / "out" / "datalist.json")
    exported = json.loads(out.read_text())
    assert exported["training"] == [{"image": "../imagesTr/a.nii.gz", "label": "../labelsTr/a.nii.gz"}]
    assert exported["test"] == [{"image": "../imagesTs/c.nii.gz"}]
    again = from_decathlon(out)
    assert [e.image for e in again.entries] == [e.image for e in manifest.entries]


def test_decathlon_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"expected at least one non-empty list among training, validation, test"):
        from_decathlon(_write(tmp_path / "d.json", {"numTraining": 3}))
    with pytest.raises(ManifestError, match="cannot read JSON"):
        from_decathlon(tmp_path / "absent.json")


def test_in_memory_manifest_has_no_path():
    assert Manifest(entries=[]).path is None


def test_survival_fields_and_spacing_must_be_finite(tmp_path):
    """Python's json reads NaN and Infinity; JSON Schema's minimum lets both through."""
    m = tmp_path / "m.json"
    m.write_text('{"entries": [{"image": "a", "time": Infinity, "event": 1},\n'
                 ' {"image": "b", "time": 3, "event": 0, "covariates": {"age": NaN, "dose": -Infinity, "ok": 1}},\n'
                 ' {"image": "c", "spacing": [1, 1e999, 2]}]}')
    with pytest.raises(ManifestError) as info:
        load_manifest(m)
    assert str(info.value).splitlines() == [
        f"manifest {m}: entries[0].time: Infinity is not a finite number",
        f"manifest {m}: entries[1].covariates.age: NaN is not a finite number",
        f"manifest {m}: entries[1].covariates.dose: -Infinity is not a finite number",
        f"manifest {m}: entries[2].spacing: Infinity is not a finite number",
    ]


def test_check_refuses_a_manifest_with_an_infinite_time(tmp_path):
    import sys

    from child_processes import run_command

    m = tmp_path / "m.json"
    m.write_text('{"entries": [{"image": "a.nii.gz", "modality": "CT", "time": Infinity, "event": 1}]}')
    proc = run_command([sys.executable, "-m", "volpre", "check", str(m)], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"volpre check: error: manifest {m}: entries[0].time: Infinity is not a finite number\n"


def test_select_splits_names_the_splits_the_manifest_has(tmp_path):
    m = _write(tmp_path / "m.json", {"entries": [{"image": "a", "split": "train"}, {"image": "b", "split": "train"},
                                                 {"image": "c", "split": "val"}, {"image": "d"}]})
    manifest = load_manifest(m)
    assert [e.id for e in manifest.select_splits(["val", "train"])] == ["a", "b", "c"]
    assert len(manifest.select_splits(None)) == 4
    with pytest.raises(ManifestError) as info:
        manifest.select_splits(["train", "tset"])
    assert str(info.value) == (f"--splits: unknown split 'tset'; manifest {m} has splits train (2 entries), "
                               "val (1 entry) and 1 entry without a split")
    unsplit = load_manifest(_write(tmp_path / "u.json", {"entries": [{"image": "a"}]}))
    with pytest.raises(ManifestError, match=r"--split: unknown split 'train'; manifest .*u.json has no splits"):
        unsplit.select_splits(["train"], option="--split")
