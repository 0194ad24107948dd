"""The command line's shape: building the parser (what ``volpre --help`` and ``volpre COMMAND
--help`` do) imports no torch, so help stays fast; each command's work imports it when it runs."""

from __future__ import annotations

import sys
from pathlib import Path

from child_processes import run_command

REPO = Path(__file__).parent.parent


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from volpre.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))")
    proc = run_command([sys.executable, "-c", code], timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
