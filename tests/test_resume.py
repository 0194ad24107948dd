"""Resume refuses other data, damaged checkpoints are detected and the previous step used, and
writers killed half way leave nothing that a rerun trips over."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from child_processes import run_command
from volpre.cli import main
from volpre.engine.checkpoint import CheckpointError, load_checkpoint, state_checksum
from volpre.files import remove_stale_temporaries

REPO = Path(__file__).parent.parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _steps(output: Path) -> list[int]:
    return [r["step"] for r in _records(output) if "event" not in r]


def _manifest(demo_manifest: Path, path: Path, drop: tuple[str, ...] = (), add: tuple[dict, ...] = ()) -> Path:
    """The demo manifest with absolute paths, without the ids in ``drop``, plus ``add``."""
    data = json.loads(demo_manifest.read_text())
    base = demo_manifest.parent
    entries = [{**e, "image": str(base / e["image"]), "label": str(base / e["label"])}
               for e in data["entries"] if e["id"] not in drop]
    path.write_text(json.dumps({"format_version": 1, "entries": entries + list(add)}))
    return path


def _args(manifest: Path, output: Path, cache: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(manifest), "--output", str(output),
            "--device", "cpu", "data.num_workers=0", "train.checkpoint_every=1", f"data.cache_dir={cache}",
            "train.lr=1e-4", *extra]


def test_resume_refuses_changed_entries_and_splits_and_continues_with_new_data(demo_manifest, tmp_path, capsys,
                                                                                caplog):
    cache, out = demo_manifest.parent / ".volpre_cache", tmp_path / "run"
    original = _manifest(demo_manifest, tmp_path / "original.json")
    extra = {"image": str(demo_manifest.parent / "images/s002/ct0.nrrd"), "id": "extra-ct", "subject": "s9",
             "modality": "CT", "split": "train"}
    changed = _manifest(demo_manifest, tmp_path / "changed.json", drop=("s001-ct1",), add=(extra,))

    # the documented override train.lr=1e-4 (YAML reads 1e-4 as text) works through the CLI
    assert main(_args(original, out, cache, "--splits", "train", "--max-steps", "2")) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["config"]["train"]["lr"] == 1e-4
    assert state["data"]["splits"] == ["train"]
    assert [i for i, _ in state["data"]["entries"]] == ["s000-ct0", "s000-mr0", "s001-ct0", "s001-ct1", "s001-mr0"]
    first_manifest = state["manifest"]
    capsys.readouterr()

    assert main(_args(changed, out, cache, "--resume", "--max-steps", "3")) == 2  # --splits train from the run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: the data differ from those the run was trained on: " in err
    assert "1 entry removed: s001-ct1; 1 entry added: extra-ct" in err and "pass --new-data" in err

    assert main(_args(original, out, cache, "--resume", "--splits", "test", "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    assert ("splits: the run was started on --splits train, this resume asks for --splits test; 5 entries removed: "
            "s000-ct0, s000-mr0, s001-ct0, s001-ct1, s001-mr0; 3 entries added: s003-ct0, s003-ct1, s003-mr0") in err
    assert main(_args(original, out, cache, "--resume", "--max-steps", "3")) == 0  # the run's data: fine
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3

    assert main(_args(changed, out, cache, "--new-data", "--max-steps", "4")) == 2
    assert "--new-data continues a run on changed data: it needs --resume" in capsys.readouterr().err
    assert main(_args(changed, out, cache, "--resume", "--new-data", "--max-steps", "4")) == 0
    assert "continuing at step 3 on other data: 1 entry removed: s001-ct1; 1 entry added: extra-ct" in caplog.text
    events = [r for r in _records(out) if "event" in r]
    assert len(events) == 1 and events[0]["event"] == "new_data" and events[0]["step"] == 3
    assert events[0]["added"] == ["extra-ct"] and events[0]["removed"] == ["s001-ct1"]
    assert events[0]["exact_resume"] is False and events[0]["manifest"]["path"] == str(changed.resolve())
    assert _steps(out) == [1, 2, 3, 4]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    history = state["data"]["history"]
    assert [(h["from_step"], h["new_data"], h["added"], h["removed"]) for h in history] == [
        (0, False, 0, 0), (3, True, 1, 1)]
    assert history[0]["manifest"] == first_manifest  # the provenance of steps 1-3 is kept
    assert state["manifest"]["path"] == str(changed.resolve())
    assert main(_args(changed, out, cache, "--resume", "--max-steps", "5")) == 0  # now these are the run's data


def _flip_inside_a_tensor(path: Path) -> None:
    """Flip 48 bytes in the middle of the largest tensor record of a torch zip file (in place)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:  # in place: every hard link of the file sees it
        f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        block = f.read(48)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in block))


