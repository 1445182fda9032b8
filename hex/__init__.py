"""HEX: an H&E patch -> the intensities of 40 CODEX markers (stages 04-06).

Entries (``python -m``, also under torchrun): ``hex.train`` (stage 04, :mod:`hex.train.stage`), ``hex.test``
(stage 05, :mod:`hex.evaluate.stage`), ``hex.infer_wsi`` (stage 06, :mod:`hex.infer.stage`) and
``hex.virtual_codex`` (the maps of predictions made earlier, :mod:`hex.infer.maps`).

- :mod:`hex.backbones`: the image-encoder factory (MUSK, DINOv2, tiny CNN, timm);
- :mod:`hex.model`: the HEX model (backbone + regression heads) and loading its checkpoints' tensors;
- :mod:`hex.losses`, :mod:`hex.fds`: the adaptive robust loss, feature/label distribution smoothing;
- :mod:`hex.data`: labelled patch datasets, split files, batch transforms;
- :mod:`hex.trained_model`: a trained HEX ready for use (metadata, the original release's checkpoint);
- :mod:`hex.train`, :mod:`hex.evaluate`, :mod:`hex.infer`: the three stages and what only they use.
"""
