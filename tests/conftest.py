"""Shared fixtures: an offline Prefect environment, one tiny demo region, and disposable catalog copies."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.topology import topology  # noqa: F401 (session fixture: prefect server + dask scheduler + workers)

REPO = Path(__file__).resolve().parents[1]
REPO_CATALOG = REPO / "data_catalog.yaml"
DEMO_SITES_PER_SIDE = 3


def _deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _write_catalog(folder: Path, **overrides) -> Path:
    """The repository's catalog with ``root: "."`` (as ``labelrefinery demo`` writes it), plus overrides."""
    catalog = yaml.safe_load(REPO_CATALOG.read_text(encoding="utf-8"))
    catalog["root"] = "."
    catalog = _deep_merge(catalog, overrides)
    path = Path(folder) / "data_catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    return path


# Files that each run whole refreshes (minutes): collected first, so that under `make test`'s two
# pytest-xdist processes they start at once instead of one of them finishing the suite alone.
LONGEST_FIRST = (
    "test_operations.py",
    "test_refresh.py",
    "test_kill.py",
    "test_topology.py",
    "test_learn_stage.py",
    "test_bad_input.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def _offline_prefect(tmp_path_factory) -> Iterator[None]:
    """No telemetry, a patient ephemeral server and a throwaway PREFECT_HOME for every test."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("prefect_home")
    mp.setenv("DO_NOT_TRACK", "1")
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    mp.setenv("PREFECT_HOME", str(home))
    mp.delenv("PREFECT_API_URL", raising=False)
    refresh = getattr(sys.modules.get("prefect.context"), "refresh_global_settings_context", None)
    if refresh is not None:  # Prefect was imported during collection: make it re-read the environment
        refresh()
    yield
    mp.undo()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A tiny demo region (2 scenes x 9 sites), generated once, with its catalog at ``data_catalog.yaml``.

    Shared by the whole session: read it, never write into it (use ``make_catalog`` for a copy).
    """
    from tasks.demo import generate_demo_region

    root = tmp_path_factory.mktemp("demo_region")
    generate_demo_region(root, scale=1, seed=0, sites_per_side=DEMO_SITES_PER_SIDE)
    _write_catalog(root)
    return root


@pytest.fixture
def make_catalog(demo_root) -> Callable[..., Path]:
    """``make_catalog(folder, inputs=True, **overrides) -> catalog path``.

    Copies the demo region's ``inputs/`` into ``folder`` (so a test may corrupt the copy) and writes the
    repository catalog there with ``root: "."``; ``overrides`` are deep-merged into the catalog mapping,
    e.g. ``settings={"ingest": {"required_bands": 5}}`` or ``datasets={"input_labels": {"uri": ...}}``.
    ``inputs=False`` writes only the catalog (for tests that bring their own inputs).
    """

    def _make(folder: Path, inputs: bool = True, **overrides) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if inputs:
            shutil.copytree(demo_root / "inputs", folder / "inputs")
        return _write_catalog(folder, **overrides)

    return _make
