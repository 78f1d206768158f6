"""The artifact store: GeoParquet 1.1 dialect, native-CRS parts, and atomically published versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from schemas.tables import SchemaViolation, validate
from tasks.store.artifacts import (
    bytes_hash,
    crs_part_name,
    file_hash,
    geo_parts,
    read_table,
    write_table,
)
from tasks.store.versions import (
    DRAFT_PREFIX,
    LATEST,
    MANIFEST,
    RefreshLocked,
    VersionStore,
    atomic_write_text,
)

REPO = Path(__file__).resolve().parents[1]


# ---- tables ---------------------------------------------------------------------------------------
def _sites(n: int = 3) -> gpd.GeoDataFrame:
    x0 = np.arange(n) * 0.01
    return gpd.GeoDataFrame(
        {
            "site_id": [f"S{i:05d}" for i in range(n)],
            "scene_id": ["scene_000"] * n,
            "crs": ["EPSG:32630"] * n,
            "transform": [[4.0, 0.0, 600000.0 + 960 * i, 0.0, -4.0, 900000.0] for i in range(n)],
            "width": np.full(n, 224, dtype="int64"),
            "height": np.full(n, 224, dtype="int64"),
            "role": ["gold", "multi", "unlabelled"][:n],
            "n_labellers": np.array([3, 2, 0][:n], dtype="int64"),
            "has_reference": [True, False, False][:n],
        },
        geometry=[shapely.box(x, 8.0, x + 0.008, 8.008) for x in x0],
        crs=4326,
    )


def _labels() -> pd.DataFrame:
    """Label rows in two native CRSs (UTM 30N and 31N), as the ingest stage hands them to write_table."""
    rows = []
    for crs, x0 in (("EPSG:32630", 600000.0), ("EPSG:32631", 200000.0)):
        for k in range(2):
            poly = shapely.box(x0 + 100 * k, 900000.0, x0 + 100 * k + 50, 900040.0)
            rows.append(
                {
                    "polygon_id": f"{crs[-5:]}/lab/{k}",
                    "site_id": f"{crs[-5:]}",
                    "labeller_id": "lab",
                    "label": "crop" if k else None,
                    "area_m2": poly.area,
                    "was_valid": True,
                    "repair_note": None,
                    "geometry": poly,
                    "crs": crs,
                }
            )
    return pd.DataFrame(rows)


def _geo_meta(path: Path) -> dict:
    return json.loads(pq.read_metadata(path).metadata[b"geo"])


def _compressions(path: Path) -> set[str]:
    md = pq.read_metadata(path)
    return {
        md.row_group(g).column(c).compression for g in range(md.num_row_groups) for c in range(md.num_columns)
    }


def test_geoparquet_round_trip(tmp_path):
    sites = _sites()
    rec = write_table("sites", sites, tmp_path / "sites.parquet")
    path = tmp_path / "sites.parquet"
    assert rec == {"path": "sites.parquet", "rows": 3, "checksum": file_hash(path)}
    geo = _geo_meta(path)
    assert geo["version"] == "1.1.0"
    col = geo["columns"][geo["primary_column"]]
    assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert "bbox" in pq.read_schema(path).names
    assert _compressions(path) == {"ZSTD"}
    back = read_table(path)
    assert isinstance(back, gpd.GeoDataFrame) and back.crs.to_epsg() == 4326
    assert "bbox" not in back.columns
    validate("sites", back)
    pd.testing.assert_frame_equal(
        pd.DataFrame(back.drop(columns="geometry")).astype({"transform": object}),
        pd.DataFrame(sites.drop(columns="geometry")),
        check_dtype=False,
    )
    assert list(back["transform"].iloc[1]) == [4.0, 0.0, 600960.0, 0.0, -4.0, 900000.0]
    assert back.geometry.geom_equals(sites.geometry).all()
    bbox = pq.read_table(path, columns=["bbox"]).column("bbox").to_pylist()[0]
    assert bbox["xmin"] == pytest.approx(0.0) and bbox["ymax"] == pytest.approx(8.008)
    # Same content, same bytes: the checksum identifies the table.
    assert write_table("sites", sites, tmp_path / "again.parquet")["checksum"] == rec["checksum"]


def test_plain_parquet_round_trip_keeps_dtypes(tmp_path):
    df = pd.DataFrame(
        {
            "site_id": ["S1", "S1", "S2"],
            "labeller_id": ["a", "b", "a"],
            "completed_at": pd.to_datetime(
                ["2026-03-01T10:00:00Z", None, "2026-03-02T11:30:00Z"], utc=True
            ).astype("datetime64[us, UTC]"),
            "status": ["completed", "pending", "completed"],
            "n_polygons": np.array([2, 0, 0], dtype="int64"),
            "is_reference": [False, False, True],
        }
    )
    write_table("assignments", df, tmp_path / "a.parquet")
    assert b"geo" not in (pq.read_metadata(tmp_path / "a.parquet").metadata or {})
    assert _compressions(tmp_path / "a.parquet") == {"ZSTD"}
    back = read_table(tmp_path / "a.parquet")
    validate("assignments", back)
    assert str(back["completed_at"].dtype) == "datetime64[us, UTC]"
    assert back["completed_at"].isna().tolist() == [False, True, False]
    assert back["site_id"].tolist() == ["S1", "S1", "S2"]


def test_write_table_refuses_a_table_that_breaks_its_schema(tmp_path):
    bad = _sites().assign(width=np.array([224, 0, 224], dtype="int64"))
    with pytest.raises(SchemaViolation, match="width"):
        write_table("sites", bad, tmp_path / "sites.parquet")
    assert not (tmp_path / "sites.parquet").exists()
    wrong_crs = _sites().to_crs(3857)
    with pytest.raises(SchemaViolation, match="EPSG:4326"):
        write_table("sites", wrong_crs, tmp_path / "sites.parquet")
    dup = pd.concat([_sites(), _sites().iloc[:1]])
    with pytest.raises(SchemaViolation):
        write_table("sites", dup, tmp_path / "sites.parquet")
    assert not (tmp_path / "sites.parquet").exists()


def test_native_crs_table_is_one_part_per_crs(tmp_path):
    labels = _labels()
    rec = write_table("labels", labels, tmp_path / "labels")
    parts = sorted(p.name for p in (tmp_path / "labels").iterdir())
    assert parts == [crs_part_name("EPSG:32630"), crs_part_name("EPSG:32631")]
    assert parts == ["part-EPSG_32630.parquet", "part-EPSG_32631.parquet"]
    assert rec["path"] == "labels" and rec["rows"] == 4
    for name, epsg in zip(parts, (32630, 32631), strict=True):
        path = tmp_path / "labels" / name
        geo = _geo_meta(path)
        assert geo["version"] == "1.1.0" and "covering" in geo["columns"]["geometry"]
        assert _compressions(path) == {"ZSTD"}
        part = gpd.read_parquet(path)
        assert part.crs.to_epsg() == epsg and len(part) == 2 and "crs" not in part.columns
        validate("labels", part)
    back = read_table(tmp_path / "labels")
    assert sorted(back["crs"].unique()) == ["EPSG:32630", "EPSG:32631"]
    assert sorted(back["polygon_id"]) == sorted(labels["polygon_id"])
    split = geo_parts(back)
    assert set(split) == {"EPSG:32630", "EPSG:32631"}
    for crs, gdf in split.items():
        assert gdf.crs.to_string() == crs
        src = labels[labels["crs"] == crs].set_index("polygon_id")
        got = gdf.set_index("polygon_id").loc[src.index]
        assert got.geometry.geom_equals(gpd.GeoSeries(src["geometry"], crs=crs)).all()
        assert got["label"].isna().tolist() == src["label"].isna().tolist()
    # The checksum follows the content of the parts.
    moved = labels.assign(geometry=labels.geometry.map(lambda g: shapely.affinity.translate(g, 1.0)))
    moved["area_m2"] = moved.geometry.map(lambda g: g.area)
    assert write_table("labels", moved, tmp_path / "labels2")["checksum"] != rec["checksum"]


def test_native_crs_table_can_be_empty(tmp_path):
    empty = _labels().iloc[:0]
    rec = write_table("labels", empty, tmp_path / "labels")
    assert rec["rows"] == 0
    assert [p.name for p in (tmp_path / "labels").iterdir()] == ["part-empty.parquet"]
    back = read_table(tmp_path / "labels")
    assert len(back) == 0 and "polygon_id" in back.columns


def test_native_crs_part_is_validated(tmp_path):
    bad = _labels()
    bad.loc[3, "area_m2"] = -1.0
    with pytest.raises(SchemaViolation, match="area_m2"):
        write_table("labels", bad, tmp_path / "labels")


def test_hashes():
    assert bytes_hash(b"ab", b"c") == bytes_hash(b"abc") != bytes_hash(b"abd")
    assert len(bytes_hash(b"")) == 32


def test_file_hash_streams(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom((1 << 20) * 2 + 17)
    path.write_bytes(data)
    assert file_hash(path) == bytes_hash(data)


# ---- versions -------------------------------------------------------------------------------------
def _publish(store: VersionStore, content: str = "x") -> str:
    draft = store.new_draft()
    (draft.path / "table.txt").write_text(content, encoding="utf-8")
    draft.artifacts["table"] = {"path": "table.txt", "rows": 1, "checksum": bytes_hash(content.encode())}
    store.publish(draft, {"note": content})
    return draft.version_id


def test_publish_makes_version_visible_and_switches_latest(tmp_path):
    store = VersionStore(tmp_path)
    assert store.list() == [] and store.latest_id() is None
    draft = store.new_draft()
    assert draft.path.parent == tmp_path / "versions" and draft.path.name.startswith(DRAFT_PREFIX)
    (draft.path / "table.txt").write_text("one", encoding="utf-8")
    draft.artifacts["table"] = {"path": "table.txt", "rows": 1}
    assert store.list() == [] and store.latest_id() is None  # a draft is invisible
    final = store.publish(draft, {"note": "first"})
    assert final == tmp_path / "versions" / draft.version_id
    assert not draft.path.exists() and (final / "table.txt").read_text() == "one"
    assert store.list() == [draft.version_id] and store.latest_id() == draft.version_id
    manifest = store.manifest(draft.version_id)
    assert manifest["version_id"] == draft.version_id and manifest["note"] == "first"
    assert manifest["artifacts"] == {"table": {"path": "table.txt", "rows": 1}}
    assert json.loads((tmp_path / "versions" / LATEST).read_text()) == {"version_id": draft.version_id}

    second = _publish(store, "two")
    assert store.list() == [draft.version_id, second] and store.latest_id() == second
    assert (final / "table.txt").read_text() == "one"  # earlier versions are never touched
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.endswith(".tmp")]


def test_publish_syncs_the_files_this_run_wrote_not_links_to_a_published_version(tmp_path, monkeypatch):
    store = VersionStore(tmp_path)
    first = store.publish(_draft_with(store, "kept.txt", "reused"), {})
    draft = _draft_with(store, "fresh.txt", "new")
    os.link(first / "kept.txt", draft.path / "kept.txt")  # what reuse.link_or_copy does
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    final = store.publish(draft, {})
    names = {Path(p).name for p in synced}
    assert "fresh.txt" in names and "manifest.json" in names and "kept.txt" not in names
    assert (final / "kept.txt").read_text() == "reused" and (final / "fresh.txt").read_text() == "new"


def _draft_with(store, name, text):
    draft = store.new_draft()
    (draft.path / name).write_text(text, encoding="utf-8")
    return draft


def test_version_ids_sort_by_creation(tmp_path):
    store = VersionStore(tmp_path)
    ids = [_publish(store, str(i)) for i in range(5)]
    assert store.list() == ids and store.latest_id() == ids[-1]


def test_drafts_and_stray_folders_are_not_versions(tmp_path):
    store = VersionStore(tmp_path)
    vid = _publish(store)
    store.new_draft()
    (tmp_path / "versions" / "no_manifest").mkdir()
    (tmp_path / "versions" / ".hidden").mkdir()
    assert store.list() == [vid]


def test_remove_stale_drafts(tmp_path):
    store = VersionStore(tmp_path)
    assert store.remove_stale_drafts() == []
    vid = _publish(store)
    d1, d2 = store.new_draft(), store.new_draft()
    (d1.path / "sub").mkdir()
    (d1.path / "sub" / "part.parquet").write_bytes(b"half written")
    removed = store.remove_stale_drafts()
    assert sorted(removed) == sorted([d1.path.name, d2.path.name])
    assert not d1.path.exists() and not d2.path.exists()
    assert store.list() == [vid] and (tmp_path / "versions" / vid / MANIFEST).exists()
    assert store.latest_id() == vid


def test_discard(tmp_path):
    store = VersionStore(tmp_path)
    draft = store.new_draft()
    (draft.path / "a").write_text("a")
    store.discard(draft)
    assert not draft.path.exists() and store.list() == []


def test_version_path_rejects_escapes(tmp_path):
    store = VersionStore(tmp_path)
    vid = _publish(store)
    assert store.version_path(vid) == (tmp_path / "versions" / vid).resolve()
    for bad in ("../x", "..", ".draft-123", "a/b", "/etc"):
        with pytest.raises(ValueError, match="not a version id"):
            store.version_path(bad)


def test_atomic_write_text_replaces(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ---- the refresh lock, held by another process -----------------------------------------------------
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tasks.store.versions import VersionStore
    with VersionStore({root!r}).lock():
        Path({flag!r}).write_text("held")
        time.sleep({hold})
        Path({flag!r}).write_text("releasing")
    """
)


