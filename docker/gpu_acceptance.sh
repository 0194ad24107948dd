#!/usr/bin/env bash
# GPU acceptance run: on one GPU, every shipped full-size config for 30 bf16 steps, resnet-dae in fp16,
# swin-dae compiled / with gradient checkpointing / against the MONAI Swin-SSL recipe, and volpre pretrain
# under torchrun; one JSON of samples/s, peak memory, losses, FLOPs and model FLOP utilisation.
# Exits non-zero if any case failed (each failure's traceback is in the JSON and OUT/cases/*.log).
#
# Usage, in a checkout with volpre installed: docker/gpu_acceptance.sh [OUT] [volpre bench gpu options...]
# In the image (whose entrypoint is volpre): docker run --rm --gpus all volpre:0.1.0 bench gpu --out /tmp/acc
set -euo pipefail
out="${1:-gpu_acceptance}"
shift || true
python_bin="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$python_bin" -m volpre bench gpu --out "$out" "$@"
