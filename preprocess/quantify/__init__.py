"""Stage 03, marker quantification: the mean of every CODEX marker under every H&E patch, then normalised labels.

The command line and its rules are :mod:`.stage` (``python -m preprocess.quantify``); the modules by job:
:mod:`.geometry` (the registration's map, patch lookup, coverage), :mod:`.readers` (CODEX region reads),
:mod:`.accumulate` (sums per patch, no-data test), :mod:`.raw` (pass-1 files and their freshness),
:mod:`.normalize` (pass 2, also ``python -m preprocess.normalize``), :mod:`.tables` (pairs and panel).
"""
