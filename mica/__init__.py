"""MICA (stages 07-09): feature bags, the co-attention survival/response model, k-fold training, testing, IG.

* :mod:`mica.extract_features` — stage 07 (``python -m mica.extract_features``); its parts live in
  :mod:`mica.features` (H&E bags, image encoders, CODEX encoders and feature files, done-records).
* :mod:`mica.clinical` (training units, survival bins, split files), :mod:`mica.dataset` (bags of a fold),
  :mod:`mica.model`, :mod:`mica.survival` (loss and metrics), :mod:`mica.predict` (the prediction loop).
* :mod:`mica.train` — stage 08; :mod:`mica.checkpoint` and :mod:`mica.fold_inputs` (what a fold was trained on).
* :mod:`mica.test` — stage 09; :mod:`mica.attribution` (Integrated Gradients), :mod:`mica.plots`.
* :mod:`mica.baselines` — clinical baselines and the check of the survival head on real data.
"""
