"""Orchestration-free API of the consensus stage.

The caller does the I/O and the fan-out (Dask): every ``*_batch`` function is pure, takes a list of
``SiteInput`` and returns small picklable tables; ``run_consensus_local`` chains them in-process and is the
reference the Dask flow must reproduce:

    site_inputs -> quality_batch* -> labeller_quality -> pattern_counts_batch* -> sum -> fit_pooled_em
    -> labeller_quality(latent) -> consensus_batch*
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely
from shapely.geometry.base import BaseGeometry

from tasks.consensus.em import EMModel, fit_em
from tasks.consensus.labellers import labeller_quality
from tasks.consensus.measures import assignment_quality_rows
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import (
    PATTERN_COLUMNS,
    counts_frame,
    empty_counts,
    site_counts_frame,
    site_patterns,
    sum_counts,
)
from tasks.consensus.posterior import SITE_CONSENSUS_COLUMNS, consensus_site, site_votes
from tasks.consensus.site import SiteInput, empty_labels, grid_box
from tasks.store.grid import SiteGrid, transformer

__all__ = [
    "ASSIGNMENT_QUALITY_COLUMNS",
    "CONSENSUS_LABEL_COLUMNS",
    "ConsensusBatchResult",
    "ConsensusResult",
    "consensus_batch",
    "fit_pooled_em",
    "labeller_quality",
    "pattern_counts_batch",
    "quality_batch",
    "run_consensus_local",
    "site_inputs",
    "site_pattern_counts",
    "site_voters",
]

ASSIGNMENT_QUALITY_COLUMNS = [
    "site_id", "labeller_id", "reference_id", "completed_at",
    "lacuna_area", "lacuna_n", "lacuna_edge", "lacuna_categorical", "lacuna_score",
    "iou", "field_skill", "nofield_skill", "tss", "boundary_precision", "boundary_recall", "boundary_f",
    "tp_m2", "fp_m2", "fn_m2", "tn_m2", "footprint_m2", "n_ref_polygons", "n_lab_polygons", "n_matched",
]  # fmt: skip
CONSENSUS_LABEL_COLUMNS = ["polygon_id", "site_id", "class", "confidence", "n_pixels", "crs", "geometry"]


# ----------------------------------------------------------------------------------------------- inputs
def _footprint(geom: BaseGeometry | None, src_crs, grid: SiteGrid) -> BaseGeometry:
    """Site footprint in the native CRS: the 4326 geometry reprojected and cut to the grid box.

    Reprojection noise would leave slivers, so a footprint covering >= 99.9 % of the box is the box itself.
    """
    box = grid_box(grid)
    if geom is None or geom.is_empty:
        return box
    if src_crs is not None and pyproj.CRS.from_user_input(src_crs) != pyproj.CRS.from_user_input(grid.crs):
        tr = transformer(src_crs, grid.crs)
        geom = shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    fp = shapely.intersection(shapely.make_valid(geom), box)
    if fp.is_empty or fp.area >= 0.999 * box.area:
        return box
    return fp


def site_inputs(
    sites_df: pd.DataFrame,
    labels_gdf: pd.DataFrame,
    assignments_df: pd.DataFrame,
    reference_labellers: Iterable[str] = (),
) -> Iterator[SiteInput]:
    """Group the tables by site; yields sites with at least one completed assignment, in sites_df order.

    ``labels_gdf`` geometries must be in each site's native CRS (the per-CRS parts concatenated);
    ``sites_df`` geometry is taken to be in its GeoDataFrame CRS (EPSG:4326 when unset).
    """
    refs = {str(r) for r in reference_labellers}
    a = assignments_df.copy()
    a["site_id"] = a["site_id"].astype(str)
    a["labeller_id"] = a["labeller_id"].astype(str)
    flag = a["is_reference"].fillna(False).astype(bool) if "is_reference" in a.columns else False
    a["is_reference"] = flag | a["labeller_id"].isin(refs)
    a_by_site = dict(tuple(a.groupby("site_id", sort=False)))
    lab = labels_gdf if labels_gdf is not None else empty_labels()
    lab = pd.DataFrame(lab).copy()
    if len(lab):
        lab["site_id"] = lab["site_id"].astype(str)
        lab["labeller_id"] = lab["labeller_id"].astype(str)
    l_by_site = dict(tuple(lab.groupby("site_id", sort=False))) if len(lab) else {}
    src_crs = getattr(sites_df, "crs", None) or "EPSG:4326"
    has_geom = "geometry" in sites_df.columns
    for row in sites_df.to_dict("records"):
        sid = str(row["site_id"])
        sa = a_by_site.get(sid)
        if sa is None or not (sa["status"].astype(str) == "completed").any():
            continue
        grid = SiteGrid.from_row(row)
        fp = _footprint(row.get("geometry") if has_geom else None, src_crs, grid)
        labels = l_by_site.get(sid, empty_labels())
        yield SiteInput(grid=grid, footprint=fp, labels=labels, assignments=sa, role=row.get("role"))


def site_voters(
    assignments_df: pd.DataFrame, reference_labellers: Iterable[str] = ()
) -> dict[str, tuple[str, ...]]:
    """``SiteInput.voters`` of every site with a completed assignment, from the assignments alone (no
    footprints, no polygons): what a site's consensus key needs when its results are reused."""
    refs = {str(r) for r in reference_labellers}
    a = assignments_df[assignments_df["status"].astype(str) == "completed"]
    if a.empty:
        return {}
    flag = a["is_reference"] if "is_reference" in a.columns else pd.Series(False, index=a.index)
    a = pd.DataFrame(
        {
            "site_id": a["site_id"].astype(str),
            "labeller_id": a["labeller_id"].astype(str),
            "completed_at": a["completed_at"],
            "ref": flag.fillna(False).astype(bool).to_numpy() | a["labeller_id"].astype(str).isin(refs),
        }
    )
    # as SiteInput._completed: a labeller assigned twice keeps the latest completion (NaT sorts first)
    a = a.sort_values(["completed_at", "labeller_id"], na_position="first", kind="stable")
    a = a.drop_duplicates(["site_id", "labeller_id"], keep="last")
    out = {str(s): () for s in a["site_id"].unique()}
    for sid, g in a[~a["ref"]].groupby("site_id", sort=False):
        out[str(sid)] = tuple(sorted(g["labeller_id"]))
    return out


def batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------- quality
def quality_batch(batch: Sequence[SiteInput], params: ConsensusParams) -> pd.DataFrame:
    """assignment_quality rows of the gold sites in ``batch`` (every non-reference completed assignment)."""
    rows = []
    for site in batch:
        rows.extend(assignment_quality_rows(site, params))
        site.release()
    df = pd.DataFrame(rows, columns=ASSIGNMENT_QUALITY_COLUMNS)
    df["completed_at"] = pd.to_datetime(df["completed_at"], utc=True)
    return df


# ------------------------------------------------------------------------------------------------- EM
def pattern_counts_batch(batch: Sequence[SiteInput], params: ConsensusParams) -> pd.DataFrame:
    """Vote-pattern counts of the batch (sum the batches with ``sum_counts`` before fitting)."""
    items = []
    for site in batch:
        sv = site_votes(site, params)
        if sv is not None:
            pats = site_patterns(sv.codes, sv.gold, params.n_classes + 2, sv.zone, with_inverse=False)
            items.append((sv.voters, pats))
        site.release()
    return counts_frame(items)


def site_pattern_counts(batch: Sequence[SiteInput], params: ConsensusParams) -> pd.DataFrame:
    """Vote-pattern counts per site (``site_id`` + ``PATTERN_COLUMNS``, see ``site_counts_frame``).

    Summing the sites' rows (``sum_counts``) gives exactly ``pattern_counts_batch`` (integer counts)."""
    items = []
    for site in batch:
        sv = site_votes(site, params)
        if sv is not None:
            pats = site_patterns(sv.codes, sv.gold, params.n_classes + 2, sv.zone, with_inverse=False)
            items.append((site.site_id, sv.voters, pats))
        site.release()
    return site_counts_frame(items)


def fit_pooled_em(
    counts: pd.DataFrame | Sequence[pd.DataFrame],
    labeller_quality_df: pd.DataFrame | None,
    params: ConsensusParams,
) -> EMModel:
    """One global EM over all counts (a list of batch tables is summed first)."""
    if not isinstance(counts, pd.DataFrame):
        counts = sum_counts(list(counts))
    return fit_em(counts[PATTERN_COLUMNS], labeller_quality_df, params)


