"""Stage 07's parts (the stage itself is :mod:`mica.extract_features`).

* :mod:`mica.features.image_encoders` — image encoders (a ``hex.backbones`` name or a HEX run's backbone) and the
  embedding of a slide's tiles;
* :mod:`mica.features.he_bags` — H&E feature bags: their files, writer, reader, and one slide's extraction;
* :mod:`mica.features.codex_encoders` — encoders of virtual CODEX channels (stats descriptors, channel images);
* :mod:`mica.features.codex_features` — virtual CODEX maps in, per-slide CODEX feature parts and the table out;
* :mod:`mica.features.done_records` — what a slide's features were made with (done-records, checks before work).
"""
