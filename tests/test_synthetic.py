"""Demo data (volpre.demo.synthetic): determinism, manifest, formats, grids, tissue values, survival, splits.

Images are read back with volpre's checked reader (nibabel, SimpleITK and pydicom underneath)
and labels with the same reader, so a label that does not sit on its image's grid, or an image
whose content is shifted against its label, fails the tissue-value tests. DICOM files are also
inspected with pydicom directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.transforms.utils_morphological_ops import dilate, erode
from pydicom.uid import EnhancedCTImageStorage

from volpre.data.errors import VolumeError
from volpre.data.manifest import load_manifest
from volpre.data.readers import read_volume
from volpre.demo.synthetic import (
    CT_LABELS,
    CT_REFERENCE_NOISE_HU,
    CT_REFERENCE_VOXEL_MM,
    LESION_RADIUS_MM,
    MANIFEST_NAME,
    MR_LABELS,
    Grid,
    _lesion_volume_moments,
    assign_splits,
    sample_subject,
    write_demo_data,
)
from volpre.survival import concordance_index

SEED = 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The default dataset (8 subjects) of seed 0."""
    return write_demo_data(tmp_path_factory.mktemp("demo") / "out", seed=SEED)


@pytest.fixture(scope="module")
def manifest(demo):
    return load_manifest(demo)


@pytest.fixture(scope="module")
def volumes(manifest) -> dict:
    """Entry id -> (image, label) as read back by read_volume: MetaTensors (1, X, Y, Z) in RAS."""
    return {e.id: (read_volume(e.image[0], series_uid=e.series_uid), read_volume(e.label)) for e in manifest.entries}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entry(manifest, entry_id):
    return next(e for e in manifest.entries if e.id == entry_id)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_writes_identical_bytes_and_another_seed_other_data(demo, tmp_path):
    again = write_demo_data(tmp_path / "again", subjects=8, seed=SEED)
    first, second = _files(demo.parent), _files(again.parent)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    assert again.read_text() == demo.read_text()

    other = load_manifest(write_demo_data(tmp_path / "other", subjects=4, seed=SEED + 1))
    base = load_manifest(demo)
    for entry_id in ("s000-mr0", "s002-ct0"):  # same storage plan, other subject
        a = read_volume(_entry(base, entry_id).image[0])
        b = read_volume(_entry(other, entry_id).image[0])
        assert a.shape != b.shape or not torch.equal(a, b)
    assert _entry(base, "s000-ct0").series_uid != _entry(other, "s000-ct0").series_uid
    assert [e.time for e in base.entries[:6]] != [e.time for e in other.entries[:6]]
    # A subject is the same whatever the number of subjects written (4 here, 8 by default).
    assert _entry(other, "s003-ct0").time == sample_subject(SEED + 1, 3).time_days


def test_written_outcomes_are_those_of_the_sampled_subjects(manifest):
    for index in range(8):
        subject = sample_subject(SEED, index)
        ct = _entry(manifest, f"{subject.name}-ct0")
        assert (ct.time, ct.event) == (subject.time_days, subject.event)


# ----------------------------------------------------------------------------- manifest and files


def test_manifest_lists_every_scan_with_subject_label_split_and_outcome(demo, manifest):
    assert demo.name == MANIFEST_NAME and demo.is_file()
    raw = json.loads(demo.read_text())
    assert all(not Path(item["image"]).is_absolute() for item in raw["entries"])  # portable
    by_subject: dict[str, list] = {}
    for entry in manifest.entries:
        by_subject.setdefault(entry.subject, []).append(entry)
        assert entry.image[0].exists() and entry.label.is_file()
        assert entry.id == f"{entry.subject}-{entry.modality.lower()}{entry.id[-1]}"
        if entry.modality == "CT":
            assert entry.time >= 1 and entry.event in (0, 1)
        else:
            assert entry.modality == "MR" and entry.time is None and entry.event is None
    assert sorted(by_subject) == [f"s{i:03d}" for i in range(8)]
    for subject, entries in by_subject.items():
        assert {e.modality for e in entries} == {"CT", "MR"}
        assert len({(e.time, e.event) for e in entries if e.modality == "CT"}) == 1
    assert sorted(len(v) for v in by_subject.values()) == [2] * 4 + [3] * 4  # odd subjects: follow-up CT


