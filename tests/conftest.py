"""Shared fixtures (the demo dataset is generated once per test session) and the hang guards.

No test may hang CI. pytest-timeout (``--timeout`` in pyproject.toml, signal method) fails a test
that runs too long and prints where it was; a deadlock inside C code (an OpenMP pool, a lock held
with the GIL) never returns to Python to see that signal, so every test also arms faulthandler's
watchdog thread, which dumps every thread's stack and ends the session a little later.
Child processes go through ``child_processes`` (timeouts, whole process groups killed, spawn).
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEMO_SUBJECTS = 4


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """Manifest of the demo data (4 subjects: CT and MR in every file format, labels, survival)."""
    from volpre.demo.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", subjects=DEMO_SUBJECTS, seed=0)


def pytest_report_header(config) -> str:
    """Free space where the tests write (a full disk fails checkpoint writes by the dozen)."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free
    return f"free disk in {tempfile.gettempdir()}: {free / 2**30:.1f} GiB (the suite writes up to ~1 GiB at a time)"


HARD_TIMEOUT_MARGIN_S = 120
"""The watchdog fires this long after pytest-timeout should have failed the test."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Arm the watchdog for the whole of one test: fixture setup, the test, teardown.

    pytest-timeout bounds each of the three phases by ``--timeout``; the watchdog allows the sum
    of setup and call plus a margin, so it only fires on a hang that the signal could not break.
    """
    timeout = float(item.config.getoption("timeout", default=None) or 600)
    faulthandler.dump_traceback_later(2 * timeout + HARD_TIMEOUT_MARGIN_S, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
