"""HEX training data: H&E patches joined with their CODEX marker labels, split files, and batch transforms.

Layouts read (all paths relative to the data root, usually the pipeline's ``OUT``):

* patch store ``he_patches/{slide}.h5``: ``imgs`` (N,H,W,3) uint8, ``coords`` (N,2) int64 level-0 top-left x,y;
* legacy patches ``he_patches/{slide}/{slide}_{index}.png`` (original HEX code);
* labels ``markers/{slide}.csv``: ``slide,index,x,y,<markers...>`` in [0,1], ``index`` = row in the patch store
  (legacy CSVs name the markers ``mean_intensity_channel{1..40}``; ``channel_registered/`` is read when
  ``markers/`` is absent), and ``markers/normalization.json`` (per-marker percentiles, carried into checkpoints);
* split ``splits_{k}.csv`` (columns ``train``, ``val`` of slide ids, empty cells allowed) + ``clinical.csv``
  (``case_id,slide_id``): a patient in both columns is an error.

Images stay uint8 through the DataLoader (4x less copying and pinning than float). :class:`BatchTransform` then
runs on the training device, batched: flips + rot90 (on uint8), float conversion, colour jitter at the smaller of
source/target resolution, resize to the backbone input size, normalisation with the backbone mean/std.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from preprocess.utils import PipelineError, write_json

log = logging.getLogger(__name__)

META_COLUMNS = ("slide", "index", "x", "y")
LEGACY_PREFIX = "mean_intensity_channel"
_LEGACY_RE = re.compile(rf"^{LEGACY_PREFIX}(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# splits and clinical table


def _clean_id(v: Any) -> str:
    s = str(v).strip()
    return s[:-2] if re.fullmatch(r"\d+\.0", s) else s  # "4.0" written by pandas for numeric ids -> "4"


def read_split(path: str | os.PathLike, column: str) -> list[str]:
    """Slide ids in ``column`` of a split CSV (empty cells skipped); a missing file/column or no ids is an error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"split file {path} does not exist")
    df = pd.read_csv(path, dtype=str)
    if column not in df.columns:
        raise PipelineError(f"split file {path} has no column {column!r} (columns: {list(df.columns)})")
    ids = [_clean_id(v) for v in df[column].dropna() if str(v).strip()]
    if not ids:
        raise PipelineError(f"split file {path}: column {column!r} lists no slides")
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise PipelineError(f"split file {path}: column {column!r} lists slides more than once: {dup[:10]}")
    return ids


