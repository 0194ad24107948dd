"""Benchmarks (``volpre bench``): figures of speed and memory, never asserted in tests.

- :mod:`~volpre.bench.data`: crop throughput of MONAI's pipelines and volpre's (``bench data``);
  :mod:`~volpre.bench.volumes` writes CT volumes of realistic size for it (``bench ct-volumes``);
  :mod:`~volpre.bench.isolated` runs each pipeline in a fresh process.
- :mod:`~volpre.bench.step`: one pretraining step phase by phase, against a plain PyTorch
  reference (:mod:`~volpre.bench.reference`) (``bench step``).
- :mod:`~volpre.bench.gpu`: the GPU acceptance run of every full-size config (``bench gpu``).
- :mod:`~volpre.bench.errors`: :class:`~volpre.bench.errors.BenchError`.

Imports: every library layer below it (errors, files, config, data, objectives, engine, demo);
nothing in the library imports this package (only :mod:`volpre.commands`).
"""
