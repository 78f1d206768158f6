"""Incremental reprocessing: content keys per unit of work, and carrying results over from the last version.

A stage's per-site result is a pure function of (the site's inputs, the global values it used, parameters,
code). Its *key* hashes exactly those. When the previous published version holds a result under the same
key, the new version takes it over (table rows copied, files hard-linked) instead of recomputing it, so a
reprocess after a small label change touches only the sites that depend on it.

Global values that every site uses (labeller skills, the model, thresholds) would make every key change
whenever any label changes. ``carry_close`` keeps the previous version's value of such a parameter unless
the refitted value moved by more than a stated tolerance (``Reuse.refit`` refits exactly, as the nightly
refresh does). The rule is deterministic given (previous version, inputs), so a reprocess that reuses
results and one that recomputes everything (``Reuse.enabled = False``) publish identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.store.artifacts import file_hash, read_table, unshare, write_table

KEYS_FOLDER = "reuse_keys"  # the catalog's ``reuse_keys`` artifact
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ keys
def _feed(h, part) -> None:
    """Hash ``part`` unambiguously (type tag + length prefix), whatever its type."""
    if part is None:
        h.update(b"N")
    elif isinstance(part, bytes | bytearray | memoryview):
        b = bytes(part)
        h.update(b"B%d:" % len(b) + b)
    elif isinstance(part, str):
        b = part.encode()
        h.update(b"S%d:" % len(b) + b)
    elif isinstance(part, bool | int | float | np.integer | np.floating):
        h.update(
            b"F" + repr(float(part)).encode() if isinstance(part, float | np.floating) else b"I%d" % part
        )
    elif isinstance(part, np.ndarray):
        arr = np.ascontiguousarray(part)
        h.update(b"A" + str(arr.dtype).encode() + repr(arr.shape).encode())
        h.update(arr.tobytes())
    elif isinstance(part, pd.DataFrame):
        h.update(b"D" + repr(list(part.columns)).encode())
        _feed(h, frame_bytes(part))
    elif isinstance(part, Mapping):
        h.update(b"M")
        _feed(h, json.dumps(part, sort_keys=True, default=str))
    elif isinstance(part, list | tuple):
        h.update(b"L%d" % len(part))
        for p in part:
            _feed(h, p)
    else:
        raise TypeError(f"cannot key a {type(part).__name__}")


def content_key(*parts) -> str:
    """BLAKE2b-128 hex of ``parts`` (bytes, str, numbers, arrays, frames, dicts, lists of these)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def _column_text(s: pd.Series) -> list[str]:
    """A column as the text ``frame_bytes`` hashes (geometry as hex WKB; '' for a missing value)."""
    if hasattr(s, "geom_type") or s.name == "geometry":
        import shapely

        vals = shapely.to_wkb(np.asarray(s, dtype=object), hex=True, output_dimension=2)
        return pd.Series(vals, index=s.index).fillna("").astype(str).tolist()
    return [t if isinstance(t, str) else "" for t in s.astype(str).tolist()]  # pandas 3 keeps NaN


def frame_bytes(df: pd.DataFrame) -> bytes:
    """Canonical bytes of a frame's values (geometry as WKB); row order is the caller's to fix."""
    if not len(df.columns):
        return b""
    rows = zip(*(_column_text(df[c]) for c in df.columns), strict=True)
    return "\x1e".join("\x1f".join(r) for r in rows).encode()


def _elementwise_text(s: pd.Series) -> bool:
    """Whether ``astype(str)`` formats each element alone (datetimes pick one format per array)."""
    if hasattr(s, "geom_type") or s.name == "geometry" or isinstance(s.dtype, pd.StringDtype):
        return True
    return isinstance(s.dtype, np.dtype) and s.dtype.kind in "OUSiufb"


def group_keys(
    df: pd.DataFrame, by: str, columns: Iterable[str], sort_by: Iterable[str] = ()
) -> dict[str, str]:
    """One key per value of ``by``: the content of ``columns`` of its rows, in ``sort_by`` order.

    Equal to ``content_key(columns, frame_bytes(group))`` per group, but each column is converted to text
    once for the whole frame (a frame per group cost seconds per thousand sites). Columns whose text
    depends on the rest of the array fall back to converting group by group.
    """
    columns, sort_by = list(columns), list(sort_by)
    if len(df) == 0:
        return {}
    ordered = df.sort_values([by, *sort_by], kind="stable") if sort_by else df
    if not all(_elementwise_text(ordered[c]) for c in columns):
        return {
            str(uid): content_key(columns, frame_bytes(part[columns]))
            for uid, part in ordered.groupby(by, sort=False)
        }
    row_texts = ["\x1f".join(r) for r in zip(*(_column_text(ordered[c]) for c in columns), strict=True)]
    groups: dict = {}
    for uid, text in zip(ordered[by].tolist(), row_texts, strict=True):
        if uid is None or uid is pd.NA or (isinstance(uid, float) and uid != uid):
            continue  # as groupby: rows without a group are dropped
        groups.setdefault(uid, []).append(text)
    return {str(uid): content_key(columns, "\x1e".join(t).encode()) for uid, t in groups.items()}


