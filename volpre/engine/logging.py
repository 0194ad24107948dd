"""Run logs on rank 0: ``metrics.jsonl`` (one line per step, plus a line for step 0 when a probe
runs there) and TensorBoard scalars and images.

Per-step values stay on the device until a flush (every ``log_every`` steps), so logging costs
one host sync per flush, not one per step. Events of the run (``--resume --new-data``) are lines
of their own in ``metrics.jsonl``, with an ``event`` key and the ``step`` they happened at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from volpre.files import atomic_write_text


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def mid_slices(volume: torch.Tensor) -> torch.Tensor:
    """Orthogonal mid-slices of one channel, side by side.

    ``volume``: ``(X, Y, Z)``. Returns ``(H, W)`` float in [0, 1] (min-max scaled), panels
    sagittal (Y x Z), coronal (X x Z) and axial (X x Y), each padded to a common height and
    transposed so superior/anterior point up.
    """
    v = volume.float()
    x, y, z = v.shape
    panels = [v[x // 2].T.flip(0), v[:, y // 2].T.flip(0), v[:, :, z // 2].T.flip(0)]
    height = max(p.shape[0] for p in panels)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, height - p.shape[0])) for p in panels]
    grid = torch.cat(padded, dim=1)
    lo, hi = grid.min(), grid.max()
    return (grid - lo) / (hi - lo).clamp_min(1e-6)


class RunLogger:
    """Buffers per-step scalars and writes them to ``metrics.jsonl`` and TensorBoard on flush."""

    def __init__(self, output: Path, purge_step: int | None = None):
        self.output = Path(output)
        self.metrics_path = self.output / "metrics.jsonl"
        if purge_step is not None:
            truncate_metrics(self.metrics_path, purge_step)
        self.writer = SummaryWriter(log_dir=str(self.output / "tensorboard"), purge_step=purge_step)
        self._steps: list[int] = []
        self._device_values: list[dict[str, torch.Tensor]] = []
        self._host_values: list[dict[str, float]] = []

    def add_step(self, step: int, device_values: dict[str, torch.Tensor], host_values: dict[str, float]) -> None:
        """Queue one step: scalar tensors (kept on device until flush) and plain numbers."""
        self._steps.append(step)
        self._device_values.append({k: v.detach() for k, v in device_values.items()})
        self._host_values.append(dict(host_values))

    def flush(self, extra_for_last_step: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """Write the queued steps (one host sync for all of them); return the written records.

        ``extra_for_last_step``: values measured over the whole window (throughput, data wait),
        recorded with its last step.
        """
        if not self._steps:
            return []
        if extra_for_last_step:
            self._host_values[-1].update(extra_for_last_step)
        keys = list(self._device_values[0])
        stacked = torch.stack([torch.stack([d[k].float() for k in keys]) for d in self._device_values]).cpu().tolist()
        records = []
        with open(self.metrics_path, "a") as f:
            for step, values, host in zip(self._steps, stacked, self._host_values):
                record = {"step": step, **dict(zip(keys, values)), **host}
                f.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step" and value is not None:
                        self.writer.add_scalar(key.replace(".", "/"), value, step)
                records.append(record)
        self.writer.flush()
        self._steps, self._device_values, self._host_values = [], [], []
        return records

    def add_event(self, record: dict[str, Any]) -> None:
        """Append one event line (``{"event": NAME, "step": N, ...}``) to ``metrics.jsonl`` at once."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    def write_record(self, step: int, values: dict[str, float]) -> None:
        """Write one record of plain numbers for ``step`` at once (e.g. the probe before step 1, which
        has no training values); queued steps are flushed first so lines stay in step order."""
        self.flush()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self.writer.add_scalar(key.replace(".", "/"), value, step)
        self.writer.flush()

    def add_images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Log orthogonal mid-slices of the first sample's first channel of each ``(B, C, X, Y, Z)``."""
        rows = [mid_slices(v[0, 0].detach().cpu()) for v in images.values()]
        width = max(r.shape[1] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows]
        grid = torch.cat(rows, dim=0)
        self.writer.add_image("slices/" + "|".join(images), grid, step, dataformats="HW")
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
