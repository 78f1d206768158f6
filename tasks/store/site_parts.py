"""A table kept as a folder of parts of a fixed number of sites, each named by a content key of its sites'
keys, so that a new version hard-links every part whose sites did not change instead of reading and
writing it again.

A site's key must cover everything its rows depend on (its inputs, parameters, code); a part's name hashes
its sites' (site, key) pairs, its group and a salt (e.g. the Parquet writer's versions). A part whose name
the previous version's folder holds therefore has the rows, and the bytes, a fresh write would give: it is
linked (``link_or_copy``). Only the parts holding a changed, added or removed site are written.

Sites are split by group first (a GeoParquet file carries one CRS), then cut into runs of ``part_sites``
in the caller's site order; names are ``part-<group>-<index>-<key>.parquet``, so sorting them sorts the rows
by (group, site), the order one file per group gave: readers of the folder (``read_table``,
``read_site_rows``, ``read_attributes``) see no difference. Fixed counts, not content-defined cut points: an
edit of a site's rows rewrites its one part; adding or removing a site also rewrites the parts after it in
its group.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import geopandas
import pandas as pd
import pyarrow

from tasks.store.artifacts import write_table
from tasks.store.folders import folder_record, previous_record
from tasks.store.reuse import Reuse, code_key, content_key, link_or_copy, previous_rows
from tasks.store.site_rows import read_site_rows

PREFIX = "part-"


@cache
def writer_salt() -> tuple:
    """What a written part's bytes depend on beyond its rows: the table dialect's code (``artifacts``,
    this module, the schemas) and the Parquet writers' versions. Part of every part's name, so a part
    linked from a version written otherwise is never mistaken for what this code writes."""
    return (
        code_key("tasks.store.artifacts", "tasks.store.site_parts", "schemas"),
        pyarrow.__version__,
        geopandas.__version__,
    )


@dataclass(frozen=True)
class Part:
    """One part file: its name, its group (e.g. a CRS; '' when ungrouped) and its sites in row order."""

    name: str
    group: str
    sites: tuple[str, ...]


def group_tag(group: str) -> str:
    """A group's text as a file name fragment (as ``artifacts.crs_part_name`` spells a CRS)."""
    return "".join(ch if ch.isalnum() else "_" for ch in group)


def plan_parts(
    keys: Mapping[str, str],
    part_sites: int,
    groups: Mapping[str, str] | None = None,
    salt=(),
    order: Callable[[str], Hashable] | None = None,
) -> list[Part]:
    """The parts of a table whose sites have ``keys`` (site -> key), in file-name (= row) order.

    ``groups``: site -> group (None: one group). ``order``: the sort key of sites within a group (default:
    the site id). ``salt``: anything else every part's content depends on.
    """
    if part_sites < 1:
        raise ValueError(f"part_sites must be positive, not {part_sites}")
    members: dict[str, list[str]] = {}
    for site in keys:
        members.setdefault(str(groups[site]) if groups is not None else "", []).append(site)
    parts = []
    for group in sorted(members, key=lambda g: (group_tag(g), g)):
        ids = sorted(members[group], key=order)
        stem = PREFIX + (f"{group_tag(group)}-" if group else "")
        for index, start in enumerate(range(0, len(ids), part_sites)):
            chunk = tuple(ids[start : start + part_sites])
            key = content_key(salt, group, json.dumps([[s, keys[s]] for s in chunk]))[:16]
            parts.append(Part(f"{stem}{index:05d}-{key}.parquet", group, chunk))
    return parts


@dataclass(frozen=True)
class PartsWritten:
    """What :func:`write_parts` did: the parts linked from the previous version, and those written."""

    linked: list[Part]
    written: list[Part]

    @property
    def linked_sites(self) -> set[str]:
        return {s for p in self.linked for s in p.sites}


def parts_to_write(parts: Sequence[Part], previous_folder: str | Path | None) -> list[Part]:
    """The ``parts`` that :func:`write_parts` will write: those whose name the previous folder lacks."""
    prev = Path(previous_folder) if previous_folder is not None else None
    return [p for p in parts if prev is None or not (prev / p.name).is_file()]


def write_parts(
    folder: str | Path,
    parts: Sequence[Part],
    previous_folder: str | Path | None,
    rows: Callable[[list[str]], pd.DataFrame],
    write: Callable[[pd.DataFrame, Path], None],
    site_column: str = "site_id",
) -> PartsWritten:
    """Fill ``folder`` with ``parts``: a part the previous version's folder has (same name) is linked from
    there; the others are written from ``rows(sites of every part to write)`` (one call), each part's rows
    by ``write(frame, path)`` in the order ``rows`` gives them. A part without rows gets no file.

    Whatever ``*.parquet`` the folder held before (an earlier attempt, a copied version) is removed first,
    by unlinking: a file shared with a published version is never written through.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.parquet"):
        stale.unlink()
    todo = parts_to_write(parts, previous_folder)
    names = {p.name for p in todo}
    linked = [p for p in parts if p.name not in names]
    for p in linked:
        link_or_copy(Path(previous_folder) / p.name, folder / p.name)
    if todo:
        df = rows([s for p in todo for s in p.sites])
        where = {s: i for i, p in enumerate(todo) for s in p.sites}
        index = df[site_column].astype(str).map(where)
        if index.isna().any():
            extra = sorted(set(df.loc[index.isna(), site_column].astype(str)))[:3]
            raise ValueError(f"rows of sites no part holds: {extra}")
        for i, part_rows in df.groupby(index.to_numpy(), sort=True):
            write(part_rows, folder / todo[int(i)].name)
    return PartsWritten(linked, todo)


def native_part_writer(table: str) -> Callable[[pd.DataFrame, Path], None]:
    """A ``write`` for :func:`write_parts` of a native-CRS geometric table (rows of one CRS, a ``crs``
    column): ``write_table`` writes its one-CRS folder of one file, which then takes the part's name."""

    def write(rows: pd.DataFrame, path: Path) -> None:
        tmp = path.parent / f".{path.stem}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_table(table, rows, tmp)
            (written,) = tmp.glob("*.parquet")
            os.replace(written, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return write


def previous_site_rows(reuse: Reuse, uri: str, site_ids: Iterable[str]) -> pd.DataFrame | None:
    """The previous version's rows of ``site_ids`` in table ``uri`` (``read_table``'s layout), None when it
    has none: from a folder of parts only the parts and row groups that can hold them are read
    (``read_site_rows``), from a single file through a Parquet filter (``reuse.previous_rows``)."""
    ids = sorted({str(s) for s in site_ids})
    if not ids or reuse.previous is None:
        return None
    path = reuse.previous / uri
    if path.is_dir() and any(path.glob("*.parquet")):
        try:
            rows = read_site_rows(path, ids)
            return rows if len(rows) else None
        except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, pyarrow.ArrowTypeError):
            pass  # an empty part written with untyped columns
    try:
        return previous_rows(reuse, uri, ids)
    except pyarrow.ArrowTypeError:
        return None


def parts_record(
    folder: str | Path, rel: str, previous_dir: str | Path | None, artifact: str, rows: int
) -> dict:
    """The manifest record of a parts folder (``folders.folder_record``: the checksum of its files' hashes
    in name order, and each file's hash): a part linked from the previous version keeps the hash recorded
    for it there, so only written parts are read to hash them. ``rows``: the table's row count."""
    prev_folder, prev_rec = previous_record(previous_dir, artifact)
    return folder_record(folder, rel, "*.parquet", prev_folder, prev_rec) | {"rows": rows}
