"""Shared fixtures: the demo dataset is generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEMO_SUBJECTS = 4


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """Manifest of the demo data (4 subjects: CT and MR in every file format, labels, survival)."""
    from volpre.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", subjects=DEMO_SUBJECTS, seed=0)
