"""Folder artifact records: files linked from the previous version keep their recorded hash."""

from __future__ import annotations

import json
import os
import shutil

from tasks.store.artifacts import bytes_hash, file_hash
from tasks.store.folders import folder_record, previous_record


def _full(folder) -> str:
    return bytes_hash(*(file_hash(p).encode() for p in sorted(folder.glob("*.tif"))))


def test_linked_files_take_the_previous_hash_and_others_are_read(tmp_path):
    prev_v, new_v = tmp_path / "v0", tmp_path / "v1"
    (prev_v / "rasters").mkdir(parents=True)
    (new_v / "rasters").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (prev_v / "rasters" / f"{name}.tif").write_bytes(name.encode() * 1000)
    (prev_v / "rasters" / "notes.txt").write_text("not matched by the pattern")
    rec = folder_record(prev_v / "rasters", "rasters")
    assert rec["rows"] == 3 and rec["checksum"] == _full(prev_v / "rasters")
    assert rec["files"] == {f"{n}.tif": file_hash(prev_v / "rasters" / f"{n}.tif") for n in "abc"}
    (prev_v / "manifest.json").write_text(json.dumps({"artifacts": {"rasters": rec}}))

    os.link(prev_v / "rasters" / "a.tif", new_v / "rasters" / "a.tif")  # reused: a hard link
    shutil.copy2(prev_v / "rasters" / "b.tif", new_v / "rasters" / "b.tif")  # a copy: not the same file
    (new_v / "rasters" / "c.tif").write_bytes(b"recomputed")  # same name, new content
    folder, prev = previous_record(prev_v, "rasters")
    assert folder == prev_v / "rasters" and prev == rec
    out = folder_record(new_v / "rasters", "rasters", "*.tif", folder, prev)
    assert out["checksum"] == _full(new_v / "rasters") and out["rows"] == 3

    # only the linked file's hash comes from the record: a wrong record shows where it is trusted
    wrong = {**rec, "files": {k: "0" * 32 for k in rec["files"]}}
    out = folder_record(new_v / "rasters", "rasters", "*.tif", folder, wrong)
    assert out["files"]["a.tif"] == "0" * 32
    assert out["files"]["b.tif"] == file_hash(new_v / "rasters" / "b.tif")
    assert out["files"]["c.tif"] == file_hash(new_v / "rasters" / "c.tif")


def test_no_previous_record_reads_every_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x.tif").write_bytes(b"x")
    assert previous_record(None, "r") == (None, {})
    assert previous_record(tmp_path, "r") == (None, {})  # no manifest
    (tmp_path / "manifest.json").write_text("{not json")
    assert previous_record(tmp_path, "r") == (None, {})
    assert folder_record(tmp_path / "r", "r")["checksum"] == _full(tmp_path / "r")


def test_writes_never_go_through_a_link_to_a_published_file(tmp_path):
    """A retried task rewrites a unit it had linked: the published version's file must stay as it was."""
    import numpy as np
    import pandas as pd
    import rasterio

    from tasks.store.artifacts import file_hash, write_table
    from tasks.store.grid import SiteGrid
    from tasks.store.rasters import write_site_raster
    from tasks.store.reuse import link_or_copy

    published, draft = tmp_path / "v1", tmp_path / "v2"
    grid = SiteGrid("s", "EPSG:32633", (2.0, 0.0, 0.0, 0.0, -2.0, 40.0), 20, 20)
    published.mkdir()
    draft.mkdir()
    write_site_raster(published / "s.tif", grid, np.zeros((1, 20, 20)), ["p"])
    keys = pd.DataFrame({"stage": ["x"], "unit_id": ["s"], "key": ["a" * 32], "computed_in": ["v1"]})
    write_table("reuse_keys", keys, published / "keys.parquet")
    before = {p.name: file_hash(p) for p in published.iterdir()}

    for name in before:
        link_or_copy(published / name, draft / name)
        link_or_copy(published / name, draft / name)  # twice: the retry links again over its own link
    write_site_raster(draft / "s.tif", grid, np.ones((1, 20, 20)), ["p"])
    write_table("reuse_keys", keys.assign(key="b" * 32), draft / "keys.parquet")

    assert {p.name: file_hash(p) for p in published.iterdir()} == before
    with rasterio.open(draft / "s.tif") as src:
        assert src.read(1).min() == 1.0
    assert os.stat(draft / "s.tif").st_ino != os.stat(published / "s.tif").st_ino
