"""seg: train a 2D U-Net on cardiac MRI and compare normalization layers.

The modules form layers, bottom to top. A module imports only modules of lower layers, and only at
its top (never inside a function); a package (data, norms, tools) counts as one module, whose own
modules import each other freely. tests/test_structure.py reads the table below and checks the
imports against it, so a new module is placed here when it is added.

    layer 0  schema identity stopping distributed stats metrics ordering augment orientation schedules
    layer 1  data norms checkpoint losses optimizers runtime launch reporting claims
    layer 2  unet runs step summary
    layer 3  model stacked
    layer 4  config inference
    layer 5  train evaluation export
    layer 6  tools

    layer 0   what needs nothing of the project: the config schema and its error (schema), the keys
              that do not define a run (identity), signals (stopping), what the processes of a
              data-parallel run do together (distributed), statistics, Dice, the epoch order, the
              augmentation, orientations, the learning-rate schedules
    layer 1   data: files -> slices; norms: the normalization layers; checkpoints and RunState;
              the loss and optimizer tables; device, precision and seeds (runtime); the process
              group and Hydra's resolvers (launch); metrics.json and TensorBoard (reporting)
    layer 2   the U-Net; run folders; the training step; sweep summaries
    layer 3   build_model: a configuration -> the network (training, prediction, export); K runs of
              one U-Net trained as one computation (stacked)
    layer 4   validate: every config key checked by its owner; prediction from checkpoints
    layer 5   the training loop; evaluation of predictions; ONNX export
    layer 6   the console commands (seg-predict, seg-evaluate, seg-export, seg-summarize,
              seg-prepare-data); training is ``python train.py``
"""

__version__ = "0.1.0"