def test_every_format_and_orientation_is_present(manifest):
    kinds = set()
    for entry in manifest.entries:
        path = entry.image[0]
        if path.is_dir():
            kinds.add("dicom-series")
        elif path.suffix == ".dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) > 1
            kinds.add("dicom-enhanced")
        else:
            kinds.add("".join(path.suffixes))
    assert kinds == {".nii.gz", ".nrrd", ".mha", "dicom-series", "dicom-enhanced"}

    # Stored layouts that reading must undo: LAS NIfTI, oblique MR, a coronal MetaImage.
    assert nib.aff2axcodes(nib.load(_entry(manifest, "s001-ct0").image[0]).affine) == ("L", "A", "S")
    mr_affine = nib.load(_entry(manifest, "s000-mr0").image[0]).affine[:3, :3]
    cosines = np.abs(mr_affine / np.linalg.norm(mr_affine, axis=0))
    assert cosines.max(axis=0).min() < 0.999  # oblique: no axis is aligned with R, A or S
    coronal = sitk.ReadImage(str(_entry(manifest, "s003-ct0").image[0]))
    assert np.allclose(np.reshape(coronal.GetDirection(), (3, 3)), [[1, 0, 0], [0, 0, -1], [0, -1, 0]])

    # DICOM series stored head-first (slices going up) and feet-first with rows flipped.
    def slice_geometry(entry):
        files = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(entry.image[0].iterdir())]
        main = [ds for ds in files if ds.SeriesInstanceUID == entry.series_uid]
        main.sort(key=lambda ds: ds.InstanceNumber)
        return [float(v) for v in main[0].ImageOrientationPatient], [float(ds.ImagePositionPatient[2]) for ds in main]

    orientation, heights = slice_geometry(_entry(manifest, "s000-ct0"))
    assert orientation == [1, 0, 0, 0, 1, 0] and np.all(np.diff(heights) > 0)
    orientation, heights = slice_geometry(_entry(manifest, "s003-ct1"))
    assert orientation == [-1, 0, 0, 0, 1, 0] and np.all(np.diff(heights) < 0)


def test_a_dicom_study_folder_holds_several_series_and_the_manifest_names_the_main_one(manifest):
    entry = _entry(manifest, "s000-ct0")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in entry.image[0].iterdir()]
    counts: dict[str, int] = {}
    for ds in headers:
        counts[ds.SeriesInstanceUID] = counts.get(ds.SeriesInstanceUID, 0) + 1
        assert ds.PatientID == "s000" and ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert len(counts) == 3 and sorted(counts.values()) == [1, 36, 72]  # localizer, 10 mm, 5 mm
    assert counts[entry.series_uid] == 72
    with pytest.raises(VolumeError, match=r"2 DICOM series where one was expected; pass series_uid"):
        read_volume(entry.image[0])
    mr = _entry(manifest, "s001-mr0")
    assert mr.series_uid is not None and all(p.suffix == "" for p in mr.image[0].iterdir())


def test_every_entry_reads_back_with_its_label_on_the_same_grid(manifest, volumes):
    for entry in manifest.entries:
        image, label = volumes[entry.id]
        assert image.shape == label.shape, entry.id
        assert torch.allclose(image.affine, label.affine, atol=1e-3), entry.id
        assert tuple(image.shape[1:]) == entry.shape
        assert np.allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0), entry.spacing, atol=1e-4)
        assert 64**3 * 0.8 <= image[0].numel() <= 96**3, entry.id
        assert nib.load(entry.label).get_data_dtype() == np.uint8
        assert set(torch.unique(label).tolist()) == {0.0, 1.0, 2.0}, entry.id
        if entry.series_uid is not None or entry.image[0].suffix == ".dcm":  # labels of DICOM: RAS
            assert nib.aff2axcodes(nib.load(entry.label).affine) == ("R", "A", "S")


