"""Child processes in tests: always bounded by a timeout, always killed when it passes.

A test that starts a process must never outlive it: a child left running (or deadlocked) keeps
pytest from exiting and hangs CI. Commands run in their own session (process group), so a
timeout kills the whole tree (``torchrun`` and its workers, ``monai.bundle run`` and its
DataLoader workers), not just the direct child. Python-level children (``multiprocessing``)
use the ``spawn`` start method: forking after torch has started its thread pools can deadlock
the child inside its first parallel op.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

SPAWN = multiprocessing.get_context("spawn")
"""The only multiprocessing context tests may use (see the module docstring)."""

STOP_GRACE_S = 45.0
"""How long a command that must be stopped has after SIGTERM before its group gets SIGKILL. torchrun
starts its workers in sessions of their own (out of reach of a signal to torchrun's group) and, on
SIGTERM, stops them itself (SIGTERM, then SIGKILL 30 s later); a SIGKILL to torchrun would orphan
them, still holding the pipes this module reads."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the group, up to :data:`STOP_GRACE_S` for the command to exit, then SIGKILL to the group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)


def _remaining_output(proc: subprocess.Popen) -> tuple[str, str]:
    """What a stopped command left in its pipes; gives up after :data:`STOP_GRACE_S` if an orphan holds them."""
    try:
        return proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        return "", ""


def run_command(args: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``args`` to completion (text output captured unless ``kwargs`` redirect it).

    Raises ``AssertionError`` with the tail of the output if it runs past ``timeout`` seconds,
    after killing its whole process group. Any other exception (a pytest timeout included) also
    kills the group before propagating.
    """
    kwargs.setdefault("text", True)
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    proc = subprocess.Popen(list(args), start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        stdout, stderr = _remaining_output(proc)
        raise AssertionError(
            f"{' '.join(map(str, args))} ran past {timeout} s and was killed\n"
            f"stdout tail: {str(stdout or '')[-2000:]}\nstderr tail: {str(stderr or '')[-2000:]}"
        ) from None
    except BaseException:
        _stop_group(proc)
        _remaining_output(proc)
        raise
    _kill_group(proc)  # grandchildren that outlived their parent
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def started_command(args: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``Popen(args)`` in its own session for the ``with`` block; its group is killed on exit."""
    proc = subprocess.Popen(list(args), start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        _stop_group(proc)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def join_or_kill(processes: Sequence[multiprocessing.process.BaseProcess], timeout: float) -> list[int | None]:
    """Wait up to ``timeout`` seconds in all for ``processes``; kill any still alive; exit codes.

    A process that had to be killed reports a negative exit code (the signal), so a test that
    asserts exit code 0 fails instead of hanging.
    """
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in processes]


@contextlib.contextmanager
def spawned(processes: Sequence[multiprocessing.process.BaseProcess]) -> Iterator[None]:
    """Start ``processes`` for the ``with`` block and make sure none is alive after it."""
    for p in processes:
        p.start()
    try:
        yield
    finally:
        join_or_kill(processes, timeout=0)
