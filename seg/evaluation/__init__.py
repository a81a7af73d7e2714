"""What a segmentation scores: the Dice of the trainer's validation and test (``dice``: counts on the device,
per slice and per volume); the figures cardiac MRI is reported in -- surface distances HD, HD95, ASSD in mm
(``surface``), volumes, EDV/ESV/SV/EF and LV mass (``cardiac``), agreement statistics and Bland-Altman plots
(``agreement``), one volume's figures (``scores``), the trainer's test figures per volume (``per_volume``);
and label files scored against references for seg-evaluate (``files``, ``cases``: phase and vendor from the
dataset's files, ``report``: its tables). Imports seg.config, seg.runtime and seg.data."""
