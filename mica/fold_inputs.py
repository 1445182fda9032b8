"""What a MICA fold was trained on: its input artifacts, recorded with the fold and compared before it is skipped,
resumed or scored.

A fold's model depends on the feature bags of every slide of its split (train and val) and on their encoders, so
``mica.train`` records (:func:`fold_inputs`) in ``fold_{k}/checkpoint.json`` (and ``state.pt`` while it trains)::

    "inputs": {"slides": [...],                                   # the split's slides, in order
               "bags": {slide: {"pt": [size, mtime_ns], "h5": [size, mtime_ns]}},   # H&E bag files (path modes)
               "bag_encoders": ["musk"],                          # what the h5 bags record (attr encoder)
               "codex": {slide: sha256 of its (40, D') float32 set}, "codex_encoder": "stats"}  # (CODEX modes)

A bag rebuilt by stage 07 (other weights, ``--overwrite``) has another size or mtime; a CODEX token set is known by
its values, so reassembling ``codex_features/{encdir}.h5`` from the same parts changes nothing. As for the slides of
per-slide stages (:mod:`pipeline.done`), changed inputs redo: ``mica.train`` retrains such a fold (the log says
why), and ``mica.test`` refuses to score it (one line naming the fold, the slide and the fix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mica.dataset import FeatureSource


def _stamp(path: Any) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def fold_inputs(source: FeatureSource, mode: str, slides: Sequence[str]) -> dict[str, Any]:
    """The inputs record of a fold over ``slides`` (see the module docstring); ``mode`` says which inputs the model
    reads (coattn: both, path: the H&E bags, codex: the CODEX tokens). The inputs must exist (checked before)."""
    rec: dict[str, Any] = {"slides": list(slides)}
    if mode in ("coattn", "path"):
        bags = {}
        for s in slides:
            pt, h5 = source.files(s)
            bags[s] = {k: _stamp(p) for k, p in (("pt", pt), ("h5", h5)) if p is not None}
        rec["bags"] = bags
        rec["bag_encoders"] = sorted(source.bag_encoders(list(slides)))
    if mode in ("coattn", "codex"):
        rec["codex"] = source.codex_digests(list(slides))
        rec["codex_encoder"] = source.codex_encoder()
    return rec


def _listed(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def changed_inputs(recorded: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """How the inputs ``now`` differ from those ``recorded`` with a fold (empty: the same), one phrase each:
    ``"H&E bags of 2 slides changed since (a, b)"``; a fold without a record gets one phrase saying so."""
    if not recorded:
        return ["no record of the inputs it was trained on (an older version of mica.train)"]
    out = []
    was, cur = list(recorded.get("slides", [])), list(now.get("slides", []))
    if was != cur:
        gone, new = [s for s in was if s not in cur], [s for s in cur if s not in was]
        out.append(f"the split's slides differ (now without {_listed(gone) or '-'}, with {_listed(new) or '-'})")
    for key, what in (("bag_encoders", "H&E bag encoder"), ("codex_encoder", "CODEX encoder")):
        if key in now and recorded.get(key) != now[key]:
            out.append(f"{what} {recorded.get(key)} -> {now[key]}")
    for key, what in (("bags", "H&E bags"), ("codex", "CODEX features")):
        if key not in now:
            continue
        old = recorded.get(key, {})
        diff = [s for s in cur if s in was and old.get(s) != now[key].get(s)]
        if diff:
            out.append(f"{what} of {len(diff)} slides changed since ({_listed(diff)})")
    return out
