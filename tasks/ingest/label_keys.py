"""Per-site keys of the raw label inputs: what lets ingest normalise only the sites whose labels changed.

A site's key covers its raw label rows, its normalised assignments, its grid, the label classes, the
file's CRS, the code that reads and normalises labels and the geometry libraries' versions; it is
computed without normalising any geometry (one pass over the rows, a batch of the file at a time).
"""

from __future__ import annotations

import hashlib
from functools import cache

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely

from tasks.store.reuse import code_key, content_key

LABELS_STAGE = "ingest_labels"  # reuse_keys/<this>.parquet: per site, the key of its raw label inputs
# The code a site's normalised labels depend on: reading, checks, geometry work, assembly (not imagery).
LABEL_CODE = (
    "tasks.ingest.labels",
    "tasks.ingest.label_keys",
    "tasks.ingest.label_parts",
    "tasks.ingest.raw_label_rows",
    "tasks.ingest.readers",
    "tasks.ingest.stage",
)


def label_input_keys(
    rows: LabelRowDigests, assignments: pd.DataFrame, grids: pd.DataFrame, classes: list[str]
) -> dict[str, str]:
    """Per site with assignments: the key of everything its normalised ``labels`` and ``assignments``
    rows depend on, computed without normalising any geometry.

    That is the site's raw label rows (``rows``: labeller, class, geometry as WKB in the file's CRS) in
    file order within each labeller (the order numbers its polygons; rows of other sites or labellers may
    move freely), its normalised assignments, its grid, the label classes, the file's CRS, the code that
    reads and normalises labels (``LABEL_CODE``) and the geometry libraries' versions (``make_valid`` and
    reprojection results may change with them).
    """
    common = content_key(
        "ingest/labels",
        code_key(*LABEL_CODE),
        _geometry_library_versions(),
        list(classes),
        # the CRS's name (authority code, else its definition), not its WKT: threads of long-lived workers
        # may spell one CRS differently (tasks/store/geoparquet.crs_projjson)
        rows.crs.to_string() if rows.crs is not None else None,
    )
    a_keys = _assignment_row_keys(assignments)
    l_keys = rows.site_digests()
    g = grids.drop_duplicates("site_id")
    site_grid = {
        str(s): [str(c), [float(v) for v in t], int(w), int(h)]
        for s, c, t, w, h in zip(g["site_id"], g["crs"], g["transform"], g["width"], g["height"], strict=True)
    }
    return {
        site: content_key(common, site_grid.get(site), a_keys.get(site), l_keys.get(site))
        for site in sorted(a_keys.keys() | l_keys.keys())
    }


class LabelRowDigests:
    """Per site, a digest of its raw label rows (validated: :func:`validate_labels`), fed batch by batch in
    file order, so a large label file is keyed one batch at a time. Each (site, labeller) pair's rows are
    chained in file order (a pair keeps only its 16-byte digest so far); a site's digest joins its pairs'
    digests in labeller order."""

    def __init__(self) -> None:
        self.crs = None  # the file's CRS, once a row was seen
        self._pairs: dict[tuple[str, str], bytes] = {}
        self._prefixes: dict = {}

    @classmethod
    def of(cls, labels: gpd.GeoDataFrame) -> LabelRowDigests:
        digests = cls()
        digests.add(labels)
        return digests

    def add(self, labels: gpd.GeoDataFrame, wkb: np.ndarray | None = None) -> None:
        """Hash the next rows of the file (each batch after the rows before it); ``wkb``: their geometries
        as :func:`row_wkb` gives them, if the caller has them already."""
        if len(labels) == 0:
            return
        self.crs = labels.crs if self.crs is None else self.crs
        wkb = row_wkb(labels) if wkb is None else wkb
        pairs, prefixes = self._pairs, self._prefixes
        label = labels["label"].astype(object)
        label = label.where(label.notna(), None).to_numpy()  # every missing class hashes as b"N"
        sites, who = (labels[c].to_numpy(dtype=object) for c in ("site_id", "labeller_id"))
        for s, w, c, b in zip(sites, who, label, wkb, strict=True):
            # the labeller and class prefix made once per distinct value (few)
            key = (w, c) if c is None or isinstance(c, str) else None
            p = prefixes.get(key) if key is not None else None
            if p is None:
                wb = w.encode()
                p = b"%d:" % len(wb) + wb + _class_bytes(c)
                if key is not None:
                    prefixes[key] = p
            pairs[(s, w)] = hashlib.blake2b(
                pairs.get((s, w), b"") + p + b"%d:" % len(b) + b, digest_size=16
            ).digest()

    def site_digests(self) -> dict[str, str]:
        """Per site with rows: the digest of its pairs' digests, in labeller order."""
        sites: dict[str, hashlib.blake2b] = {}
        for s, w in sorted(self._pairs):
            h = sites.get(s)
            if h is None:
                h = sites[s] = hashlib.blake2b(digest_size=16)
            wb = w.encode()
            h.update(b"%d:" % len(wb) + wb + self._pairs[(s, w)])
        return {s: h.hexdigest() for s, h in sites.items()}


def _assignment_row_keys(assignments: pd.DataFrame) -> dict[str, str]:
    """Per site: a digest of its normalised assignments (labeller, status, completion instant, reference),
    in labeller order. Vectorised: one pass over the rows, not one frame per site."""
    if len(assignments) == 0:
        return {}
    done = pd.to_datetime(assignments["completed_at"], utc=True)
    instants = done.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]").view("int64")
    frame = pd.DataFrame(
        {
            "site": assignments["site_id"].astype(str).to_numpy(dtype=object),
            "who": assignments["labeller_id"].astype(str).to_numpy(dtype=object),
            "status": assignments["status"].astype(str).to_numpy(dtype=object),
            "at": np.where(done.isna().to_numpy(), None, instants),
            "ref": assignments["is_reference"].astype(bool).to_numpy(),
        }
    ).sort_values(["site", "who", "status"])
    out: dict[str, str] = {}
    h, current = None, None
    for s, w, st, at, ref in zip(*(frame[c].to_numpy() for c in frame.columns), strict=True):
        if s != current:
            if h is not None:
                out[current] = h.hexdigest()
            h, current = hashlib.blake2b(digest_size=16), s
        wb, sb = w.encode(), st.encode()
        tb = b"N" if at is None else b"T%d" % at
        h.update(b"%d:" % len(wb) + wb + b"%d:" % len(sb) + sb + tb + (b"R" if ref else b"C"))
    out[current] = h.hexdigest()
    return out


def row_wkb(labels: gpd.GeoDataFrame) -> np.ndarray:
    """Each row's geometry as little-endian WKB: what keys hash and the spill stores."""
    return shapely.to_wkb(np.asarray(labels.geometry.to_numpy(), dtype=object), byte_order=1)


def _class_bytes(value) -> bytes:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return b"N"
    if isinstance(value, str):
        b = value.encode()
        return b"S%d:" % len(b) + b
    b = f"{type(value).__name__}:{value!r}".encode()
    return b"O%d:" % len(b) + b


@cache
def _geometry_library_versions() -> list[str]:
    return [shapely.__version__, shapely.geos_version_string, pyproj.__version__, pyproj.proj_version_str]
