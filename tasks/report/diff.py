"""Changes since the previous version: headline deltas, sites whose labels changed, labellers added or gone.

Each version's ``metrics.json`` carries per-site fingerprints of its labels (keys, not rows), so the next
version can diff against it without re-reading old artifacts. A previous version built before the report
stage existed has no ``metrics.json``; its aggregates are then computed from its artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.report.metrics import HEADLINE, num
from tasks.store.reuse import recorded_label_keys, site_label_keys

# What ``fingerprints.site_labels`` holds: ``tasks.store.reuse.site_label_keys``, the key the watcher and
# every stage compare, so the Changes page names exactly the sites a reprocess treated as changed.
# Reports made before it recorded no kind (BLAKE2b digests of another content): those never compare.
FINGERPRINT_KIND = "site_label_keys"
NOT_COMPARED = (
    "The previous version's metrics.json holds per-site label fingerprints of an older kind and its folder "
    "has no usable record of the current kind, so site-level label changes could not be compared this "
    "once; the next version will compare them."
)


def labelled_site_keys(art, sites) -> dict[str, str]:
    """``site_label_keys`` of ``sites`` as ingest recorded them in the version (no polygon is read), or
    computed from the version's tables when that record is missing or was not made from them."""
    sites = sorted({str(s) for s in sites})
    keys = recorded_label_keys(art.dir, sites, art.path("labels"), art.path("assignments"))
    if keys is None:
        keys = site_label_keys(art.table("labels"), art.table("assignments"))
    return {s: keys[s] for s in sites if s in keys}


def fingerprints(art) -> dict:
    """Sites, labellers, and per labelled site (a completed assignment or a polygon) its label key."""
    asg = art.table("assignments")
    done = asg[asg["status"] == "completed"]
    labelled = {
        str(s) for col in (done["site_id"], art.attributes("labels")["site_id"]) for s in col.unique()
    }
    return {
        "sites": sorted(map(str, art.table("sites")["site_id"])),
        "labellers": sorted(map(str, done["labeller_id"].unique())),
        "kind": FINGERPRINT_KIND,
        "site_labels": labelled_site_keys(art, labelled),
    }


def previous_site_labels(prev: dict, prev_art) -> dict[str, str] | None:
    """The previous version's per-site label fingerprints, of this code's kind. A ``metrics.json`` of an
    older kind names the sites that were labelled then; their keys come from that version's own record
    (``prev_art``: its artifacts). None when there is none: its sites cannot be compared."""
    fp = prev.get("fingerprints") or {}
    if fp.get("kind") == FINGERPRINT_KIND:
        return fp.get("site_labels", {})
    if "site_labels" not in fp or prev_art is None:
        return None
    if not fp["site_labels"]:
        return {}  # no site was labelled then
    try:
        return recorded_label_keys(
            prev_art.dir, fp["site_labels"], prev_art.path("labels"), prev_art.path("assignments")
        )
    except OSError:  # its labels or assignments are gone
        return None


def load_metrics(version_dir: Path | None, name: str = "metrics.json") -> dict | None:
    if version_dir is None:
        return None
    p = Path(version_dir) / name
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def changes(cur: dict, prev: dict | None, max_rows: int, prev_art=None) -> dict:
    """What changed since ``prev`` (its metrics); ``prev_art``: its artifacts, read only when its label
    fingerprints are of an older kind."""
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
    p_sites, c_sites = previous_site_labels(prev, prev_art), cf["site_labels"]
    pl, cl = set(pf.get("labellers", [])), set(cf["labellers"])
    out = {
        "previous_version_id": prev.get("version_id"),
        "previous_created_at": prev.get("created_at"),
        "headline": rows,
    }
    if p_sites is None:
        out.update(dict.fromkeys(("n_sites_changed", "n_sites_newly_labelled", "n_sites_no_longer_labelled")))
        out.update({k: [] for k in ("sites_changed", "sites_newly_labelled", "sites_no_longer_labelled")})
        out["site_labels_note"] = NOT_COMPARED
    else:
        changed = sorted(s for s in set(p_sites) & set(c_sites) if p_sites[s] != c_sites[s])
        newly = sorted(set(c_sites) - set(p_sites))
        dropped = sorted(set(p_sites) - set(c_sites))
        out.update(
            n_sites_changed=len(changed),
            n_sites_newly_labelled=len(newly),
            n_sites_no_longer_labelled=len(dropped),
            sites_changed=changed[:max_rows],
            sites_newly_labelled=newly[:max_rows],
            sites_no_longer_labelled=dropped[:max_rows],
        )
    return {
        **out,
        "sites_added": sorted(set(cf["sites"]) - set(pf.get("sites", [])))[:max_rows],
        "sites_removed": sorted(set(pf.get("sites", [])) - set(cf["sites"]))[:max_rows],
        "labellers_added": sorted(cl - pl),
        "labellers_gone": sorted(pl - cl),
    }
