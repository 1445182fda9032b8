"""Stage 06, whole-slide inference (``python -m hex.infer_wsi``) and the virtual CODEX maps
(``python -m hex.virtual_codex`` for predictions made earlier).

- :mod:`.stage`: the entry (flags, slides shared among ranks and job-array shards, done-records, the last line
  counting slides with their prediction and maps);
- :mod:`.tiles`: a slide's tiles read region by region by DataLoader workers (also stage 07's reader);
- :mod:`.predictions`: one slide's prediction file ``hex_pred/{slide}.h5``: its grid, predicting, writing, reading;
- :mod:`.maps`: tile predictions -> one slide's maps, their done-records, and ``python -m hex.virtual_codex``;
- :mod:`.map_formats`: the map files (pyramidal OME-TIFF, QuPath GeoJSON, preview PNG);
- :mod:`.dense_maps`: with ``--dense``, the cell-scale map (blended overlapping tiles, written band by band) and its
  reader.
"""