def _hold_lock(root: Path, hold_s: float) -> subprocess.Popen:
    flag = root.parent / f"{root.name}.held"
    flag.unlink(missing_ok=True)
    code = _HOLDER.format(repo=str(REPO), root=str(root), flag=str(flag), hold=hold_s)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not flag.exists() or flag.read_text() != "held":
        assert proc.poll() is None, "lock holder exited early"
        assert time.monotonic() < deadline, "lock holder never took the lock"
        time.sleep(0.02)
    return proc


def test_second_lock_from_another_process_is_refused(tmp_path):
    root = tmp_path / "root"
    proc = _hold_lock(root, 30)
    try:
        store = VersionStore(root)
        t0 = time.monotonic()
        with pytest.raises(RefreshLocked) as exc, store.lock():
            pass
        assert time.monotonic() - t0 < 0.5  # wait_s=0: refuse at once
        msg = str(exc.value)
        assert str(root) in msg and "another refresh is running" in msg and ".refresh.lock" in msg
        t0 = time.monotonic()
        with pytest.raises(RefreshLocked), store.lock(wait_s=1.0):
            pass
        assert time.monotonic() - t0 >= 1.0
        with pytest.raises(RefreshLocked, match="another refresh is running"):
            store.ensure_unlocked()  # what run_refresh asks before starting a server and a cluster
    finally:
        proc.kill()
        proc.wait()
    with VersionStore(root).lock():  # the OS drops the lock of a killed holder
        assert (root / ".refresh.lock").read_text() == f"pid {os.getpid()}\n"
    VersionStore(root).ensure_unlocked()  # free: returns without holding it
    proc = _hold_lock(root, 30)  # another process can take it at once
    proc.kill()
    proc.wait()


