"""The ``pseudo_labels`` table in parts of sites (tasks/learn/pseudo_parts.py): with every unit reused a
reprocess links every part (no read, no write); a recomputed site rewrites its part only; a new threshold
rewrites every part (it sets ``kept``); the folder always equals a whole-table write of the same rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from tasks.learn import pseudo_parts
from tasks.learn.pseudo_parts import ROW_COLUMNS, assemble, write_pseudo_labels
from tasks.store.artifacts import read_table, write_table
from tasks.store.reuse import Reuse

CRS = {f"S{i:03d}": ("EPSG:32630" if i % 4 else "EPSG:32631") for i in range(12)}


def _rows(sites, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in sites:
        for i in range(int(rng.integers(0, 4))):  # some sites have no polygon at all
            x = float(rng.uniform(0, 1000))
            rows.append(
                (
                    f"{s}-p{i:04d}",
                    s,
                    "field",
                    float(rng.uniform()),
                    "unlabelled",
                    shapely.box(x, 0, x + 5, 5),
                    CRS[s],
                )
            )
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: os.stat(p).st_ino for p in folder.glob("*.parquet")}


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(pseudo_parts, "PART_SITES", 3)


def test_reused_units_link_their_parts_and_the_folder_equals_a_whole_write(tmp_path):
    keys = {s: "k" for s in CRS}
    rows = _rows(CRS)
    v1 = tmp_path / "v1"
    w1 = write_pseudo_labels(v1 / "pseudo_labels", keys, CRS, rows, set(), 0.5, Reuse(), "pseudo_labels")
    whole = tmp_path / "whole"
    write_table("pseudo_labels", assemble([rows], 0.5), whole)
    pd.testing.assert_frame_equal(read_table(v1 / "pseudo_labels"), read_table(whole))
    assert (w1.rows, w1.kept) == (len(rows), int((rows["confidence"] >= 0.5).sum()))
    assert len(_inodes(v1 / "pseudo_labels")) > 2

    # every unit reused: every part is v1's file, nothing read or written
    empty = rows.iloc[:0]
    v2 = tmp_path / "v2"
    w2 = write_pseudo_labels(
        v2 / "pseudo_labels", keys, CRS, empty, set(keys), 0.5, Reuse(str(v1)), "pseudo_labels"
    )
    assert _inodes(v2 / "pseudo_labels") == _inodes(v1 / "pseudo_labels")
    assert w2.record["checksum"] == w1.record["checksum"] and (w2.rows, w2.kept) == (w1.rows, w1.kept)

    # one site recomputed with new polygons: its part is written, the others linked
    site = "S004"
    new_rows = _rows([site], seed=9)
    changed = {**keys, site: "k2"}
    v3 = tmp_path / "v3"
    reused = set(keys) - {site}
    write_pseudo_labels(
        v3 / "pseudo_labels", changed, CRS, new_rows, reused, 0.5, Reuse(str(v1)), "pseudo_labels"
    )
    old, new = _inodes(v1 / "pseudo_labels"), _inodes(v3 / "pseudo_labels")
    assert len([n for n, ino in new.items() if old.get(n) != ino]) == 1
    expect = assemble([pd.concat([rows[rows["site_id"] != site], new_rows])], 0.5)
    pd.testing.assert_frame_equal(read_table(v3 / "pseudo_labels"), read_table(_whole(tmp_path, expect)))

    # another threshold: every part is written again, ``kept`` follows it
    v4 = tmp_path / "v4"
    w4 = write_pseudo_labels(
        v4 / "pseudo_labels", keys, CRS, empty, set(keys), 0.2, Reuse(str(v1)), "pseudo_labels"
    )
    assert not set(_inodes(v4 / "pseudo_labels").values()) & set(old.values())
    assert w4.kept == int((rows["confidence"] >= 0.2).sum())
    pd.testing.assert_frame_equal(
        read_table(v4 / "pseudo_labels"), read_table(_whole(tmp_path, assemble([rows], 0.2)))
    )


def _whole(tmp_path: Path, labels: pd.DataFrame) -> Path:
    out = tmp_path / f"whole-{len(list(tmp_path.glob('whole-*')))}"
    write_table("pseudo_labels", labels, out)
    return out


def test_no_polygon_anywhere_writes_one_empty_typed_part(tmp_path):
    keys = {s: "k" for s in CRS}
    w = write_pseudo_labels(tmp_path / "p", keys, CRS, _rows([]), set(), 0.5, Reuse(), "pseudo_labels")
    assert (w.rows, w.kept) == (0, 0)
    assert [p.name for p in (tmp_path / "p").glob("*.parquet")] == ["part-empty.parquet"]
    assert len(read_table(tmp_path / "p")) == 0
