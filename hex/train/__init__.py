"""Stage 04, training HEX (``python -m hex.train``, under torchrun too).

- :mod:`.stage`: the entry (flags, the run, the epoch loop with validation and checkpoints; the commands are in
  its docstring);
- :mod:`.config`: :class:`~hex.train.config.TrainConfig`, the flags filled from the backbone's recipe and checked;
- :mod:`.start`: starting a run, fresh or resumed (run folder, split, datasets, model and optimiser state);
- :mod:`.epoch`: one training epoch (model + loss step, optimiser, lr schedule, DDP wrapper, selection score);
- :mod:`.checkpoints`: the epoch checkpoints (which to resume, whether it belongs to this run) and the best model.
"""