def test_lock_waits_for_the_holder(tmp_path):
    root = tmp_path / "root"
    proc = _hold_lock(root, 1.5)
    try:
        t0 = time.monotonic()
        with VersionStore(root).lock(wait_s=30):
            waited = time.monotonic() - t0
            assert (tmp_path / "root.held").read_text() == "releasing"  # the holder had to let go first
        assert 0.3 < waited < 25
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_released_on_error(tmp_path):
    store = VersionStore(tmp_path)
    with pytest.raises(KeyError), store.lock():
        raise KeyError("boom")
    with store.lock():
        pass


def test_input_error_survives_pickling():
    """Errors raised on Dask workers come back pickled: message and fields must survive."""
    import pickle

    from tasks.store.errors import InputError

    err = pickle.loads(pickle.dumps(InputError("labels.csv", "duplicate id", row=3)))
    assert (err.path, err.row, err.reason) == ("labels.csv", 3, "duplicate id")
    assert str(err) == "labels.csv: row 3: duplicate id"


def test_tables_are_written_in_row_groups_a_filtered_read_can_skip(tmp_path):
    from tasks.store.artifacts import ROW_GROUP_ROWS

    n = 2 * ROW_GROUP_ROWS + 5
    ids = [f"S{i:06d}" for i in range(n)]
    df = pd.DataFrame({"stage": "x", "unit_id": ids, "key": ["a" * 32] * n, "computed_in": "v1"})
    write_table("reuse_keys", df, tmp_path / "k.parquet")
    meta = pq.read_metadata(tmp_path / "k.parquet")
    assert meta.num_row_groups == 3
    col = meta.schema.names.index("unit_id")
    ranges = [(meta.row_group(g).column(col).statistics.min, meta.row_group(g).column(col).statistics.max)
              for g in range(3)]  # fmt: skip
    assert ranges[0][1] < ranges[1][0] and ranges[1][1] < ranges[2][0]  # disjoint: prunable by site
    got = read_table(tmp_path / "k.parquet", filters=[("unit_id", "in", [ids[3], ids[-1]])])
    assert got["unit_id"].tolist() == [ids[3], ids[-1]]


def test_latest_pointing_at_a_deleted_version_falls_back_with_a_warning(tmp_path):
    import shutil as _shutil
    import warnings

    store = VersionStore(tmp_path)
    ids = []
    for _ in range(2):
        d = store.new_draft()
        store.publish(d, {"n": 1})
        ids.append(d.version_id)
    assert store.latest_id() == ids[1]
    _shutil.rmtree(store.version_path(ids[1]))
    with pytest.warns(UserWarning, match="whose folder is gone"):
        assert store.latest_id() == ids[0]
    _shutil.rmtree(store.version_path(ids[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.latest_id() is None
    assert "no version is left" in str(caught[0].message)
