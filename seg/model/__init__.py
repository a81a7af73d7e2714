"""The network: the U-Net with one ConvNorm block reused at every level (``unet``) and ``build_model(cfg)``,
the one place a configuration becomes a network, for training, prediction and export (``build``).
Imports seg.config, seg.runtime, seg.data and seg.norms."""