@cache
def code_key(*packages: str) -> str:
    """Hash of the Python sources of ``packages`` (e.g. ``"tasks.consensus"``): the code part of a key."""
    h = hashlib.blake2b(digest_size=16)
    for pkg in sorted(packages):
        base = REPO.joinpath(*pkg.split("."))
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for f in files:
            _feed(h, str(f.relative_to(REPO)))
            _feed(h, f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- the previous one
@dataclass(frozen=True)
class Reuse:
    """What a stage may take from the last published version.

    ``previous_dir``: that version's folder (None on the first run). ``enabled``: False recomputes every
    unit (a full refresh). ``refit``: True refits global parameters exactly; False carries the previous
    ones within their tolerances (``carry_close``) and keeps the previous model.
    """

    previous_dir: str | None = None
    enabled: bool = True
    refit: bool = True
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def previous(self) -> Path | None:
        return Path(self.previous_dir) if self.previous_dir else None

    def previous_keys(self, stage: str) -> dict[str, tuple[str, str]]:
        """unit_id -> (key, computed_in) of ``stage`` in the previous version ({} when none)."""
        if stage not in self._cache:
            self._cache[stage] = read_keys(self.previous, stage) if self.previous else {}
        return self._cache[stage]

    def reusable(self, stage: str, keys: Mapping[str, str]) -> set[str]:
        """Units whose key equals the previous version's (empty when reuse is off)."""
        if not self.enabled or self.previous is None:
            return set()
        prev = self.previous_keys(stage)
        return {u for u, k in keys.items() if u in prev and prev[u][0] == k}

    def computed_in(self, stage: str, unit_ids: Iterable[str], this_version: str) -> dict[str, str]:
        """Which version computed each unit: the previous one's record for reused units, else this one."""
        prev = self.previous_keys(stage)
        return {u: prev[u][1] if u in prev else this_version for u in unit_ids}


def keys_path(version_dir: str | Path, stage: str) -> Path:
    return Path(version_dir) / KEYS_FOLDER / f"{stage}.parquet"


def write_keys(
    version_dir: str | Path, stage: str, keys: Mapping[str, str], reused: Iterable[str], reuse: Reuse
) -> dict:
    """Write ``stage``'s unit keys into the version; returns the manifest record of the file."""
    version_dir = Path(version_dir)
    this = version_dir.name.removeprefix(".draft-")
    reused = set(reused)
    prev = reuse.previous_keys(stage) if reused else {}
    df = pd.DataFrame(
        {
            "stage": pd.Series([stage] * len(keys), dtype=object),
            "unit_id": pd.Series(list(keys), dtype=object),
            "key": pd.Series(list(keys.values()), dtype=object),
            "computed_in": pd.Series([prev[u][1] if u in reused else this for u in keys], dtype=object),
        }
    )
    record = write_table("reuse_keys", df, keys_path(version_dir, stage))
    return {**record, "path": f"{KEYS_FOLDER}/{stage}.parquet"}


def read_keys(version_dir: str | Path | None, stage: str) -> dict[str, tuple[str, str]]:
    if version_dir is None:
        return {}
    path = keys_path(version_dir, stage)
    if not path.exists():
        return {}
    df = read_table(path)
    return dict(zip(df["unit_id"], zip(df["key"], df["computed_in"], strict=True), strict=True))


def reuse_counts(stage: str, total: int, reused: int) -> dict[str, int]:
    """Manifest counts every incremental stage reports."""
    return {f"{stage}_units": total, f"{stage}_reused": reused, f"{stage}_recomputed": total - reused}


# ------------------------------------------------------------------------------------------ carrying over
def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` to ``dst`` (published versions are immutable, so sharing inodes is safe); copy
    when the filesystem cannot link (another device, object storage mounts)."""
    dst = unshare(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def previous_rows(
    reuse: Reuse, uri: str, unit_ids: Iterable[str], column: str = "site_id"
) -> pd.DataFrame | None:
    """Rows of the previous version's table ``uri`` whose ``column`` is in ``unit_ids`` (Parquet filter)."""
    ids = sorted(set(unit_ids))
    if not ids or reuse.previous is None:
        return None
    path = reuse.previous / uri
    if not path.exists():
        return None
    try:
        return read_table(path, filters=[(column, "in", ids)])
    except (pa.ArrowTypeError, pa.ArrowNotImplementedError):  # an empty part written with untyped columns
        df = read_table(path)
        return df[df[column].astype(str).isin(ids)] if column in df else df.iloc[:0]


def carry_close(
    new: Mapping[str, np.ndarray | float], old: Mapping[str, np.ndarray | float] | None, tol: float
) -> tuple[dict[str, np.ndarray | float], set[str]]:
    """Per group (e.g. a labeller): keep the ``old`` value when every element moved by at most ``tol``.

    Returns (values to use, groups that took the new value). Groups missing from ``old`` take the new
    value. ``tol = 0`` takes every new value that differs at all.
    """
    old = old or {}
    out, changed = {}, set()
    for g, v in new.items():
        o = old.get(g)
        if o is not None and np.shape(o) == np.shape(v):
            diff = np.abs(np.asarray(v, float) - np.asarray(o, float))
            same_nan = np.isnan(np.asarray(v, float)) & np.isnan(np.asarray(o, float))
            if np.all(same_nan | (diff <= tol)):
                out[g] = o
                continue
        out[g] = v
        changed.add(g)
    return out, changed


# -------------------------------------------------------------------------------- a site's label content
LABEL_KEY_COLUMNS = ("polygon_id", "labeller_id", "label", "geometry")
ASSIGNMENT_KEY_COLUMNS = ("labeller_id", "status", "completed_at", "is_reference")


def site_label_keys(labels: pd.DataFrame, assignments: pd.DataFrame) -> dict[str, str]:
    """Per site: the content key of its normalised ``labels`` and ``assignments`` rows (ingest tables).

    The watcher compares these between the inputs and the last published version, and every stage that
    reads a site's labels puts this key into its own per-site key. Sites with assignments but no polygons
    still get a key ("no fields here" differs from "not labelled").
    """
    a = pd.DataFrame(
        {
            "site_id": assignments["site_id"].astype(str),
            "labeller_id": assignments["labeller_id"].astype(str),
            "status": assignments["status"].astype(str),
            "completed_at": _instants(assignments["completed_at"]),
            "is_reference": assignments["is_reference"].astype(bool).astype(int).astype(str),
        }
    )
    a_keys = group_keys(a, "site_id", ASSIGNMENT_KEY_COLUMNS, sort_by=["labeller_id"])
    l_keys: dict[str, str] = {}
    if len(labels):
        lab = pd.DataFrame(
            {
                "site_id": labels["site_id"].astype(str),
                "polygon_id": labels["polygon_id"].astype(str),
                "labeller_id": labels["labeller_id"].astype(str),
                "label": labels["label"].astype(object).where(labels["label"].notna(), "").astype(str),
                "geometry": np.asarray(
                    labels.geometry if hasattr(labels, "geometry") else labels["geometry"]
                ),
            }
        )
        l_keys = group_keys(lab, "site_id", LABEL_KEY_COLUMNS, sort_by=["polygon_id"])
    return {s: content_key(a_keys[s], l_keys.get(s)) for s in sorted(a_keys)}


SITE_LABELS = "site_labels"  # reuse_keys/<this>.parquet: per site, its ``site_label_keys`` value (ingest)
LABEL_TABLES = "site_labels_source"  # reuse_keys/<this>.parquet: the tables SITE_LABELS was computed from
LABEL_TABLES_UNIT = "labels+assignments"


def label_tables_key(labels_path: str | Path, assignments_path: str | Path) -> str:
    """Content key of a version's ``labels`` (file or folder of parts) and ``assignments`` files."""
    labels_path = Path(labels_path)
    files = sorted(labels_path.glob("*.parquet")) if labels_path.is_dir() else [labels_path]
    return content_key(*(f"{p.name}:{file_hash(p)}" for p in files), file_hash(assignments_path))


def recorded_label_keys(
    version_dir: str | Path, site_ids: Iterable[str], labels_path: str | Path, assignments_path: str | Path
) -> dict[str, str] | None:
    """``site_label_keys`` of ``site_ids`` as ingest recorded them in the version (``reuse_keys/site_labels``,
    hashed once per site when its labels change, so no later stage hashes every site's polygons again).
    None, to compute them from the tables, when the version has no record of one of them or its tables are
    not the ones the record was made from (hashing the files costs far less than keying every polygon)."""
    stored = read_keys(version_dir, SITE_LABELS)
    ids = sorted({str(s) for s in site_ids})
    if not stored or any(s not in stored for s in ids):
        return None
    source = read_keys(version_dir, LABEL_TABLES).get(LABEL_TABLES_UNIT)
    if source is None or source[0] != label_tables_key(labels_path, assignments_path):
        return None
    return {s: stored[s][0] for s in ids}


def _instants(values: pd.Series) -> list[str]:
    """UTC instants as ISO text ('' when missing), whatever the column's dtype or time zone."""
    ts = pd.to_datetime(values, utc=True, errors="coerce")
    return ["" if pd.isna(t) else t.isoformat() for t in ts]
