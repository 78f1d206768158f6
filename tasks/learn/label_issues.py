"""The ``label_issues`` stage: pixel confident learning over every crowd assignment, ranked for review.

Two passes over batches of sites, fanned out with ``dask.delayed`` on the active scheduler: (1) a
(given class x p(field)) histogram per batch, summed and fitted once (thresholds pooled over all sites
and labellers); (2) per assignment, flagged pixels -> regions -> issues. Batches read their own rasters,
so memory is O(batch). See docs/label_issues.md for the method and the tables.

Incremental: each site's histogram (``label_issue_stats``) and issue rows are keyed by their inputs, so a
reprocess reads only the sites whose inputs (or the fit they used) changed; ranks are always redone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.catalog import Catalog
from tasks.learn.issue_parts import LIGHT, StagedIssues, stage_rows, staging_folder, write_parts
from tasks.learn.issue_ranking import gold_records, rank_assignments, rank_tables, score_tables
from tasks.learn.issue_reuse import choose_fit, input_keys, previous_site_rows
from tasks.learn.issue_sites import (
    SiteWork,
    build_work,
    light_batches,
    read_site_probabilities,
    site_arrays,
    with_geometries,
)
from tasks.learn.issue_stats import PreviousStats, StagedHists, stage_hists, write_stats
from tasks.learn.pixel_issues import (
    KINDS,
    IssueParams,
    PixelCL,
    PixelStats,
    assignment_regions,
    fit_pixel_cl,
)
from tasks.memory import releasing_memory
from tasks.store.artifacts import read_table, write_table
from tasks.store.errors import InputError
from tasks.store.grid import SiteGrid
from tasks.store.reuse import (
    Reuse,
    content_key,
    recorded_label_keys,
    reuse_counts,
    site_label_keys,
    write_keys,
)
from tasks.store.stage_result import StageResult

STAGE = "label_issues"
OOS_URI = "oos_probabilities"
STATS_URI = "label_issue_stats"


@dataclass
class LabelIssuesResult:
    label_issues: pd.DataFrame
    assignment_issues: pd.DataFrame
    model: PixelCL
    notes: list[str] = field(default_factory=list)


@dataclass
class LabelIssuesStageResult(StageResult):
    """Artifact records of the label_issues stage."""


def params_from_catalog(catalog: Catalog) -> IssueParams:
    overrides = dict(catalog.settings.learn.get("label_issues", {}) or {})
    return IssueParams(**overrides)


def site_stats(w: SiteWork, params: IssueParams) -> PixelStats:
    """Pass 1 for one site: the (given class x p(field) bin) histogram of its crowd assignments."""
    stats = PixelStats.zeros(params.n_bins)
    (w,) = with_geometries([w])
    bins, _, ids = site_arrays(w, params)
    for raster in ids.values():
        stats.add(bins, (raster > 0).astype(np.int8))
    return stats


@releasing_memory  # a Dask task: hand its freed pages back, so the worker tracks the current batch
def site_stats_batch(
    batch: list[SiteWork], params: IssueParams, staging: str | None = None, index: int = 0
) -> tuple[PixelStats, dict[str, str]]:
    """Pass 1: the batch's summed histogram; with ``staging``, each site's histogram (sparse bytes, see
    ``PixelStats.encode``) written to piece ``index`` there (site -> piece), not returned: at 100x the demo
    the sites' histograms, held by the workers and then by the stage task, were 1.36 GB."""
    total, per_site = PixelStats.zeros(params.n_bins), {}
    for w in with_geometries(batch):
        st = site_stats(w, params)
        total = total + st
        if staging is not None:
            per_site[w.site_id] = (*st.encode(), int(st.hist.sum()))
    return total, stage_hists(per_site, staging, index) if staging is not None else {}


