"""Encoders of virtual CODEX maps: one D'-vector per marker channel, i.e. 40 tokens per slide for MICA.

Input: a virtual CODEX map (H', W', C) in P99-normalised units (~[0, 1]; 1 ~ the marker's 99th percentile over the
training tiles, 0 = no expression / no tissue) and its tissue mask (H', W') bool. Two encoders:

* **image encoders** (``dinov2_vits14_reg`` as the original MICA, or any ``hex.backbones`` name): each channel is
  clipped to [0, 1], scaled to uint8 (x 255, rounded), copied to 3 channels, resized to the backbone input size
  (224 px, bicubic with antialiasing when shrinking; results clamped and rounded to the uint8 grid, as PIL's resize
  of a uint8 image gives), normalised with the backbone mean/std (ImageNet) and embedded (CLS token, D' = 384).
  The [0, 1] clip only makes sense because the maps are P99-normalised: on raw intensities the x 255 step would
  saturate or, for values below 1/255, give all-black images. See :func:`channel_images`, :func:`to_model_input`.
* **stats** (:func:`stats_features`): per-channel spatial descriptors over the tissue pixels, CPU-fast and
  interpretable; the columns are :data:`STATS_FEATURES` (D' = 10), documented in :data:`STATS_DESCRIPTIONS`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from preprocess.utils import PipelineError, StageReport, atomic_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATS_ENCODER = "stats"
HIGH_THRESHOLD = 0.5
"""'High expression' threshold in P99-normalised units (half the marker's 99th percentile; cohort-agnostic)."""
EPI_THRESHOLD = 0.5
"""A tissue pixel is epithelial when the mean of the epithelial channels exceeds this (P99-normalised units)."""
EPITHELIAL_MARKERS = ("Pan-Cytokeratin", "E-cadherin", "EpCAM")
_EPI_ALIASES = {"pancytokeratin", "panck", "cytokeratin", "ecadherin", "cdh1", "epcam"}

STATS_DESCRIPTIONS: dict[str, str] = {
    "mean": "level: mean of the channel over tissue pixels",
    "sd": "spread: standard deviation over tissue pixels",
    "p50": "median over tissue pixels",
    "p90": "90th percentile over tissue pixels",
    "frac_high": f"fraction of tissue pixels above the high threshold ({HIGH_THRESHOLD} P99-normalised units)",
    "moran_i": "spatial autocorrelation: Moran's I with binary 4-neighbour weights between tissue pixels "
               "(~1 = one smooth aggregate, ~0 = random, < 0 = checkerboard)",
    "corr_epi": "co-location: Pearson correlation over tissue pixels with the epithelial score (mean of the "
                "Pan-Cytokeratin/E-cadherin/EpCAM channels present; 0 without any)",
    "frac_high_in_epi": "fraction of the channel's high pixels lying in the epithelial region (epithelial score > "
                        f"{EPI_THRESHOLD}); 0 when the channel has no high pixel",
    "mean_epi": "mean over the epithelial region (tumour nests); 0 when there is none",
    "mean_stroma": "mean over tissue outside the epithelial region; 0 when there is none",
}
STATS_FEATURES: tuple[str, ...] = tuple(STATS_DESCRIPTIONS)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def epithelial_channels(markers: Sequence[str]) -> list[int]:
    """Indices of the epithelial markers (Pan-Cytokeratin, E-cadherin, EpCAM; case/punctuation-insensitive)."""
    return [i for i, m in enumerate(markers) if _norm(m) in _EPI_ALIASES]


def tissue_values(vmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, C) float32 values of the tissue pixels of a (H, W, C) map (mask (H, W) bool)."""
    return np.asarray(vmap[mask], dtype=np.float32)


def morans_i(vmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Moran's I per channel (C,) of a (H, W, C) map over the tissue pixels, binary 4-neighbour weights.

    ``I = n / W * sum_ij w_ij z_i z_j / sum_i z_i^2`` with ``z`` the deviations from the tissue mean, ``w_ij = 1``
    for horizontally/vertically adjacent tissue pixels (both directions counted, so ``W = 2 E`` for E adjacent
    pairs). 0 for a constant channel or when no two tissue pixels touch.
    """
    mask = np.asarray(mask, bool)
    c = vmap.shape[-1]
    out = np.zeros(c, np.float32)
    n = int(mask.sum())
    eh = mask[:, :-1] & mask[:, 1:]
    ev = mask[:-1, :] & mask[1:, :]
    n_edges = int(eh.sum() + ev.sum())
    if n < 2 or n_edges == 0:
        return out
    for k in range(c):  # one (H, W) float64 plane at a time (a whole map in float64 can be hundreds of MB)
        z = np.zeros(mask.shape, np.float64)
        v = np.asarray(vmap[..., k][mask], np.float64)
        z[mask] = v - v.mean()
        denom = float((z * z).sum())
        if denom <= 1e-12:
            continue
        # z is 0 outside tissue, so products over all neighbour pairs equal products over tissue-tissue pairs
        cross = float((z[:, :-1] * z[:, 1:]).sum() + (z[:-1, :] * z[1:, :]).sum())
        out[k] = n * cross / (n_edges * denom)
    return out.astype(np.float32)


def _corr(vals: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson r of each column of vals (n, C) with ref (n,); 0 where either is constant."""
    a = vals - vals.mean(axis=0, dtype=np.float64).astype(vals.dtype)
    b = (ref - ref.mean()).astype(vals.dtype)
    num = (a * b[:, None]).sum(axis=0, dtype=np.float64)
    den = np.sqrt((a * a).sum(axis=0, dtype=np.float64) * float((b.astype(np.float64) ** 2).sum()))
    return np.where(den > 1e-12, num / np.maximum(den, 1e-300), 0.0)


def stats_features(vmap: np.ndarray, mask: np.ndarray | None, markers: Sequence[str],
                   high: float = HIGH_THRESHOLD, epi_threshold: float = EPI_THRESHOLD) -> np.ndarray:
    """Per-channel spatial descriptors (C, len(STATS_FEATURES)) float32 of a (H, W, C) map.

    ``mask`` (H, W) bool = tissue pixels (None: pixels where any channel > 0). ``markers`` (C names) locate the
    epithelial channels; without any the co-location columns are 0 (warning). An empty mask gives all zeros.
    """
    vmap = np.asarray(vmap)
    if vmap.ndim != 3:
        raise ValueError(f"expected a (H, W, C) map, got shape {vmap.shape}")
    c = vmap.shape[-1]
    if len(markers) != c:
        raise ValueError(f"{len(markers)} marker names for a map with {c} channels")
    mask = (np.asarray(vmap) > 0).any(axis=-1) if mask is None else np.asarray(mask, bool)
    if mask.shape != vmap.shape[:2]:
        raise ValueError(f"tissue mask {mask.shape} does not match the map {vmap.shape[:2]}")
    out = np.zeros((c, len(STATS_FEATURES)), np.float64)
    vals = tissue_values(vmap, mask)  # (n, C) float32; sums below accumulate in float64
    if len(vals) == 0:
        return out.astype(np.float32)
    col = {k: i for i, k in enumerate(STATS_FEATURES)}
    hi = vals > high
    out[:, col["mean"]] = vals.mean(axis=0, dtype=np.float64)
    out[:, col["sd"]] = vals.std(axis=0, dtype=np.float64)
    q = np.quantile(vals, [0.5, 0.9], axis=0)
    out[:, col["p50"]], out[:, col["p90"]] = q[0], q[1]
    out[:, col["frac_high"]] = hi.mean(axis=0)
    out[:, col["moran_i"]] = morans_i(vmap, mask)
    epi = epithelial_channels(markers)
    if not epi:
        log.warning("no epithelial channel (%s) among the markers: co-location columns are 0",
                    "/".join(EPITHELIAL_MARKERS))
        return out.astype(np.float32)
    score = vals[:, epi].mean(axis=1, dtype=np.float64)
    region = score > epi_threshold
    out[:, col["corr_epi"]] = _corr(vals, score)
    n_hi = hi.sum(axis=0)
    out[:, col["frac_high_in_epi"]] = np.where(n_hi > 0, (hi & region[:, None]).sum(axis=0) / np.maximum(n_hi, 1), 0)
    if region.any():
        out[:, col["mean_epi"]] = vals[region].mean(axis=0, dtype=np.float64)
    if (~region).any():
        out[:, col["mean_stroma"]] = vals[~region].mean(axis=0, dtype=np.float64)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# image encoders (DINOv2 as the original MICA)


def channel_images(vmap: np.ndarray) -> torch.Tensor:
    """uint8 (C, 1, H, W) grey images of a (H, W, C) map: clip to [0, 1], x 255, rounded (one image per marker;
    it becomes 3 identical RGB channels in :func:`to_model_input`)."""
    x = np.clip(np.nan_to_num(np.asarray(vmap, np.float32), nan=0.0), 0.0, 1.0)
    img = np.rint(x * 255.0).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[:, None]))


def resize_grey(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float32 (B, 1, size, size) in [0, 1]: bicubic (antialiased when shrinking), clamped
    and rounded to the uint8 grid (what ``PIL.Image.resize(BICUBIC)`` of a uint8 image gives, up to rounding)."""
    x = img.float()
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
        x = x.clamp(0, 255).round()
    return x / 255.0


def to_model_input(grey: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float (B, 1, S, S) in [0, 1] -> normalised (B, 3, S, S): the grey image copied to R, G, B, then
    ``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) - m) / s


def channel_batches(items, batch_size: int):
    """(slide, images (C, 1, S, S)) items -> (batch (B, 1, S, S), [(slide, channel), ...]) batches of ``batch_size``
    images (the last may be smaller); a batch may hold the channels of several slides."""
    imgs: list[torch.Tensor] = []
    keys: list[tuple[str, int]] = []
    for slide, x in items:
        imgs += list(x)
        keys += [(slide, c) for c in range(len(x))]
        while len(imgs) >= batch_size:
            yield torch.stack(imgs[:batch_size]), keys[:batch_size]
            del imgs[:batch_size], keys[:batch_size]
    if imgs:
        yield torch.stack(imgs), keys


# ----------------------------------------------------------------------------------------------------------------
# inputs: OUT/virtual_codex/{slide}.npy (+ {slide}_mask.png, {slide}.json from hex.virtual_codex)


def find_maps(out: str | os.PathLike) -> dict[str, Path]:
    """Virtual CODEX maps by slide id: ``OUT/virtual_codex/{slide}.npy`` (mask files excluded)."""
    d = Path(out) / "virtual_codex"
    return {p.stem: p for p in sorted(d.glob("*.npy")) if not p.stem.endswith("_mask") and not p.name.startswith(".")}


def read_mask(npy_path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Tissue mask (H', W') bool beside a map: ``{slide}_mask.png`` (hex.virtual_codex: 255 = tissue) or
    ``{slide}_mask.npy``; None when there is none. A mask of another shape is a :class:`PipelineError`."""
    base = npy_path.with_name(npy_path.stem + "_mask")
    for p in (base.with_suffix(".png"), base.with_suffix(".npy")):
        if not p.is_file():
            continue
        if p.suffix == ".png":
            from PIL import Image

            with Image.open(p) as im:
                mask = np.asarray(im.convert("L")) > 127
        else:
            mask = np.load(p, allow_pickle=False) > 0
        if mask.shape != tuple(shape):
            raise PipelineError(f"tissue mask {p} is {mask.shape}, its map {npy_path} is {tuple(shape)}; rerun "
                                "hex.virtual_codex for this slide")
        return mask
    return None


def read_markers(out: str | os.PathLike, slide: str, npy_path: Path) -> list[str]:
    """Marker names of a map (HEX output order): ``virtual_codex/{slide}.json`` ``markers``, else the ``markers``
    attribute of ``hex_pred/{slide}.h5``."""
    rec = npy_path.with_suffix(".json")
    if rec.is_file():
        try:
            markers = json.loads(rec.read_text()).get("markers")
        except json.JSONDecodeError:
            markers = None
        if markers:
            return [str(m) for m in markers]
    pred = Path(out) / "hex_pred" / f"{slide}.h5"
    if pred.is_file():
        import h5py

        with h5py.File(pred, "r") as f:
            if "markers" in f.attrs:
                return [m.decode() if isinstance(m, bytes) else str(m) for m in np.atleast_1d(f.attrs["markers"])]
    raise PipelineError(f"no marker names for {npy_path}: neither {rec} nor {pred} (attr 'markers') lists them; "
                        "rerun hex.infer_wsi / hex.virtual_codex")


def map_inputs(npy_path: Path) -> list[Path]:
    """Files a slide's CODEX features depend on: the map, its mask and its record (freshness check)."""
    return [npy_path, npy_path.with_name(npy_path.stem + "_mask.png"), npy_path.with_suffix(".json")]


def load_map(out: str | os.PathLike, slide: str, npy_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(map (H', W', C) float16/32, tissue mask (H', W') bool, C marker names) of one slide; the mask falls back to
    'any channel > 0' (0 = no tissue in the maps)."""
    try:
        vmap = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {npy_path} ({e}); rerun hex.virtual_codex for this slide") from e
    if vmap.ndim != 3:
        raise PipelineError(f"{npy_path} has shape {vmap.shape}; expected (H', W', markers)")
    markers = read_markers(out, slide, npy_path)
    if len(markers) != vmap.shape[-1]:
        raise PipelineError(f"{npy_path} has {vmap.shape[-1]} channels but {len(markers)} marker names")
    mask = read_mask(npy_path, vmap.shape[:2])
    if mask is None:
        mask = (vmap > 0).any(axis=-1)
    return vmap, mask, markers


# ----------------------------------------------------------------------------------------------------------------
# outputs: OUT/codex_features/{encdir}/{slide}.h5 (parts) -> OUT/codex_features/{encdir}.h5


def part_path(out: str | os.PathLike, encdir: str, slide: str) -> Path:
    return Path(out) / "codex_features" / encdir / f"{slide}.h5"


def combined_path(out: str | os.PathLike, encdir: str) -> Path:
    return Path(out) / "codex_features" / f"{encdir}.h5"


def write_part(path: Path, feats: np.ndarray, markers: Sequence[str], attrs: dict) -> None:
    """One slide's (C, D') features with its marker names and settings, atomically."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(feats, np.float32))
        f.attrs["markers"] = list(markers)
        for k, v in attrs.items():
            f.attrs[k] = v


def part_is_done(path: Path, inputs: Sequence[Path], settings: str) -> bool:
    """The part exists, is newer than its inputs and was made with the same ``settings`` (JSON string)."""
    import h5py

    if not path.is_file():
        return False
    mt = path.stat().st_mtime
    if any(p.exists() and p.stat().st_mtime > mt for p in inputs):
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("settings", "") == settings
    except OSError:
        return False


def assemble(out: str | os.PathLike, encdir: str, encoder: str, feature_names: Sequence[str] | None = None) -> Path:
    """Write ``codex_features/{encdir}.h5`` from every part in ``codex_features/{encdir}/`` (atomically).

    File attrs: ``encoder``, ``markers``, ``schema_version``, ``feature_dim`` (+ ``feature_names``); one (C, D')
    float32 dataset per slide with attr ``source``. Parts with different marker lists are a :class:`PipelineError`.
    """
    import h5py

    parts = sorted((Path(out) / "codex_features" / encdir).glob("*.h5"))
    parts = [p for p in parts if not p.name.startswith(".")]
    dst = combined_path(out, encdir)
    markers: list[str] | None = None
    dim = None
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as g:
        for p in parts:
            with h5py.File(p, "r") as f:
                m = [str(x) for x in f.attrs["markers"]]
                feats = f["features"][:]
                source = str(f.attrs.get("source", ""))
            if markers is None:
                markers, dim = m, feats.shape[1]
            elif m != markers or feats.shape[1] != dim:
                raise PipelineError(f"{p}: markers/feature size differ from the other slides' ({len(m)} markers, D' "
                                    f"{feats.shape[1]} vs {len(markers)}, {dim}); rerun with --overwrite")
            ds = g.create_dataset(p.stem, data=feats.astype(np.float32))
            ds.attrs["source"] = source
        g.attrs["encoder"] = encoder
        g.attrs["markers"] = markers or []
        g.attrs["schema_version"] = SCHEMA_VERSION
        g.attrs["feature_dim"] = int(dim or 0)
        if feature_names is not None:
            g.attrs["feature_names"] = list(feature_names)
    log.info("%s: %d slides", dst, len(parts))
    return dst


# ----------------------------------------------------------------------------------------------------------------
# drivers


def stats_slide(slide: str, npy_path: Path, out: Path, encdir: str, high: float, settings: str) -> dict:
    """Stats features of one slide -> its part file (module level: runs in a process pool)."""
    vmap, mask, markers = load_map(out, slide, npy_path)
    feats = stats_features(vmap, mask, markers, high=high)
    write_part(part_path(out, encdir, slide), feats, markers,
               {"encoder": STATS_ENCODER, "source": str(npy_path), "settings": settings,
                "feature_names": list(STATS_FEATURES), "schema_version": SCHEMA_VERSION})
    return {"tissue_pixels": int(mask.sum())}


class MapImages(Dataset):
    """Item i = (slide, uint8 grey images (C, 1, S, S) of its channels resized to S, markers, error message)."""

    def __init__(self, out: Path, slides: Sequence[str], maps: dict[str, Path], size: int):
        self.out, self.slides, self.maps, self.size = out, list(slides), maps, int(size)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int):
        s = self.slides[i]
        try:
            vmap, _, markers = load_map(self.out, s, self.maps[s])
            grey = resize_grey(channel_images(vmap), self.size)
            return s, (grey * 255).round().to(torch.uint8), markers, ""
        except PipelineError as e:
            return s, None, None, str(e)


@torch.inference_mode()
def run_image(slides: Sequence[str], maps: dict[str, Path], out: Path, encdir: str, name: str, module: nn.Module,
              input_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device, settings: str,
              batch_size: int = 64, workers: int = 0, amp: torch.dtype | None = None,
              overwrite: bool = False, skip_errors: bool = True, progress: bool = True,
              sources: Sequence[Path] = ()) -> StageReport:
    """Image-encoder features (C, D) of each slide's channels, batched across slides (a batch may hold channels of
    several slides); each map is loaded once (DataLoader ``workers``). Writes one part per slide."""
    from hex.evaluate import autocast

    rep = StageReport()
    todo = []
    for s in slides:
        if not overwrite and part_is_done(part_path(out, encdir, s), [*map_inputs(maps[s]), *sources], settings):
            rep.skipped.append(s)
        else:
            todo.append(s)
    loader = DataLoader(MapImages(out, todo, maps, input_size), batch_size=None, num_workers=min(workers, len(todo)))
    pending: dict[str, list] = {}  # slide -> [features (C, D) or None, markers, channels filled]

    def items():
        for s, grey, markers, err in tqdm(loader, desc=f"CODEX features ({name})", unit="slide", disable=not progress):
            if err:
                if not skip_errors:
                    raise PipelineError(err)
                rep.failed[s] = err
                log.error("%s: %s", s, err)
                continue
            pending[s] = [None, list(markers), 0]
            yield s, grey

    module.eval()
    for batch, keys in channel_batches(items(), batch_size):
        x = to_model_input(batch.to(device, non_blocking=True).float() / 255.0, mean, std)
        with autocast(device, amp):
            y = module(x).float().cpu().numpy()
        for (s, c), row in zip(keys, y):
            entry = pending[s]
            if entry[0] is None:
                entry[0] = np.zeros((len(entry[1]), row.shape[0]), np.float32)
            entry[0][c] = row
            entry[2] += 1
            if entry[2] == len(entry[1]):
                write_part(part_path(out, encdir, s), entry[0], entry[1],
                           {"encoder": name, "source": str(maps[s]), "settings": settings,
                            "schema_version": SCHEMA_VERSION})
                del pending[s]
                rep.done.append(s)
    log.info("CODEX features (%s): %s", name, rep.summary())
    return rep
