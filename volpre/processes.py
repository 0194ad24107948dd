"""Commands volpre starts itself (the demo's ``monai.bundle run``, ``volpre bench gpu``'s cases):
output to a log file, a time limit, and on timeout the whole process group stopped (SIGTERM, then
SIGKILL: a command's DataLoader workers or torchrun's ranks included), never left running."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from volpre.errors import VolpreError


class CommandTimeout(VolpreError, RuntimeError):
    """The command ran past its time limit; it and its process group were killed."""


def run_logged(cmd: list[str], log: Path, timeout_s: float, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with stdout and stderr into ``log`` (the command line first); return its exit code.

    Raises :class:`CommandTimeout` after ``timeout_s`` seconds, once its process group is dead.
    """
    log = Path(log)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CommandTimeout(f"{cmd[0]} did not finish within {timeout_s:.0f} s and was killed; log: {log}") \
                from None
        except BaseException:  # KeyboardInterrupt and the like: leave nothing behind
            _kill_group(proc)
            raise


TERM_GRACE_S = 30.0
"""After SIGTERM, how long the command may take to stop what it started in sessions of its own (torchrun
stops its ranks on SIGTERM; a SIGKILL to the launcher's group alone would orphan them) before SIGKILL."""


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:  # the leader is gone; anything left in its group goes now
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