def collect_stats(
    parts: list[list[SiteWork]], params: IssueParams, staging: Path | None = None
) -> tuple[PixelStats, StagedHists]:
    """Pass 1 over batches on the active Dask scheduler: the pooled histogram, and with ``staging`` each
    site's, staged there."""
    where = None if staging is None else str(staging)
    outs = dask.compute(*[dask.delayed(site_stats_batch)(b, params, where, k) for k, b in enumerate(parts)])
    total = reduce(PixelStats.__add__, (o[0] for o in outs), PixelStats.zeros(params.n_bins))
    return total, StagedHists({sid: piece for o in outs for sid, piece in o[1].items()})


def collect_issues(
    parts: list[list[SiteWork]], model: PixelCL, params: IssueParams
) -> tuple[list[dict], list[dict]]:
    """Pass 2 over batches on the active Dask scheduler: unranked issue records and summaries."""
    outs = dask.compute(*[dask.delayed(issues_batch)(b, model, params) for b in parts])
    return [r for o in outs for r in o[0]], [s for o in outs for s in o[1]]


def issues_batch(batch: list[SiteWork], model: PixelCL, params: IssueParams) -> tuple[list[dict], list[dict]]:
    """Pass 2: issue records and one summary row per assignment (unranked, geometry in native CRS)."""
    issues, summaries = [], []
    for w in with_geometries(batch):
        bins, cons, ids = site_arrays(w, params)
        area = abs(w.grid.transform[0] * w.grid.transform[4])
        for lid, raster in ids.items():
            recs, summary = assignment_regions(bins, raster, cons, model, params, w.grid.affine, area)
            names = w.labellers[lid][0]
            counts = {k: 0 for k in KINDS[:4]}
            for k, r in enumerate(recs):
                for kind, n in (r.get("regions") or {r["kind"]: 1}).items():
                    counts[kind] = counts.get(kind, 0) + n
                poly = r.pop("polygon")
                r.update(
                    site_id=w.site_id,
                    labeller_id=lid,
                    issue_id=f"{w.site_id}/{lid}/{k:04d}",
                    labeller_polygon_id=names[poly - 1] if poly else None,
                    consensus_independent=w.consensus_independent,
                    crs=w.grid.crs,
                )
                issues.append(r)
            summary.update(
                site_id=w.site_id,
                labeller_id=lid,
                n_issues=len(recs),
                consensus_independent=w.consensus_independent,
                **{f"n_{k}": counts.get(k, 0) for k in KINDS[:4]},
            )
            summaries.append(summary)
    return issues, summaries


@releasing_memory
def staged_issues_batch(
    batch: list[SiteWork],
    model: PixelCL,
    params: IssueParams,
    labeller_quality: pd.DataFrame | None,
    source: str,
    staging: str,
    index: int,
) -> tuple[StagedIssues, pd.DataFrame]:
    """Pass 2 for a stage run: the batch's issue rows scored and written to ``staging`` (only their light
    columns come back, so the task running the stage never holds the region's polygons) and its
    assignment summaries."""
    issues, summaries = issues_batch(batch, model, params)
    li, ai = score_tables(issues, summaries, labeller_quality, source, model.thresholds, params)
    return stage_rows(li, staging, index), ai


def stage_issues(
    parts: list[list[SiteWork]],
    model: PixelCL,
    params: IssueParams,
    labeller_quality: pd.DataFrame | None,
    source: str,
    staging: Path,
    start: int = 0,
) -> tuple[list[StagedIssues], list[pd.DataFrame]]:
    """``staged_issues_batch`` over batches on the active Dask scheduler (piece numbers from ``start``)."""
    outs = dask.compute(
        *[
            dask.delayed(staged_issues_batch)(b, model, params, labeller_quality, source, str(staging), k)
            for k, b in enumerate(parts, start)
        ]
    )
    return [o[0] for o in outs], [o[1] for o in outs]


