"""volpre.engine.batches: the device prefetcher windows the crops of each batch it hands out."""

from __future__ import annotations

import torch

from volpre.config import PreprocessConfig
from volpre.data.transforms import CROP_DTYPE, CropWindow
from volpre.engine.batches import DevicePrefetcher, StepBatches


def _batch(values, modality):
    image = torch.tensor(values).to(CROP_DTYPE).reshape(len(values), 1, 1, 1, 1).expand(-1, 1, 2, 2, 2).contiguous()
    return {"image": image, "modality": torch.tensor(modality), "subject": torch.arange(len(values))}


def test_batches_arrive_windowed_in_float32_in_channels_last_and_the_rest_unchanged():
    window = CropWindow(PreprocessConfig(ct_window=(-1000.0, 1000.0)), ["CT", "MR"])
    host = [_batch([-1000.0, 0.0, 1.5], [0, 0, 1]), _batch([500.0, 3000.0], [0, 0])]
    batches = DevicePrefetcher(iter(host), torch.device("cpu"), channels_last=True, window=window)
    first, second = next(batches), next(batches)
    assert first["image"].dtype == torch.float32
    assert first["image"][:, 0, 0, 0, 0].tolist() == [0.0, 0.5, 1.5]  # CT windowed, MR as it came
    assert second["image"][:, 0, 0, 0, 0].tolist() == [0.75, 1.0]
    assert first["image"].is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(first["subject"], torch.arange(3)) and torch.equal(first["modality"], torch.tensor([0, 0, 1]))
    assert host[0]["image"].dtype == CROP_DTYPE  # the host batch is not changed


def test_without_a_window_images_pass_as_they_come():
    host = [_batch([-1000.0], [0])] * 2
    step = next(iter(StepBatches(DevicePrefetcher(iter(host), torch.device("cpu")), grad_accum=2)))
    assert len(step) == 2 and all(b["image"].dtype == CROP_DTYPE for b in step)
