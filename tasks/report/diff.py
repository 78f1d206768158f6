"""Changes since the previous version: headline deltas, sites whose labels changed, labellers added or gone.

Each version's ``metrics.json`` carries per-site fingerprints of its labels (digests, not rows), so the next
version can diff against it without re-reading old artifacts. A previous version built before the report
stage existed has no ``metrics.json``; its aggregates are then computed from its artifacts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import shapely

from tasks.report.metrics import HEADLINE, num


def site_label_digests(labels: pd.DataFrame, assignments: pd.DataFrame) -> dict[str, str]:
    """Per site: BLAKE2b of its completed assignments and polygons (labeller, class, geometry WKB).

    Each part is followed by a unit separator; a site's digest hashes its assignment parts (by labeller)
    then its polygon parts (by polygon id)."""
    parts: dict[str, list[bytes]] = {}

    def text(v) -> bytes:
        return v if isinstance(v, bytes) else str(v).encode()

    done = assignments[assignments["status"] == "completed"].sort_values(["site_id", "labeller_id"])
    cols = [done[c].tolist() for c in ("site_id", "labeller_id", "n_polygons")]
    for sid, lid, n in zip(*cols, strict=True):
        parts.setdefault(str(sid), []).append(b"A\x1f" + text(lid) + b"\x1f" + text(n) + b"\x1f")
    if len(labels):
        lab = labels.sort_values("polygon_id")
        wkb = shapely.to_wkb(lab["geometry"].to_numpy())
        cols = [lab[c].tolist() for c in ("site_id", "labeller_id", "label")]
        for sid, lid, label, w in zip(*cols, wkb.tolist(), strict=True):
            cls = b"" if label is None or label != label else text(label)
            part = b"P\x1f" + text(lid) + b"\x1f" + cls + b"\x1f" + w + b"\x1f"
            parts.setdefault(str(sid), []).append(part)
    return {k: hashlib.blake2b(b"".join(v), digest_size=8).hexdigest() for k, v in sorted(parts.items())}


def fingerprints(art) -> dict:
    asg = art.table("assignments")
    done = asg[asg["status"] == "completed"]
    return {
        "sites": sorted(map(str, art.table("sites")["site_id"])),
        "labellers": sorted(map(str, done["labeller_id"].unique())),
        "site_labels": site_label_digests(art.table("labels"), asg),
    }


def load_metrics(version_dir: Path | None, name: str = "metrics.json") -> dict | None:
    if version_dir is None:
        return None
    p = Path(version_dir) / name
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def changes(cur: dict, prev: dict | None, max_rows: int) -> dict:
    if prev is None:
        return {"previous_version_id": None}
    ph, h = prev.get("headline", {}), cur["headline"]
    rows = []
    for key, label, fmt, better in HEADLINE:
        a, b = ph.get(key), h.get(key)
        if a is None and b is None:
            continue
        delta = num(b - a) if a is not None and b is not None else None
        rows.append(
            {
                "key": key,
                "label": label,
                "format": fmt,
                "better": better,
                "previous": a,
                "current": b,
                "delta": delta,
            }
        )
    pf, cf = prev.get("fingerprints", {}), cur["fingerprints"]
    p_sites, c_sites = pf.get("site_labels", {}), cf["site_labels"]
    changed = sorted(s for s in set(p_sites) & set(c_sites) if p_sites[s] != c_sites[s])
    newly = sorted(set(c_sites) - set(p_sites))
    dropped = sorted(set(p_sites) - set(c_sites))
    pl, cl = set(pf.get("labellers", [])), set(cf["labellers"])
    return {
        "previous_version_id": prev.get("version_id"),
        "previous_created_at": prev.get("created_at"),
        "headline": rows,
        "n_sites_changed": len(changed),
        "n_sites_newly_labelled": len(newly),
        "n_sites_no_longer_labelled": len(dropped),
        "sites_changed": changed[:max_rows],
        "sites_newly_labelled": newly[:max_rows],
        "sites_no_longer_labelled": dropped[:max_rows],
        "sites_added": sorted(set(cf["sites"]) - set(pf.get("sites", [])))[:max_rows],
        "sites_removed": sorted(set(pf.get("sites", [])) - set(cf["sites"]))[:max_rows],
        "labellers_added": sorted(cl - pl),
        "labellers_gone": sorted(pl - cl),
    }
