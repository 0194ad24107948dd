"""Where the bundle templates are: the repository's ``bundles/`` folder, or its installed copy.

The templates live in the top-level ``bundles/`` folder of the source tree. An installed volpre
(``pip install .``, the Docker image) carries them as the package data of
``volpre.bundle_templates`` (setup.cfg maps ``bundles/`` onto that package). Layout::

    bundles/common/LICENSE
    bundles/common/configs/{logging.conf,multi_gpu_train.json}           shared by every bundle
    bundles/segmentation/configs/{train,inference,evaluate,metadata}.json
    bundles/segmentation/docs/README.md
    bundles/survival/configs/{train,inference,evaluate,metadata}.json
    bundles/survival/docs/README.md
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TASKS = ("segmentation", "survival")
"""Bundle kinds, each a template folder."""


def templates_root() -> Path:
    """The folder holding ``common/`` and one folder per task.

    Raises:
        FileNotFoundError: neither the installed package data nor the source tree's ``bundles/``
            is there (a broken install).
    """
    installed = importlib.util.find_spec("volpre.bundle_templates")
    candidates = []
    if installed is not None and installed.submodule_search_locations:
        candidates += [Path(p) for p in installed.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "bundles")
    for candidate in candidates:
        if (candidate / "common" / "LICENSE").is_file():
            return candidate
    raise FileNotFoundError(
        "volpre's bundle templates are missing: looked in " + ", ".join(str(c) for c in candidates)
        + " (reinstall volpre; the package data volpre.bundle_templates must be installed)"
    )
