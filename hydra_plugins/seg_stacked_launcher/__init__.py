"""Hydra launcher ``stacked`` (``python train.py -m ... hydra/launcher=stacked``): a sweep's jobs that can share
one computation trained as stacks (seg/stacked, seg/training/stacked/runs.py); see stacked_launcher.py."""
