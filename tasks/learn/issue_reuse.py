"""Incremental reprocessing of the ``label_issues`` stage: what each site's results are keyed by, the
per-site histograms kept in ``label_issue_stats``, carrying the previous fit, and taking over unchanged
sites' rows from the previous version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.learn.issue_ranking import ISSUE_COLUMNS
from tasks.learn.issue_sites import SiteWork
from tasks.learn.pixel_issues import IssueParams, PixelCL, PixelStats, fit_pixel_cl, fit_summary
from tasks.store.artifacts import CARRIED, CarriedRows, file_hash, read_carried
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
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, CarriedRows | None, set[str]]:
    """The previous version's label_issues and assignment_issues rows of the reusable scored sites, and
    the reusable units left once sites whose rows are missing, incomplete or in another CRS than the
    site's grid now are dropped (recomputed). The label_issues rows come as ``read_carried`` gives them
    (geometry left as written, for ``write_table`` to copy); rows it cannot carry (a part it cannot
    filter) come decoded, as fresh rows do."""
    ids = sorted(reused & {w.site_id for w in scored})
    if not ids:
        return None, None, None, reused
    old_ai = previous_rows(reuse, ai_uri, ids)
    old_li, carried = _previous_issue_rows(reuse, li_uri, ids)
    if old_ai is None or old_li is None:
        return None, None, None, reused - set(ids)
    have = old_ai.groupby("site_id")["labeller_id"].agg(lambda s: sorted(map(str, s))).to_dict()
    crs = {w.site_id: w.grid.crs for w in scored}
    wrong_crs = (
        set(old_li.loc[old_li["crs"] != old_li["site_id"].map(crs), "site_id"]) if len(old_li) else set()
    )
    ok = {
        w.site_id
        for w in scored
        if w.site_id in ids and have.get(w.site_id) == sorted(w.labellers) and w.site_id not in wrong_crs
    }
    old_ai = old_ai[old_ai["site_id"].isin(ok)]
    old_li = old_li[old_li["site_id"].isin(ok)] if len(old_li) else old_li
    if len(old_li) == 0:
        old_li = pd.DataFrame(columns=[*ISSUE_COLUMNS, CARRIED])
    return old_li, old_ai, carried, reused - (set(ids) - ok)


def _previous_issue_rows(
    reuse: Reuse, uri: str, ids: list[str]
) -> tuple[pd.DataFrame | None, CarriedRows | None]:
    path = reuse.previous / uri if reuse.previous is not None else None
    if path is None or not path.is_dir():
        return None, None
    try:
        return read_carried(path, filters=[("site_id", "in", ids)])
    except (pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError):  # e.g. an untyped empty part
        old = previous_rows(reuse, uri, ids)
        return (None, None) if old is None else (old.assign(**{CARRIED: -1}), None)
