"""Write the two pip inputs of the image's dependency layer (standard library only).

Run by ``docker/Dockerfile`` with the base image's Python, before volpre's source is copied::

    python image_requirements.py SETUP_CFG REQUIREMENTS_OUT CONSTRAINTS_OUT [EXTRA ...]

- ``REQUIREMENTS_OUT``: volpre's ``[options] install_requires`` from ``SETUP_CFG``, then the requirements
  of each named ``[options.extras_require]`` EXTRA (e.g. ``nnunet``), one requirement a line. The dependencies then install from setup.cfg alone, so that Docker layer is rebuilt only
  when setup.cfg changes, not on every source edit.
- ``CONSTRAINTS_OUT``: ``torch==<version>`` of the torch installed for this interpreter (in the
  image: the base image's CUDA build, e.g. ``2.9.1+cu128``). With it pip keeps that build; a
  dependency that needed another torch makes pip fail instead of silently replacing the CUDA
  build with a wheel from PyPI.

Exit status 0 on success; 2 with a one-line message naming the file and the problem otherwise.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import sys
from pathlib import Path


class ImageRequirementsError(ValueError):
    """setup.cfg does not declare volpre's dependencies, or the interpreter has no torch."""


def install_requires(setup_cfg: Path) -> list[str]:
    """The requirement strings of ``[options] install_requires`` in ``setup_cfg``, in file order."""
    if not setup_cfg.is_file():
        raise ImageRequirementsError(f"{setup_cfg}: no such file (expected volpre's setup.cfg)")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(setup_cfg, encoding="utf-8")
    except configparser.Error as exc:
        raise ImageRequirementsError(f"{setup_cfg}: not a valid setup.cfg ({exc.message})") from exc
    if not parser.has_option("options", "install_requires"):
        raise ImageRequirementsError(f"{setup_cfg}: no install_requires in the [options] section")
    value = parser.get("options", "install_requires")
    if value.strip().startswith(("file:", "attr:")):
        raise ImageRequirementsError(
            f"{setup_cfg}: install_requires uses a directive ({value.strip()!r}); "
            "expected the requirements listed one a line"
        )
    requirements = [line.strip() for line in value.splitlines() if line.strip()]
    if not requirements:
        raise ImageRequirementsError(f"{setup_cfg}: install_requires in [options] is empty")
    return requirements


def extra_requires(setup_cfg: Path, extra: str) -> list[str]:
    """The requirement strings of ``[options.extras_require] EXTRA`` in ``setup_cfg``, in file order."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg, encoding="utf-8")
    if not parser.has_option("options.extras_require", extra):
        raise ImageRequirementsError(f"{setup_cfg}: no extra {extra!r} in the [options.extras_require] section")
    lines = [line.split("#", 1)[0].strip() for line in parser.get("options.extras_require", extra).splitlines()]
    return [line for line in lines if line]


def installed_torch_constraint() -> str:
    """``torch==<version>`` of the torch this interpreter would import (local label included)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ImageRequirementsError(
            f"{sys.executable}: torch is not installed for this Python; expected a base image that "
            "ships a CUDA build of torch (e.g. pytorch/pytorch:<version>-cuda<...>-runtime)"
        ) from None
    return f"torch=={version}"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: image_requirements.py SETUP_CFG REQUIREMENTS_OUT CONSTRAINTS_OUT [EXTRA ...]", file=sys.stderr)
        return 2
    setup_cfg, requirements_out, constraints_out = (Path(a) for a in argv[:3])
    try:
        requirements = install_requires(setup_cfg)
        for extra in argv[3:]:
            requirements += extra_requires(setup_cfg, extra)
        constraint = installed_torch_constraint()
    except ImageRequirementsError as error:
        print(f"image_requirements.py: error: {error}", file=sys.stderr)
        return 2
    requirements_out.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    constraints_out.write_text(constraint + "\n", encoding="utf-8")
    print(f"{len(requirements)} requirements -> {requirements_out}; {constraint} -> {constraints_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