def read_clinical(path: str | os.PathLike) -> dict[str, str]:
    """Map slide id -> case (patient) id from a clinical CSV with ``case_id,slide_id`` columns."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"clinical table {path} does not exist")
    df = pd.read_csv(path, dtype=str)
    for col in ("case_id", "slide_id"):
        if col not in df.columns:
            raise PipelineError(f"clinical table {path} has no column {col!r} (columns: {list(df.columns)})")
    return {_clean_id(s): _clean_id(c) for s, c in zip(df["slide_id"], df["case_id"]) if pd.notna(s)}


def load_split(
    path: str | os.PathLike, clinical: str | os.PathLike | None = None, columns: Sequence[str] = ("train", "val")
) -> dict[str, list[str]]:
    """Read the given split columns and check that no slide and (with ``clinical``) no patient is in two of them.

    Returns ``{column: [slide ids]}``. Slides missing from the clinical table are their own patient (warning).
    """
    split = {c: read_split(path, c) for c in columns}
    case_of = read_clinical(clinical) if clinical is not None else {}
    if clinical is not None:
        unknown = sorted({s for ids in split.values() for s in ids if s not in case_of})
        if unknown:
            log.warning("split %s: %d slides not in clinical table %s (treated as their own patient): %s",
                        path, len(unknown), clinical, unknown[:5])
    cols = list(columns)
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            both = sorted(set(split[a]) & set(split[b]))
            if both:
                raise PipelineError(f"split file {path}: slides in both {a!r} and {b!r}: {both[:10]}")
            pa = {case_of.get(s, s) for s in split[a]}
            pb = {case_of.get(s, s) for s in split[b]}
            overlap = sorted(pa & pb)
            if overlap:
                raise PipelineError(
                    f"split file {path}: patients in both {a!r} and {b!r} (via {clinical}): {overlap[:10]}; "
                    "a patient's slides must all be on one side")
    return split


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
    if not (root / "markers").is_dir() and (root / "channel_registered").is_dir():
        return root / "channel_registered"
    return root / "markers"


def list_labelled_slides(markers_dir: str | os.PathLike) -> list[str]:
    """Slide ids with a label CSV in ``markers_dir`` (sorted)."""
    d = Path(markers_dir)
    if not d.is_dir():
        raise PipelineError(f"marker folder {d} does not exist")
    return sorted(p.name.split(".", 1)[0] for p in d.glob("*.csv") if not p.name.startswith("."))


def load_normalization(markers_dir: str | os.PathLike) -> dict | None:
    """Contents of ``markers/normalization.json`` (None when absent)."""
    p = Path(markers_dir) / "normalization.json"
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
    """Rows of ``imgs`` in one patch store; the file handle is opened on first use in each process."""

    kind = "h5"

    def __init__(self, path: Path):
        self.path = path
        self._f: h5py.File | None = None
        self._pid = -1

    def _imgs(self) -> h5py.Dataset:
        if self._f is None or self._pid != os.getpid():
            self._f = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._f["imgs"]

    def read(self, index: int) -> np.ndarray:
        """(H,W,3) uint8 of patch ``index``."""
        return self._imgs()[index]

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_f": None, "_pid": -1}


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

    Item ``i`` is ``(img, labels, i)``: img (3,H,W) uint8 as stored (no transform), labels (M,) float32 in [0,1].
    ``slides``, ``slide_idx`` (N,), ``rows`` (N,) (patch index in its slide), ``coords`` (N,2) level-0 x,y and
    ``markers`` (M names) describe the samples in order.
    """

    def __init__(self, slides: list[str], sources: list[Any], slide_idx: np.ndarray, rows: np.ndarray,
                 labels: np.ndarray, coords: np.ndarray, markers: list[str], normalization: dict | None = None):
        self.slides = slides
        self.sources = sources
        self.slide_idx = slide_idx.astype(np.int64)
        self.rows = rows.astype(np.int64)
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        self.coords = coords.astype(np.int64)
        self.markers = markers
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        arr = self.sources[self.slide_idx[i]].read(int(self.rows[i]))
        img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3,H,W) uint8
        return img, torch.from_numpy(self.labels[i]), i

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
) -> PatchDataset:
    """Join the label CSVs of ``slides`` with their patches (h5 store, else legacy PNG folder).

    ``markers`` fixes the marker order (e.g. from a checkpoint); otherwise the first CSV's order is used and every
    other CSV must have the same markers. Rows with missing labels are dropped (warning); a label ``index`` outside
    the patch store, a missing PNG, or a marker set that differs between slides is an error naming the file.
    """
    if not slides:
        raise PipelineError("no slides to load (empty split?)")
    root = Path(data_root)
    mdir = resolve_markers_dir(root, markers_dir)
    pdir = Path(patches_dir) if patches_dir is not None else root / "he_patches"
    names: list[str] | None = list(markers) if markers is not None else None
    sources, s_idx, rows, labels, coords = [], [], [], [], []
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
            with h5py.File(src.path, "r") as f:
                if "imgs" not in f:
                    raise PipelineError(f"patch store {src.path} has no 'imgs' dataset")
                n = f["imgs"].shape[0]
                if len(idx) and (idx.min() < 0 or idx.max() >= n):
                    raise PipelineError(f"{csv}: index {int(idx.max())} out of range for {src.path} ({n} patches)")
                if "coords" in f and {"x", "y"} <= set(df.columns) and len(idx):
                    store_xy = f["coords"][:][idx]
                    bad = int((store_xy != xy).any(axis=1).sum())
                    if bad:
                        log.warning("%s: %d of %d rows have x,y different from %s coords[index]",
                                    csv, bad, len(idx), src.path)
        else:
            missing = [i for i in idx if not src.file(int(i)).is_file()]
            if missing:
                raise PipelineError(f"{len(missing)} PNG patches listed in {csv} are missing, e.g. "
                                    f"{src.file(int(missing[0]))}")
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
                      np.concatenate(coords), names, load_normalization(mdir))
    if len(ds) == 0:
        raise PipelineError(f"slides {list(slides)[:5]}... have no labelled patches in {mdir}")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# batch transforms (tensor ops on the training device)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def colour_jitter_matrices(n: int, amounts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine colour maps ``x -> A x + k * g`` for images in [0,1]: A (n,3,3) and k (n,) on the CPU,
    where ``g`` is the image's mean gray level (the contrast pivot; the offset is the same on all three channels).

    Composes brightness ``b``, contrast ``c`` (blend with the mean gray), saturation ``s`` (blend with the pixel's
    gray) and hue ``h`` (rotation by ``2 pi h`` of the YIQ chroma plane), with ``b, c, s ~ U[1-a, 1+a]`` and
    ``h ~ U[-a_h, a_h]`` as torchvision's ColorJitter draws them.
    """
    ab, ac, as_, ah = (float(a) for a in amounts)
    b = 1 - ab + 2 * ab * torch.rand(n)
    c = 1 - ac + 2 * ac * torch.rand(n)
    s = 1 - as_ + 2 * as_ * torch.rand(n)
    theta = -(torch.rand(n) * 2 - 1) * ah * 2 * math.pi  # sign: positive h turns like HSV hue
    eye = torch.eye(3).expand(n, 3, 3)
    luma = torch.tensor(_LUMA).view(1, 1, 3).expand(n, 3, 3)  # every row = luma weights: (1 w^T)
    sat = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * luma
    yiq = torch.tensor(_RGB_TO_YIQ)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), -torch.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(theta), torch.cos(theta)
    hue = torch.linalg.inv(yiq) @ rot @ yiq
    a = hue @ sat * (c * b).view(n, 1, 1)
    return a, (1 - c) * b  # (hue @ sat) maps gray to gray, so the contrast offset stays (1-c) b g on every channel


@dataclass
class BatchTransform:
    """uint8 (B,3,H,W) batch -> normalised float32 (B,3,S,S) on the batch's device.

    Training: a random element of the dihedral group per sample (horizontal/vertical flips and rot90; on uint8),
    then colour jitter (brightness/contrast/saturation/hue = 0.1/0.1/0.1/0.01). Jitter and normalisation are folded
    into one per-sample 3x3 affine map, applied in a single batched matmul and clamped once to the image range, at
    the smaller of the source and target resolutions (resizing is linear, so the order does not matter). Unlike
    torchvision's ColorJitter the four factors compose in a fixed order without intermediate clamping, and hue
    rotates the YIQ chroma plane instead of shifting HSV hue (identical to first order; <= 3.6 degrees here).
    Random numbers come from the CPU torch RNG: results do not depend on the device, and a restored RNG state
    replays them.
    """

    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool = False
    jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.01)
    flips: bool = True
    interpolation: str = "bilinear"

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.input_size, self.input_size):
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                             align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic"))

    @staticmethod
    def _geometry(x: torch.Tensor) -> torch.Tensor:
        """Random flip/rot90 per sample of a square uint8 batch (8 dihedral elements, uniform)."""
        n = x.shape[0]
        code = torch.randint(0, 8, (n,)).tolist()
        out = torch.empty_like(x)
        for i, c in enumerate(code):
            v = x[i]
            if c & 1:
                v = v.flip(-1)
            if c & 2:
                v = v.flip(-2)
            if c & 4:
                v = v.transpose(-1, -2)
            out[i].copy_(v)
        return out

    def _affine(self, x: torch.Tensor, colour: bool) -> torch.Tensor:
        """(B,3,H,W) float in [0,255] -> normalised, with the per-sample colour map when ``colour``."""
        n, dev = x.shape[0], x.device
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1)
        offset = (-mean / std).expand(n, 3, 1).to(dev)  # (n,3,1)
        if colour:
            a, k = colour_jitter_matrices(n, self.jitter)
            sub = x[:, :, ::4, ::4]  # mean gray from a 1/16 subsample (the contrast pivot)
            gray = (sub * torch.tensor(_LUMA, device=dev).view(1, 3, 1, 1)).sum(1).mean(dim=(1, 2)) / 255
            offset = offset + (k.to(dev) * gray).view(n, 1, 1) / std.to(dev)
        else:
            a = torch.eye(3).expand(n, 3, 3)
        a = a / (255.0 * std)  # fold 1/255 and 1/std into the matrix
        y = torch.baddbmm(offset, a.to(dev), x.reshape(n, 3, -1))
        if colour:
            y = torch.clamp(y, (-mean / std).to(dev), ((1 - mean) / std).to(dev))
        return y.view_as(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 (B,3,H,W) batch, got {x.dtype} {tuple(x.shape)}")
        colour = self.train and any(self.jitter)
        if self.train and self.flips and x.shape[-1] == x.shape[-2]:
            x = self._geometry(x)
        x = x.float()
        if x.shape[-1] < self.input_size:  # upsampling: colour at the (smaller) source resolution
            return self._resize(self._affine(x, colour))
        return self._affine(self._resize(x), colour)


# ----------------------------------------------------------------------------------------------------------------
# synthetic data (tests, benchmarks, sanity checks)


def synthetic_patches(n: int, rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random H&E-like patches (N,size,size,3) uint8 and their per-channel mean colour (N,3) in [0,1].

    Each patch is a random base colour with a smooth blob texture, so simple colour statistics are learnable.
    """
    base = rng.uniform(0.15, 0.9, size=(n, 1, 1, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        fx, fy, ph = rng.uniform(2, 8), rng.uniform(2, 8), rng.uniform(0, 2 * math.pi)
        tex = 0.08 * np.sin(2 * math.pi * fx * xx + ph) * np.cos(2 * math.pi * fy * yy)
        noise = rng.normal(0, 0.03, size=(size, size, 1)).astype(np.float32)
        im = np.clip(base[i] + tex[..., None] + noise, 0, 1)
        imgs[i] = (im * 255).round().astype(np.uint8)
    return imgs, imgs.reshape(n, -1, 3).mean(axis=1) / 255.0


def synthetic_labels(colour: np.ndarray, num_markers: int, n_visible: int, rng: np.random.Generator) -> np.ndarray:
    """(N,M) labels in [0,1]: the first ``n_visible`` markers are fixed functions of mean colour, the rest noise."""
    r, g, b = colour[:, 0], colour[:, 1], colour[:, 2]
    funcs = [r, g, b, 1 - r, (r + b) / 2, 1 - g, (r + g) / 2, (g + b) / 2]
    y = rng.uniform(0, 1, size=(len(colour), num_markers)).astype(np.float32)
    for m in range(min(n_visible, num_markers)):
        y[:, m] = np.clip(funcs[m % len(funcs)] + rng.normal(0, 0.02, len(colour)), 0, 1)
    return y


def write_synthetic_dataset(
    root: str | os.PathLike,
    n_slides: int = 4,
    n_per_slide: int = 12,
    num_markers: int = 40,
    n_visible: int = 8,
    size: int = 224,
    seed: int = 0,
    legacy: bool = False,
    both: bool = False,
) -> dict[str, Any]:
    """Write a tiny cohort in the pipeline layout under ``root`` and return its description.

    Writes ``he_patches/{slide}.h5`` (or, with ``legacy``, ``he_patches/{slide}/{slide}_{i}.png`` and
    ``mean_intensity_channel{i}`` CSV columns; ``both`` writes PNGs next to the h5 stores under ``he_png/``),
    ``markers/{slide}.csv``, ``markers/normalization.json``, ``clinical.csv`` (two slides per patient),
    ``splits/splits_0.csv`` (last patient's slides in ``val``) and ``ground_truth.json``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    slides = [f"slide_{i:03d}" for i in range(n_slides)]
    markers = [f"{LEGACY_PREFIX}{i + 1}" for i in range(num_markers)] if legacy else [f"M{i:02d}" for i in
                                                                                        range(num_markers)]
    (root / "markers").mkdir(parents=True, exist_ok=True)
    (root / "he_patches").mkdir(parents=True, exist_ok=True)
    for slide in slides:
        imgs, colour = synthetic_patches(n_per_slide, rng, size)
        y = synthetic_labels(colour, num_markers, n_visible, rng)
        coords = np.stack([np.arange(n_per_slide) * size, np.full(n_per_slide, 1000)], axis=1).astype(np.int64)
        if not legacy:
            with h5py.File(root / "he_patches" / f"{slide}.h5", "w") as f:
                f.create_dataset("imgs", data=imgs, chunks=(1, size, size, 3))
                f.create_dataset("coords", data=coords)
        if legacy or both:
            d = root / ("he_png" if both and not legacy else "he_patches") / slide
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_slide):
                Image.fromarray(imgs[i]).save(d / f"{slide}_{i}.png")
        df = pd.DataFrame({"slide": slide, "index": np.arange(n_per_slide), "x": coords[:, 0], "y": coords[:, 1]})
        df = pd.concat([df, pd.DataFrame(y, columns=markers)], axis=1)
        df.to_csv(root / "markers" / f"{slide}.csv", index=False)
    write_json(root / "markers" / "normalization.json",
               {m: {"p_low": 0.0, "p_high": 1.0} for m in markers})
    cases = [f"case_{i // 2:03d}" for i in range(n_slides)]
    pd.DataFrame({"case_id": cases, "slide_id": slides, "survival_months": 12.0, "censorship": 0}).to_csv(
        root / "clinical.csv", index=False)
    last = cases[-1]
    train = [s for s, c in zip(slides, cases) if c != last]
    val = [s for s, c in zip(slides, cases) if c == last]
    (root / "splits").mkdir(exist_ok=True)
    pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val)}).to_csv(root / "splits" / "splits_0.csv",
                                                                           index=False)
    info = {"slides": slides, "markers": markers, "visible_markers": markers[:n_visible], "train": train,
            "val": val}
    write_json(root / "ground_truth.json", {"seed": seed, "markers": markers, "visible_markers": markers[:n_visible]})
    return info
