"""Pretraining runs: the trainer (Ignite engine, AMP, EMA, DDP under torchrun, probes, stop on
SIGTERM), exact-resume checkpoints, the device prefetcher, logging to metrics.jsonl and TensorBoard.

- :mod:`~volpre.engine.trainer`: :func:`~volpre.engine.trainer.pretrain` and ``Pretraining``.
- :mod:`~volpre.engine.checkpoint`: checksummed checkpoints, retention, fallback on damage.
- :mod:`~volpre.engine.batches`: micro-batches copied (and CT-windowed) on the device ahead of use.
- :mod:`~volpre.engine.distributed`, :mod:`~volpre.engine.ema`, :mod:`~volpre.engine.logging`,
  :mod:`~volpre.engine.provenance` (what a run read, for exact resume).

Imports: errors, files, versions, config, data, models, objectives; never export, evaluate, demo,
bench or commands (the trainer's probe is passed in: ``volpre.evaluate.probe.TrainingProbe``).
"""
