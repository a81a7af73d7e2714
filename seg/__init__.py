"""seg: train a 2D U-Net on cardiac MRI and compare normalization layers."""

__version__ = "0.1.0"
