"""Trained models used: segmenting volumes from checkpoints (``predict``: preprocessing, ensembles, test-time
mirroring, the input's grid), input and output files (``files``), NIfTI orientations (``orientation``)
and ONNX export (``export``). Imports the packages below it, never seg.training."""
