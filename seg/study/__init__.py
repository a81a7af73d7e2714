"""A sweep read back: its runs, the tables by layer and learning rate, the choice of each layer's rate on
validation, paired statistics, the papers' claims and the plots. Reads run folders; imports seg.config
only (seg-summarize needs no torch)."""
