"""Versions of volpre and the libraries whose behaviour its weights depend on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from volpre import __version__

TRACKED_PACKAGES = ("monai", "torch", "numpy", "pytorch-ignite", "nibabel", "pydicom", "SimpleITK")


def installed_versions() -> dict[str, str]:
    """``{"volpre": ..., "monai": ..., "torch": ..., ..., "python": ...}`` of this environment."""
    versions = {"volpre": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
