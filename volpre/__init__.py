"""volpre: self-supervised pretraining of 3D medical-image encoders, exported as MONAI bundles."""

__version__ = "0.1.0"
