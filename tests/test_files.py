"""volpre.files: atomic writers (text, bytes, torch) and the file fingerprint."""

from __future__ import annotations

import hashlib

import pytest
import torch

from volpre.files import atomic_torch_save, atomic_write, atomic_write_text, check_new_output, file_sha256


def test_atomic_writers_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    assert atomic_write_text(path, "n\u00e9w\n") == path
    assert path.read_text(encoding="utf-8") == "n\u00e9w\n"
    weights = tmp_path / "w.pt"
    atomic_torch_save({"a": torch.arange(3)}, weights)
    assert torch.equal(torch.load(weights, weights_only=True)["a"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "w.pt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")

    def half_then_fail(f):
        f.write(b"half of a new file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_file_sha256_matches_hashlib_across_block_boundaries(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB and a bit: several 1 MiB blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_check_new_output_takes_new_or_empty_folders_and_names_what_is_in_the_way(tmp_path):
    check_new_output(tmp_path / "new", "bundle output")
    (tmp_path / "empty").mkdir()
    check_new_output(tmp_path / "empty", "bundle output")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match=r"^probe output .*full is a non-empty directory; expected a new or "
                                              r"empty directory \(remove it\)$"):
        check_new_output(tmp_path / "full", "probe output", " (remove it)")
    with pytest.raises(FileExistsError, match=r"^bundle output .*file is a file; expected a new or empty directory$"):
        check_new_output(tmp_path / "file", "bundle output")
