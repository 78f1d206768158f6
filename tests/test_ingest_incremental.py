"""Incremental ingest: unchanged tiles are taken from the previous version, unchanged files not reread."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import Window

from schemas.catalog import load_catalog
from tasks.ingest.stage import run_ingest
from tasks.store import artifacts
from tasks.store.artifacts import read_table
from tasks.store.hash_cache import HashCache, cache_path
from tasks.store.reuse import Reuse, read_keys

TABLES = ("sites", "tiles", "labels", "assignments", "item_labels")


# ---- helpers --------------------------------------------------------------------------------------
def _age(folder: Path, seconds: float = 3600) -> None:
    """Date every file under ``folder`` back: the cache trusts no entry of a file modified just now."""
    t = time.time() - seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))


@pytest.fixture
def region(make_catalog, tmp_path):
    cat_path = make_catalog(tmp_path / "region")
    _age(cat_path.parent / "inputs")
    return load_catalog(cat_path)


def _tables(catalog, out: Path) -> dict[str, pd.DataFrame]:
    return {name: read_table(out / catalog.datasets[name].uri) for name in TABLES}


def _assert_same_tables(catalog, a: Path, b: Path) -> None:
    ta, tb = _tables(catalog, a), _tables(catalog, b)
    for name in TABLES:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)


def _scene(catalog, name: str) -> Path:
    return Path(catalog.input_path("imagery")).parent / f"{name}.tif"


def _brighten(path: Path, window: Window) -> None:
    """Rewrite a window of the scene's pixels in place (a valid GeoTIFF, no longer COG-ordered)."""
    with rasterio.open(path, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        arr = dst.read(window=window)
        new = np.clip(arr.astype(np.int64) // 2 + 7, 0, np.iinfo(arr.dtype).max).astype(arr.dtype)
        dst.write(new, window=window)


# ---- tiles ------------------------------------------------------------------------------------------
def test_unchanged_inputs_reuse_every_tile(region, tmp_path):
    a, b, full = tmp_path / "A", tmp_path / "B", tmp_path / "full"
    first = run_ingest(region, a)
    n = first.counts["ingest_units"]
    assert n == first.counts["ingest_recomputed"] > 0 and first.counts["ingest_reused"] == 0
    assert first.artifacts["reuse_keys/ingest"]["rows"] == n

    again = run_ingest(region, b, reuse=Reuse(previous_dir=str(a)))
    assert again.counts["ingest_reused"] == n and again.counts["ingest_recomputed"] == 0
    fresh = run_ingest(region, full, reuse=Reuse(previous_dir=str(a), enabled=False))
    assert fresh.counts["ingest_recomputed"] == n

    _assert_same_tables(region, b, full)
    _assert_same_tables(region, a, b)
    assert again.artifacts["tiles"] == fresh.artifacts["tiles"]  # byte-identical GeoParquet
    # Reused units remember the version that computed them; recomputed ones name their own.
    assert {c for _, c in read_keys(b, "ingest").values()} == {"A"}
    assert {c for _, c in read_keys(full, "ingest").values()} == {"full"}
    tiles = _tables(region, b)["tiles"]
    pairs = list(zip(tiles.site_id, tiles.scene_id, strict=True))
    assert pairs == sorted(pairs)
    for name, key in (("sites", ["site_id"]), ("assignments", ["site_id", "labeller_id"])):
        df = _tables(region, b)[name]
        assert df.equals(df.sort_values(key).reset_index(drop=True)), name


def test_changed_scene_recomputes_only_its_tiles(region, tmp_path):
    a, b, full = tmp_path / "A", tmp_path / "B", tmp_path / "full"
    run_ingest(region, a)
    before = _tables(region, a)["tiles"].set_index(["site_id", "scene_id"])
    scenes = sorted(before.index.get_level_values("scene_id").unique())
    assert len(scenes) >= 2
    changed = scenes[0]
    with rasterio.open(_scene(region, changed)) as src:
        window = Window(0, 0, src.width, src.height)
    _brighten(_scene(region, changed), window)

    result = run_ingest(region, b, reuse=Reuse(previous_dir=str(a)))
    keys_a, keys_b = read_keys(a, "ingest"), read_keys(b, "ingest")
    redone = {u for u in keys_b if keys_b[u][0] != keys_a[u][0]}
    assert redone == {u for u in keys_b if u.endswith(f"/{changed}")} and redone
    assert {u for u, (_, c) in keys_b.items() if c == "B"} == redone
    assert result.counts["ingest_recomputed"] == len(redone)
    assert result.counts["ingest_reused"] == len(keys_b) - len(redone) > 0

    after = _tables(region, b)["tiles"].set_index(["site_id", "scene_id"])
    for (site, scene), row in after.iterrows():
        old = before.loc[(site, scene)]
        if scene == changed:
            assert row["content_hash"] != old["content_hash"]
            assert not np.allclose(list(row["mean"]), list(old["mean"]), equal_nan=True)
        else:
            assert row["content_hash"] == old["content_hash"]
            np.testing.assert_array_equal(list(row["mean"]), list(old["mean"]))

    run_ingest(region, full, reuse=Reuse(previous_dir=str(a), enabled=False))
    _assert_same_tables(region, b, full)


def test_changed_cloud_threshold_recomputes_every_tile(make_catalog, tmp_path):
    cat = load_catalog(make_catalog(tmp_path / "r"))
    run_ingest(cat, tmp_path / "A")
    ingest = cat.settings.ingest.model_copy(update={"cloud_threshold": 1.0})
    stricter = cat.model_copy(update={"settings": cat.settings.model_copy(update={"ingest": ingest})})
    result = run_ingest(stricter, tmp_path / "B", reuse=Reuse(previous_dir=str(tmp_path / "A")))
    assert result.counts["ingest_reused"] == 0 and result.counts["ingest_recomputed"] > 0


# ---- the file-hash cache ----------------------------------------------------------------------------
def test_hash_cache_skips_unchanged_files_and_rehashes_touched_ones(region, tmp_path, monkeypatch):
    inputs_dir = str(region.input_root_path / "inputs")
    hashed: list[str] = []
    real = artifacts.file_hash

    def counting(path):
        if str(path).startswith(inputs_dir):  # write_table hashes the outputs it writes, too
            hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(artifacts, "file_hash", counting)
    first = run_ingest(region, tmp_path / "A")
    inputs = {r["path"]: r["hash"] for r in first.inputs}
    assert sorted(hashed) == sorted(os.path.abspath(p) for p in inputs)  # the first run reads each once
    entries = json.loads(cache_path(region.root_path).read_text())["files"]
    assert all(entries[os.path.abspath(p)]["hash"] == h for p, h in inputs.items())

    hashed.clear()
    second = run_ingest(region, tmp_path / "B")
    assert hashed == []  # nothing reread
    assert {r["path"]: r["hash"] for r in second.inputs} == inputs

    # A new mtime (same bytes) rehashes that file, and only that one.
    scene = _scene(region, "scene_001")
    t = time.time() - 60
    os.utime(scene, (t, t))
    hashed.clear()
    third = run_ingest(region, tmp_path / "C")
    assert hashed == [os.path.abspath(scene)]
    assert {r["path"]: r["hash"] for r in third.inputs} == inputs


def test_hash_cache_sees_changes_and_survives_corruption(tmp_path, monkeypatch):
    f = tmp_path / "data.bin"
    f.write_bytes(b"a" * 100)
    old = time.time() - 60
    os.utime(f, (old, old))
    cpath = tmp_path / "root" / ".cache" / "file_hashes.json"
    cache = HashCache(cpath)
    h1 = cache.hash(f)
    cache.save()
    assert h1 == artifacts.file_hash(f)

    calls = []
    real = artifacts.file_hash
    monkeypatch.setattr(artifacts, "file_hash", lambda p: calls.append(p) or real(p))
    assert HashCache(cpath).hash(f) == h1 and calls == []

    # Same size, same mtime, new bytes and a new inode (written elsewhere, renamed over): rehashed.
    g = tmp_path / "data.new"
    g.write_bytes(b"b" * 100)
    os.utime(g, (old, old))
    os.replace(g, f)
    assert HashCache(cpath).hash(f) == real(f) != h1 and len(calls) == 1

    # A file modified just now is never trusted from the cache (its mtime could hide a second write).
    f.write_bytes(b"c" * 100)
    fresh = HashCache(cpath)
    fresh.hash(f)
    fresh.save()
    calls.clear()
    assert HashCache(cpath).hash(f) == real(f) and len(calls) == 1

    cpath.write_text("{not json")
    calls.clear()
    broken = HashCache(cpath)
    assert broken.hash(f) == real(f) and len(calls) == 1
    broken.save()
    assert json.loads(cpath.read_text())["version"] == 1
    assert not [p for p in cpath.parent.iterdir() if p.name.endswith(".tmp")]
