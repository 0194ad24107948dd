"""The guards that keep child processes from hanging the suite: timeouts kill whole process groups."""

from __future__ import annotations

import os
import sys
import time

import pytest

from child_processes import SPAWN, join_or_kill, run_command, spawned


def _sleep_forever() -> None:
    time.sleep(3600)


def test_join_or_kill_kills_a_process_that_outlives_its_timeout():
    sleeper = SPAWN.Process(target=_sleep_forever)
    with spawned([sleeper]):
        start = time.monotonic()
        codes = join_or_kill([sleeper], timeout=1)
    assert codes[0] is not None and codes[0] < 0  # killed by a signal, not exited
    assert not sleeper.is_alive() and time.monotonic() - start < 30


def test_a_command_past_its_timeout_is_killed_with_its_grandchildren(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the child starts a grandchild that would outlive it, then waits for it
    script = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()")
    with pytest.raises(AssertionError, match="ran past 3 s and was killed"):
        run_command([sys.executable, "-c", script], timeout=3)
    _assert_gone(int(pid_file.read_text()), "the grandchild survived the timeout")


def test_a_command_past_its_timeout_may_stop_children_of_its_own_sessions_first(tmp_path):
    """As torchrun does: workers in sessions of their own, stopped by the launcher on SIGTERM. A SIGKILL
    to the launcher's group alone would orphan them, and reading their pipes would hang."""
    pid_file = tmp_path / "worker.pid"
    script = (f"import signal, subprocess, sys; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); "
              f"signal.signal(signal.SIGTERM, lambda *_: (p.kill(), sys.exit(1))); p.wait()")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 3 s and was killed"):
        run_command([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - start < 40
    _assert_gone(int(pid_file.read_text()), "the worker in its own session survived the timeout")


def _assert_gone(pid: int, message: str) -> None:
    """Fail with ``message`` (killing ``pid``) unless it ends within 5 s."""
    for _ in range(50):
        if not _running(pid):
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(message)


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie waiting to be reaped by init counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_finished_command_returns_its_output_and_exit_code():
    done = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_volpre_run_logged_kills_a_command_and_its_group_past_the_timeout(tmp_path, monkeypatch):
    from volpre import processes

    monkeypatch.setattr(processes, "TERM_GRACE_S", 5.0)
    pid_file, log = tmp_path / "grandchild.pid", tmp_path / "log.txt"
    script = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); p.wait()")
    with pytest.raises(processes.CommandTimeout, match=r"did not finish within 3 s and was killed; log: .*log.txt"):
        processes.run_logged([sys.executable, "-c", script], log, timeout_s=3)
    assert "started" in log.read_text() and log.read_text().startswith(sys.executable)
    _assert_gone(int(pid_file.read_text()), "the grandchild survived the timeout")
    assert processes.run_logged([sys.executable, "-c", "import sys; sys.exit(3)"], log, timeout_s=60) == 3
