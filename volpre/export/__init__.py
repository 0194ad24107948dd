"""Export: pretrained encoders -> MONAI bundles (segmentation and survival), loaded strictly.

- :func:`export_bundle` (``volpre export``) writes a bundle from the templates in ``bundles/``.
- :mod:`~volpre.export.source` checks a checkpoint's encoder; :mod:`~volpre.export.keymap` maps
  its keys onto the bundle network; :mod:`~volpre.models.weights` reads and loads weight files
  strictly, listing every mismatch.
- Bundle components (named by the bundle configs, so they live in the installed package):
  :mod:`~volpre.export.networks` (``network_def`` factories), :mod:`~volpre.export.datalist`
  (records from a manifest), :mod:`~volpre.export.transforms`, :mod:`~volpre.export.finetune`
  (encoder learning rate, freezing).
- :mod:`~volpre.export.schema`: MONAI's metadata schema shipped with volpre, for offline verification
  (``python -m volpre.export.schema PATH``).

Imports: errors, files, config, data, models, survival, engine's checkpoint reader; never
evaluate, demo, bench or commands.
"""

from volpre.export.builder import export_bundle
from volpre.export.source import PretrainedEncoder, read_pretrained_encoder
from volpre.models.weights import WeightsError

__all__ = ["PretrainedEncoder", "WeightsError", "export_bundle", "read_pretrained_encoder"]
