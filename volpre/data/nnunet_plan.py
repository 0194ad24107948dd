"""An nnU-Net v2 plan as volpre's preprocessing: the same intensities in pretraining and fine-tuning.

``model.encoder: nnunet`` pretrains the network nnU-Net builds from a plans file
(``nnUNetv2_plan_and_preprocess`` writes ``nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json``), so its
input must look like what nnU-Net feeds that network when it fine-tunes. :class:`NNUNetPlan`
reads the plans with nnU-Net's own ``PlansManager`` (configuration inheritance included) and
preprocesses a volume with the configuration's own preprocessor (``DefaultPreprocessor.run_case_npy``
unless the plan names another): ``transpose_forward``, crop to the non-zero region, the per-channel
normalisation scheme (``CTNormalization`` clips to the dataset fingerprint's 0.5/99.5 percentiles
and z-scores with its foreground mean and std; ``ZScoreNormalization`` z-scores each image, over the
non-zero mask where ``use_mask_for_norm`` says so; ...), then resampling to the target spacing with
the plan's resampling function (third-order spline, separate z for anisotropic data).

Reading: volumes come through volpre's checked reader (every format and integrity check of
``volpre.data.readers``, DICOM series included), which returns RAS ``(C, X, Y, Z)``. nnU-Net's
``SimpleITKIO`` hands the preprocessor the array in SimpleITK's index order ``(z, y, x)`` with the
spacing reversed to match; volpre therefore turns the RAS volume into LPS (ITK's patient axes) and
reverses the axes (``(C, S, P, L)``, spacing ``(sz, sy, sx)``) before ``run_case_npy``. That is
exactly SimpleITK's array for images stored along LPS (identity direction: the usual axial DICOM
series and the NIfTI files ITK tools write from them); for other storage orders the same voxels
come in another axis order or sign (an SSL crop does not mind; intensities and spacing are the same).

The result is ``(C, a0, a1, a2)`` float32 in the *plan's* axis order (after ``transpose_forward``),
where the plan's ``patch_size`` and ``spacing`` live; volpre's crops (``data.roi``) use that order
too. :func:`resolve_run_config` fills ``data.roi: null`` with the plan's patch size and checks the
crop and mask sizes against the network's strides.

nnU-Net v2 is optional (``pip install 'volpre[nnunet]'``); nothing here imports it before it is
needed, and nothing imports ``timm`` or ``torchvision`` (nnU-Net's planner, preprocessor, trainer
and its plain and residual U-Nets do not need them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volpre.config import ConfigError, NNUNetConfig, RunConfig
from volpre.data.errors import VolumeError
from volpre.data.manifest import entry_record
from volpre.data.manifest import ManifestEntry
from volpre.data.transforms import LoadVolumed

NNUNET_INSTALL = (
    "pip install 'volpre[nnunet]' -c <(python -c 'import torch; print(\"torch==\" + torch.__version__)')"
)
"""The install command for the optional nnU-Net dependencies, keeping the torch already installed."""

SUPPORTED_NORMALISATION_MODALITY = {"CTNormalization": "CT"}
"""Normalisation schemes that assume one modality: manifest entries of another are refused."""


def require_nnunet() -> None:
    """Raise :class:`ConfigError` (how to install it) unless nnunetv2 and dynamic_network_architectures import."""
    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"model.encoder nnunet needs nnU-Net v2 ({exc.name} is not installed): {NNUNET_INSTALL}"
        ) from exc


def plans_sha256(plans: dict[str, Any]) -> str:
    """SHA-256 of the plans' canonical JSON (sorted keys): equal for equal plans, whatever the file's layout."""
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class NNUNetPlan:
    """One configuration of an nnU-Net v2 plans file.

    Attributes:
        plans: the whole plans dict (as in the JSON file).
        configuration: the configuration name (e.g. ``3d_fullres``).
        source: where the plans came from, for messages (a file or a checkpoint).
    """

    plans: dict[str, Any]
    configuration: str
    source: str

    @classmethod
    def load(cls, cfg: NNUNetConfig) -> NNUNetPlan:
        """Read ``model.nnunet.plans`` and check ``model.nnunet.configuration`` is a 3D configuration of it.

        Raises:
            ConfigError: nnU-Net is not installed, the key is unset, the file is missing or not a plans file,
                or the configuration is not in it (the message lists those it has) or is not 3D.
        """
        require_nnunet()
        if cfg.plans is None:
            raise ConfigError(
                "model.nnunet.plans is not set: give the plans file nnUNetv2_plan_and_preprocess wrote, e.g. "
                "model.nnunet.plans=$nnUNet_preprocessed/Dataset001_X/nnUNetPlans.json"
            )
        path = Path(cfg.plans).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.nnunet.plans: {path}: no such file (expected an nnU-Net v2 plans JSON)")
        try:
            plans = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model.nnunet.plans: {path} is not a JSON file ({exc})") from exc
        return cls.from_plans(plans, cfg.configuration, str(path))

    @classmethod
    def from_plans(cls, plans: Any, configuration: str, source: str) -> NNUNetPlan:
        """A plan from an already read plans dict (e.g. the copy a checkpoint keeps); checked as :meth:`load`."""
        require_nnunet()
        if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
            raise ConfigError(f"model.nnunet.plans: {source} is not an nnU-Net v2 plans file (no 'configurations')")
        available = sorted(plans["configurations"])
        if configuration not in available:
            raise ConfigError(
                f"model.nnunet.configuration: got {configuration!r}; the plans {source} have {', '.join(available)}"
            )
        plan = cls(plans=plans, configuration=configuration, source=source)
        if len(plan.patch_size) != 3:
            raise ConfigError(
                f"model.nnunet.configuration: {configuration!r} of {source} is a {len(plan.patch_size)}D "
                "configuration; volpre pretrains 3D networks (use e.g. 3d_fullres)"
            )
        return plan

    # ------------------------------------------------------------------ nnU-Net's view of the plan

    def manager(self):
        """nnU-Net's ``PlansManager`` for these plans (built on each call: it is not picklable for workers)."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    def configuration_manager(self):
        """nnU-Net's ``ConfigurationManager`` of :attr:`configuration` (inheritance resolved)."""
        return self.manager().get_configuration(self.configuration)

    @property
    def _resolved(self) -> dict[str, Any]:
        return self.configuration_manager().configuration

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The configuration's patch size, in the plan's axis order."""
        return tuple(int(p) for p in self._resolved["patch_size"])

    @property
    def in_channels(self) -> int:
        """Input channels of the network: one normalisation scheme per channel."""
        return len(self._resolved["normalization_schemes"])

    @property
    def normalization_schemes(self) -> tuple[str, ...]:
        return tuple(self._resolved["normalization_schemes"])

    @property
    def total_strides(self) -> tuple[int, int, int]:
        """Product of the encoder's stage strides on each axis (the downsampling of its deepest map)."""
        strides = self._resolved["architecture"]["arch_kwargs"]["strides"]
        per_stage = [[s] * 3 if isinstance(s, int) else list(s) for s in strides]
        return tuple(int(math.prod(stage[axis] for stage in per_stage)) for axis in range(3))  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        return plans_sha256(self.plans)

    def preprocessing_record(self) -> dict[str, Any]:
        """What decides the preprocessed volume (keys the cache): the resolved configuration's preprocessing
        entries, the fingerprint's intensity properties, ``transpose_forward`` and the nnunetv2 version."""
        from importlib.metadata import version

        resolved = self._resolved
        keys = ("preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                "resampling_fn_data_kwargs")
        return {
            "nnunetv2": version("nnunetv2"),
            "configuration": {k: resolved.get(k) for k in keys},
            "transpose_forward": self.plans.get("transpose_forward"),
            "foreground_intensity_properties_per_channel": self.plans.get(
                "foreground_intensity_properties_per_channel"),
        }

    # ------------------------------------------------------------------ preprocessing

    def check_modality(self, modality: str | None, where: str) -> None:
        """Refuse an entry whose modality contradicts a channel's normalisation (CT normalisation of an MR)."""
        for channel, scheme in enumerate(self.normalization_schemes):
            expected = SUPPORTED_NORMALISATION_MODALITY.get(scheme)
            if expected is not None and modality is not None and modality != expected:
                raise VolumeError(
                    where, "modality",
                    f"modality {modality!r}, but the nnU-Net plan {self.source} normalises channel {channel} with "
                    f"{scheme} (for {expected}); pretrain on the {expected} entries (volpre pretrain --splits, or a "
                    "manifest of them)",
                )

    def preprocess(self, image: Any, spacing: tuple[float, float, float]) -> np.ndarray:
        """Preprocess one volume as nnU-Net preprocesses it for this configuration.

        Args:
            image: ``(C, X, Y, Z)`` RAS array (volpre's reader; CT in HU), ``C == in_channels``.
            spacing: voxel spacing of ``image`` in mm, ``(sx, sy, sz)``.

        Returns:
            ``(C, a0, a1, a2)`` float32 in the plan's axis order, normalised and on the target spacing.
        """
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 4 or array.shape[0] != self.in_channels:
            raise ValueError(
                f"the nnU-Net plan {self.source} ({self.configuration}) expects {self.in_channels} channel(s) "
                f"(one per normalisation scheme), got an image of shape {array.shape}"
            )
        manager = self.manager()
        configuration = manager.get_configuration(self.configuration)
        preprocessor = configuration.preprocessor_class(verbose=False)
        sitk_order = np.ascontiguousarray(array[:, ::-1, ::-1, :].transpose(0, 3, 2, 1))  # RAS -> LPS -> (S, P, L)
        properties = {"spacing": [float(s) for s in reversed(spacing)]}
        data, _seg, _properties = preprocessor.run_case_npy(sitk_order, None, properties, manager, configuration, {})
        return np.ascontiguousarray(data, dtype=np.float32)

    def preprocess_entry(self, entry: ManifestEntry) -> np.ndarray:
        """Read a manifest entry with volpre's checked reader (all its channels) and :meth:`preprocess` it."""
        image = LoadVolumed()(entry_record(entry))["image"]
        spacing = tuple(float(s) for s in np.asarray(image.pixdim, dtype=np.float64)[:3])
        return self.preprocess(image.detach().cpu().numpy(), spacing)  # type: ignore[arg-type]


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.roi: null`` set to the plan's patch size, checked against the plan (nnunet only).

    Checks that ``model.in_channels`` equals the plan's channels; that every crop axis is a multiple of
    the encoder's total stride and at least twice it (instance norm needs more than one voxel on the
    deepest map); for ``mvm`` that mask cells tile the crop, are multiples of the total stride and
    leave cells masked and visible; for the ``dae`` mask that ``mask_block`` divides the crop. Other
    encoders are returned unchanged.

    Raises:
        ConfigError: naming the key and what the plan allows.
    """
    if cfg.model.encoder != "nnunet":
        return cfg
    plan = NNUNetPlan.load(cfg.model.nnunet)
    where = f"the nnU-Net plan {plan.source} ({plan.configuration})"
    if cfg.model.in_channels != plan.in_channels:
        raise ConfigError(
            f"model.in_channels is {cfg.model.in_channels}, but {where} normalises {plan.in_channels} channel(s) "
            f"({', '.join(plan.normalization_schemes)}); set model.in_channels={plan.in_channels}"
        )
    roi = plan.patch_size if cfg.data.roi is None else tuple(cfg.data.roi)
    strides = plan.total_strides
    if any(r % s or r < 2 * s for r, s in zip(roi, strides)):
        raise ConfigError(
            f"data.roi {list(roi)} does not fit {where}: every axis must be a multiple of the encoder's total stride "
            f"{list(strides)} and at least twice it (the plan's patch size is {list(plan.patch_size)})"
        )
    if cfg.objective.name == "mvm":
        cells = mask_cells(cfg.objective.mvm.mask_patch, strides)
        if any(c % s for c, s in zip(cells, strides)) or any(r % c for r, c in zip(roi, cells)):
            raise ConfigError(
                f"objective.mvm.mask_patch {cfg.objective.mvm.mask_patch}: mask cells of {list(cells)} voxels must be "
                f"multiples of the total stride {list(strides)} of {where} and divide data.roi {list(roi)} "
                "(null: one cell per deepest-map position)"
            )
        count = math.prod(r // c for r, c in zip(roi, cells))
        masked = round(cfg.objective.mvm.mask_ratio * count)
        if not 0 < masked < count:
            raise ConfigError(
                f"objective.mvm.mask_ratio {cfg.objective.mvm.mask_ratio} masks {masked} of the {count} cells of "
                f"{list(cells)} voxels in a data.roi crop of {list(roi)}; it must mask at least one and leave one visible"
            )
    if cfg.objective.name == "dae" and "mask" in cfg.objective.dae.disruptions:
        block = cfg.objective.dae.mask_block
        if any(r % block for r in roi):
            raise ConfigError(f"data.roi {list(roi)} must be divisible by objective.dae.mask_block {block}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, roi=roi))


def mask_cells(mask_patch: int | None, strides: tuple[int, int, int]) -> tuple[int, int, int]:
    """Edge of the MVM mask cells per axis: ``mask_patch`` on every axis, or the total stride when ``None``."""
    return tuple(strides) if mask_patch is None else (mask_patch,) * 3  # type: ignore[return-value]