def run_label_issues(
    work: list[SiteWork],
    params: IssueParams | None = None,
    labeller_quality: pd.DataFrame | None = None,
    batch_size: int = 100,
    source: str = "oos",
) -> LabelIssuesResult:
    """Both passes on the active Dask scheduler; sites without probabilities are skipped (noted)."""
    params = params or IssueParams()
    notes = []
    if missing := [w.site_id for w in work if not w.has_probabilities]:
        notes.append(
            f"{len(missing)} labelled site(s) without probabilities skipped: {', '.join(missing[:10])}"
        )
    work = [w for w in work if w.has_probabilities]
    parts = _batches(work, params.batch_size or batch_size)
    total, _ = collect_stats(parts, params)
    model = fit_pixel_cl(total, params.filter_by)
    notes += _empty_class_notes(total)
    issues, summaries = collect_issues(parts, model, params)
    li, ai = rank_tables(issues, summaries, labeller_quality, source, model.thresholds, params)
    return LabelIssuesResult(li, ai, model, notes)


def _batches(work: list[SiteWork], size: int) -> list[list[SiteWork]]:
    return [work[i : i + size] for i in range(0, len(work), size)]


def _empty_class_notes(stats: PixelStats) -> list[str]:
    return [
        f"no crowd pixel is labelled {('background', 'field')[k]}: nothing is flagged as it"
        for k in np.flatnonzero(stats.hist.sum(axis=1) == 0)
    ]


def load_probabilities(
    catalog: Catalog, version_dir: str | Path, site_ids: Sequence[str] | None = None, source: str = "auto"
) -> tuple[dict[str, np.ndarray], str]:
    """site_id -> (bands, H, W) probabilities and the source used ("oos" or the "consensus" stand-in).

    "auto" reads ``oos_probabilities/<site_id>.tif`` when that folder holds any raster, else consensus band 1.
    """
    version_dir = Path(version_dir)
    sites = read_table(version_dir / catalog.datasets["sites"].uri)
    grids = {str(r["site_id"]): SiteGrid.from_row(r) for r in sites.to_dict("records")}
    folder, kind = _prob_folder(catalog, version_dir, source)
    out = {}
    for sid in site_ids if site_ids is not None else sorted(grids):
        path = folder / f"{sid}.tif"
        if path.is_file():
            out[sid] = read_site_probabilities(path, grids[sid], kind)
    return out, kind


def _prob_folder(catalog: Catalog, version_dir: Path, source: str) -> tuple[Path, str]:
    entry = catalog.datasets.get("oos_probabilities")
    oos = version_dir / (entry.uri if entry is not None else OOS_URI)
    has_oos = oos.is_dir() and any(oos.glob("*.tif"))
    if source == "oos" and not has_oos:
        raise InputError(oos, "no out-of-sample probabilities; run the training stage or use source 'auto'")
    if source == "oos" or (source == "auto" and has_oos):
        return oos, "oos"
    return version_dir / catalog.datasets["consensus_rasters"].uri, "consensus"


def _label_values(labels: pd.DataFrame | None, labels_path: Path) -> set[str]:
    """The distinct polygon classes: of ``labels``, or read part by part (one column) from the table."""
    if labels is not None:
        return set(labels["label"].dropna().astype(str)) if "label" in labels else set()
    values: set[str] = set()
    for part in sorted(labels_path.glob("*.parquet")) if labels_path.is_dir() else [labels_path]:
        if "label" in pq.read_schema(part).names:
            values |= {str(v) for v in pc.unique(pq.read_table(part, columns=["label"])["label"]).drop_null()}
    return values


