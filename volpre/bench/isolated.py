"""Run a benchmark step in a fresh process and measure its peak memory.

Peak resident memory (RSS) is only meaningful per process, and a process's peak never goes
down: each measured pipeline therefore runs in its own freshly spawned interpreter, which reports
its own peak (the main process, which collates batches) and the largest peak of its DataLoader
workers (children it has waited for), from ``getrusage``.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
from typing import Any, Callable


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident memory of this process (``RUSAGE_SELF``) or of its largest finished child
    (``RUSAGE_CHILDREN``), in bytes."""
    peak = resource.getrusage(who).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _child(target: Callable[..., dict], args: tuple, start_method: str, connection) -> None:
    # a spawned interpreter defaults to spawning its own children; DataLoader workers should start
    # as they would in the caller (fork on Linux), or each would re-import torch first
    multiprocessing.set_start_method(start_method, force=True)
    try:
        result = target(*args)
        result["peak_rss_main_bytes"] = peak_rss_bytes(resource.RUSAGE_SELF)
        result["peak_rss_worker_bytes"] = peak_rss_bytes(resource.RUSAGE_CHILDREN)
        connection.send(("ok", result))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
        raise
    finally:
        connection.close()


BENCHMARK_TIMEOUT_S = 3600.0
"""A benchmark process that has not reported after this long is killed (it is hung)."""


def run_isolated(target: Callable[..., dict], *args: Any, timeout_s: float = BENCHMARK_TIMEOUT_S) -> dict:
    """``target(*args)`` in a new spawned process; its dict plus ``peak_rss_main_bytes`` and
    ``peak_rss_worker_bytes``. ``target`` must be importable (a module-level function).

    Raises:
        RuntimeError: if the process fails, dies without a result, or reports nothing within
            ``timeout_s`` seconds (it is then killed; its DataLoader workers exit with it).
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(target, args, multiprocessing.get_start_method(), send))
    process.start()
    send.close()
    name = getattr(target, "__name__", target)
    try:
        if not receive.poll(timeout_s):
            raise RuntimeError(f"benchmark step {name} reported nothing within {timeout_s:.0f} s and was killed")
        try:
            status, payload = receive.recv()
        except EOFError:
            status, payload = "error", "the benchmark process died without a result"
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark step {name} failed: {payload}")
    return payload