def test_grid_reorientation_matches_nibabel():
    rng = np.random.default_rng(3)
    for axcodes in ("LPS", "RPI", "LIA", "PIR", "RAS"):
        grid = Grid.centred((5, 6, 7), (1.0, 2.0, 3.0), axcodes, np.array([10.0, -5.0, 2.0]), (0.1, -0.05, 0.08))
        array = rng.integers(0, 100, size=grid.shape).astype(np.int16)
        reference = nib.as_closest_canonical(nib.Nifti1Image(array, grid.affine))
        assert nib.aff2axcodes(grid.affine) == tuple(axcodes)
        assert grid.to_ras().shape == reference.shape
        assert np.allclose(grid.to_ras().affine, reference.affine)
        assert np.array_equal(grid.array_to_ras(array), np.asarray(reference.dataobj))
        centre = grid.affine @ np.append((np.asarray(grid.shape) - 1) / 2.0, 1.0)
        assert np.allclose(centre[:3], [10.0, -5.0, 2.0]) and np.allclose(grid.to_ras().centre, centre[:3])


# ----------------------------------------------------------------------------- anatomy


def _core(mask: torch.Tensor) -> torch.Tensor:
    """The mask less its surface voxels (less partial volume), or the mask itself when that leaves < 8."""
    core = erode(mask[None, None].float())[0, 0] > 0
    return core if core.sum() >= 8 else mask


def _dilated(mask: torch.Tensor) -> torch.Tensor:
    return dilate(mask[None, None].float())[0, 0] > 0


def test_ct_tissues_have_their_hounsfield_units(manifest, volumes):
    for entry in (e for e in manifest.entries if e.modality == "CT"):
        image, label = (v[0] for v in volumes[entry.id])
        torso = sample_subject(SEED, int(entry.subject[1:])).torso
        liver = image[_core(label == CT_LABELS["liver"])].mean().item()
        lesion_mask = label == CT_LABELS["lesion"]
        lesion = image[_core(lesion_mask)].mean().item()
        assert abs(liver - torso.liver_hu) < 4, (entry.id, liver, torso.liver_hu)
        # Small lesions lose contrast to partial volume; a lesion with a core keeps most of it.
        kept = 0.6 if (erode(lesion_mask[None, None].float()) > 0).sum() >= 8 else 0.25
        assert liver - lesion > kept * (torso.liver_hu - torso.lesion_hu), (entry.id, liver, lesion)
        corner = image[:6, :6, :].mean().item()
        assert -1024 <= corner < -980  # air around the body
        upper = image[:, :, int(0.8 * image.shape[2]):]
        lung = ((upper > -950) & (upper < -750)).float().mean().item()
        fat = ((image > -150) & (image < -50)).float().mean().item()
        assert lung > 0.04 and fat > 0.01, (entry.id, lung, fat)  # lungs at the top; subcutaneous fat
        assert image.max() > 500 and image.min() >= -1024  # bone; stored range


def test_ct_noise_is_the_clinical_noise_averaged_onto_the_stored_voxels(manifest, volumes):
    # The reference voxel's noise, averaged over the V / V_ref reference voxels a stored voxel holds.
    reference_mm3 = float(np.prod(CT_REFERENCE_VOXEL_MM))
    for entry in (e for e in manifest.entries if e.modality == "CT"):
        image = volumes[entry.id][0]
        voxel_mm3 = float(np.prod(image.pixdim.numpy()))
        image = image[0]
        low, high = (sd * math.sqrt(reference_mm3 / voxel_mm3) for sd in CT_REFERENCE_NOISE_HU)
        air = image[:6, :6, :].numpy().astype(np.float64)  # air outside the body: only noise
        rounding = 1.0 / 12.0  # variance of rounding to whole HU
        measured = math.sqrt(max(air.var() - rounding, 0.0))
        assert 0.9 * low < measured < 1.1 * high, (entry.id, measured, low, high)
        assert high < 3.0  # a few HU on ~5 mm voxels, not the 10..18 HU of a 0.78 mm pixel


