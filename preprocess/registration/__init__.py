"""CODEX -> H&E registration (stage 02), one job per module.

- :mod:`~preprocess.registration.params`: :class:`RegParams`, the parameters (units in the names).
- :mod:`~preprocess.registration.work_images`: whole-image working copies at a chosen pixel size.
- :mod:`~preprocess.registration.coarse`: palom's keypoint affine on the working images.
- :mod:`~preprocess.registration.blocks`: palom's block shifts and the robust affine refit.
- :mod:`~preprocess.registration.field`: the displacement field on top of the affine (non-rigid part).
- :mod:`~preprocess.registration.record_qc`: QC scores and figure, and the registration record.
- :mod:`~preprocess.registration.pair`: :func:`register_pair`, the steps in order for one pair.
- :mod:`~preprocess.registration.export`: the CODEX resampled into the H&E pixel grid (OME-TIFF).
- :mod:`~preprocess.registration.stage_files`: the stage's files per slide, its done-record and summary table.

The command line is :mod:`preprocess.register`.
"""
