"""The patch-store file format: writing the patches of ``he_patches/{slide}.h5`` and reading them back.

Raw stores hold ``imgs`` (N, H, W, 3) uint8 RGB, one patch per chunk, optionally with a lossless HDF5 filter
(gzip, lzf); JPEG stores hold ``imgs_jpeg`` (N,) variable-length uint8 (one RGB JPEG per patch) with the attribute
``imgs_shape``. ``imgs_encoding`` says which; :class:`PatchStoreReader` reads both. The stage that writes the
stores is :mod:`preprocess.patch_store`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

COMPRESSIONS = ("gzip", "lzf", "none", "jpeg")
"""Patch encodings: gzip / lzf (lossless HDF5 filters), none (raw), jpeg (lossy, one JPEG per patch)."""


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of a sorted index array."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, cuts)]


def encode_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """One RGB patch (h, w, 3) uint8 as JPEG bytes, (n,) uint8 (OpenCV, 4:2:0 chroma subsampling)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.ravel()


class PatchStoreReader:
    """Random access to the patches of one ``he_patches/{slide}.h5``, whatever its encoding.

    ``reader[i]`` is patch i as (H, W, 3) uint8 RGB; ``len(reader)`` the number of patches. Raw stores
    (``imgs``, compressed or not) are read as they are; JPEG stores (``imgs_jpeg``) are decoded.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        self._f = h5py.File(self.path, "r")
        if "imgs" in self._f:
            self._ds, self.encoding = self._f["imgs"], "raw"
            self.shape = tuple(self._ds.shape)
        elif "imgs_jpeg" in self._f:
            self._ds, self.encoding = self._f["imgs_jpeg"], "jpeg"
            self.shape = tuple(int(v) for v in self._f.attrs["imgs_shape"])
        else:
            self._f.close()
            raise PipelineError(f"patch store {self.path} has neither 'imgs' nor 'imgs_jpeg'; rerun "
                                "preprocess.patch_store for it")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self.encoding == "raw":
            return self._ds[i]
        import cv2

        return cv2.imdecode(self._ds[i], cv2.IMREAD_COLOR)[..., ::-1].copy()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PatchStoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def patch_writer(f, n: int, size: int, compression: str = "gzip", compression_level: int = 4,
                 jpeg_quality: int = 90) -> Callable[[np.ndarray, np.ndarray], None]:
    """Create the patch dataset of an open (writable) ``h5py.File`` ``f`` for ``n`` patches of (size, size, 3)
    uint8 with ``compression`` (one of :data:`COMPRESSIONS`); returns ``write(indices (k,), patches (k, s, s, 3))``
    (indices sorted, as in the grid)."""
    import h5py

    if compression == "jpeg":
        ds = f.create_dataset("imgs_jpeg", shape=(n,), dtype=h5py.vlen_dtype(np.uint8), chunks=(min(n, 64),))
        f.attrs.update({"imgs_encoding": "jpeg", "jpeg_quality": int(jpeg_quality),
                        "imgs_shape": np.array([n, size, size, 3], np.int64)})

        def write(idx: np.ndarray, patches: np.ndarray) -> None:
            for i, p in zip(idx, patches):
                ds[int(i)] = encode_jpeg(p, jpeg_quality)

        return write
    comp = None if compression == "none" else compression
    opts = {"compression_opts": int(compression_level)} if comp == "gzip" else {}
    ds = f.create_dataset("imgs", shape=(n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3),
                          compression=comp, **opts)
    f.attrs["imgs_encoding"] = "raw"

    def write(idx: np.ndarray, patches: np.ndarray) -> None:
        pos = 0
        for a, b in _runs(idx):
            ds[a:b] = patches[pos : pos + b - a]
            pos += b - a

    return write
