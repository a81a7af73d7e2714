"""seg: train a 2D U-Net on cardiac MRI and compare normalization layers.

The package is grouped by stage, one subpackage a stage. The subpackages form layers, bottom to top:
a module imports only its own subpackage and subpackages of lower layers, and only at its top (never
inside a function). tests/test_structure.py reads the table below and checks every import against it,
so a new subpackage is placed here when it is added; each subpackage's ``__init__`` says what it holds.

    layer 0  config
    layer 1  runtime
    layer 2  data norms
    layer 3  model evaluation
    layer 4  training inference
    layer 5  study
    layer 6  tools

    config      the schema, the keys that define a run, Hydra's registrations, the tools' options
    runtime     device and precision, data-parallel processes, signals, temporaries, checkpoints, run folders
    data        files -> preprocessed slices: the readers of each dataset, the phantom, the cache, the splits
    norms       the normalization layers and the registry that turns a name into a module
    model       the U-Net and build_model(cfg)
    evaluation  Dice while training; label files scored against references
    training    the loop, the step, its tables (loss, optimizer, schedule), augmentation, stacked runs
    inference   prediction from checkpoints, orientations, ONNX export
    study       a sweep's tables, the choice on validation, paired statistics, claims, plots
    tools       the console commands (seg-predict, seg-evaluate, seg-export, seg-summarize,
                seg-prepare-data); training is ``python train.py``
"""

__version__ = "0.1.0"
