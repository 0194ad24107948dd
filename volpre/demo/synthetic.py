"""Deterministic demo dataset: CT torso and MR head phantoms, labels, outcomes, mixed file formats.

:func:`write_demo_data` writes ``subjects`` synthetic patients and their manifest; everything
downstream (index, check, pretraining, segmentation and survival fine-tuning, the
label-efficiency evaluation, the data benchmarks, CI) runs on it. Same seed, same bytes.

**Anatomy.** Each subject is drawn from its own random stream (``seed``, subject index), so
subject ``k`` is the same whatever the number of subjects written.

- CT torso, Hounsfield units: air -1000 around the body; an elliptic body with a subcutaneous
  fat layer (-100) over soft tissue (40); lungs (-850) in the upper part with a trachea (air);
  heart (42), descending aorta (45), spleen (48), kidneys (32) in perirenal fat, bowel loops
  in mesenteric fat with gas below the diaphragm; a liver (right lobe + left lobe, 55..66 HU)
  holding a spherical hypodense tumour (20..30 HU below the liver) whose radius varies per
  subject and grows at the follow-up scan; a spine of vertebral bodies (cortical shell 1200,
  trabecular core 220), discs (80), spinal canal (15) and posterior elements (650); twelve
  pairs of ribs (650) that slope down anteriorly, with costal cartilage (130), and a sternum.
  Body size, fat thickness, pose (up to 5 degrees of rotation, 15 mm of shift) and the
  lesion's size and place vary per subject. Mild Gaussian smoothing (partial volume) and
  Gaussian noise: 10..18 HU at a clinical 0.78 x 0.78 x 5 mm voxel, averaged onto the stored
  ~5 mm voxels (1.4..2.9 HU, :func:`ct_noise_sd_hu`); stored as integer HU in [-1024, 3071].
- MR head, T1-like arbitrary units (>= 0): scalp fat, dark skull, CSF, folded grey/white
  matter, lateral ventricles, a falx, orbits with eyes, the neck; a lesion (a metastasis,
  hypointense) in the white matter; a smooth multiplicative bias field (MONAI's
  ``RandBiasField``), Rician noise and a per-subject intensity gain; stored as integers.

Labels (uint8, 0 background) are computed from the same geometry at the same voxel centres as
the image: CT ``1`` liver, ``2`` lesion (:data:`CT_LABELS`); MR ``1`` brain (grey and white
matter, ventricles, lesion), ``2`` lesion (:data:`MR_LABELS`). A label is written as NIfTI on
the grid that :func:`volpre.data.readers.read_volume` returns for its image: the stored grid for
NIfTI/NRRD/MetaImage images (readers reorient both the same way), the grid reoriented to the
closest RAS axes for DICOM images.

**Survival.** The outcome is drawn from the baseline lesion volume ``V`` (mm^3): the event time
is exponential with hazard ``ln(2) / 720 days * exp(z)``, ``z`` the standardised volume (mean and
standard deviation of ``V`` under the lesion radius distribution, known in closed form), and an
independent exponential censoring time censors about 30% of subjects. ``time`` (whole days, >= 1,
counted from the baseline scan) and ``event`` (1 observed, 0 censored) are written on each of the
subject's CT entries. Subjects with larger lesions die sooner: the C-index of ``V`` against the
outcome is about 0.75 over many subjects.

**Scans and formats.** Every subject has a baseline CT ``ct0`` and an MR ``mr0``; subjects with
an odd index also have a follow-up CT ``ct1``. Storage cycles over four plans by subject index
(so every format and orientation is present from four subjects on):

- ``k % 4 == 0``: ct0 DICOM study, axial head-first (LPS); mr0 NIfTI, oblique (LAS).
- ``k % 4 == 1``: ct0 NIfTI (LAS); ct1 Enhanced multi-frame DICOM (LPS); mr0 DICOM study,
  oblique sagittal (PIR).
- ``k % 4 == 2``: ct0 NRRD (LPS); mr0 MetaImage ``.mha``, oblique (LPS).
- ``k % 4 == 3``: ct0 MetaImage, coronal reformat (LIA); ct1 DICOM study, feet-first with rows
  flipped (RPI); mr0 NRRD, oblique (RAS).

The letters (nibabel axis codes) say where the stored voxel axes point, so reading must
reorient most scans; "oblique" grids are also tilted by up to 8 degrees.

A DICOM CT study folder holds three series in one directory: a localizer (series 1, one
topogram image), the main axial series (series 2, 5 mm, files ``IM-0002-NNNN.dcm``) and a
second reconstruction (series 3, 10 mm, smoother); the manifest names the main series by its
``series_uid``. A DICOM MR study folder holds a localizer (series 1) and the main series
(series 2), files named without an extension (``MR0002NNNN``) as many scanners write them.
UIDs derive from the seed; no dates or random UIDs are written.

**Layout**::

    out_dir/manifest.json
    out_dir/images/s000/ct0/            DICOM study folder (several series)
    out_dir/images/s000/mr0.nii.gz
    out_dir/images/s001/ct1.dcm         Enhanced multi-frame CT
    out_dir/labels/s000-ct0.nii.gz      one label per scan, named by the entry id

**Splits** are by subject (all of a subject's scans share one split), a seeded permutation:
20% ``test`` and 20% ``val`` (each at least one subject), the rest ``train``. With one subject
everything is ``train``; with two, one ``train`` and one ``test``; from three on every split is
non-empty.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import GaussianSmooth, RandBiasField
from monai.transforms.utils import create_rotate

from volpre.demo.dicom_writer import SeriesTags, deterministic_uid, write_dicom_series, write_multiframe_dicom
from volpre.data.geometry import LPS_TO_RAS
from volpre.data.manifest import TEST, TRAIN, VAL, Manifest, ManifestEntry, save_manifest
from volpre.errors import UserInputError
from volpre.files import check_new_output

CT_LABELS = {"liver": 1, "lesion": 2}
"""Label values of the CT segmentations (0 is background)."""
MR_LABELS = {"brain": 1, "lesion": 2}
"""Label values of the MR segmentations (0 is background)."""

MANIFEST_NAME = "manifest.json"

LESION_RADIUS_MM = (8.0, 20.0)
"""The baseline liver lesion's radius is uniform in this range (mm)."""
_LESION_GROWTH = (1.05, 1.25)
"""Follow-up radius / baseline radius, uniform in this range."""
_LESION_MARGIN_MM = 5.0
"""Least distance between the (follow-up) lesion and the liver's surface."""

