"""End to end: the refresh flow on real Prefect + a real Dask LocalCluster over a tiny demo region."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from schemas.catalog import load_catalog
from schemas.tables import validate
from tasks.demo import generate_demo_region
from tasks.store.artifacts import geo_parts, read_table
from tasks.store.versions import VersionStore
from tests.crs_spelling import assert_crs_spelled_as_fresh_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory):
    """Generate a tiny region, run the refresh flow twice, return (catalog path, store). Both runs talk to
    one temporary Prefect server, started as a refresh starts it (the second finds it in PREFECT_API_URL):
    one server start (10-25 s) less."""
    from flows.refresh import run_refresh
    from flows.runtime import configure_environment, prefect_api

    root = tmp_path_factory.mktemp("refresh")
    generate_demo_region(root, scale=1, seed=3, sites_per_side=3)
    catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text())
    catalog["root"] = "."
    catalog["settings"]["learn"] = {"steps": 20}  # the flow's wiring is under test, not the model
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    configure_environment(root)
    with prefect_api():
        first = run_refresh(str(root / "data_catalog.yaml"))
        second = run_refresh(str(root / "data_catalog.yaml"))
    return root / "data_catalog.yaml", VersionStore(root), first, second


def test_refresh_publishes_versions_and_moves_latest(refreshed):
    _, store, first, second = refreshed
    assert store.list() == sorted([first["version_id"], second["version_id"]])
    assert store.latest_id() == second["version_id"]
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".draft-")]


def test_every_published_table_matches_its_schema(refreshed):
    catalog_path, store, _, second = refreshed
    cat = load_catalog(catalog_path)
    vdir = store.version_path(second["version_id"])
    manifest = store.manifest(second["version_id"])
    checked = 0
    for name, entry in cat.datasets.items():
        if entry.kind != "artifact" or entry.schema_ref is None or name not in manifest["artifacts"]:
            continue
        df = read_table(vdir / entry.uri)
        assert manifest["artifacts"][name]["rows"] == len(df), name
        if entry.crs == "native":
            for part in geo_parts(df).values():
                validate(entry.schema_ref, part.reset_index(drop=True))
        else:
            validate(entry.schema_ref, df)
        checked += 1
    assert checked >= 10, "ingest and consensus tables are all published"


def test_manifest_records_provenance(refreshed):
    _, store, _, second = refreshed
    m = store.manifest(second["version_id"])
    assert {"ingest", "consensus"} <= set(m["stage_timings"])
    assert m["code_version"]["package"] == "0.1.0"
    hashes = {i["dataset"]: i["hash"] for i in m["inputs"]}
    assert {"imagery", "input_sites", "input_assignments", "input_labels", "input_item_labels"} <= set(hashes)
    assert all(len(h) == 32 for h in hashes.values())
    assert m["catalog"]["content"]["settings"]["reference_labellers"] == ["expert"]
    assert json.loads((store.dir / "LATEST").read_text())["version_id"] == second["version_id"]


def test_roles_and_no_field_sites_survive_the_flow(refreshed):
    catalog_path, store, _, second = refreshed
    root = catalog_path.parent
    vdir = store.version_path(second["version_id"])
    sites = read_table(vdir / "sites.parquet")
    truth = pd.read_csv(root / "truth" / "sites.csv", dtype=str)
    merged = sites.merge(truth, on="site_id", suffixes=("", "_truth"))
    assert len(merged) == len(truth)
    assert (merged["role"] == merged["role_truth"]).all()
    a = read_table(vdir / "assignments.parquet")
    no_fields = a[(a.status == "completed") & (a.n_polygons == 0)]
    pending = a[a.status == "pending"]
    assert len(no_fields) > 0 and len(pending) > 0
    assert no_fields["completed_at"].notna().all() and pending["completed_at"].isna().all()


def test_consensus_rasters_align_with_site_grids(refreshed):
    import rasterio

    _, store, _, second = refreshed
    vdir = store.version_path(second["version_id"])
    sites = read_table(vdir / "sites.parquet").set_index("site_id")
    sc = read_table(vdir / "site_consensus.parquet")
    assert set(sc["site_id"]) <= set(sites.index)
    for site_id in sc["site_id"][:3]:
        with rasterio.open(vdir / "consensus_rasters" / f"{site_id}.tif") as src:
            s = sites.loc[site_id]
            assert (src.width, src.height) == (s.width, s.height)
            assert src.crs.to_string() == s.crs
            assert tuple(src.transform)[:6] == pytest.approx(tuple(s["transform"]))
            prob, risk = src.read(1), src.read(2)
        inside = ~pd.isna(prob)
        assert inside.mean() > 0.9
        assert ((risk[inside] >= 0) & (risk[inside] <= 0.5)).all()


def test_every_geoparquet_file_spells_its_crs_as_a_new_process(refreshed):
    """Each CRS is written with one definition whichever worker thread wrote the file (threads of Dask
    workers have built EPSG codes without their datum ensemble after a refresh ran through them)."""
    _, store, _, _ = refreshed
    assert assert_crs_spelled_as_fresh_process(store.dir) > 10


def test_second_refresh_reproduces_the_first(refreshed):
    """Same inputs, same code: identical table contents (versions differ only in id and timings)."""
    _, store, first, second = refreshed
    for uri in ("sites.parquet", "tiles.parquet", "assignments.parquet", "site_consensus.parquet"):
        a = read_table(store.version_path(first["version_id"]) / uri)
        b = read_table(store.version_path(second["version_id"]) / uri)
        pd.testing.assert_frame_equal(
            pd.DataFrame(a).drop(columns="geometry", errors="ignore"),
            pd.DataFrame(b).drop(columns="geometry", errors="ignore"),
        )


def test_refresh_refuses_a_second_concurrent_run(refreshed, tmp_path):
    """The root lock is held for the flow's whole run; a contender gets a clear RefreshLocked."""
    from tasks.store.versions import RefreshLocked

    catalog_path, store, _, _ = refreshed
    with (
        store.lock(),
        pytest.raises(RefreshLocked, match="another refresh is running"),
        VersionStore(store.root).lock(wait_s=0.5),
    ):
        pass


def test_refresh_subflows_run_without_heartbeats_of_their_own():
    """Prefect's flow engine reads the heartbeat setting per run: inside ``covered_by_parent_heartbeat`` a
    (sub)flow run starts no heartbeat thread, whose one-second sleeps delayed each refresh's end."""
    from prefect import flow
    from prefect.flow_engine import FlowRunEngine
    from prefect.settings import get_current_settings

    from flows.runtime import covered_by_parent_heartbeat

    @flow
    def probe() -> None:
        return None

    before = get_current_settings().flows.heartbeat_frequency
    assert before is not None and FlowRunEngine(flow=probe).heartbeat_seconds is not None
    with covered_by_parent_heartbeat():
        assert FlowRunEngine(flow=probe).heartbeat_seconds is None
    assert get_current_settings().flows.heartbeat_frequency == before
