"""Does squidpy take stage 10's AnnData as it is? Run with a Python that has squidpy (not a project dependency):

    python -m venv /tmp/sq && /tmp/sq/bin/pip install squidpy==1.8.2 anndata==0.12.19
    /tmp/sq/bin/python bench/check_squidpy.py OUT/spatial/slide_000.h5ad [more.h5ad ...]

Imports only anndata and squidpy (so it runs outside the project's environment); prints, per file, the cells, the
phenotype categories, squidpy's neighbourhood-enrichment z-scores of the five most co-localised phenotype pairs,
and exits 1 when squidpy fails on a file.
"""

from __future__ import annotations

import sys


def check(path: str) -> None:
    import anndata
    import numpy as np
    import squidpy as sq

    adata = anndata.read_h5ad(path)
    cats = list(adata.obs["phenotype"].cat.categories)
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=10)
    sq.gr.nhood_enrichment(adata, cluster_key="phenotype", seed=0, n_perms=200, show_progress_bar=False)
    z = np.asarray(adata.uns["phenotype_nhood_enrichment"]["zscore"])
    pairs = sorted(((z[i, j], cats[i], cats[j]) for i in range(len(cats)) for j in range(i, len(cats))
                    if np.isfinite(z[i, j])), reverse=True)[:5]
    print(f"{path}: {adata.n_obs} cells x {adata.n_vars} markers, spatial units {adata.uns.get('spatial_units')}; "
          f"phenotypes {cats}; squidpy {sq.__version__} nhood_enrichment z {z.shape}; top pairs: "
          + ", ".join(f"{a}-{b} {v:.1f}" for v, a, b in pairs))


def main(argv: list[str]) -> int:
    failed = 0
    for p in argv:
        try:
            check(p)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{p}: squidpy failed: {type(e).__name__}: {e}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
