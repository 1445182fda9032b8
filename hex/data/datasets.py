"""HEX training data: H&E patches joined with their CODEX marker labels.

Layouts read (all paths relative to the data root, usually the pipeline's ``OUT``):

* patch store ``he_patches/{slide}.h5``: ``imgs`` (N,H,W,3) uint8, ``coords`` (N,2) int64 level-0 top-left x,y;
* legacy patches ``he_patches/{slide}/{slide}_{index}.png`` (original HEX code);
* labels ``markers/{slide}.csv``: ``slide,index,x,y,<markers...>`` in [0,1], ``index`` = row in the patch store
  (legacy CSVs name the markers ``mean_intensity_channel{1..40}``; ``channel_registered/`` is read when
  ``markers/`` is absent), and ``markers/normalization.json`` (per-marker percentiles, carried into checkpoints).

A label row whose ``x,y`` differ from the patch store's ``coords[index]`` is an error: the label belongs to another
patch (a stale or mismatched patch store).

Dense labels (``dense_dir``, usually ``DATA/markers_dense``): ``{slide}.h5`` of stage 03 with ``--dense-grid G``
(:func:`preprocess.quantify.dense.read_dense_labels`), matched to the label rows by the ``index`` column; kept in
memory as float16 (M x G x G x 2 bytes per patch: 20 KB for 40 markers at G = 16).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline import artifacts as art
from pipeline.errors import PipelineError
from preprocess.patch_store_format import PatchStoreReader

log = logging.getLogger(__name__)

META_COLUMNS = ("slide", "index", "x", "y")
LEGACY_PREFIX = "mean_intensity_channel"
_LEGACY_RE = re.compile(rf"^{LEGACY_PREFIX}(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# marker tables


def marker_columns(columns: Sequence[str]) -> list[str]:
    """Marker columns of a label CSV: all but ``slide,index,x,y``; legacy ``mean_intensity_channel{i}`` by ``i``."""
    cols = [c for c in columns if c not in META_COLUMNS]
    if cols and all(_LEGACY_RE.match(c) for c in cols):
        cols = sorted(cols, key=lambda c: int(_LEGACY_RE.match(c).group(1)))  # type: ignore[union-attr]
    return cols


def resolve_markers_dir(data_root: str | os.PathLike, markers_dir: str | os.PathLike | None = None) -> Path:
    """``markers_dir`` if given, else ``DATA/markers``, else the legacy ``DATA/channel_registered``."""
    if markers_dir is not None:
        return Path(markers_dir)
    root = Path(data_root)
    labels = art.LABELS.dir(root)
    if not labels.is_dir() and (root / "channel_registered").is_dir():
        return root / "channel_registered"
    return labels


def list_labelled_slides(markers_dir: str | os.PathLike) -> list[str]:
    """Slide ids with a label CSV in ``markers_dir`` (sorted)."""
    d = Path(markers_dir)
    if not d.is_dir():
        raise PipelineError(f"marker folder {d} does not exist")
    return sorted(p.name.split(".", 1)[0] for p in d.glob("*.csv") if not p.name.startswith("."))


def load_normalization(markers_dir: str | os.PathLike) -> dict | None:
    """Contents of ``markers/normalization.json`` (None when absent)."""
    p = Path(markers_dir) / art.NORMALIZATION.name
    return json.loads(p.read_text()) if p.is_file() else None


def read_marker_csv(path: str | os.PathLike, markers: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Read one label CSV; returns the frame and its marker names (reordered to ``markers`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"marker table {path} does not exist (run the quantification stage for this slide)")
    df = pd.read_csv(path, dtype={"slide": str})
    if "index" not in df.columns:
        raise PipelineError(f"marker table {path} has no 'index' column (expected slide,index,x,y,<markers>)")
    names = marker_columns(df.columns)
    if markers is not None:
        missing = [m for m in markers if m not in df.columns]
        if missing:
            raise PipelineError(f"marker table {path} lacks markers {missing[:10]} (expected {len(markers)} markers)")
        names = list(markers)
    if not names:
        raise PipelineError(f"marker table {path} has no marker columns")
    return df, names


# ----------------------------------------------------------------------------------------------------------------
# patch sources (opened lazily, once per process)


class _H5Source:
    """Patches of one store (``imgs``, any HDF5 compression, or JPEG-encoded ``imgs_jpeg``) through
    :class:`preprocess.patch_store_format.PatchStoreReader`; the file is opened on first use in each process."""

    kind = "h5"

    def __init__(self, path: Path):
        self.path = path
        self._reader: PatchStoreReader | None = None
        self._pid = -1

    def _open(self) -> PatchStoreReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = PatchStoreReader(self.path)
            self._pid = os.getpid()
        return self._reader

    def read(self, index: int) -> np.ndarray:
        """(H,W,3) uint8 of patch ``index``."""
        return self._open()[index]

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_reader": None, "_pid": -1}


class _PngSource:
    """Legacy ``he_patches/{slide}/{slide}_{index}.png`` files."""

    kind = "png"

    def __init__(self, folder: Path, slide: str):
        self.folder = folder
        self.slide = slide

    def file(self, index: int) -> Path:
        return self.folder / f"{self.slide}_{index}.png"

    def read(self, index: int) -> np.ndarray:
        with Image.open(self.file(index)) as im:
            return np.array(im.convert("RGB"))

    def close(self) -> None:
        pass


class PatchDataset(Dataset):
    """Labelled patches of many slides.

    Item ``i`` is ``(img, labels, i)``: img (3,H,W) uint8 as stored (no transform), labels (M,) float32 in [0,1];
    with dense labels ``(img, labels, i, dense)``, dense (M,G,G) float32 in [0,1], NaN = no data.
    ``slides``, ``slide_idx`` (N,), ``rows`` (N,) (patch index in its slide), ``coords`` (N,2) level-0 x,y and
    ``markers`` (M names) describe the samples in order; ``dense`` (N,M,G,G) float16 or None, ``dense_grid`` G (0
    without).
    """

    def __init__(self, slides: list[str], sources: list[Any], slide_idx: np.ndarray, rows: np.ndarray,
                 labels: np.ndarray, coords: np.ndarray, markers: list[str], normalization: dict | None = None,
                 dense: np.ndarray | None = None):
        self.slides = slides
        self.sources = sources
        self.slide_idx = slide_idx.astype(np.int64)
        self.rows = rows.astype(np.int64)
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        self.coords = coords.astype(np.int64)
        self.markers = markers
        self.normalization = normalization
        self.dense = dense

    @property
    def dense_grid(self) -> int:
        """G of the dense labels (0: none)."""
        return 0 if self.dense is None else int(self.dense.shape[-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple:
        arr = self.sources[self.slide_idx[i]].read(int(self.rows[i]))
        img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3,H,W) uint8
        if self.dense is None:
            return img, torch.from_numpy(self.labels[i]), i
        return img, torch.from_numpy(self.labels[i]), i, torch.from_numpy(self.dense[i].astype(np.float32))

    @property
    def slide_of_sample(self) -> np.ndarray:
        """(N,) slide id of every sample."""
        return np.asarray(self.slides, dtype=object)[self.slide_idx]

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _patch_source(patches_dir: Path, slide: str) -> Any:
    h5 = patches_dir / f"{slide}.h5"
    if h5.is_file():
        return _H5Source(h5)
    folder = patches_dir / slide
    if folder.is_dir():
        return _PngSource(folder, slide)
    raise PipelineError(f"no patches for slide {slide!r}: neither {h5} nor the PNG folder {folder} exists "
                        "(run the patch-store stage)")


def build_dataset(
    data_root: str | os.PathLike,
    slides: Sequence[str],
    markers: Sequence[str] | None = None,
    markers_dir: str | os.PathLike | None = None,
    patches_dir: str | os.PathLike | None = None,
    dense_dir: str | os.PathLike | None = None,
    dense_grid: int | None = None,
) -> PatchDataset:
    """Join the label CSVs of ``slides`` with their patches (h5 store, else legacy PNG folder).

    ``markers`` fixes the marker order (e.g. from a checkpoint); otherwise the first CSV's order is used and every
    other CSV must have the same markers. Rows with missing labels are dropped (warning); a label ``index`` outside
    the patch store, a missing PNG, or a marker set that differs between slides is an error naming the file.

    ``dense_dir``: also the dense labels ``{dense_dir}/{slide}.h5`` of every label row (items get a 4th element);
    a missing file, a file without some labelled rows or lacking markers, or another grid than ``dense_grid`` (or
    than the first slide's) is a PipelineError naming the file and "run stage 03 with --dense-grid G".
    """
    if not slides:
        raise PipelineError("no slides to load (empty split?)")
    root = Path(data_root)
    mdir = resolve_markers_dir(root, markers_dir)
    pdir = Path(patches_dir) if patches_dir is not None else art.PATCH_STORE.dir(root)
    names: list[str] | None = list(markers) if markers is not None else None
    sources, s_idx, rows, labels, coords, dense = [], [], [], [], [], []
    for k, slide in enumerate(slides):
        csv = mdir / f"{slide}.csv"
        df, cols = read_marker_csv(csv, names)
        if names is None:
            names = cols
        elif set(marker_columns(df.columns)) != set(names) and markers is None:
            raise PipelineError(f"marker table {csv} has markers {marker_columns(df.columns)[:5]}... which differ "
                                f"from the first slide's {names[:5]}...")
        y = df[names].to_numpy(dtype=np.float32)
        ok = np.isfinite(y).all(axis=1)
        if not ok.all():
            log.warning("%s: dropping %d rows with missing labels", csv, int((~ok).sum()))
            df, y = df[ok], y[ok]
        idx = df["index"].to_numpy(dtype=np.int64)
        src = _patch_source(pdir, slide)
        xy = (df[["x", "y"]].to_numpy(dtype=np.int64) if {"x", "y"} <= set(df.columns)
              else np.zeros((len(df), 2), np.int64))
        if src.kind == "h5":
            with PatchStoreReader(src.path) as reader, h5py.File(src.path, "r") as f:
                n = len(reader)
                if len(idx) and (idx.min() < 0 or idx.max() >= n):
                    raise PipelineError(f"{csv}: index {int(idx.max())} out of range for {src.path} ({n} patches)")
                if "coords" in f and {"x", "y"} <= set(df.columns) and len(idx):
                    _check_coords(csv, xy, f["coords"][:][idx], idx, src.path)
        else:
            missing = [i for i in idx if not src.file(int(i)).is_file()]
            if missing:
                raise PipelineError(f"{len(missing)} PNG patches listed in {csv} are missing, e.g. "
                                    f"{src.file(int(missing[0]))}")
        if dense_dir is not None:
            d = _dense_rows(Path(dense_dir) / f"{slide}.h5", idx, xy, names, dense_grid)
            dense_grid = int(d.shape[-1])
            dense.append(d)
        sources.append(src)
        s_idx.append(np.full(len(idx), k, np.int64))
        rows.append(idx)
        labels.append(y)
        coords.append(xy)
    assert names is not None
    y_all = np.concatenate(labels)
    if y_all.size and (y_all.min() < -1e-6 or y_all.max() > 1 + 1e-6):
        log.warning("labels outside [0,1] (min %.3g, max %.3g): expected normalised marker values",
                    float(y_all.min()), float(y_all.max()))
    ds = PatchDataset(list(slides), sources, np.concatenate(s_idx), np.concatenate(rows), y_all,
                      np.concatenate(coords), names, load_normalization(mdir),
                      np.concatenate(dense) if dense_dir is not None else None)
    if len(ds) == 0:
        raise PipelineError(f"slides {list(slides)[:5]}... have no labelled patches in {mdir}")
    return ds


def _dense_rows(path: Path, idx: np.ndarray, xy: np.ndarray, markers: Sequence[str], grid: int | None) -> np.ndarray:
    """Dense labels (len(idx), M, G, G) float16 of the patch rows ``idx`` (level-0 top-left ``xy`` (N,2)) from
    ``path``, markers in the order of ``markers``; PipelineError naming the file when it is missing, lacks rows or
    markers, has other coordinates for them or another grid."""
    from preprocess.quantify.dense import read_dense_labels

    fix = f"run stage 03 with --dense-grid {grid or 'G'} (DENSE=1 bash scripts/03_quantify.sh)"
    try:
        d = read_dense_labels(path)
    except PipelineError as e:
        raise PipelineError(f"{e} ({fix})") from None
    if grid is not None and d.grid != grid:
        raise PipelineError(f"dense labels {path} have a {d.grid}x{d.grid} grid, not {grid}x{grid}; {fix}")
    missing = [m for m in markers if m not in d.markers]
    if missing:
        raise PipelineError(f"dense labels {path} lack markers {missing[:5]}; {fix} for this marker panel")
    pos = {int(v): i for i, v in enumerate(d.index)}
    absent = [int(i) for i in idx if int(i) not in pos]
    if absent:
        raise PipelineError(f"dense labels {path} lack {len(absent)} labelled patches (e.g. index {absent[0]}): "
                            f"stale file; {fix}")
    sel = np.fromiter((pos[int(i)] for i in idx), np.int64, len(idx))
    bad = np.flatnonzero((d.coords[sel] != xy).any(axis=1)) if xy.any() else []
    if len(bad):
        raise PipelineError(f"dense labels {path}: {len(bad)} patches have other coordinates than the label table "
                            f"(index {int(idx[bad[0]])}: {d.coords[sel][bad[0]].tolist()} vs {xy[bad[0]].tolist()}); "
                            f"stale file; {fix}")
    order = [d.markers.index(m) for m in markers]
    return d.values[sel][:, order].astype(np.float16)


def _check_coords(csv: Path, xy: np.ndarray, store_xy: np.ndarray, idx: np.ndarray, store: Path) -> None:
    """Label x,y (N,2) must equal the patch store's ``coords[index]`` (N,2), else PipelineError naming both files."""
    bad = np.flatnonzero((store_xy != xy).any(axis=1))
    if len(bad):
        i = int(bad[0])
        raise PipelineError(
            f"{csv}: {len(bad)} of {len(idx)} rows have x,y different from {store} coords[index] (first: index "
            f"{int(idx[i])} x,y {xy[i].tolist()} vs {store_xy[i].tolist()}); the labels and the patch store come "
            "from different patch grids: rerun stage 03 for this slide")


def normalization_differences(a: dict | None, b: dict | None, markers: Sequence[str] | None = None) -> list[str]:
    """What differs between two label normalisations (``markers/normalization.json`` contents): ``[]`` when they
    agree or either is unknown (None). With the ``markers``/``percentiles``/``values`` layout, the percentiles and
    the per-marker values of ``markers`` (default: all) are compared to a relative 1e-6; other layouts must be
    equal."""
    if a is None or b is None:
        return []
    if not all(k in d for d in (a, b) for k in ("markers", "values")):
        return [] if a == b else ["normalization files differ"]
    diffs = []
    if not np.allclose(a.get("percentiles", []), b.get("percentiles", []), rtol=1e-6):
        diffs.append(f"percentiles {a.get('percentiles')} vs {b.get('percentiles')}")
    va = {m: (lo, hi) for m, lo, hi in zip(a["markers"], *a["values"])}
    vb = {m: (lo, hi) for m, lo, hi in zip(b["markers"], *b["values"])}
    for m in markers if markers is not None else a["markers"]:
        if m in va and m in vb and not np.allclose(va[m], vb[m], rtol=1e-6, atol=0):
            diffs.append(f"{m}: {list(va[m])} vs {list(vb[m])}")
    return diffs
