"""How a new Python process spells a CRS in GeoParquet metadata, and a check that every GeoParquet file of a
version spells its CRS so (whichever worker thread wrote it: tasks/store/geoparquet.crs_projjson)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

_SPELL = """
import json, sys
import geopandas as gpd, shapely
from geopandas.io.arrow import _geopandas_to_arrow
out = {}
for crs in sys.argv[1:]:
    t = _geopandas_to_arrow(gpd.GeoDataFrame(geometry=[shapely.Point(0, 0)], crs=crs), index=False)
    field = json.loads(t.schema.field("geometry").metadata[b"ARROW:extension:metadata"])["crs"]
    out[crs] = [json.loads(t.schema.metadata[b"geo"])["columns"]["geometry"]["crs"], field]
print(json.dumps(out))
"""


def fresh_process_projjson(crs_texts, field: bool = False) -> dict[str, dict]:
    """CRS text -> the PROJJSON geopandas writes for it in a new process (in the ``geo`` metadata, or with
    ``field`` in the geometry column's GeoArrow extension metadata)."""
    return {k: v[int(field)] for k, v in _fresh_spellings(crs_texts).items()}


def _fresh_spellings(crs_texts) -> dict[str, list]:
    texts = sorted(set(crs_texts))
    if not texts:
        return {}
    done = subprocess.run(
        [sys.executable, "-c", _SPELL, *texts], check=True, capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stdout)


def assert_crs_spelled_as_fresh_process(folder: str | Path) -> int:
    """Every GeoParquet file under ``folder`` carries its CRS exactly as a new process writes it (file and
    geometry column metadata); returns how many files were checked."""
    from tasks.store.geoparquet import parsed_crs

    found = {}
    for path in sorted(Path(folder).rglob("*.parquet")):
        meta = pq.read_schema(path).metadata or {}
        if b"geo" not in meta:
            continue
        geo = json.loads(meta[b"geo"])
        crs = geo["columns"][geo["primary_column"]].get("crs")
        ext = pq.read_schema(path).field(geo["primary_column"]).metadata or {}
        field = json.loads(ext.get(b"ARROW:extension:metadata", b"{}")).get("crs")
        if crs is not None:
            found[path] = (parsed_crs(crs).to_string(), crs, field)
    want = _fresh_spellings(text for text, *_ in found.values())
    wrong = [
        f"{p}: {text}"
        for p, (text, crs, field) in found.items()
        if crs != want[text][0] or field not in (None, want[text][1])
    ]
    assert not wrong, "CRS spelled unlike a new process's:\n" + "\n".join(wrong)
    return len(found)
