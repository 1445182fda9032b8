"""Spatial niches from virtual CODEX (stage 10): cells or tiles, phenotypes, cellular neighbourhoods, link to outcome.

The top layer: imports pipeline, preprocess, hex and mica; nothing imports it.
"""
