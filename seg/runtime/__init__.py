"""Where and how a process runs, whatever it runs: the device, precision and seeds (``device``), the
processes of a data-parallel run (``distributed``), signals and exit codes (``stopping``), files written
under a temporary name (``temporaries``), checkpoints and the state a run resumes from (``checkpoint``)
and run folders (``runs``). Imports seg.config only."""
