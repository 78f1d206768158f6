"""The schema of ``data_catalog.yaml``: every dataset the pipeline reads or writes, and its settings.

Loading validates the whole file and reports the first problems by entry and field, so a user who
points ``--catalog`` at a hand-written file learns exactly what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.tables import TABLES

INPUTS = ("imagery", "input_sites", "input_assignments", "input_labels", "input_item_labels")
REQUIRED_INPUTS = ("imagery", "input_sites", "input_assignments", "input_labels")
ARTIFACTS = (
    "sites", "tiles", "labels", "assignments", "item_labels",
    "assignment_quality", "labeller_quality", "site_consensus", "consensus_labels", "consensus_rasters",
    "item_consensus", "item_labeller_quality", "item_confusion",
    "label_issues", "assignment_issues",
    "model", "oos_probabilities", "pseudo_probabilities", "pseudo_labels", "pseudo_label_thresholds",
    "metrics", "report",
)  # fmt: skip


class CatalogError(ValueError):
    """The catalog is unreadable or invalid; the message names the file, the entry and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dataset(_Strict):
    kind: Literal["input", "artifact"]
    uri: str = Field(
        min_length=1, description="Path or glob relative to the root (inputs), or to the version."
    )
    format: Literal["geotiff", "vector", "csv", "parquet", "geoparquet", "cog", "pytorch", "json", "html"]
    description: str = ""
    schema_ref: str | None = Field(None, alias="schema", description="Table name in schemas/tables.py.")
    primary_key: list[str] = []
    crs: str | None = Field(None, description="Declared CRS; 'native' = the site's projected CRS.")
    stage: str | None = Field(None, description="Stage that produces an artifact.")
    optional: bool = False
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename map: pipeline column -> column name in the user's file."
    )
    constants: dict[str, str] = Field(
        default_factory=dict,
        description="Columns the file lacks, filled with one value (e.g. a labeller_id).",
    )

    @field_validator("schema_ref")
    @classmethod
    def _known_schema(cls, v: str | None) -> str | None:
        if v is not None and v not in TABLES:
            raise ValueError(f"unknown schema {v!r}; known: {sorted(TABLES)}")
        return v

    @model_validator(mode="after")
    def _artifact_has_stage(self) -> Dataset:
        if self.kind == "artifact" and not self.stage:
            raise ValueError("an artifact needs the 'stage' that produces it")
        return self


class IngestSettings(_Strict):
    cloud_threshold: float | None = Field(
        None,
        description="DN of the visible-band (B, G, R) mean above which a pixel is cloud-like; "
        "default 220 for 8-bit data, 4500 for 16-bit reflectance x 10 000",
    )
    band_names: list[str] | None = Field(None, description="Override band names when files carry none.")
    required_bands: int = Field(1, ge=1, description="Fewest bands a scene may have.")
    batch_size: int = Field(
        100,
        ge=1,
        description="Sites per Dask task of the per-site stages (consensus, label issues); ingest reads "
        "every scene's tiles in one Dask computation, whatever this says.",
    )


class ScheduleSettings(_Strict):
    """When the pipeline runs by itself (``labelrefinery deploy``) and how the label watcher behaves."""

    cron: str = Field("0 2 * * *", description="Nightly refresh, five-field cron.")
    timezone: str = Field("UTC", description="IANA time zone of the cron, e.g. Africa/Nairobi.")
    watch_interval_s: float = Field(60.0, gt=0, description="How often the label watcher compares inputs.")
    quiet_s: float = Field(
        30.0, ge=0, description="Debounce: announce a change only after the label files were still this long."
    )
    debounce_s: float = Field(
        60.0, ge=0, description="The reprocess trigger fires once per this window, however many events."
    )
    renotify_s: float = Field(
        600.0, gt=0, description="Announce a change set that is still unpublished again after this long."
    )
    lock_wait_s: float = Field(3600.0, ge=0, description="How long a scheduled run waits for a running one.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron {v!r} must have five fields (minute hour day month weekday)")
        return v

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class Settings(_Strict):
    reference_labellers: list[str] = Field(min_length=0, default_factory=list)
    label_classes: list[str] = Field(
        default_factory=list, description="Allowed polygon classes; empty = any."
    )
    item_classes: list[str] = Field(default_factory=list, description="Allowed item classes; empty = any.")
    ingest: IngestSettings = IngestSettings()
    consensus: dict[str, Any] = Field(default_factory=dict, description="ConsensusParams overrides.")
    learn: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] = Field(default_factory=dict)
    schedule: ScheduleSettings = ScheduleSettings()


class Catalog(_Strict):
    catalog_version: Literal[1] = 1
    name: str = Field(min_length=1)
    root: str = Field(min_length=1, description="Dataset root (versions live here), relative to this file.")
    input_root: str | None = Field(None, description="Where relative input URIs start; default: root.")
    description: str = ""
    intended_use: str = ""
    limitations: str = ""
    settings: Settings = Settings()
    datasets: dict[str, Dataset]
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _required(self) -> Catalog:
        for name in REQUIRED_INPUTS + ARTIFACTS:
            if name not in self.datasets:
                raise ValueError(f"datasets: entry {name!r} is required")
        for name in INPUTS:
            if name in self.datasets and self.datasets[name].kind != "input":
                raise ValueError(f"datasets.{name}: must have kind 'input'")
        return self

    @property
    def root_path(self) -> Path:
        return self._resolve(self.root)

    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        return path.resolve()

    @property
    def input_root_path(self) -> Path:
        return self._resolve(self.input_root) if self.input_root else self.root_path

    def input_path(self, name: str) -> str:
        """Absolute path (or glob) of an input dataset."""
        uri = Path(self.datasets[name].uri).expanduser()
        return str(uri if uri.is_absolute() else self.input_root_path / uri)


DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "data_catalog.yaml"


def _with_default_artifacts(raw: dict) -> dict:
    """A user's catalog may list only its inputs: artifact entries it leaves out take the standard layout
    of the repository's data_catalog.yaml (the one map of every dataset)."""
    datasets = raw.get("datasets")
    if not isinstance(datasets, dict) or not DEFAULT_CATALOG.exists():
        return raw
    default = yaml.safe_load(DEFAULT_CATALOG.read_text(encoding="utf-8"))["datasets"]
    missing = {k: v for k, v in default.items() if v.get("kind") == "artifact" and k not in datasets}
    return {**raw, "datasets": {**datasets, **missing}} if missing else raw


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; raise :class:`CatalogError` naming entry and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a mapping at the top level")
    try:
        cat = Catalog.model_validate(_with_default_artifacts(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{where}: {err['msg']}")
        raise CatalogError(f"{path}: invalid catalog:\n  " + "\n  ".join(problems)) from None
    cat.path = path.resolve()
    return cat
