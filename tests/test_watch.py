"""The label watcher: change detection against the last published version, and its debouncing."""

from __future__ import annotations

import os
import time

import geopandas as gpd
import pandas as pd
import pytest

from flows.watch import check_once, dataset_resource
from schemas.catalog import load_catalog
from tasks.ingest.changes import detect_label_changes
from tasks.ingest.stage import run_ingest
from tasks.store.versions import VersionStore


@pytest.fixture
def published(tmp_path, make_catalog):
    """A copy of the demo region with one published (ingest-only) version."""
    path = make_catalog(tmp_path / "region", settings={"schedule": {"quiet_s": 0}})
    catalog = load_catalog(path)
    store = VersionStore(catalog.root_path)
    draft = store.new_draft()
    run_ingest(catalog, draft.path)
    store.publish(draft, {})
    return catalog


def _labels(catalog):
    return catalog.input_path("input_labels")


def test_nothing_changed_after_publishing(published):
    changes = detect_label_changes(published)
    assert changes.published_version is not None
    assert changes.sites == [] and not changes.any


def test_edited_polygon_and_new_completion_are_the_changed_sites(published):
    labels = gpd.read_parquet(_labels(published))
    site = labels["site_id"].iloc[0]
    moved = labels.copy()
    first = moved.index[moved["site_id"] == site][0]
    moved.loc[first, "geometry"] = moved.loc[first, "geometry"].buffer(-3.0)
    moved.to_parquet(_labels(published))
    a_path = published.input_path("input_assignments")
    a = pd.read_csv(a_path, dtype=str)
    pending = a.index[a["completed_at"].isna()]
    other = a.loc[pending[0], "site_id"]
    assert other != site
    a.loc[pending[0], "completed_at"] = "2026-11-27T10:00:00Z"  # "no fields here" from a pending task
    a.to_csv(a_path, index=False)

    changes = detect_label_changes(published)
    assert changes.changed == sorted({site, other})
    assert changes.added == [] and changes.removed == []


def test_class_change_alone_is_a_change(published):
    labels = gpd.read_parquet(_labels(published))
    row = labels.index[labels["label"].notna()][0]
    labels.loc[row, "label"] = "fallow" if labels.loc[row, "label"] == "crop" else "crop"
    labels.to_parquet(_labels(published))
    assert detect_label_changes(published).changed == [labels.loc[row, "site_id"]]


def test_watcher_debounces_and_announces_each_change_set_once(published):
    sent = []

    def emit(catalog, changes):
        sent.append(changes.sites)
        return f"event-{len(sent)}"

    s = published.settings.schedule
    assert check_once(published, 0, s.renotify_s, emit=emit).status == "unchanged"
    labels = gpd.read_parquet(_labels(published))
    site = labels["site_id"].iloc[-1]
    labels[labels["site_id"] != site].to_parquet(_labels(published))  # every polygon of one site deleted
    now = time.time()
    assert check_once(published, 60, s.renotify_s, emit=emit, now=now).status == "settling"
    assert sent == []
    first = check_once(published, 0, s.renotify_s, emit=emit, now=now)
    assert first.status == "announced" and first.event_id == "event-1" and sent == [[site]]
    assert check_once(published, 0, s.renotify_s, emit=emit, now=now + 1).status == "already_announced"
    later = check_once(published, 0, s.renotify_s, emit=emit, now=now + s.renotify_s + 1)
    assert later.status == "announced" and len(sent) == 2  # still unpublished: said again


def test_watcher_on_an_unpublished_root_says_so(tmp_path, make_catalog):
    catalog = load_catalog(make_catalog(tmp_path / "fresh"))
    assert check_once(catalog, 0, 60, emit=lambda *a: pytest.fail("nothing to compare with")).status == (
        "unpublished"
    )


def test_bad_label_input_names_the_file(published):
    labels = gpd.read_parquet(_labels(published))
    labels.loc[0, "labeller_id"] = "nobody-assigned"
    labels.to_parquet(_labels(published))
    with pytest.raises(Exception, match="labels.parquet") as info:
        detect_label_changes(published)
    assert "nobody-assigned" in str(info.value)


def test_resource_id_is_per_dataset_root(tmp_path, make_catalog):
    a = load_catalog(make_catalog(tmp_path / "a", inputs=False))
    b = load_catalog(make_catalog(tmp_path / "b", inputs=False))
    assert dataset_resource(a)["prefect.resource.id"] != dataset_resource(b)["prefect.resource.id"]
    assert dataset_resource(a)["prefect.resource.id"].startswith("labelrefinery.dataset.")
    assert os.path.isabs(dataset_resource(a)["labelrefinery.root"])
