"""The data catalog: the repository's file loads, and every kind of broken file is named precisely."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from schemas.catalog import ARTIFACTS, REQUIRED_INPUTS, CatalogError, load_catalog
from schemas.tables import TABLES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))


def _load_variant(tmp_path: Path, raw: dict, change) -> str:
    """Write a changed copy of the repository catalog; return the CatalogError message it gives."""
    cat = copy.deepcopy(raw)
    change(cat)
    path = tmp_path / "broken_catalog.yaml"
    path.write_text(yaml.safe_dump(cat, sort_keys=False), encoding="utf-8")
    with pytest.raises(CatalogError) as exc:
        load_catalog(path)
    msg = str(exc.value)
    assert str(path) in msg
    return msg


def test_repo_catalog_loads():
    cat = load_catalog(REPO / "data_catalog.yaml")
    assert cat.path == (REPO / "data_catalog.yaml").resolve()
    assert cat.root_path == (REPO / "demo_region").resolve()
    for name in REQUIRED_INPUTS:
        assert cat.datasets[name].kind == "input"
    for name in ARTIFACTS:
        ds = cat.datasets[name]
        assert ds.kind == "artifact" and ds.stage
        if ds.schema_ref is not None:
            assert ds.schema_ref in TABLES
            assert ds.primary_key == list(TABLES[ds.schema_ref].primary_key)
    assert cat.input_path("input_sites") == str(cat.root_path / "inputs" / "sites.geojson")
    assert cat.settings.reference_labellers == ["expert"]
    assert cat.settings.ingest.required_bands == 4


def test_input_root_and_absolute_uris(tmp_path, raw):
    cat = copy.deepcopy(raw)
    cat["root"] = "versions_here"
    cat["input_root"] = "../elsewhere"
    cat["datasets"]["imagery"]["uri"] = "/abs/scenes/*.tif"
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "cat.yaml"
    path.write_text(yaml.safe_dump(cat), encoding="utf-8")
    loaded = load_catalog(path)
    assert loaded.root_path == (tmp_path / "sub" / "versions_here").resolve()
    assert loaded.input_path("input_labels") == str(
        (tmp_path / "elsewhere").resolve() / "inputs/labels.parquet"
    )
    assert loaded.input_path("imagery") == "/abs/scenes/*.tif"


def test_unknown_key_names_entry_and_field(tmp_path, raw):
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"]["sites"].update(colour="red"))
    assert "datasets.sites.colour" in msg and "not permitted" in msg


def test_unknown_top_level_and_settings_keys(tmp_path, raw):
    msg = _load_variant(tmp_path, raw, lambda c: c["settings"]["ingest"].update(cloud_thresold=3))
    assert "settings.ingest.cloud_thresold" in msg


@pytest.mark.parametrize("missing", ["input_labels", "imagery", "input_sites"])
def test_missing_required_dataset(tmp_path, raw, missing):
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"].pop(missing))
    assert f"entry {missing!r} is required" in msg


def test_omitted_artifacts_take_the_standard_layout(tmp_path, raw):
    raw = copy.deepcopy(raw)
    raw["datasets"] = {k: v for k, v in raw["datasets"].items() if v["kind"] == "input"}
    path = tmp_path / "inputs_only.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cat = load_catalog(path)
    assert cat.datasets["tiles"].uri == "tiles.parquet" and cat.datasets["tiles"].stage == "ingest"


def test_bad_schema_name(tmp_path, raw):
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"]["sites"].update(schema="sitez"))
    assert "datasets.sites.schema" in msg and "unknown schema 'sitez'" in msg


def test_artifact_without_stage(tmp_path, raw):
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"]["tiles"].pop("stage"))
    assert "datasets.tiles" in msg and "'stage'" in msg


def test_input_declared_as_artifact(tmp_path, raw):
    msg = _load_variant(
        tmp_path, raw, lambda c: c["datasets"]["imagery"].update(kind="artifact", stage="ingest")
    )
    assert "datasets.imagery" in msg and "kind 'input'" in msg


def test_bad_values(tmp_path, raw):
    msg = _load_variant(tmp_path, raw, lambda c: c["settings"]["ingest"].update(required_bands=0))
    assert "settings.ingest.required_bands" in msg
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"]["imagery"].update(format="jpeg"))
    assert "datasets.imagery.format" in msg
    msg = _load_variant(tmp_path, raw, lambda c: c["datasets"]["input_sites"].update(uri=""))
    assert "datasets.input_sites.uri" in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    text = (REPO / "data_catalog.yaml").read_text(encoding="utf-8").replace("Synthetic", "Synthétic")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CatalogError, match="not UTF-8") as exc:
        load_catalog(path)
    assert str(path) in str(exc.value)
    assert f"byte {text.index('Synthétic') + len('Synth')}" in str(exc.value)


def test_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndatasets: [a, b\n  c: }\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="not valid YAML") as exc:
        load_catalog(path)
    assert str(path) in str(exc.value) and "line 3" in str(exc.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="mapping at the top level"):
        load_catalog(path)
    with pytest.raises(CatalogError, match="not found") as exc:
        load_catalog(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(exc.value)
