"""Stage 05, evaluating a trained HEX on labelled patches (``python -m hex.test``), and the one prediction loop.

- :mod:`.stage`: the entry (flags, which slides, the done-record, the training-split and normalisation checks);
- :mod:`.predict`: the prediction loop shared by evaluation, training's validation, whole-slide inference and
  feature extraction (autocast, channels-last, sharded prediction over ranks);
- :mod:`.metrics`: per-marker Pearson/Spearman/MSE and the marker and slide tables;
- :mod:`.reports`: the files ``hex.test`` writes (CSV tables, ``summary.json``, plots).
- :mod:`.dense`: dense models scored per cell (``dense_pearson.csv``, the upsampled stride-56 baseline).
"""
