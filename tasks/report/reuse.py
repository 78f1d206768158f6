"""Incremental report: parts whose inputs are unchanged are taken over from the previous version.

The report's units of reuse (``reuse_keys/report``) are its costly parts: the band histograms, the
sampled dataset properties, each figure and each site's thumbnail panels. A unit's key hashes exactly
what it reads (scene file hashes, the upstream stage's key of a raster it reads, the data a figure
draws, settings, code). When the previous version computed a unit under the same key, its numbers come
from the previous ``metrics.json`` and its files are hard-linked from the previous ``report/``: both are
what a fresh build writes, so a reused report equals a rebuilt one (times and version ids aside).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tasks.report.diff import load_metrics
from tasks.store.artifacts import file_hash
from tasks.store.reuse import Reuse, link_or_copy, read_keys, reuse_counts, write_keys

STAGE = "report"


class ReportReuse:
    """Keys of this build's units, and what the previous version (when reuse is on) can give back."""

    def __init__(self, reuse: Reuse | None, version_dir: Path, report_uri: str, metrics_uri: str):
        self.reuse = reuse or Reuse()
        self.version_dir = Path(version_dir)
        self.keys: dict[str, str] = {}
        self.reused: set[str] = set()
        prev = self.reuse.previous if self.reuse.enabled else None
        self.prev_report = prev / report_uri if prev is not None else None
        self.prev_metrics = load_metrics(prev, metrics_uri) if prev is not None else None
        self._upstream: dict[str, dict] = {}
        self._scene_hashes: dict[str, str] = {}

    # --------------------------------------------------------------------------------------- keys
    def hit(self, unit: str, key: str | None) -> bool:
        """Record ``unit``'s key (None: not keyable, always computed); True when the previous version
        computed it under the same key and its metrics are at hand."""
        if key is None:
            return False
        self.keys[unit] = key
        return self.prev_metrics is not None and bool(self.reuse.reusable(STAGE, {unit: key}))

    def took(self, unit: str) -> None:
        self.reused.add(unit)

    def set_scene_hashes(self, provenance: dict | None) -> None:
        """Content hashes of the scene files, from the ingest stage's input records (path -> hash)."""
        for rec in (provenance or {}).get("inputs") or []:
            if isinstance(rec, dict) and rec.get("dataset") == "imagery" and rec.get("hash"):
                self._scene_hashes[_real(rec["path"])] = str(rec["hash"])

    def scene_key(self, path: str | None) -> str | None:
        """The scene file's content hash (None when the ingest records do not name it: not keyable)."""
        if path is None:
            return "absent"
        return self._scene_hashes.get(_real(path))

    def scenes_key(self, scenes: dict[str, str]) -> list | None:
        parts = [(sid, self.scene_key(p)) for sid, p in sorted(scenes.items())]
        return None if any(h is None for _, h in parts) else parts

    def upstream(self, stage: str, unit: str, path: Path | None) -> str:
        """What a raster another stage wrote contributes to a key: that stage's unit key in this version,
        else the file's content hash; 'absent' without a file."""
        if path is None or not Path(path).is_file():
            return "absent"
        return self.upstream_key(stage, unit) or "file:" + file_hash(path)

    def upstream_key(self, stage: str, unit: str) -> str | None:
        """``stage``'s key of ``unit`` in this version (None when it recorded none): what that stage wrote
        for the unit is a function of it."""
        if stage not in self._upstream:
            self._upstream[stage] = read_keys(self.version_dir, stage)
        rec = self._upstream[stage].get(unit)
        return f"key:{stage}:{rec[0]}" if rec is not None else None

    # -------------------------------------------------------------------------------------- files
    def link(self, rel_paths: Iterable[str], out_root: Path) -> bool:
        """Hard-link the previous report's ``rel_paths`` into ``out_root``; False (nothing linked) when
        one of them is missing there."""
        rel_paths = list(dict.fromkeys(rel_paths))
        if self.prev_report is None or not all((self.prev_report / r).is_file() for r in rel_paths):
            return False
        for r in rel_paths:
            dst = out_root / r
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            link_or_copy(self.prev_report / r, dst)
        return True

    # ------------------------------------------------------------------------------------- record
    def write(self) -> tuple[dict, dict]:
        """(the reuse_keys/report record, counts)."""
        record = write_keys(self.version_dir, STAGE, self.keys, self.reused & set(self.keys), self.reuse)
        return record, reuse_counts(STAGE, len(self.keys), len(self.reused & set(self.keys)))


def _real(path: str | Path) -> str:
    return os.path.realpath(path)
