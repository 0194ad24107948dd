"""Feeding the training step: timed groups of micro-batches, copied to the device ahead of use."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device`` without blocking the host.

    With ``channels_last``, 5D float tensors use ``torch.channels_last_3d`` memory format.
    """
    if isinstance(batch, torch.Tensor):
        moved = batch.to(device, non_blocking=True)
        if channels_last and moved.dim() == 5 and moved.is_floating_point():
            moved = moved.contiguous(memory_format=torch.channels_last_3d)
        return moved
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record_stream(v, stream)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _record_stream(v, stream)


class DevicePrefetcher:
    """Iterates host batches and hands them out already on ``device``, their crops windowed.

    ``window`` (:class:`volpre.data.transforms.CropWindow`) turns ``batch["image"]``, the crops
    as they left the workers (float16 intensities), into the float32 model input on the device,
    given the host batch's ``modality`` ids; ``None`` leaves images as they come. On CUDA the copy and window
    of batch ``n + 1`` run on a side stream while step ``n`` computes (the DataLoader should pin
    memory). On the CPU they run when the batch is asked for.
    """

    def __init__(self, batches: Iterator[Any], device: torch.device, channels_last: bool = False,
                 window: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.batches, self.device, self.channels_last, self.window = batches, device, channels_last, window
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: Any = None
        if self.stream is not None:
            self._preload()

    def _on_device(self, host: Any) -> Any:
        batch = to_device(host, self.device)
        if self.window is not None:  # given the host's modality ids: no wait for the device
            batch = {**batch, "image": self.window(batch["image"], host["modality"])}
        return to_device(batch, self.device, self.channels_last)  # already there: the memory format only

    def _preload(self) -> None:
        host = next(self.batches)
        with torch.cuda.stream(self.stream):
            self._next = self._on_device(host)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self.stream is None:
            return self._on_device(next(self.batches))
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        batch = self._next
        _record_stream(batch, torch.cuda.current_stream(self.device))
        self._preload()
        return batch


class StepBatches:
    """Yields, per optimiser step, the list of ``grad_accum`` micro-batches (on the device), and
    remembers how long the last step waited for them (``last_wait_s``)."""

    def __init__(self, batches: Iterator[Any], grad_accum: int):
        self.batches, self.grad_accum = batches, grad_accum
        self.last_wait_s = 0.0

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> list[Any]:
        start = time.perf_counter()
        group = [next(self.batches) for _ in range(self.grad_accum)]
        self.last_wait_s = time.perf_counter() - start
        return group
