"""MONAI's bundle metadata schema, shipped with volpre so bundles verify offline.

``meta_schema_20240725.json`` beside this module is MONAI's official metadata schema (Apache-2.0,
(c) MONAI Consortium), stored verbatim: the text of ``public/schema/meta_schema_20240725.json``
in the GitHub repository ``Project-MONAI/project-monai.github.io`` (commit
``abfc0515409b160a9af8f5cef631dff45d503162``), published at
https://project-monai.github.io/schema/meta_schema_20240725.json and, under the URL that
MONAI's model zoo and volpre's ``metadata.json`` name (:data:`SCHEMA_URL`), on the
``MONAI-extra-test-data`` 0.8.1 release. SHA-256 of the file: :data:`SCHEMA_SHA256`.

``python -m monai.bundle verify_metadata`` downloads the schema that ``metadata.json`` names
unless a file already exists at ``--filepath``; copy ours there first::

    python -m volpre.export.schema /tmp/meta_schema.json
    python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json --filepath /tmp/meta_schema.json
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("meta_schema_20240725.json")
"""The shipped schema."""
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
"""What a bundle's ``metadata.json`` names as its ``schema``."""
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
"""SHA-256 of :data:`SCHEMA_FILE` (checked by the tests)."""


def copy_meta_schema(filepath: str | os.PathLike[str]) -> Path:
    """Copy the shipped schema to ``filepath`` (creating its folder) and return the path.

    Then ``python -m monai.bundle verify_metadata --filepath FILEPATH ...`` finds it there and does
    not download anything.

    Raises:
        IsADirectoryError: ``filepath`` is an existing directory (give a file name).
    """
    target = Path(filepath)
    if target.is_dir():
        raise IsADirectoryError(
            f"meta schema target {target} is a directory; expected a file path such as {target / SCHEMA_FILE.name}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCHEMA_FILE, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m volpre.export.schema FILEPATH``: copy the schema there and print the path."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m volpre.export.schema FILEPATH", file=sys.stderr)
        return 2
    print(copy_meta_schema(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