def test_damaged_checkpoints_are_detected_and_resume_falls_back_to_the_previous_step(demo_manifest, tmp_path,
                                                                                       capsys, caplog):
    cache, out = demo_manifest.parent / ".volpre_cache", tmp_path / "run"
    manifest = _manifest(demo_manifest, tmp_path / "m.json")
    args = _args(manifest, out, cache, "--splits", "train", "train.keep_last=3")
    assert main(args + ["--max-steps", "3"]) == 0
    folder = out / "checkpoints"
    last, step3 = folder / "last.pt", folder / "step_00000003.pt"
    assert os.path.samefile(last, step3)

    # a bit flip in the middle of the file (one inode: last.pt and step_3 both)
    middle = last.stat().st_size // 2
    copy = tmp_path / "copy.pt"
    copy.write_bytes(last.read_bytes())
    with open(copy, "r+b") as f:
        f.seek(middle)
        block = f.read(48)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in block))
    with pytest.raises(CheckpointError, match=r"copy\.pt: (checksum mismatch|cannot be read)"):
        load_checkpoint(copy)
    _flip_inside_a_tensor(last)  # inside tensor data the file still unpickles: only the checksum notices
    state = torch.load(last, weights_only=True)
    assert state_checksum(state) != state["checksum"]
    with pytest.raises(CheckpointError, match=r"last\.pt: checksum mismatch: its contents are not what volpre "
                                              r"wrote .*; the newest readable checkpoint beside it is "
                                              r".*step_00000002\.pt \(step 2\)$"):
        load_checkpoint(last)
    capsys.readouterr()
    assert main(["export", str(last), "--task", "segmentation", "--out-channels", "2", "--out",
                 str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "step_00000002.pt (step 2)" in err and err.count("\n") == 1
    assert not (tmp_path / "bundle").exists()

    assert main(args + ["--resume", "--max-steps", "4"]) == 0
    assert re.search(r"--resume: checkpoint .*last\.pt: checksum mismatch: .*; resuming from .*step_00000002\.pt "
                     r"\(step 2\), the newest readable checkpoint, instead", caplog.text)
    assert _steps(out) == [1, 2, 3, 4]  # steps 3 and 4 trained again from step 2
    assert load_checkpoint(last)["step"] == 4

    # a 0-byte last.pt (its own inode: the step files are intact)
    last.unlink()
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot be read \(the file is empty\); .*; the newest "
                                              r"readable checkpoint beside it is .*step_00000004\.pt \(step 4\)$"):
        load_checkpoint(last)
    caplog.clear()
    assert main(args + ["--resume", "--max-steps", "5"]) == 0
    assert re.search(r"the file is empty.*; resuming from .*step_00000004\.pt \(step 4\)", caplog.text)
    assert _steps(out) == [1, 2, 3, 4, 5] and load_checkpoint(last)["step"] == 5


KILLED_DURING_FIRST_SAVE = """
import os, signal, sys
import torch
def dying_save(obj, f):
    f.write(b"PK half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
from volpre.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_during_its_first_save_starts_over_cleanly(demo_manifest, tmp_path, caplog):
    cache, out = demo_manifest.parent / ".volpre_cache", tmp_path / "run"
    manifest = _manifest(demo_manifest, tmp_path / "m.json", drop=("s000-ct0", "s001-ct1", "s001-mr0"))
    args = _args(manifest, out, cache, "--splits", "train", "train.log_every=1", "--max-steps", "2")
    proc = run_command([sys.executable, "-c", textwrap.dedent(KILLED_DURING_FIRST_SAVE), *args], timeout=600,
                       env=SUBPROCESS_ENV)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _steps(out) == [1]  # logged before the save that was killed
    left = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(left) == 1 and left[0].startswith(".step_00000001.pt.tmp"), left
    assert main(args) == 0  # no checkpoint: a fresh start, not a resume
    assert "a checkpoint left half-written by a process that died" in caplog.text
    assert "holds the log of a run that wrote no checkpoint; starting over" in caplog.text
    assert _steps(out) == [1, 2]  # step 1 once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best.pt", "last.pt", "step_00000001.pt", "step_00000002.pt"]


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above pid_max: no such process
    host = socket.gethostname()
    names = {
        "dead": f".step_00000005.pt.tmp{dead}@{host}",
        "dead_old_style": f".last.pt.tmp{dead}",
        "ours": f".step_00000006.pt.tmp{os.getpid()}@{host}",
        "foreign_fresh": f".best.pt.tmp{dead}@another-node",
        "foreign_old": f".step_00000007.pt.tmp{dead}@another-node",
        "not_a_temporary": "step_00000005.pt",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".bundle.tmp{dead}@{host}").mkdir()
    os.utime(tmp_path / names["foreign_old"], (0, 0))
    removed = {p.name for p in remove_stale_temporaries(tmp_path)}
    assert removed == {names["dead"], names["dead_old_style"], names["foreign_old"], f".bundle.tmp{dead}@{host}"}
    assert {p.name for p in tmp_path.iterdir()} == {names["ours"], names["foreign_fresh"], names["not_a_temporary"]}
