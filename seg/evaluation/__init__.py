"""What a segmentation scores: the Dice of the trainer's validation and test (``dice``: counts on the device,
per slice and per volume) and the scores of label files against references (``files``, for seg-evaluate).
Imports seg.config, seg.runtime and seg.data."""
