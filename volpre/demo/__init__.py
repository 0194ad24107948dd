"""The demo: deterministic synthetic data and the whole path run on it (``volpre demo``).

- :mod:`~volpre.demo.synthetic`: CT torso and MR head phantoms with labels and survival outcomes,
  written in every format volpre reads (``volpre demo-data``); the tests and benchmarks use it too.
- :mod:`~volpre.demo.dicom_writer`: DICOM series and Enhanced multi-frame DICOM writers for them.
- :mod:`~volpre.demo.run`: ``volpre demo`` (index, check, pretrain, probe, export, fine-tune, report).

Not the data layer: nothing in ``volpre.data`` imports this package; it may import every other
volpre package. This ``__init__`` imports nothing, so that reading the phantoms does not load the
demo's pipeline.
"""
