"""Finding local paths in files that are meant to be shared (exported bundles)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/'~$-])/[\w.-]+/[\w./-]+")
"""An absolute POSIX path of two or more parts in text, not a URL's path (``https://host/a/b``)
nor a path joined onto a config reference (``@bundle_root + '/models/model.pt'``)."""


def local_paths_in(folder: Path, places: Iterable[Path]) -> dict[str, list[str]]:
    """``{file: [what it holds]}`` for every file under ``folder`` that holds one of ``places``
    (as bytes: binary files too) or, in a text file, any absolute path."""
    needles = {str(Path(p).resolve()) for p in places} | {str(Path(p)) for p in places}
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits = sorted(n for n in needles if n.encode() in data)
        try:
            hits += ABSOLUTE_PATH.findall(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass  # a binary file: searched for the places above only
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found
