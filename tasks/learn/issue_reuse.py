"""Incremental reprocessing of the ``label_issues`` stage: what each site's results are keyed by, the
per-site histograms kept in ``label_issue_stats``, carrying the previous fit, and taking over unchanged
sites' rows from the previous version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.learn.issue_parts import PreviousParts, read_previous
from tasks.learn.issue_sites import SiteWork
from tasks.learn.pixel_issues import IssueParams, PixelCL, PixelStats, fit_pixel_cl, fit_summary
from tasks.store.artifacts import file_hash
from tasks.store.reuse import (
    Reuse,
    carry_close,
    code_key,
    content_key,
    previous_rows,
    read_keys,
)


def key_params(params: IssueParams, reference_labellers: Sequence[str]) -> dict:
    """Parameters a site's results depend on (batching, the carry tolerance and the stats file layout
    change no result)."""
    out = params.model_dump(mode="json", exclude={"batch_size", "carry_close", "stats_part_sites"})
    return out | {"reference_labellers": sorted(map(str, reference_labellers))}


def raster_part(upstream: Mapping[str, tuple[str, str]], site_id: str, path: str | None) -> str:
    """What a site's raster input contributes to a key: the producing stage's unit key when it wrote one,
    else the file's content hash; 'absent' without a file."""
    if path is None:
        return "absent"
    if site_id in upstream:
        return "key:" + upstream[site_id][0]
    return "file:" + file_hash(path)


def input_keys(
    work: list[SiteWork],
    version_dir: Path,
    source: str,
    label_keys: Mapping[str, str],
    params: IssueParams,
    reference_labellers: Sequence[str],
) -> dict[str, str]:
    """site_id -> key of everything its histogram and issues read: the consensus raster, the probability
    raster (or array), the site's labels and assignments, parameters and code."""
    consensus_keys, train_keys = read_keys(version_dir, "consensus"), read_keys(version_dir, "train")
    common = (source, key_params(params, reference_labellers), code_key("tasks.learn", "tasks.store"))
    out = {}
    for w in work:
        cons = raster_part(consensus_keys, w.site_id, w.consensus_path)
        if w.probs is not None:
            prob = content_key(np.asarray(w.probs))
        elif w.prob_kind == "consensus":
            prob = raster_part(consensus_keys, w.site_id, w.prob_path)
        else:
            prob = raster_part(train_keys, w.site_id, w.prob_path)
        out[w.site_id] = content_key("label_issues/input", cons, prob, label_keys.get(w.site_id), *common)
    return out


def choose_fit(
    total: PixelStats, previous: tuple[str, int, bytes, bytes] | None, reuse: Reuse, params: IssueParams
) -> tuple[PixelStats, PixelCL, bool]:
    """(pooled histogram in use, its fit, carried?). Without refit the previous version's pooled
    histogram stays in use while its fit is within ``carry_close`` of the refit (``fit_summary``)."""
    fresh = fit_pixel_cl(total, params.filter_by)
    if reuse.refit or previous is None or previous[1] != params.n_bins:
        return total, fresh, False
    old_stats = PixelStats.decode(params.n_bins, previous[2], previous[3])
    old = fit_pixel_cl(old_stats, params.filter_by)
    _, changed = carry_close({"fit": fit_summary(fresh)}, {"fit": fit_summary(old)}, params.carry_close)
    return (total, fresh, False) if changed else (old_stats, old, True)


def previous_site_rows(
    reuse: Reuse, li_uri: str, ai_uri: str, scored: list[SiteWork], reused: set[str]
) -> tuple[PreviousParts | None, pd.DataFrame | None, set[str]]:
    """What the new version takes over from the previous one for the reusable scored sites: their
    label_issues rows (light columns and the parts to stream them from, ``read_previous``), their
    assignment_issues rows, and the reusable units left once sites whose rows are missing, incomplete,
    in another CRS than the site's grid now, or in a part that cannot be streamed are dropped
    (recomputed)."""
    ids = sorted(reused & {w.site_id for w in scored})
    if not ids:
        return None, None, reused
    old_ai = previous_rows(reuse, ai_uri, ids)
    folder = reuse.previous / li_uri if reuse.previous is not None else None
    if old_ai is None or folder is None or not folder.is_dir():
        return None, None, reused - set(ids)
    old = read_previous(folder, ids)
    light = old.light
    have = old_ai.groupby("site_id")["labeller_id"].agg(lambda s: sorted(map(str, s))).to_dict()
    crs = {w.site_id: w.grid.crs for w in scored}
    wrong_crs = set(light.loc[light["crs"] != light["site_id"].map(crs), "site_id"]) if len(light) else set()
    ok = {
        w.site_id
        for w in scored
        if w.site_id in ids
        and have.get(w.site_id) == sorted(w.labellers)
        and w.site_id not in wrong_crs | old.unusable
    }
    old.light = light[light["site_id"].isin(ok)].reset_index(drop=True)
    return old, old_ai[old_ai["site_id"].isin(ok)], reused - (set(ids) - ok)