def test_mr_tissues_are_positive_with_a_darker_lesion_in_the_brain(manifest, volumes):
    for entry in (e for e in manifest.entries if e.modality == "MR"):
        image, label = (v[0] for v in volumes[entry.id])
        brain = image[_core(label == MR_LABELS["brain"])].mean()
        lesion = image[label == MR_LABELS["lesion"]].mean()
        background = torch.cat([image[:5, :5, -5:].flatten(), image[-5:, -5:, -5:].flatten()]).mean()
        assert image.min() >= 0
        assert lesion < 0.85 * brain and background < 0.1 * brain, (entry.id, brain, lesion, background)


@pytest.mark.parametrize("modality, outer", [("CT", CT_LABELS["liver"]), ("MR", MR_LABELS["brain"])])
def test_the_lesion_lies_inside_its_organ(manifest, volumes, modality, outer):
    for entry in (e for e in manifest.entries if e.modality == modality):
        label = volumes[entry.id][1][0]
        lesion = label == 2
        assert lesion.sum() >= 5, entry.id
        neighbourhood = label[_dilated(lesion)]
        assert set(torch.unique(neighbourhood).tolist()) == {float(outer), 2.0}, entry.id


def test_lesion_label_volume_matches_the_drawn_radius_and_grows_at_follow_up(manifest, volumes):
    for entry in (e for e in manifest.entries if e.modality == "CT"):
        image, label = volumes[entry.id]
        voxel_mm3 = float(torch.linalg.det(image.affine[:3, :3]).abs())
        measured = float((label == CT_LABELS["lesion"]).sum()) * voxel_mm3
        torso = sample_subject(SEED, int(entry.subject[1:])).torso
        expected = torso.lesion_volume_mm3(follow_up=entry.id.endswith("ct1"))
        assert 0.6 * expected < measured < 1.5 * expected, (entry.id, measured, expected)
    for subject in ("s001", "s003", "s005", "s007"):
        sizes = [(volumes[f"{subject}-{key}"][1] == CT_LABELS["lesion"]).sum() for key in ("ct0", "ct1")]
        assert sizes[1] > sizes[0]


# ----------------------------------------------------------------------------- survival and splits


def test_larger_lesions_mean_earlier_events():
    subjects = [sample_subject(SEED, i) for i in range(400)]
    volume = np.array([s.lesion_volume_mm3 for s in subjects])
    time = np.array([s.time_days for s in subjects])
    event = np.array([s.event for s in subjects])
    assert np.all(time >= 1) and set(np.unique(event)) == {0, 1}
    assert 0.2 < 1 - event.mean() < 0.4  # censoring about 30%
    assert concordance_index(volume, time, event) > 0.68
    radii = np.array([s.torso.lesion_radius for s in subjects])
    assert LESION_RADIUS_MM[0] <= radii.min() and radii.max() <= LESION_RADIUS_MM[1]


def test_lesion_volume_moments_match_sampling():
    radius = np.random.default_rng(0).uniform(*LESION_RADIUS_MM, size=1_000_000)
    volume = 4.0 / 3.0 * math.pi * radius**3
    mean, sd = _lesion_volume_moments()
    assert mean == pytest.approx(volume.mean(), rel=3e-3) and sd == pytest.approx(volume.std(), rel=3e-3)


