"""Hydra launcher ``stacked`` (``python train.py -m ... hydra/launcher=stacked``): a sweep's jobs that can share
one computation trained as stacks (seg/stacked, seg/train_stacked.py); see stacked_launcher.py."""
