"""The environment a refresh sets up: bounded native caches reach the Dask worker processes it starts, and
a value the user set is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
from flows.runtime import configure_environment
configure_environment(sys.argv[1])
from distributed import Client, LocalCluster

def native_settings():
    import os
    import pyarrow as pa
    return os.environ.get("GDAL_CACHEMAX"), pa.default_memory_pool().backend_name

if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c) as client:
            print(json.dumps(client.submit(native_settings).result()))
"""


def _worker_settings(tmp_path, **env) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in ("GDAL_CACHEMAX", "ARROW_DEFAULT_MEMORY_POOL")}
    script = tmp_path / "probe.py"
    script.write_text(_PROBE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=clean | {"PYTHONPATH": str(REPO)} | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_get_a_bounded_gdal_cache_and_the_system_arrow_pool(tmp_path):
    assert _worker_settings(tmp_path) == ["128", "system"]


def test_a_users_setting_is_kept(tmp_path):
    got = _worker_settings(tmp_path, GDAL_CACHEMAX="512", ARROW_DEFAULT_MEMORY_POOL="mimalloc")
    assert got == ["512", "mimalloc"]