def test_splits_keep_subjects_whole_and_are_seeded(manifest):
    split_of: dict[str, set] = {}
    for entry in manifest.entries:
        split_of.setdefault(entry.subject, set()).add(entry.split)
    assert all(len(s) == 1 for s in split_of.values())
    names = [next(iter(split_of[f"s{i:03d}"])) for i in range(8)]
    assert names == assign_splits(8, SEED)
    assert sorted(names) == ["test", "test", "train", "train", "train", "train", "val", "val"]
    assert any(assign_splits(8, s) != names for s in range(1, 6))
    assert assign_splits(1, 0) == ["train"]
    assert sorted(assign_splits(2, 0)) == ["test", "train"]
    for n in (3, 4, 5, 20):
        assert set(assign_splits(n, 7)) == {"train", "val", "test"}


def test_split_fractions_are_followed_and_must_leave_training_subjects():
    splits = assign_splits(80, 1, val_fraction=0.1, test_fraction=0.4)
    assert (splits.count("test"), splits.count("val"), splits.count("train")) == (32, 8, 40)
    assert assign_splits(8, SEED, 0.2, 0.2) == assign_splits(8, SEED)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\), got 1\.0"):
        assign_splits(8, 0, test_fraction=1.0)
    with pytest.raises(ValueError, match=r"5 test and 5 val subjects of 10 leave none for train"):
        assign_splits(10, 0, val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------- the small size


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_manifest(write_demo_data(tmp_path_factory.mktemp("small") / "out", subjects=4, seed=SEED,
                                         size="small"))


def test_small_data_are_the_same_subjects_on_liver_targeted_ct_and_coarser_mr(small, manifest, volumes):
    full = {e.id: e for e in manifest.entries}
    assert [e.id for e in small.entries] == [e.id for e in manifest.entries if int(e.subject[1:]) < 4]
    for entry in small.entries:
        twin = full[entry.id]
        assert (entry.time, entry.event, entry.modality) == (twin.time, twin.event, twin.modality)
        image, label = read_volume(entry.image[0], series_uid=entry.series_uid), read_volume(entry.label)
        full_image, full_label = volumes[entry.id]
        assert image.numel() * 6 < full_image.numel()  # at least 6 times fewer voxels
        if entry.modality == "CT":
            ras = np.asarray(entry.spacing) * np.asarray(entry.shape)
            assert ras[:2] == pytest.approx([160.0, 160.0], abs=6.0) and ras[2] == pytest.approx(180.0)
            # the targeted field of view holds the whole lesion (same voxel size: the same voxel count) ...
            lesion = int((label == CT_LABELS["lesion"]).sum())
            assert lesion == pytest.approx(int((full_label == CT_LABELS["lesion"]).sum()), rel=0.1)
            # ... in liver of realistic HU; the field of view is body but for its corners and some bowel gas
            liver = image[label == CT_LABELS["liver"]]
            assert 30.0 < float(liver.median()) < 80.0 and float((image < -900).float().mean()) < 0.1
        else:
            assert entry.spacing == pytest.approx([2.0 * s for s in twin.spacing], rel=0.05)
            assert int((label == MR_LABELS["lesion"]).sum()) > 0


def test_demo_data_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from volpre.cli import main

    assert main(["demo-data", str(tmp_path / "a"), "--subjects", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("volpre demo-data: error: demo data: subjects must be a positive "
                                               "integer, got 0")
    assert main(["demo-data", str(tmp_path / "b"), "--subjects", "2", "--size", "small"]) == 0
    assert "(small)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_naming_what_was_found(tmp_path):
    with pytest.raises(ValueError, match=r"subjects must be a positive integer, got 0"):
        write_demo_data(tmp_path / "a", subjects=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        write_demo_data(tmp_path / "a", seed=-1)
    with pytest.raises(ValueError, match=r"size must be one of full, small, got 'tiny'"):
        write_demo_data(tmp_path / "a", size="tiny")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match=rf"{busy} is a non-empty directory; expected a new or empty"):
        write_demo_data(busy)
    with pytest.raises(FileExistsError, match=r"old.nii.gz is a file; expected a new or empty directory"):
        write_demo_data(busy / "old.nii.gz")
    assert not (tmp_path / "a").exists()
