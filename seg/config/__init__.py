"""What a run is configured by, before anything runs: the typed schema Hydra checks every key against
(``schema``), which keys define a run and which only say how it runs (``identity``), the structured
configs and resolvers registered with Hydra (``launch``), and the ``key=value`` options of the console
commands (``options``). Imports nothing of seg."""
