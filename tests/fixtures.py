"""Test fixtures shared by several test modules (not library code): writers of small pipeline artifacts.

- ``ReferenceMusk``: MUSK's full module layout (both branches and heads) at any size, for checkpoint-layout tests;
- ``blob_slide``: an H&E-like test image;
- ``save_run``: a HEX run folder with ``best.safetensors`` (stage 04's output) for a given model;
- ``write_pred``: a stage-06 prediction file (``hex_pred/{slide}.h5``) from coordinates and values;
- ``write_maps``: stage-06 virtual CODEX maps (``virtual_codex/{slide}.npy``, ``_mask.png``, ``.json``).

The synthetic HEX training set (patch stores + labels) is ``bench.synthetic_hex_data.write_synthetic_dataset``: the
benchmarks use it too. Session fixtures (``small_cohort``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch import nn

from hex.backbones.musk import _import_beit3
from hex.model import HEX
from pipeline import artifacts as art
from sample_data.panel import MARKERS as PANEL_MARKERS

MAP_MARKERS = [f"M{i:02d}" for i in range(37)] + ["Pan-Cytokeratin", "CD8", "CD68"]
"""The 40 marker names :func:`write_maps` records: three the ``stats`` CODEX encoder reads, the rest placeholders."""


class ReferenceMusk(nn.Module):
    """MUSK's module layout rebuilt from torchscale (both branches + heads): the official checkpoint's key set
    (974 tensors at full size), every tensor random, non-trivial. ``image_embedding(x)`` is MUSK's
    ``forward(image=x, with_head=False, out_norm=False)[0]``."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_dim: int, img_size: int) -> None:
        super().__init__()
        EncoderConfig, BEiT3 = _import_beit3()
        args = EncoderConfig(img_size=img_size, patch_size=16, vocab_size=64010, multiway=True,
                             layernorm_embedding=False, normalize_output=True, no_output_layer=True, drop_path_rate=0,
                             encoder_embed_dim=embed_dim, encoder_attention_heads=num_heads,
                             encoder_ffn_embed_dim=mlp_dim, encoder_layers=depth)
        self.beit3 = BEiT3(args)
        self.language_head = nn.Linear(embed_dim, embed_dim, bias=False)
        self.vision_head = nn.Linear(embed_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]))
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.05)  # everything non-trivial, norms included

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:  # MUSK forward(with_head=False, out_norm=False)
        return self.beit3(visual_tokens=x)["encoder_out"][:, 0, :]


