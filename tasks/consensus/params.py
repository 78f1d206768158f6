"""Parameters of the consensus stage.

Defaults reproduce the Lacuna platform (Estes et al. 2024); the catalog overrides them later, so every knob
lives here and nowhere else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUALITY_MEASURES = (
    "lacuna_score",
    "lacuna_area",
    "lacuna_n",
    "lacuna_edge",
    "lacuna_categorical",
    "iou",
    "tss",
    "field_skill",
    "nofield_skill",
    "boundary_f",
)


class ConsensusParams(BaseModel):
    """All tunables of the consensus stage (immutable, hashable, picklable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- Lacuna assignment score -------------------------------------------------------------------
    w_area: float = Field(0.55, ge=0, description="Weight of the area-weighted overall accuracy.")
    w_n: float = Field(0.225, ge=0, description="Weight of the share of reference fields matched 1:1.")
    w_edge: float = Field(0.1, ge=0, description="Weight of the boundary ring measure.")
    w_categorical: float = Field(0.125, ge=0, description="Weight of the class accuracy on tp area.")
    ref_ring_buffer_m: float = Field(9.0, gt=0, description="Reference boundary buffer (each side), m.")
    lab_ring_buffer_m: float = Field(0.1, gt=0, description="Labeller boundary buffer (each side), m.")
    match_overlap: float = Field(0.5, gt=0, lt=1, description="Pair matches when overlap > this of both.")

    # --- sound measures --------------------------------------------------------------------------------
    boundary_tolerance_px: float = Field(2.0, ge=0, description="Boundary F-score tolerance tau, pixels.")

    # --- labeller quality --------------------------------------------------------------------------------
    trust_measure: str = Field("lacuna_score", description="assignment_quality column behind trust/drift.")
    rolling_k: int = Field(5, ge=1, description="Rolling window (last k gold tasks) for trust.")
    trust_threshold: float = Field(0.45, description="Trusted when rolling score >= this.")
    interval_level: float = Field(0.9, gt=0, lt=1, description="Two-sided level of the quality intervals.")
    n_bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the mean intervals.")
    seed: int = Field(0, description="Seed of every random draw in the stage (bootstrap).")
    min_tasks_for_drift: int = Field(3, ge=3, description="Fewer gold tasks -> slope 0.0, p 1.0.")

    # --- consensus ---------------------------------------------------------------------------------------
    method: Literal["em", "bayes"] = "em"
    class_names: tuple[str, ...] = Field(("crop", "fallow"), description="Polygon classes, coded 1..C.")
    risk_threshold: float = Field(0.34, ge=0, le=0.5, description="Pixel is risky when risk > this.")
    label_threshold: float = Field(0.5, gt=0, lt=1, description="Field when posterior >= this.")
    edge_zone_px: int = Field(1, ge=0, description="EM edge-zone half width in pixels; 0 = plain DS.")
    em_max_iter: int = Field(200, ge=1)
    em_tol: float = Field(1e-7, gt=0, description="Stop when mean |delta parameter| < tol.")
    smoothing: float = Field(1.0, ge=0, description="Dirichlet pseudo-count per confusion cell (pixels).")
    guard_margin: float = Field(0.02, ge=0, lt=1, description="Inversion guard: keep sens+spec >= 1+margin.")
    clamp_gold_output: bool = Field(True, description="EM output on gold sites equals the reference.")

    # --- defaults for labellers without gold -------------------------------------------------------------
    default_quality: float | None = Field(None, description="Q without gold; None -> population mean.")
    fallback_quality: float = Field(0.5, gt=0, le=1, description="Q when nobody has gold.")
    fallback_field_skill: float = Field(
        0.75, gt=0, lt=1, description="FS / sensitivity when nobody has gold."
    )
    fallback_nofield_skill: float = Field(0.9, gt=0, lt=1, description="NFS / specificity ditto.")

    # --- incremental reprocessing ------------------------------------------------------------------------
    # Every site's consensus uses the global per-labeller values (EM skills and class confusions, or the
    # Bayesian merge weights), so refitting them exactly after a single relabelled site would nudge every
    # labeller's values a little and rewrite every site. A reprocess (``Reuse.refit = False``) therefore
    # keeps a labeller's previous values unless the refit moved one of them by more than this; a change
    # that matters (e.g. new gold showing a labeller is worse) still propagates to all their sites, and
    # the nightly refresh refits exactly. Not part of any site's key: it decides which values are used,
    # and the values used are keyed.
    carry_tolerance: float = Field(
        0.01,
        ge=0,
        description="Reprocess: keep a labeller's previous EM skills / merge weights (and the priors) "
        "when the refit moved each by at most this (absolute; 0 = take every change).",
    )

    @model_validator(mode="after")
    def _check(self) -> ConsensusParams:
        if len(self.class_names) > 8:
            raise ValueError("at most 8 polygon classes (codes must fit one decimal digit)")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.trust_measure not in QUALITY_MEASURES:
            raise ValueError(f"trust_measure must be one of {QUALITY_MEASURES}")
        return self

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def unclassed_code(self) -> int:
        """Raster code of a field polygon whose label is null or not in ``class_names``."""
        return len(self.class_names) + 1

    def class_code(self, label: str | None) -> int:
        """1..C for a known class, ``unclassed_code`` otherwise (null label = unclassed field)."""
        if label is None or label != label:  # None or NaN
            return self.unclassed_code
        try:
            return self.class_names.index(str(label)) + 1
        except ValueError:
            return self.unclassed_code

    def class_name(self, code: int) -> str | None:
        """Inverse of ``class_code``; unclassed and background map to None."""
        return self.class_names[code - 1] if 1 <= code <= len(self.class_names) else None