_BASELINE_MEDIAN_DAYS = 720.0
_LOG_HAZARD_PER_SD = 1.0
"""Log hazard ratio per standard deviation of lesion volume."""
_CENSORING_RATE_FACTOR = 0.32
"""Censoring hazard / baseline event hazard; 0.32 censors about 30% of subjects."""

CT_REFERENCE_NOISE_HU = (10.0, 18.0)
"""Noise (SD, HU) of each demo CT, drawn per scan in this range, as a routine-dose abdominal CT
shows it in soft tissue at the reference voxel :data:`CT_REFERENCE_VOXEL_MM` (a 512 x 512 matrix
over 400 mm, 5 mm slices). The stored scans have far larger voxels, which hold less noise
(:func:`ct_noise_sd_hu`)."""
CT_REFERENCE_VOXEL_MM = (400.0 / 512, 400.0 / 512, 5.0)
_CT_FOV_MM = 400.0
_CT_SLICES = 72
_CT_SLICE_MM = 5.0
_CT_RECON_SLICE_MM = 10.0
_CT_FOV_CENTRE_Z = -20.0
"""World height (mm) of the CT field of view's centre; the torso's z = 0 (liver dome) sits
within 15 mm of world 0, so the scan runs from below the liver to the lung apices."""
_SMALL_CT_FOV_MM = 160.0
_SMALL_CT_LENGTH_MM = 180.0
"""The ``small`` CT: a targeted reconstruction of the liver's right lobe (160 mm field of view, 180 mm long)."""
_MR_FOV_MM = (210.0, 235.0, 215.0)
_MR_FOV_CENTRE_Z = -5.0
"""World height (mm) of the MR field of view's centre; the head frame's origin (brain centre)
sits within 10 mm of world 0, so the scan holds the whole head and the top of the neck."""
_SMALL_MR_VOXEL_FACTOR = 2.0
"""The ``small`` MR: voxels twice the subject's voxel size (6.0..6.8 mm)."""
DEMO_SIZES = ("full", "small")
"""What :func:`write_demo_data` can write: ``full`` torso CTs and head MRs, or ``small`` ones (liver-targeted
CT, coarse MR) that are about 8 (CT) and 8 (MR) times smaller and faster to write and train on."""
_CT_HU_RANGE = (-1024, 3071)
_CT_RESCALE_INTERCEPT = -1024.0

# ----------------------------------------------------------------------------- tissue classes

# CT tissue classes (a later class paints over an earlier one) and their HU; the liver and
# lesion values are per subject.
_AIR, _FAT, _SOFT, _LUNG, _HEART, _AORTA, _SPLEEN, _KIDNEY, _LIVER, _LESION = range(10)
_DISC, _CANAL, _CARTILAGE, _BONE, _TRABECULAR, _CORTICAL = range(10, 16)
_CT_HU = np.array([-1000, -100, 40, -850, 42, 45, 48, 32, 0, 0, 80, 15, 130, 650, 220, 1200], dtype=np.float32)

