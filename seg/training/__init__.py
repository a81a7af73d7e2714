"""Training: the loop as named phases (``loop``), one step (``step``), what each key of a run is checked
against (``checks``), the loss, optimizer and schedule tables, augmentation and epoch order,
metrics.json and TensorBoard (``reporting``), and K runs trained as one computation (``stacked``).
Imports the packages below it, never seg.inference, seg.study or seg.tools."""
