"""Thumbnail panels of the report: the riskiest sites, the top label issues and pseudo-label examples.

Each site's panels are a unit keyed by what they draw (its pixels, its polygons, the raster behind its heat
panel), so a reprocess redraws only the sites whose inputs changed and links the others' files.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import PIL
import shapely

from schemas.catalog import Catalog
from tasks.report.extras import issue_geometries
from tasks.report.params import ReportSettings
from tasks.report.reuse import ReportReuse
from tasks.report.thumbs import field_probability, read_band, safe_name, site_panels
from tasks.store.grid import SiteGrid
from tasks.store.reuse import code_key, content_key

PANEL_FILES = ("image", "consensus", "issue", "pseudo", "risk", "probability")  # entries naming a file


def thumbnails(
    art, m, scenes, s: ReportSettings, catalog: Catalog, out: Path, rr: ReportReuse
) -> dict[str, list]:
    """Thumbnail panels of the riskiest sites, the top issues and pseudo-label examples. Each site's
    panels are a unit keyed by what they draw (its pixels, polygons, the raster of its heat panel);
    unchanged ones are linked from the previous report with the entry its metrics.json recorded.

    Polygons enter a key through the key their stage gave the site where it recorded one (ingest's site
    label key, consensus and label_issues unit keys: their rows of a site are a function of it), so a
    reprocess reads polygons only for the panels it draws; pseudo-labels (whose ``kept`` flag follows
    global thresholds) and sites without such a key enter by content."""
    tiles = art.attributes("tiles")
    sites = art.table("sites").set_index("site_id", drop=False)
    bands = list(tiles["band_names"].iloc[0]) if len(tiles) else []
    classes = list(catalog.settings.label_classes)
    band_range = _band_range(tiles)
    riskiest_ids = list(m["consensus"]["riskiest"])
    issue_rows = [r for r in m["label_issues"].get("top", []) or [] if r.get("site_id") is not None]
    examples = list(m["pseudo_labels"].get("examples", []) or [])
    site_keys = (m.get("fingerprints") or {}).get("site_labels") or {}
    # the polygons of the sites drawn, read for those sites only, and only when a panel needs them
    rows = _SiteRows(art, riskiest_ids + [r["site_id"] for r in issue_rows], riskiest_ids, issue_rows)
    common = [
        bands,
        band_range,
        classes,
        s.thumb_px,
        code_key("tasks.report.thumbs", "tasks.report.imagery", "tasks.report.panels"),
        matplotlib.__version__,
        PIL.__version__,
    ]
    prev_assets = (rr.prev_metrics or {}).get("assets") or {}

    def previous(kind: str, site_id: str, who=None) -> dict | None:
        for e in prev_assets.get(kind) or []:
            if e.get("site_id") == site_id and (kind != "issues" or e.get("labeller_id") == who):
                return {k: v for k, v in e.items() if k not in ("rank", "labeller_id")}
        return None

    def labeller_polys(site_id, who):
        lab = rows.labels(site_id)
        if who is not None:
            lab = lab[lab["labeller_id"].astype(str) == who]
        polys = {
            str(k): list(zip(g["label"], g["geometry"], strict=True)) for k, g in lab.groupby("labeller_id")
        }
        if who is not None:
            polys.setdefault(who, [])
        return polys

    def panels(unit, prev, site_id, who: str | None = None, overlays=None, heat=None, stem=None):
        """Panels of a site; ``who``: None = every labeller, "" = no labeller panel, else one labeller.
        ``overlays``: name -> (its stage's key of the site or None, read() -> (label, geometry) pairs).
        ``heat``: (panel name, stage, raster path, read(path) -> values, vmax, colormap)."""
        if site_id not in sites.index:
            return None
        row = sites.loc[site_id]
        grid = SiteGrid.from_row(row)
        scene = scenes.get(str(row["scene_id"]))
        overlays = overlays or {}
        scene_key = rr.scene_key(scene)
        key = None
        if scene_key is not None:
            if who == "":
                polys_part = None
            elif site_id in site_keys:
                polys_part = ["site_labels", site_keys[site_id]]
            else:
                polys_part = [(k, _shapes(v)) for k, v in sorted(labeller_polys(site_id, who).items())]
            key = content_key(
                unit,
                common,
                [grid.site_id, grid.crs, list(grid.transform), grid.width, grid.height],
                scene_key,
                polys_part,
                [(k, _shapes(read()) if up is None else up) for k, (up, read) in overlays.items()],
                None if heat is None else [heat[0], rr.upstream(heat[1], site_id, heat[2]), heat[4], heat[5]],
                stem,
            )
        if rr.hit(unit, key) and prev is not None:
            files = [prev[k] for k in PANEL_FILES if isinstance(prev.get(k), str)]
            files += [lp["src"] for lp in prev.get("labellers", [])]
            if rr.link(files, out.parent):
                rr.took(unit)
                return prev
        heat_values = None if heat is None else (heat[0], heat[3](heat[2]), heat[4], heat[5])
        return site_panels(
            grid,
            scene,
            bands,
            out,
            "thumbs",
            classes,
            s.thumb_px,
            labeller_polys=None if who == "" else labeller_polys(site_id, who),
            overlays={k: read() for k, (_, read) in overlays.items()},
            heat_values=heat_values,
            band_range=band_range,
            stem=stem,
        )

    def risk_band(path):
        return read_band(path, 2, s.thumb_px)

    def p_field(path):
        return field_probability(path, s.thumb_px)

    riskiest = []
    for sid in riskiest_ids:
        path = art.raster_path("consensus_rasters", sid)
        p = panels(
            f"thumbs/riskiest/{sid}",
            previous("riskiest", sid),
            sid,
            overlays={"consensus": (rr.upstream_key("consensus", sid), lambda sid=sid: rows.consensus(sid))},
            heat=("risk", "consensus", path, risk_band, 0.5, "magma"),
        )
        if p:
            riskiest.append(p)
    issues, drawn_issues = [], {}
    for i, r in enumerate(m["label_issues"].get("top", []) or []):
        sid = r.get("site_id")
        if sid is None:
            continue
        who = r.get("labeller_id")
        if (sid, who) not in drawn_issues:  # one site and labeller: the same panels for each of its issues
            drawn_issues[sid, who] = panels(
                f"thumbs/issues/{sid}/{who}",
                previous("issues", sid, who),
                sid,
                who=who,
                overlays={
                    "issue": (
                        rr.upstream_key("label_issues", sid),
                        lambda sid=sid, who=who: rows.issues(sid, who),
                    )
                },
                stem=safe_name(f"{sid}/issue/{who}"),  # not the riskiest panels' file names
            )
        p = drawn_issues[sid, who]
        if p:
            issues.append({**p, "rank": i + 1, "labeller_id": r.get("labeller_id")})
    pseudo = []
    pl = art.site_rows("pseudo_labels", examples)
    for sid in examples:
        over, has = [], pl is not None and "geometry" in pl and "site_id" in pl
        if has:
            g = pl[pl["site_id"].astype(str) == sid]
            g = g[g["kept"].astype(bool)] if "kept" in g else g
            cls = g["class"] if "class" in g else pd.Series([None] * len(g), index=g.index)
            over = list(zip(cls, g["geometry"], strict=True))
        path = art.raster_path("pseudo_probabilities", sid)
        p = panels(
            f"thumbs/pseudo/{sid}",
            previous("pseudo", sid),
            sid,
            who="",
            overlays={"pseudo": (None, lambda over=over: over)} if has else {},
            heat=("probability", "pseudo_labels", path, p_field, 1.0, "viridis"),
        )
        if p:
            pseudo.append(p)
    return {"riskiest": riskiest, "issues": issues, "pseudo": pseudo}


class _SiteRows:
    """Polygons of the sites the panels may draw, each table read (for all those sites at once) the first
    time a panel needs it."""

    def __init__(self, art, label_sites: list[str], riskiest: list[str], issue_rows: list[dict]):
        self.art, self.label_sites, self.riskiest = art, label_sites, riskiest
        self.issue_sites = [r["site_id"] for r in issue_rows]
        self._labels = self._cons = self._issues = None

    def labels(self, site_id: str) -> pd.DataFrame:
        if self._labels is None:
            lab = self.art.site_rows("labels", self.label_sites)
            self._labels = (lab.iloc[:0], {k: g for k, g in lab.groupby("site_id")} if len(lab) else {})
        empty, by_site = self._labels
        return by_site.get(site_id, empty)

    def consensus(self, site_id: str) -> list:
        if self._cons is None:
            cons = self.art.site_rows("consensus_labels", self.riskiest)
            self._cons = {k: g for k, g in cons.groupby("site_id")} if len(cons) else {}
        c = self._cons.get(site_id)
        return [] if c is None else list(zip(c["class"], c["geometry"], strict=True))

    def issues(self, site_id: str, who: str | None) -> list:
        if self._issues is None:
            attrs = self.art.attributes("label_issues")
            has = attrs is not None and "site_id" in attrs and self.issue_sites
            self._issues = (self.art.site_rows("label_issues", self.issue_sites) if has else None,)
        (li_rows,) = self._issues
        return [] if li_rows is None else issue_geometries(self.art, site_id, who, li_rows)


def _shapes(pairs) -> list:
    """(label, geometry) pairs as keyable parts: the label as text ('' for none) and the geometry's WKB."""
    return [
        ("" if lab is None or lab != lab else str(lab), b"" if g is None else shapely.to_wkb(g))
        for lab, g in pairs
    ]


def _band_range(tiles: pd.DataFrame) -> tuple | None:
    """Region-wide stretch: per band, the median over tiles of each tile's 2nd and 98th percentile."""
    if not len(tiles):
        return None
    n = len(tiles["band_names"].iloc[0])
    lo = [float(np.nanmedian([v[i] for v in tiles["p02"]])) for i in range(n)]
    hi = [float(np.nanmedian([v[i] for v in tiles["p98"]])) for i in range(n)]
    return lo, hi