# MR tissue classes and their T1-like intensities.
_M_AIR, _M_FAT, _M_MUSCLE, _M_SKULL, _M_CSF, _M_GM, _M_WM, _M_VENTRICLE, _M_LESION, _M_VITREOUS = range(10)
_MR_T1 = np.array([0, 850, 380, 40, 150, 470, 680, 150, 300, 110], dtype=np.float32)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` ``(X, Y, Z)`` voxels and ``affine`` ``(4, 4)`` voxel index -> RAS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float], axcodes: str,
                centre: np.ndarray, tilt_radians: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
        """A grid whose centre lies at ``centre`` (RAS mm).

        ``axcodes`` names where each voxel axis points (nibabel codes: ``"LPS"`` is DICOM's axial
        head-first layout); ``tilt_radians`` then rotates the axes about R, A, S (an oblique scan).
        """
        directions = np.zeros((3, 3))
        for voxel_axis, (ras_axis, sign) in enumerate(nib.orientations.axcodes2ornt(axcodes)):
            directions[int(ras_axis), voxel_axis] = sign
        linear = create_rotate(3, tilt_radians)[:3, :3] @ directions @ np.diag(spacing)
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = np.asarray(centre, dtype=np.float64) - linear @ ((np.asarray(shape) - 1) / 2.0)
        return cls(tuple(int(s) for s in shape), affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres per voxel along X, Y, Z."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def centre(self) -> np.ndarray:
        """RAS mm ``(3,)`` of the grid's centre (the middle of the voxel index range)."""
        return self.affine[:3, :3] @ ((np.asarray(self.shape) - 1) / 2.0) + self.affine[:3, 3]

    def points(self) -> np.ndarray:
        """RAS millimetres of every voxel centre: float32 ``(3, X, Y, Z)``."""
        index = np.indices(self.shape, dtype=np.float32)
        linear = self.affine[:3, :3].astype(np.float32)
        return np.einsum("ij,j...->i...", linear, index) + self.affine[:3, 3].astype(np.float32)[:, None, None, None]

    def _ras_orientation(self) -> np.ndarray:
        return nib.orientations.io_orientation(self.affine)

    def to_ras(self) -> Grid:
        """The same voxels with axes flipped and permuted to the closest R, A, S directions."""
        ornt = self._ras_orientation()
        shape = [0, 0, 0]
        for voxel_axis, (ras_axis, _) in enumerate(ornt):
            shape[int(ras_axis)] = self.shape[voxel_axis]
        return Grid(tuple(shape), self.affine @ nib.orientations.inv_ornt_aff(ornt, self.shape))

    def array_to_ras(self, array: np.ndarray) -> np.ndarray:
        """Reorder an ``(X, Y, Z)`` array on this grid into the layout of :meth:`to_ras`."""
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self._ras_orientation()))


@dataclass(frozen=True)
class Pose:
    """Rigid placement of a phantom: ``world = rotation @ body + translation`` (mm, RAS)."""

    rotation: np.ndarray
    """``(3, 3)`` orthonormal."""
    translation: np.ndarray
    """``(3,)`` RAS mm of the body frame's origin."""

    def body_coordinates(self, points: np.ndarray) -> np.ndarray:
        """Body-frame mm of world ``points`` ``(3, ...)``: ``rotation.T @ (points - translation)``."""
        shifted = points - self.translation.astype(np.float32).reshape(3, *([1] * (points.ndim - 1)))
        return np.einsum("ji,j...->i...", self.rotation.astype(np.float32), shifted)


def _random_pose(rng: np.random.Generator, max_degrees: float, max_shift_mm: float) -> Pose:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    return Pose(create_rotate(3, angles)[:3, :3], rng.uniform(-max_shift_mm, max_shift_mm, size=3))


def _ellipsoid_radius2(x, y, z, centre, semi_axes) -> np.ndarray:
    """Squared normalised radius: < 1 inside the axis-aligned ellipsoid."""
    return (((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2
            + ((z - centre[2]) / semi_axes[2]) ** 2)


def _inside_ellipsoid(x, y, z, centre, semi_axes) -> np.ndarray:
    return _ellipsoid_radius2(x, y, z, centre, semi_axes) <= 1.0


def _point_in_shrunk_ellipsoid(rng: np.random.Generator, centre: np.ndarray, semi_axes: np.ndarray,
                               radius: float) -> np.ndarray:
    """A random centre for a ball of ``radius`` mm that lies inside the ellipsoid.

    The ellipsoid contains the ball of its shortest semi-axis ``m`` about its centre and is
    convex, so ``(1 - radius / m) * E + B(radius)`` lies inside ``E``: a centre drawn uniformly
    from the ellipsoid shrunk by ``1 - radius / m`` keeps the ball inside.
    """
    shrink = 1.0 - radius / float(np.min(semi_axes))  # > 0 for the radii and livers drawn here
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return centre + shrink * semi_axes * direction * rng.uniform() ** (1.0 / 3.0)


# ----------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class TorsoAnatomy:
    """A CT subject's torso in its body frame (mm; x to the right, y anterior, z superior)."""

    half_width: float
    """Body semi-axis along x (skin)."""
    half_depth: float
    """Body semi-axis along y (skin)."""
    fat_mm: float
    """Subcutaneous fat thickness."""
    liver_hu: float
    lesion_hu: float
    liver_centre: np.ndarray
    """Centre of the liver's right lobe ``(3,)``; the lesion lies inside this ellipsoid."""
    liver_semi_axes: np.ndarray
    lesion_centre: np.ndarray
    lesion_radius: float
    """Baseline lesion radius (mm)."""
    lesion_growth: float
    """Follow-up lesion radius / baseline radius."""
    spine_phase_mm: float
    """Height offset of the vertebral pattern."""
    bowel_phase: np.ndarray
    """``(5,)`` phases (radians) of the bowel-loop pattern."""

    def lesion_radius_mm(self, follow_up: bool) -> float:
        return self.lesion_radius * (self.lesion_growth if follow_up else 1.0)

    def lesion_volume_mm3(self, follow_up: bool) -> float:
        return 4.0 / 3.0 * math.pi * self.lesion_radius_mm(follow_up) ** 3


@dataclass(frozen=True)
class HeadAnatomy:
    """An MR subject's head in its head frame (mm, origin at the brain's centre)."""

    semi_axes: np.ndarray
    """Scalp surface semi-axes ``(3,)`` along x, y, z."""
    lesion_centre: np.ndarray
    lesion_radius: float
    fold_phase: float
    """Phase of the cortical folding pattern (radians)."""
    gain: float
    """Scanner intensity scale (arbitrary units per unit of T1 signal)."""


@dataclass(frozen=True)
class DemoSubject:
    """Everything random about one demo subject (drawn by :func:`sample_subject`)."""

    index: int
    name: str
    """``"s003"`` for index 3: the manifest's ``subject``."""
    torso: TorsoAnatomy
    ct_poses: tuple[Pose, Pose]
    """Baseline and follow-up placement of the torso in the scanner."""
    ct_pixel_mm: float
    """CT in-plane pixel spacing."""
    head: HeadAnatomy
    head_pose: Pose
    mr_voxel_mm: float
    mr_tilt_radians: tuple[float, float, float]
    """Obliquity of the MR acquisition grid."""
    time_days: float
    event: int

    @property
    def lesion_volume_mm3(self) -> float:
        """Volume of the baseline liver lesion (the survival covariate)."""
        return self.torso.lesion_volume_mm3(follow_up=False)


def _lesion_volume_moments() -> tuple[float, float]:
    """Mean and standard deviation of ``4/3 pi r^3`` for ``r`` uniform in LESION_RADIUS_MM."""
    low, high = LESION_RADIUS_MM

    def raw_moment(k: int) -> float:  # E[r^k] for r ~ U(low, high)
        return (high ** (k + 1) - low ** (k + 1)) / ((k + 1) * (high - low))

    c = 4.0 / 3.0 * math.pi
    mean = c * raw_moment(3)
    return mean, math.sqrt(c * c * raw_moment(6) - mean * mean)


def _draw_outcome(rng: np.random.Generator, lesion_volume_mm3: float) -> tuple[float, int]:
    mean, sd = _lesion_volume_moments()
    baseline_hazard = math.log(2.0) / _BASELINE_MEDIAN_DAYS
    hazard = baseline_hazard * math.exp(_LOG_HAZARD_PER_SD * (lesion_volume_mm3 - mean) / sd)
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.exponential(1.0 / (_CENSORING_RATE_FACTOR * baseline_hazard))
    return float(max(1.0, math.ceil(min(event_time, censor_time)))), int(event_time <= censor_time)


def _sample_torso(rng: np.random.Generator) -> TorsoAnatomy:
    half_width = rng.uniform(145.0, 180.0)
    half_depth = half_width * rng.uniform(0.65, 0.75)
    fat = rng.uniform(10.0, 25.0)
    inner_w, inner_d = half_width - fat, half_depth - fat
    liver_centre = np.array([0.38 * inner_w, 0.05 * inner_d, -75.0])
    liver_semi = np.array([0.32 * inner_w, 0.6 * inner_d, 80.0])
    liver_hu = rng.uniform(55.0, 66.0)
    lesion_hu = liver_hu - rng.uniform(20.0, 30.0)
    radius = rng.uniform(*LESION_RADIUS_MM)
    growth = rng.uniform(*_LESION_GROWTH)
    lesion_centre = _point_in_shrunk_ellipsoid(rng, liver_centre, liver_semi, radius * growth + _LESION_MARGIN_MM)
    return TorsoAnatomy(
        half_width=half_width, half_depth=half_depth, fat_mm=fat, liver_hu=liver_hu, lesion_hu=lesion_hu,
        liver_centre=liver_centre, liver_semi_axes=liver_semi, lesion_centre=lesion_centre,
        lesion_radius=radius, lesion_growth=growth, spine_phase_mm=rng.uniform(0.0, 30.0),
        bowel_phase=rng.uniform(0.0, 2.0 * math.pi, size=5),
    )


def _sample_head(rng: np.random.Generator) -> HeadAnatomy:
    semi = np.array([rng.uniform(70.0, 78.0), rng.uniform(88.0, 98.0), rng.uniform(82.0, 90.0)])
    radius = rng.uniform(4.0, 12.0)
    # Lesion in the white matter of one hemisphere, clear of the ventricles (|x| < 15 mm) and of
    # the cortex: a centre in the white-matter ellipsoid shrunk for the radius, pushed lateral.
    wm_semi = semi - 22.0
    shrink = 1.0 - (radius + 3.0) / float(wm_semi.min())
    side = rng.choice([-1.0, 1.0])
    x_low = 15.0 + radius
    x = x_low + rng.uniform() * (shrink * wm_semi[0] - x_low)
    rest = shrink * math.sqrt(max(0.0, 1.0 - (x / (shrink * wm_semi[0])) ** 2))
    angle, spread = rng.uniform(0.0, 2.0 * math.pi), math.sqrt(rng.uniform())
    centre = np.array([side * x, rest * spread * wm_semi[1] * math.cos(angle),
                       rest * spread * wm_semi[2] * math.sin(angle)])
    return HeadAnatomy(semi_axes=semi, lesion_centre=centre, lesion_radius=radius,
                       fold_phase=rng.uniform(0.0, 2.0 * math.pi), gain=rng.uniform(0.8, 1.25))


def sample_subject(seed: int, index: int) -> DemoSubject:
    """Draw subject ``index`` of the demo cohort of ``seed`` (cheap: no voxels are made).

    The subject depends only on ``(seed, index)``, not on how many subjects are written.
    """
    _check_seed(seed)
    if index < 0:
        raise ValueError(f"demo subject index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    torso = _sample_torso(rng)
    baseline_pose = _random_pose(rng, max_degrees=5.0, max_shift_mm=15.0)
    follow_up_pose = _random_pose(rng, max_degrees=5.0, max_shift_mm=15.0)
    ct_pixel_mm = rng.uniform(4.8, 5.4)
    head = _sample_head(rng)
    head_pose = _random_pose(rng, max_degrees=6.0, max_shift_mm=10.0)
    mr_voxel_mm = rng.uniform(3.0, 3.4)
    mr_tilt = tuple(float(a) for a in np.deg2rad(rng.uniform(-8.0, 8.0, size=3)))
    time_days, event = _draw_outcome(rng, torso.lesion_volume_mm3(follow_up=False))
    return DemoSubject(
        index=index, name=f"s{index:03d}", torso=torso, ct_poses=(baseline_pose, follow_up_pose),
        ct_pixel_mm=ct_pixel_mm, head=head, head_pose=head_pose, mr_voxel_mm=mr_voxel_mm,
        mr_tilt_radians=mr_tilt, time_days=time_days, event=event,
    )


# ----------------------------------------------------------------------------- CT phantom


def _torso_classes(torso: TorsoAnatomy, lesion_radius: float, x: np.ndarray, y: np.ndarray,
                   z: np.ndarray) -> np.ndarray:
    """CT tissue class (uint8, same shape as ``x``) at body-frame points ``x, y, z`` (mm)."""
    a, b = torso.half_width, torso.half_depth
    ai, bi = a - torso.fat_mm, b - torso.fat_mm  # inside the fat: muscle wall and cavity
    s = bi / 90.0  # size of the spine relative to an average body
    classes = np.full(x.shape, _AIR, dtype=np.uint8)
    classes[(x / a) ** 2 + (y / b) ** 2 <= 1.0] = _FAT
    classes[(x / ai) ** 2 + (y / bi) ** 2 <= 1.0] = _SOFT

    for side in (1.0, -1.0):
        classes[_inside_ellipsoid(x, y, z, (side * 0.45 * ai, -0.05 * bi, 70.0), (0.33 * ai, 0.68 * bi, 92.0))] = _LUNG
    classes[_inside_ellipsoid(x, y, z, (-0.12 * ai, 0.25 * bi, 30.0), (0.3 * ai, 0.42 * bi, 48.0))] = _HEART
    spine_y = -0.5 * bi
    aorta = ((x + 0.12 * ai) ** 2 + (y - spine_y - 20.0 * s) ** 2 <= (11.0 * s) ** 2) & (z < 120.0)
    classes[aorta] = _AORTA
    # Abdominal cavity below the diaphragm: bowel loops in mesenteric fat, with pockets of gas.
    cavity = ((x / (ai - 12.0)) ** 2 + (y / (bi - 12.0)) ** 2 <= 1.0) & (y > spine_y + 20.0 * s) & (z < -40.0)
    p = torso.bowel_phase
    loops = (np.sin(x / 11.0 + p[0]) * np.sin(y / 9.0 + p[1]) * np.sin(z / 13.0 + p[2])
             + 0.6 * np.sin((x + y) / 7.0 + p[3]) * np.sin((y - z) / 8.0 + p[4]))
    classes[cavity & (loops < -0.15)] = _FAT
    classes[cavity & (loops > 0.95)] = _AIR
    classes[_inside_ellipsoid(x, y, z, (-0.55 * ai, -0.3 * bi, -55.0), (0.15 * ai, 0.3 * bi, 45.0))] = _SPLEEN
    for side in (1.0, -1.0):
        centre, semi = (side * 0.4 * ai, -0.38 * bi, -150.0), np.array([0.1 * ai, 0.16 * bi, 50.0])
        classes[_inside_ellipsoid(x, y, z, centre, semi + 8.0)] = _FAT  # perirenal fat
        classes[_inside_ellipsoid(x, y, z, centre, semi)] = _KIDNEY
    classes[_inside_ellipsoid(x, y, z, (-0.08 * ai, 0.3 * bi, -45.0), (0.25 * ai, 0.3 * bi, 33.0))] = _LIVER
    classes[_inside_ellipsoid(x, y, z, torso.liver_centre, torso.liver_semi_axes)] = _LIVER
    lesion = _ellipsoid_radius2(x, y, z, torso.lesion_centre, (lesion_radius,) * 3) <= 1.0
    classes[lesion] = _LESION
    trachea = (x**2 + (y - spine_y - 28.0 * s) ** 2 <= (8.0 * s) ** 2) & (z > 95.0)
    classes[trachea] = _AIR

    # Spine: vertebrae of 24 mm separated by 6 mm discs, repeating along z.
    level = np.mod(z - torso.spine_phase_mm, 30.0)
    in_vertebra = level >= 6.0
    body_r2 = (x / (22.0 * s)) ** 2 + ((y - spine_y) / (17.0 * s)) ** 2
    classes[(body_r2 <= 1.0) & ~in_vertebra] = _DISC
    classes[(body_r2 <= 1.0) & in_vertebra] = _CORTICAL
    classes[(body_r2 <= 0.7) & in_vertebra] = _TRABECULAR
    canal_y = spine_y - 26.0 * s
    canal_r = np.sqrt(x**2 + (y - canal_y) ** 2)
    arch = (canal_r <= 14.0 * s) & (y < canal_y + 3.0 * s) & in_vertebra
    spinous = (np.abs(x) <= 4.0 * s) & (y <= canal_y) & (y >= canal_y - 28.0 * s) & (level >= 10.0) & (level <= 24.0)
    transverse = (np.abs(x) <= 38.0 * s) & (np.abs(y - canal_y) <= 5.0 * s) & (level >= 12.0) & (level <= 22.0)
    classes[arch | spinous | transverse] = _BONE
    classes[canal_r <= 8.0 * s] = _CANAL

    _draw_ribs(classes, x, y, z, ai - 10.0, bi - 10.0)
    return classes


def _draw_ribs(classes: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, rib_a: float,
               rib_b: float) -> None:
    """Paint 12 rib pairs, costal cartilage and the sternum on the ellipse ``rib_a``, ``rib_b`` (mm)."""
    rho = np.sqrt((x / rib_a) ** 2 + (y / rib_b) ** 2)
    ray = np.sqrt(x**2 + y**2) / np.maximum(rho, 1e-6)  # distance from the axis to the ellipse along the ray
    near = np.nonzero(np.abs(rho - 1.0) * ray <= 5.0)
    xs, ys, zs = x[near], y[near], z[near]
    theta = np.arctan2(ys / rib_b, np.abs(xs) / rib_a)  # -pi/2 at the spine, +pi/2 at the sternum
    start, drop = -1.25, 40.0
    rib = np.zeros(xs.shape, dtype=bool)
    cartilage = np.zeros(xs.shape, dtype=bool)
    for k in range(12):
        end = 1.25 if k < 7 else (0.9 if k < 10 else 0.1)  # true, false and floating ribs
        centre_z = 140.0 - 24.0 * k - drop * (theta - start) / (math.pi / 2 - start)
        on_rib = (np.abs(zs - centre_z) <= 6.0) & (theta >= start) & (theta <= end)
        anterior = theta > 0.8
        rib |= on_rib & ~anterior
        cartilage |= on_rib & anterior
    sternum = (np.abs(xs) <= 14.0) & (ys > 0) & (zs >= -10.0) & (zs <= 140.0)
    values = classes[near]
    values[cartilage] = _CARTILAGE
    values[rib | sternum] = _BONE
    classes[near] = values


def _smooth(volume: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Gaussian smoothing (MONAI) of a float32 ``(X, Y, Z)`` array: the scanner's point spread.

    The array is edge-padded first (MONAI's filter pads with zeros, which would pull the border
    towards 0 HU) and cropped back after.
    """
    pad = int(math.ceil(4.0 * sigma_voxels))
    padded = torch.from_numpy(np.pad(volume, pad, mode="edge"))[None]
    smoothed = np.asarray(GaussianSmooth(sigma=sigma_voxels)(padded)[0], dtype=np.float32)
    return np.ascontiguousarray(smoothed[pad:-pad, pad:-pad, pad:-pad])


def _ct_hu_table(torso: TorsoAnatomy) -> np.ndarray:
    """HU per CT tissue class (float32), with this subject's liver and lesion values."""
    table = _CT_HU.copy()
    table[_LIVER], table[_LESION] = torso.liver_hu, torso.lesion_hu
    return table


def ct_noise_sd_hu(reference_sd_hu: float, spacing: tuple[float, float, float]) -> float:
    """Per-voxel noise (SD, HU) on a grid of ``spacing`` (mm) of a scan whose noise is
    ``reference_sd_hu`` at the reference voxel (:data:`CT_REFERENCE_VOXEL_MM`).

    Quantum noise is independent between the reference voxels, and a voxel of the coarser grid
    holds ``V / V_ref`` of them: its noise is the noise of their mean,
    ``reference_sd_hu * sqrt(V_ref / V)``. This is what a real scan shows after it is averaged onto
    this grid; a scan reconstructed natively at this voxel size would be quieter still (noise
    variance falls with the cube of the pixel width, Brooks and Di Chiro 1976).
    """
    return reference_sd_hu * math.sqrt(math.prod(CT_REFERENCE_VOXEL_MM) / math.prod(spacing))


def _render_ct(subject: DemoSubject, follow_up: bool, grid: Grid, rng: np.random.Generator,
               sigma_voxels: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """CT image (int16 HU, ``grid.shape``) and label (uint8: 1 liver, 2 lesion) on ``grid``.

    The noise is this scan's reference noise (drawn from :data:`CT_REFERENCE_NOISE_HU`) averaged
    onto ``grid``'s voxels (:func:`ct_noise_sd_hu`).
    """
    torso = subject.torso
    x, y, z = subject.ct_poses[int(follow_up)].body_coordinates(grid.points())
    classes = _torso_classes(torso, torso.lesion_radius_mm(follow_up), x, y, z)
    hu = _smooth(_ct_hu_table(torso)[classes], sigma_voxels)
    noise_sd = ct_noise_sd_hu(rng.uniform(*CT_REFERENCE_NOISE_HU), grid.spacing)
    hu += rng.normal(0.0, noise_sd, size=hu.shape).astype(np.float32)
    image = np.clip(np.rint(hu), *_CT_HU_RANGE).astype(np.int16)
    label = np.zeros(classes.shape, dtype=np.uint8)
    label[classes == _LIVER] = CT_LABELS["liver"]
    label[classes == _LESION] = CT_LABELS["lesion"]
    return image, label


def _render_topogram(subject: DemoSubject, follow_up: bool, ct_grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """A CT localizer: the torso's attenuation summed front to back, as a one-slice coronal image.

    Returns the image ``(X, Z, 1)`` (0..4095, bright = dense) and its affine (rows run head to feet).
    """
    ras = ct_grid.to_ras()
    width, height = ras.shape[0] * ras.spacing[0], ras.shape[2] * ras.spacing[2]
    pixel, depth_step = 4.0, 8.0
    shape = (int(round(width / pixel)), int(round(height / pixel)), int(round(_CT_FOV_MM / depth_step)))
    sampling = Grid.centred(shape, (pixel, pixel, depth_step), "LIA", ct_grid.centre)
    x, y, z = subject.ct_poses[int(follow_up)].body_coordinates(sampling.points())
    classes = _torso_classes(subject.torso, subject.torso.lesion_radius_mm(follow_up), x, y, z)
    attenuation = np.clip(_ct_hu_table(subject.torso)[classes] + 1000.0, 0.0, None) / 1000.0  # water = 1
    path_water_mm = attenuation.sum(axis=2) * depth_step
    image = np.clip(np.rint(path_water_mm * 8.0), 0, 4095)[:, :, None]
    affine = sampling.affine.copy()
    affine[:3, 3] = sampling.affine[:3, 3] + sampling.affine[:3, 2] * (shape[2] - 1) / 2.0  # the mid-plane
    affine[:3, 2] = sampling.affine[:3, 2] / depth_step  # 1 mm slice
    return image, affine


# ----------------------------------------------------------------------------- MR phantom


def _head_classes(head: HeadAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """MR tissue class (uint8, same shape as ``x``) at head-frame points ``x, y, z`` (mm)."""
    semi = head.semi_axes
    classes = np.full(x.shape, _M_AIR, dtype=np.uint8)
    neck_r2 = (x / 50.0) ** 2 + ((y + 15.0) / 55.0) ** 2
    below = z < -0.4 * semi[2]
    classes[(neck_r2 <= 1.0) & below] = _M_FAT
    classes[(neck_r2 <= 0.8) & below] = _M_MUSCLE
    zero = (0.0, 0.0, 0.0)
    classes[_inside_ellipsoid(x, y, z, zero, semi)] = _M_FAT
    classes[_inside_ellipsoid(x, y, z, zero, semi - 5.0)] = _M_SKULL
    classes[_inside_ellipsoid(x, y, z, zero, semi - 12.0)] = _M_CSF
    brain_semi = semi - 15.0
    brain = _inside_ellipsoid(x, y, z, zero, brain_semi)
    classes[brain] = _M_GM
    # White matter: an inner ellipsoid whose surface folds (gyri) by +-7%.
    wm_r = np.sqrt(_ellipsoid_radius2(x, y, z, zero, brain_semi - 7.0))
    azimuth = np.arctan2(y, x)
    polar = np.arctan2(np.sqrt(x**2 + y**2), z)
    folds = 1.0 + 0.07 * np.sin(7.0 * azimuth + head.fold_phase) * np.sin(6.0 * polar)
    classes[brain & (wm_r <= folds)] = _M_WM
    classes[brain & (np.abs(x) <= 1.5) & (z > -10.0)] = _M_CSF  # falx between the hemispheres
    for side in (1.0, -1.0):
        classes[_inside_ellipsoid(x, y, z, (side * 8.0, 5.0, 10.0), (6.0, 24.0, 12.0))] = _M_VENTRICLE
    classes[_ellipsoid_radius2(x, y, z, head.lesion_centre, (head.lesion_radius,) * 3) <= 1.0] = _M_LESION
    for side in (1.0, -1.0):
        eye = (side * 30.0, semi[1] - 20.0, -0.55 * semi[2])
        classes[_inside_ellipsoid(x, y, z, eye, (14.0, 14.0, 14.0))] = _M_FAT
        classes[_inside_ellipsoid(x, y, z, eye, (11.0, 11.0, 11.0))] = _M_VITREOUS
    return classes


def _render_mr(subject: DemoSubject, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MR image (int16, >= 0, ``grid.shape``) and label (uint8: 1 brain, 2 lesion) on ``grid``."""
    x, y, z = subject.head_pose.body_coordinates(grid.points())
    classes = _head_classes(subject.head, x, y, z)
    signal = _smooth(_MR_T1[classes] * subject.head.gain, 0.6)
    bias = RandBiasField(degree=3, coeff_range=(-0.12, 0.12), prob=1.0)
    bias.set_random_state(seed=int(rng.integers(2**31)))
    signal = np.asarray(bias(signal[None])[0], dtype=np.float32)
    noise_sd = 0.02 * float(_MR_T1[_M_WM]) * subject.head.gain
    real = signal + rng.normal(0.0, noise_sd, size=signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, noise_sd, size=signal.shape).astype(np.float32)
    image = np.clip(np.rint(np.hypot(real, imaginary)), 0, np.iinfo(np.int16).max).astype(np.int16)
    label = np.zeros(classes.shape, dtype=np.uint8)
    label[np.isin(classes, (_M_GM, _M_WM, _M_VENTRICLE))] = MR_LABELS["brain"]
    label[classes == _M_LESION] = MR_LABELS["lesion"]
    return image, label


# ----------------------------------------------------------------------------- scans and files


@dataclass(frozen=True)
class _ScanPlan:
    key: str
    """``ct0`` baseline CT, ``ct1`` follow-up CT, ``mr0`` MR."""
    storage: str
    """``dicom`` (study folder), ``dicom-enhanced``, ``nifti``, ``nrrd`` or ``mha``."""
    axcodes: str
    """Where the stored voxel axes point (nibabel codes)."""

    @property
    def modality(self) -> str:
        return "CT" if self.key.startswith("ct") else "MR"


_PLANS: tuple[tuple[_ScanPlan, ...], ...] = (
    (_ScanPlan("ct0", "dicom", "LPS"), _ScanPlan("mr0", "nifti", "LAS")),
    (_ScanPlan("ct0", "nifti", "LAS"), _ScanPlan("ct1", "dicom-enhanced", "LPS"), _ScanPlan("mr0", "dicom", "PIR")),
    (_ScanPlan("ct0", "nrrd", "LPS"), _ScanPlan("mr0", "mha", "LPS")),
    (_ScanPlan("ct0", "mha", "LIA"), _ScanPlan("ct1", "dicom", "RPI"), _ScanPlan("mr0", "nrrd", "RAS")),
)
_NOISE_STREAM = {"ct0": 1, "ct1": 2, "mr0": 3, "mr-localizer": 4}
"""Random stream (after seed and subject index) of each scan's noise and bias field."""
_SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-enhanced": ".dcm", "dicom": ""}


_RAS_AXIS_OF_CODE = {"R": "R", "L": "R", "A": "A", "P": "A", "S": "S", "I": "S"}
"""The RAS axis a nibabel axis code lies along."""


def _scan_plans(subject: DemoSubject) -> tuple[_ScanPlan, ...]:
    return _PLANS[subject.index % len(_PLANS)]


def _ct_grid(subject: DemoSubject, plan: _ScanPlan, size: str, slice_mm: float = _CT_SLICE_MM) -> Grid:
    """The scan's stored grid.

    ``full``: a 400 mm field of view, 360 mm long, centred on the table axis. ``small``: a
    targeted reconstruction of the liver, a 160 mm field of view, 180 mm long, centred on the
    right lobe of this scan's liver.
    """
    if size == "small":
        fov_mm, length_mm = _SMALL_CT_FOV_MM, _SMALL_CT_LENGTH_MM
        pose = subject.ct_poses[int(plan.key == "ct1")]
        centre = pose.rotation @ subject.torso.liver_centre + pose.translation
    else:
        fov_mm, length_mm = _CT_FOV_MM, _CT_SLICES * _CT_SLICE_MM
        centre = np.array([0.0, 0.0, _CT_FOV_CENTRE_Z])
    pixels = int(round(fov_mm / subject.ct_pixel_mm))
    n_slices = int(round(length_mm / slice_mm))
    ras_shape = {"R": pixels, "A": pixels, "S": n_slices}
    ras_spacing = {"R": subject.ct_pixel_mm, "A": subject.ct_pixel_mm, "S": slice_mm}
    axes = [_RAS_AXIS_OF_CODE[c] for c in plan.axcodes]
    return Grid.centred(tuple(ras_shape[a] for a in axes), tuple(ras_spacing[a] for a in axes), plan.axcodes,
                        centre)


def _mr_grid(subject: DemoSubject, plan: _ScanPlan, size: str) -> Grid:
    """The scan's stored grid: an oblique head field of view of about 210 x 235 x 215 mm, at the
    subject's voxel size (``full``) or twice it (``small``)."""
    voxel_mm = subject.mr_voxel_mm * (_SMALL_MR_VOXEL_FACTOR if size == "small" else 1.0)
    ras_shape = {a: int(round(fov / voxel_mm)) for a, fov in zip("RAS", _MR_FOV_MM)}
    axes = [_RAS_AXIS_OF_CODE[c] for c in plan.axcodes]
    return Grid.centred(tuple(ras_shape[a] for a in axes), (voxel_mm,) * 3, plan.axcodes,
                        np.array([0.0, 0.0, _MR_FOV_CENTRE_Z]), subject.mr_tilt_radians)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _save_sitk(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write NRRD or MetaImage (by suffix) with SimpleITK; ``affine`` is RAS, ITK wants LPS."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    lps = (LPS_TO_RAS @ affine)[:3, :]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:, 3].tolist())
    sitk.WriteImage(image, str(path), useCompression=True)


@dataclass(frozen=True)
class _Writer:
    """Where and how one demo dataset is written."""

    out_dir: Path
    seed: int
    size: str
    """``full`` or ``small`` (see :data:`DEMO_SIZES`)."""

    def uid(self, subject: DemoSubject, plan: _ScanPlan, what: str) -> str:
        return deterministic_uid(f"volpre-demo/{self.seed}/{subject.name}/{plan.key}/{what}")

    def write_scan(self, subject: DemoSubject, plan: _ScanPlan) -> ManifestEntry:
        scan_id = f"{subject.name}-{plan.key}"
        rng = np.random.default_rng([self.seed, subject.index, _NOISE_STREAM[plan.key]])
        follow_up = plan.key == "ct1"
        grid = _ct_grid(subject, plan, self.size) if plan.modality == "CT" else _mr_grid(subject, plan, self.size)
        if plan.modality == "CT":
            image, label = _render_ct(subject, follow_up, grid, rng)
        else:
            image, label = _render_mr(subject, grid, rng)
        image_path = self.out_dir / "images" / subject.name / f"{plan.key}{_SUFFIX[plan.storage]}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        series_uid = None
        label_grid, label_array = grid, label
        if plan.storage == "nifti":
            _save_nifti(image, grid.affine, image_path)
        elif plan.storage in ("nrrd", "mha"):
            _save_sitk(image, grid.affine, image_path)
        else:
            label_grid, label_array = grid.to_ras(), grid.array_to_ras(label)  # as read_volume returns it
            main_series_uid = self.uid(subject, plan, "series2")
            if plan.storage == "dicom-enhanced":  # one file holds one series: no series_uid needed
                write_multiframe_dicom(image, grid.affine, image_path,
                                       self._dicom_tags(subject, plan, main_series_uid, 2, "Follow-up abdomen 5mm"))
            else:
                series_uid = main_series_uid  # the study folder holds several series
                if plan.modality == "CT":
                    self._write_ct_study(subject, plan, grid, image, image_path, series_uid, rng)
                else:
                    self._write_mr_study(subject, plan, grid, image, image_path, series_uid)
        label_path = self.out_dir / "labels" / f"{scan_id}.nii.gz"
        label_path.parent.mkdir(parents=True, exist_ok=True)
        _save_nifti(label_array, label_grid.affine, label_path)
        ras = label_grid.to_ras()
        is_ct = plan.modality == "CT"
        return ManifestEntry(
            image=(image_path,), id=scan_id, subject=subject.name, modality=plan.modality, label=label_path,
            time=subject.time_days if is_ct else None, event=subject.event if is_ct else None,
            series_uid=series_uid, shape=ras.shape, spacing=ras.spacing,
        )

    def _dicom_tags(self, subject: DemoSubject, plan: _ScanPlan, series_uid: str, series_number: int,
                    series_description: str) -> SeriesTags:
        modality = plan.modality
        return SeriesTags(modality, subject.name, study_uid=self.uid(subject, plan, "study"), series_uid=series_uid,
                          series_description=series_description, series_number=series_number,
                          rescale_intercept=_CT_RESCALE_INTERCEPT if modality == "CT" else 0.0)

    def _write_ct_study(self, subject: DemoSubject, plan: _ScanPlan, grid: Grid, image: np.ndarray,
                        study_dir: Path, series_uid: str, rng: np.random.Generator) -> None:
        """Localizer (series 1), the main series (2) and a 10 mm reconstruction (3) in one folder."""
        follow_up = plan.key == "ct1"
        main_tags = self._dicom_tags(subject, plan, series_uid, 2, "Abdomen 5mm Br40")
        write_dicom_series(image, grid.affine, study_dir, main_tags,
                           file_names=[f"IM-0002-{k + 1:04d}.dcm" for k in range(grid.shape[2])])
        thick_grid = _ct_grid(subject, plan, self.size, slice_mm=_CT_RECON_SLICE_MM)
        thick, _ = _render_ct(subject, follow_up, thick_grid, rng, sigma_voxels=1.0)
        thick_tags = self._dicom_tags(subject, plan, self.uid(subject, plan, "series3"), 3, "Abdomen 10mm Br30")
        write_dicom_series(thick, thick_grid.affine, study_dir, thick_tags,
                           file_names=[f"IM-0003-{k + 1:04d}.dcm" for k in range(thick_grid.shape[2])])
        topogram, affine = _render_topogram(subject, follow_up, grid)
        topogram_tags = self._dicom_tags(subject, plan, self.uid(subject, plan, "series1"), 1, "Topogram 0.6 T20f")
        topogram_tags = dataclasses.replace(topogram_tags, rescale_intercept=0.0)  # a projection, not HU
        write_dicom_series(topogram, affine, study_dir, topogram_tags, file_names=["IM-0001-0001.dcm"])

    def _write_mr_study(self, subject: DemoSubject, plan: _ScanPlan, grid: Grid, image: np.ndarray,
                        study_dir: Path, series_uid: str) -> None:
        """Localizer (series 1, one mid-sagittal image) and the main series (2), extension-less files."""
        main_tags = self._dicom_tags(subject, plan, series_uid, 2, "T1 3D sag")
        write_dicom_series(image, grid.affine, study_dir, main_tags,
                           file_names=[f"MR0002{k + 1:04d}" for k in range(grid.shape[2])])
        scout_grid = Grid.centred((48, 48, 1), (5.0, 5.0, 5.0), "PIR", grid.centre)
        scout_rng = np.random.default_rng([self.seed, subject.index, _NOISE_STREAM["mr-localizer"]])
        scout, _ = _render_mr(subject, scout_grid, scout_rng)
        scout_tags = self._dicom_tags(subject, plan, self.uid(subject, plan, "series1"), 1, "Localizer sag")
        write_dicom_series(scout, scout_grid.affine, study_dir, scout_tags, file_names=["MR00010001"])


class DemoInputError(UserInputError, ValueError):
    """The demo data (or ``volpre demo``) cannot be made with these arguments: a number of subjects,
    a seed, a size or split fractions out of range, an output folder that is not a demo's."""


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DemoInputError(f"demo data seed must be a non-negative integer, got {seed!r}")


def assign_splits(n_subjects: int, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2) -> list[str]:
    """Split name per subject index: a seeded permutation, ``test_fraction`` ``test`` and
    ``val_fraction`` ``val`` (each rounded), the rest ``train``.

    ``test`` and ``val`` get at least one subject each when there are 2 (``test``) and 3
    (``val``) or more subjects, so from 3 subjects on every split is non-empty (with the default
    fractions; fractions whose rounded counts leave no ``train`` subject raise).

    Raises:
        DemoInputError: a fraction outside [0, 1), or no subject left for ``train`` (with 2+ subjects).
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise DemoInputError(f"demo data: {name} must be in [0, 1), got {fraction!r}")
    n_test = max(1, round(test_fraction * n_subjects)) if n_subjects >= 2 else 0
    n_val = max(1, round(val_fraction * n_subjects)) if n_subjects >= 3 else 0
    if n_subjects >= 2 and n_test + n_val >= n_subjects:
        raise DemoInputError(f"demo data: {n_test} test and {n_val} val subjects of {n_subjects} leave none for "
                             "train; lower val_fraction or test_fraction, or write more subjects")
    order = np.random.default_rng([seed, 0x5B117]).permutation(n_subjects)
    splits = [TRAIN] * n_subjects
    for rank, index in enumerate(order):
        if rank < n_test:
            splits[index] = TEST
        elif rank < n_test + n_val:
            splits[index] = VAL
    return splits


def write_demo_data(out_dir: Path, subjects: int = 8, seed: int = 0, size: str = "full",
                    val_fraction: float = 0.2, test_fraction: float = 0.2) -> Path:
    """Write the demo dataset of ``subjects`` subjects under ``out_dir``; return the manifest path.

    ``out_dir`` must not exist or be empty (so no stale file of another run is ever indexed).
    The same ``seed`` writes the same bytes; another seed gives other subjects. ``size``:
    ``"full"`` (about 0.5 s and 2 MB per subject) or ``"small"`` (a liver-targeted CT and a
    coarse MR per scan, see the module docstring; the same subjects, anatomy and outcomes).
    ``val_fraction`` and ``test_fraction``: shares of subjects in those splits (:func:`assign_splits`).

    Raises:
        DemoInputError: ``subjects`` < 1, ``seed`` not a non-negative integer, ``size`` unknown, or
            split fractions that leave no training subject.
        FileExistsError: ``out_dir`` is a file or a non-empty directory.
    """
    out_dir = Path(out_dir)
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise DemoInputError(f"demo data: subjects must be a positive integer, got {subjects!r}")
    _check_seed(seed)
    if size not in DEMO_SIZES:
        raise DemoInputError(f"demo data: size must be one of {', '.join(DEMO_SIZES)}, got {size!r}")
    splits = assign_splits(subjects, int(seed), val_fraction, test_fraction)
    check_new_output(out_dir, "demo data output", " (remove it or choose another path)")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out_dir.resolve(), int(seed), size)
    entries = []
    for index in range(subjects):
        subject = sample_subject(int(seed), index)
        for plan in _scan_plans(subject):
            entry = writer.write_scan(subject, plan)
            entries.append(dataclasses.replace(entry, split=splits[index]))
    what = "CT torso, MR head" if size == "full" else "small: liver-targeted CT, coarse MR head"
    description = f"volpre demo data: {subjects} synthetic subjects ({what}), seed {seed}"
    return save_manifest(Manifest(entries=entries, description=description), out_dir / MANIFEST_NAME)