# ------------------------------------------------------------------------------------------- consensus
@dataclass
class ConsensusBatchResult:
    """``rasters``: site_id -> (prob, risk) float32 (height, width), NaN outside the footprint."""

    site_consensus: pd.DataFrame
    consensus_labels: gpd.GeoDataFrame
    rasters: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)


def _labels_frame(rows: list[dict]) -> gpd.GeoDataFrame:
    df = pd.DataFrame(rows, columns=CONSENSUS_LABEL_COLUMNS)
    # Sites may differ in CRS: geometries are native, the ``crs`` column says which; the frame has none.
    return gpd.GeoDataFrame(df, geometry="geometry", crs=None)


def consensus_batch(
    batch: Sequence[SiteInput],
    em_model: EMModel | None,
    labeller_quality_df: pd.DataFrame | None,
    params: ConsensusParams,
) -> ConsensusBatchResult:
    """Consensus of every site in ``batch`` with >= 1 non-reference labeller."""
    summaries, polys, rasters, maps = [], [], {}, {}
    for site in batch:
        res = consensus_site(site, em_model, labeller_quality_df, params)
        site.release()
        if res is None:
            continue
        summaries.append(res.summary)
        polys.extend(res.polygons)
        rasters[site.site_id] = (res.prob, res.risk)
        maps[site.site_id] = res.label_map
    return ConsensusBatchResult(
        site_consensus=pd.DataFrame(summaries, columns=SITE_CONSENSUS_COLUMNS),
        consensus_labels=_labels_frame(polys),
        rasters=rasters,
        label_maps=maps,
    )


def merge_batch_results(results: Sequence[ConsensusBatchResult]) -> ConsensusBatchResult:
    rasters, maps = {}, {}
    for r in results:
        rasters.update(r.rasters)
        maps.update(r.label_maps)
    sc = [r.site_consensus for r in results if len(r.site_consensus)]
    cl = [r.consensus_labels for r in results if len(r.consensus_labels)]
    return ConsensusBatchResult(
        site_consensus=pd.concat(sc, ignore_index=True)
        if sc
        else pd.DataFrame(columns=SITE_CONSENSUS_COLUMNS),
        consensus_labels=_labels_frame([]) if not cl else gpd.GeoDataFrame(pd.concat(cl, ignore_index=True)),
        rasters=rasters,
        label_maps=maps,
    )


@dataclass
class ConsensusResult:
    assignment_quality: pd.DataFrame
    labeller_quality: pd.DataFrame
    em_model: EMModel | None
    pattern_counts: pd.DataFrame
    site_consensus: pd.DataFrame
    consensus_labels: gpd.GeoDataFrame
    rasters: dict[str, tuple[np.ndarray, np.ndarray]]
    label_maps: dict[str, np.ndarray]


def run_consensus_local(
    sites_df: pd.DataFrame,
    labels_gdf: pd.DataFrame,
    assignments_df: pd.DataFrame,
    reference_labellers: Iterable[str] = (),
    params: ConsensusParams | None = None,
    batch_size: int = 100,
    inputs: Sequence[SiteInput] | None = None,
) -> ConsensusResult:
    """The whole stage in-process (tests, and the reference for the Dask flow).

    ``inputs`` short-circuits ``site_inputs`` when the caller already built the SiteInputs.
    """
    params = params or ConsensusParams()
    sites = (
        list(inputs)
        if inputs is not None
        else list(site_inputs(sites_df, labels_gdf, assignments_df, reference_labellers))
    )
    parts = batches(sites, batch_size)
    aq = [quality_batch(b, params) for b in parts]
    aq_df = pd.concat(aq, ignore_index=True) if aq else quality_batch([], params)
    lq = labeller_quality(aq_df, params)
    model, counts = None, empty_counts()
    if params.method == "em":
        counts = sum_counts([pattern_counts_batch(b, params) for b in parts])
        model = fit_pooled_em(counts, lq, params)
        lq = labeller_quality(aq_df, params, latent=model.latent_frame())
    merged = merge_batch_results([consensus_batch(b, model, lq, params) for b in parts])
    return ConsensusResult(
        assignment_quality=aq_df,
        labeller_quality=lq,
        em_model=model,
        pattern_counts=counts,
        site_consensus=merged.site_consensus,
        consensus_labels=merged.consensus_labels,
        rasters=merged.rasters,
        label_maps=merged.label_maps,
    )
