"""volpre demo, the main job, end to end at the smallest size that still has every split."""

from __future__ import annotations

import re

import pytest

from volpre.demo import MARKER, DemoError, run_demo


def test_demo_runs_the_whole_path(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, subjects=8, pretrain_steps=3, epochs={"segmentation": 1, "survival": 2})
    text = report.read_text()
    assert "tiny smoke run" in text and "not evidence" in text
    rows = [line for line in text.splitlines() if line.startswith("| segmentation") or line.startswith("| survival")]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        ("segmentation", "pretrained"), ("segmentation", "scratch"), ("survival", "pretrained"), ("survival", "scratch")]
    for row in rows:
        value = row.split("|")[4].strip()
        assert re.fullmatch(r"\d\.\d{3}", value), row  # every arm was scored on the test split
    for arm in ("pretrained", "scratch"):
        assert (out / "finetune" / "segmentation" / arm / "models" / "model.pt").is_file()
    assert (out / "bundles" / "survival" / "configs" / "metadata.json").is_file()
    printed = capsys.readouterr().out
    assert "volpre check" in printed and "0 with problems" in printed and "indexed" in printed

    # a second run replaces the earlier demo; any other non-empty folder is refused
    assert (out / MARKER).exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    with pytest.raises(DemoError, match="is not a volpre demo folder"):
        run_demo(other)
