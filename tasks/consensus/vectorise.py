"""Consensus label map -> polygons (native CRS) with class and confidence.

Each 4-connected region of one class code becomes one polygon (holes kept, pixel-exact edges, no
simplification); confidence = mean field posterior of its pixels.
"""

from __future__ import annotations

import numpy as np
import shapely
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry import shape as to_shape

from tasks.consensus.params import ConsensusParams
from tasks.store.grid import SiteGrid

_FOUR = ndimage.generate_binary_structure(2, 1)


def vectorise(label_map: np.ndarray, prob: np.ndarray, grid: SiteGrid, params: ConsensusParams) -> list[dict]:
    """Rows (class, confidence, n_pixels, geometry) for every field region of ``label_map``."""
    comp = np.zeros(label_map.shape, dtype=np.int32)
    comp_class: list[int] = [0]
    offset = 0
    for code in np.unique(label_map):
        if code == 0:
            continue
        lab, n = ndimage.label(label_map == code, structure=_FOUR)
        if n == 0:
            continue
        comp[lab > 0] = lab[lab > 0] + offset
        comp_class.extend([int(code)] * n)
        offset += n
    if offset == 0:
        return []
    ids = comp.ravel()
    p = np.nan_to_num(prob, nan=0.0).ravel().astype(np.float64)
    n_pix = np.bincount(ids, minlength=offset + 1)
    mean_p = np.bincount(ids, p, minlength=offset + 1) / np.maximum(n_pix, 1)
    parts: dict[int, list] = {}
    for geom, value in shapes(comp, mask=comp > 0, connectivity=4, transform=grid.affine):
        parts.setdefault(int(value), []).append(to_shape(geom))
    rows = []
    for cid in sorted(parts):
        geom = parts[cid][0] if len(parts[cid]) == 1 else shapely.union_all(parts[cid])
        rows.append(
            {
                "class": params.class_name(comp_class[cid]),
                "confidence": float(mean_p[cid]),
                "n_pixels": int(n_pix[cid]),
                "geometry": geom,
            }
        )
    return rows