def run_label_issues_stage(
    catalog: Catalog,
    version_dir: str | Path,
    reuse: Reuse | None = None,
    *,
    probabilities: Mapping[str, np.ndarray] | None = None,
) -> LabelIssuesStageResult:
    """Read the ingest and consensus artifacts of ``version_dir``, write ``label_issues``,
    ``assignment_issues`` and ``label_issue_stats`` next to them. ``probabilities`` (site_id -> array)
    overrides the files.

    Incremental (``reuse``): a site's histogram is taken from the previous version's ``label_issue_stats``
    when its input key (consensus and probability rasters, labels, parameters, code) is unchanged; the fit
    is redone from the pooled histogram (or, without refit, the previous one is carried while the refit
    moves by at most ``carry_close``); a site's issue rows are taken over when its unit key (inputs, the
    fit in use, its labellers' gold records) is unchanged; ranks are recomputed over all rows. Taken-over
    issue rows keep their geometry as written (``read_carried``: never decoded and encoded again), and
    ``write_table`` validates only their new ranks (the rest was validated when written).
    """
    version_dir = Path(version_dir)
    reuse = reuse if reuse is not None else Reuse()
    ds = catalog.datasets
    params = params_from_catalog(catalog)
    t0 = time.perf_counter()
    sites = read_table(version_dir / ds["sites"].uri)
    labels_path, a_path = version_dir / ds["labels"].uri, version_dir / ds["assignments"].uri
    assignments = read_table(a_path)
    # With the sites' label keys recorded, the polygons stay on disk, unread here: batches read their own.
    label_keys = recorded_label_keys(version_dir, assignments["site_id"], labels_path, a_path)
    labels = read_table(labels_path) if label_keys is None else None
    lq_path = version_dir / ds["labeller_quality"].uri
    lq = read_table(lq_path) if lq_path.exists() else None
    refs = catalog.settings.reference_labellers
    work = build_work(
        sites, labels, assignments, refs, labels_path=None if labels is not None else labels_path
    )
    cons_dir = version_dir / ds["consensus_rasters"].uri
    if probabilities is None:
        folder, source = _prob_folder(catalog, version_dir, params.probability_source)
    else:
        folder, source = None, "given"
    for w in work:
        cpath = cons_dir / f"{w.site_id}.tif"
        w.consensus_path = str(cpath) if cpath.is_file() else None
        if probabilities is not None:
            w.probs = probabilities.get(w.site_id)
        elif (folder / f"{w.site_id}.tif").is_file():
            w.prob_path, w.prob_kind = str(folder / f"{w.site_id}.tif"), source
    timings = {"load": time.perf_counter() - t0}

    t1 = time.perf_counter()
    if label_keys is None:
        label_keys = site_label_keys(labels, assignments)
    inputs = input_keys(work, version_dir, source, label_keys, params, refs)
    timings["keys"] = time.perf_counter() - t1
    notes = []
    if missing := [w.site_id for w in work if not w.has_probabilities]:
        notes.append(
            f"{len(missing)} labelled site(s) without probabilities skipped: {', '.join(missing[:10])}"
        )
    scored = [w for w in work if w.has_probabilities]
    size = params.batch_size or catalog.settings.ingest.batch_size

    stats_uri = ds["label_issue_stats"].uri if "label_issue_stats" in ds else STATS_URI
    stats_staging = staging_folder(version_dir, stats_uri)  # pass 1's per-site histograms, until written
    try:
        # pass 1: per-site histograms (unchanged sites from the previous version), pooled, fitted
        t2 = time.perf_counter()
        prev_stats = PreviousStats.read(reuse, stats_uri)
        scored_inputs = {w.site_id: inputs[w.site_id] for w in scored}
        kept = prev_stats.reusable(scored_inputs, params.n_bins)
        todo = [w for w in scored if w.site_id not in kept]
        batches = light_batches(_batches(todo, size), labels_path)
        fresh_total, site_hists = collect_stats(batches, params, stats_staging)
        total = prev_stats.total_with(kept, fresh_total, params.n_bins)
        notes += _empty_class_notes(total)
        pooled, model, carried = choose_fit(total, prev_stats.pooled, reuse, params)
        if carried:
            notes.append(
                f"label_issues kept the previous fit: the refit moved thresholds and flag cut-offs by <= "
                f"{params.carry_close} (carry_close; a refresh with refit refits)"
            )
        timings["stats"] = time.perf_counter() - t2

        if source == "consensus":
            notes.append("label_issues used the consensus probability as a stand-in for model probabilities")
        no_cons = [w.site_id for w in work if w.consensus_path is None and w.has_probabilities]
        if no_cons:
            notes.append(
                f"{len(no_cons)} site(s) without a consensus raster: footprint = all predicted pixels"
            )
        known = set(catalog.settings.label_classes)
        if known:
            odd = sorted(_label_values(labels, labels_path) - known)
            if odd:
                notes.append(f"polygon classes outside label_classes counted as field: {', '.join(odd[:10])}")

        # pass 2: issue rows per site (unchanged units from the previous version), then ranks over all
        t3 = time.perf_counter()
        gold = gold_records(lq)
        fit_key = content_key(model.filter_by, model.thresholds, model.flag_lut)
        keys = {
            w.site_id: content_key(
                STAGE, inputs[w.site_id], fit_key, [(lid, gold.get(lid)) for lid in sorted(w.labellers)]
            )
            for w in work
        }
        reused = reuse.reusable(STAGE, keys)
        li_uri, ai_uri = ds["label_issues"].uri, ds["assignment_issues"].uri
        staging = staging_folder(version_dir, li_uri)
        try:
            # the previous rows are read while the changed sites are computed; a site whose rows turn out to
            # be missing there (or not streamable) is computed after
            with ThreadPoolExecutor(1) as pool:
                previous = pool.submit(previous_site_rows, reuse, li_uri, ai_uri, scored, reused)
                changed = [w for w in scored if w.site_id not in reused]
                batches = light_batches(_batches(changed, size), labels_path)
                staged, ai_parts = stage_issues(batches, model, params, lq, source, staging)
                old, old_ai, reused = previous.result()
            done = {w.site_id for w in changed}
            if more := [w for w in scored if w.site_id not in reused and w.site_id not in done]:
                batches = light_batches(_batches(more, size), labels_path)
                extra = stage_issues(batches, model, params, lq, source, staging, start=len(staged))
                staged, ai_parts = staged + extra[0], ai_parts + extra[1]
            lights = [s.light for s in staged] + ([old.light] if old is not None else [])
            light = pd.concat(
                [x for x in lights if len(x)] or [pd.DataFrame(columns=LIGHT)], ignore_index=True
            )
            ai_frames = [a for a in [*ai_parts, old_ai] if a is not None and len(a)]
            ai = pd.concat(ai_frames, ignore_index=True) if ai_frames else score_tables([], [], lq, source)[1]
            ai = rank_assignments(ai, light)
            timings["issues"] = time.perf_counter() - t3

            t4 = time.perf_counter()
            # the big table's write (mostly Parquet encoding, which frees the GIL) overlaps the others'
            with ThreadPoolExecutor(1) as pool:
                li_done = pool.submit(write_parts, version_dir / li_uri, light, staged, old)
                ai_record = write_table("assignment_issues", ai, version_dir / ai_uri)
                stats_record = write_stats(
                    version_dir / stats_uri,
                    stats_uri,
                    scored_inputs,
                    site_hists,
                    prev_stats,
                    pooled,
                    total,
                    params.n_bins,
                    params.stats_part_sites,
                )
                artifacts = {
                    "label_issues": li_done.result(),
                    "assignment_issues": ai_record,
                    "label_issue_stats": stats_record,
                }
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        shutil.rmtree(stats_staging, ignore_errors=True)
    artifacts[f"reuse_keys/{STAGE}"] = write_keys(version_dir, STAGE, keys, reused, reuse)
    timings["write"] = time.perf_counter() - t4
    counts = {
        "label_issues": len(light),
        "issue_assignments": len(ai),
        **reuse_counts(STAGE, len(keys), len(reused)),
        "label_issues_stats_recomputed": len(todo),
        "label_issues_fit_carried": int(carried),
    }
    return LabelIssuesStageResult(artifacts, timings, counts, notes)