def blob_slide(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 H&E-like test image: an elliptical noisy pink-purple tissue blob on white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1
    img[tissue] = (np.array([190, 100, 170]) + rng.integers(-40, 40, (int(tissue.sum()), 3))).clip(0, 255)
    return img


def save_run(out: Path, run: str, model: HEX, markers: list[str]) -> Path:
    """HEX run ``run`` under ``out`` as stage 04 leaves it (``best.safetensors`` + metadata, normalisation 10..110
    for every marker); returns the checkpoint path."""
    from hex.train.checkpoints import save_best

    run_dir = art.HEX_RUN.dir(out, run=run)
    run_dir.mkdir(parents=True, exist_ok=True)
    norm = {"markers": markers, "percentiles": [1, 99], "values": [[10.0] * len(markers), [110.0] * len(markers)]}
    save_best(run_dir, model, {"markers": markers, "normalization": norm, "model_args": model.model_args,
                               "input_size": model.input_size, "interpolation": "bilinear", "mean": list(model.mean),
                               "std": list(model.std), "epoch": 0, "val_mean_pearson": 0.0})
    return run_dir / "best.safetensors"


def write_pred(path: Path, coords, values, patch: float, stride: float, mpp: float | None = 0.5,
               markers: list[str] | None = None, **attrs) -> Path:
    """A stage-06 prediction file at ``path``: coords (N,2) level-0 px, values (N,M) -> ``codex_prediction``;
    ``markers`` default to the sample panel's 40; ``attrs`` are added to the root attributes."""
    markers = PANEL_MARKERS if markers is None else markers
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        f.create_dataset("codex_prediction", data=np.asarray(values, dtype=np.float32).reshape(-1, len(markers)))
        f.attrs["markers"] = markers
        f.attrs["patch_size_level0"] = patch
        f.attrs["stride_level0"] = stride
        f.attrs["slide_id"] = path.name.split(".", 1)[0]
        f.attrs["checkpoint"] = "runs/x/best.safetensors sha256:0"
        if mpp is not None:
            f.attrs["mpp"] = mpp
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def write_maps(out: Path, shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """virtual_codex/{slide}.npy + _mask.png + .json as hex.virtual_codex writes them, for ``shapes`` = {slide: (h, w)}
    (random values inside a mask that leaves a border); returns {slide: map (h, w, 40) float16}."""
    rng = np.random.default_rng(seed)
    d = art.VIRTUAL_CODEX.dir(out)
    d.mkdir(parents=True, exist_ok=True)
    maps = {}
    for s, (h, w) in shapes.items():
        mask = np.zeros((h, w), bool)
        mask[1:-1, 2:-1] = True
        vmap = (rng.random((h, w, 40)) * mask[..., None]).astype(np.float16)
        np.save(d / f"{s}.npy", vmap)
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / f"{s}_mask.png")
        (d / f"{s}.json").write_text(json.dumps({"slide": s, "markers": MAP_MARKERS}))
        maps[s] = vmap
    return maps


def write_synthetic_bags(root: str | Path, n_patients: int = 20, dim: int = 16, codex_dim: int = 8,
                         n_folds: int = 2, seed: int = 0, encoder: str = "synth", codex_encoder: str = "synth_codex",
                         two_slide_every: int = 5) -> dict[str, dict]:
    """A tiny cohort of MICA feature bags with a planted signal, in the layouts stages 08/09 read (``mica.dataset``).

    Patient p has risk ``r_p ~ U(0, 0.6)``; a fraction ``r_p`` of its patches are "planted" (feature 0 raised by 3),
    survival time ``60 exp(-5 r_p)`` months (x small noise), ~20% censored (earlier time), response = r_p above the
    median; CODEX token 3, feature 0 = 2 r_p. Every ``two_slide_every``-th patient has two slides. Writes
    ``root/clinical.csv``, ``root/splits/splits_{k}.csv`` (patient folds), ``root/features/{encoder}/pt_files`` +
    ``h5_files`` (with an extra ``planted`` (N,) dataset) and ``root/codex_features/{codex_encoder}.h5``.
    Returns ``{"planted": {slide: bool (N,)}, "risk": {case: r}}``.
    """
    import pandas as pd

    from mica.features.he_bags import encoder_dirname

    n_markers = 40
    root = Path(root)
    rng = np.random.default_rng(seed)
    fdir = root / "features" / encoder_dirname(encoder)
    (fdir / "pt_files").mkdir(parents=True, exist_ok=True)
    (fdir / "h5_files").mkdir(parents=True, exist_ok=True)
    (root / "codex_features").mkdir(parents=True, exist_ok=True)
    risk = rng.uniform(0, 0.6, n_patients)
    rows, planted, folds = [], {}, rng.permutation(n_patients) % n_folds
    t = 60 * np.exp(-5 * risk) * np.exp(rng.normal(0, 0.1, n_patients))
    cens = (rng.uniform(size=n_patients) < 0.2).astype(int)
    t = np.where(cens == 1, t * rng.uniform(0.5, 1.0, n_patients), t)
    markers = [f"M{i}" for i in range(n_markers)]
    with h5py.File(root / "codex_features" / f"{encoder_dirname(codex_encoder)}.h5", "w") as fc:
        fc.attrs["markers"] = markers
        fc.attrs["encoder"] = codex_encoder
        for p in range(n_patients):
            for j in range(2 if two_slide_every and p % two_slide_every == 0 else 1):
                slide = f"s{p:03d}_{j}"
                n = int(rng.integers(30, 81))
                x = rng.normal(0, 1, (n, dim)).astype(np.float32)
                mask = rng.uniform(size=n) < risk[p]
                x[mask, 0] += 3.0
                side = int(np.ceil(np.sqrt(n)))
                coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 224
                torch.save(torch.from_numpy(x), fdir / "pt_files" / f"{slide}.pt")
                with h5py.File(fdir / "h5_files" / f"{slide}.h5", "w") as f:
                    f["features"], f["coords"], f["planted"] = x, coords, mask
                    f.attrs["patch_size_level0"] = 224
                    f.attrs["encoder"] = encoder
                c = rng.normal(0, 1, (n_markers, codex_dim)).astype(np.float32)
                c[3, 0] = 2 * risk[p]
                fc[slide] = c
                planted[slide] = mask
                rows.append({"case_id": f"p{p:03d}", "slide_id": slide, "survival_months": round(float(t[p]), 3),
                             "censorship": int(cens[p]), "response": int(risk[p] > np.median(risk)),
                             "age": float(rng.normal(65, 8))})
    df = pd.DataFrame(rows)
    df.to_csv(root / "clinical.csv", index=False)
    (root / "splits").mkdir(exist_ok=True)
    for k in range(n_folds):
        val = [r["slide_id"] for r in rows if folds[int(r["case_id"][1:])] == k]
        train = [r["slide_id"] for r in rows if folds[int(r["case_id"][1:])] != k]
        n = max(len(train), len(val))
        pd.DataFrame({"train": train + [""] * (n - len(train)), "val": val + [""] * (n - len(val))}).to_csv(
            root / "splits" / f"splits_{k}.csv", index=False)
    return {"planted": planted, "risk": {f"p{p:03d}": float(risk[p]) for p in range(n_patients)}}
