"""Parameters of the learn stages (training, out-of-sample probabilities, pseudo-labels).

Every knob lives here and is overridden from the catalog's ``settings.learn`` mapping. The CPU defaults
fit training + inference for the 128-site demo region into about a minute on two cores; on CUDA the
``gpu_*`` fields replace the matching CPU ones (wider network, more steps, bigger batches, bf16).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.catalog import Catalog


class LearnParams(BaseModel):
    """All tunables of the learn stages (immutable, picklable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- network ---------------------------------------------------------------------------------------
    base_width: int = Field(8, ge=4, description="Channels of the first U-Net level (doubles per level).")
    depth: int = Field(3, ge=1, le=5, description="Down-samplings of the U-Net.")

    # --- targets ---------------------------------------------------------------------------------------
    boundary_px: int = Field(2, ge=1, le=4, description="Width of the boundary class inside each field, px.")
    edge_vote_share: float = Field(
        0.5, gt=0, le=1, description="Consensus sites: an edge drawn by this share of voters is a boundary."
    )
    field_threshold: float = Field(0.5, gt=0, lt=1, description="Consensus probability that makes a field.")

    # --- training --------------------------------------------------------------------------------------
    folds: int = Field(3, ge=2, description="K of the K-fold split across labelled sites.")
    steps: int = Field(300, ge=1, description="Optimiser steps per model (each fold and the final model).")
    batch_size: int = Field(4, ge=1)
    crop_px: int = Field(96, ge=16, description="Random square training crops (multiple of 2**depth).")
    lr: float = Field(5e-3, gt=0, description="Peak learning rate of the one-cycle schedule.")
    weight_decay: float = Field(1e-4, ge=0)
    class_weights: tuple[float, float, float] = Field(
        (1.0, 1.0, 3.0), description="Loss weight of background, interior, boundary (boundaries are thin)."
    )
    min_valid_fraction: float = Field(
        0.05, ge=0, le=1, description="Sites with less valid (not nodata/cloud) area are not trained on."
    )
    seed: int = Field(0, description="Seed of folds, crops and initial weights.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for torch; 0 = the Dask worker's thread count (a one-thread worker: one "
        "core), outside Dask every core this process may use.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")

    # --- inference -------------------------------------------------------------------------------------
    infer_batch_size: int = Field(8, ge=1)
    bf16: bool = Field(True, description="bf16 autocast (CUDA only; CPU always runs fp32).")
    channels_last: bool = Field(True, description="channels-last memory format (CUDA only).")

    # --- CUDA overrides ----------------------------------------------------------------------------------
    gpu_base_width: int = Field(32, ge=4)
    gpu_steps: int = Field(1500, ge=1)
    gpu_batch_size: int = Field(32, ge=1)
    gpu_crop_px: int = Field(224, ge=16)
    gpu_infer_batch_size: int = Field(128, ge=1)

    # --- vectorising and thresholds ------------------------------------------------------------------
    grow_px: int = Field(2, ge=0, description="Instances grow this far into field (incl. boundary) pixels.")
    min_polygon_px: int = Field(12, ge=1, description="Smaller instances are dropped (demo slivers >= 12.5).")
    match_iou: float = Field(0.5, gt=0, le=1, description="A polygon is a true positive at this IoU or more.")
    target_precision: float = Field(0.9, gt=0, le=1, description="Per-class polygon precision to reach.")
    min_support: int = Field(20, ge=1, description="Fewest kept polygons a threshold may rest on.")
    threshold_roles: tuple[str, ...] = Field(
        ("gold", "multi"), description="Sites whose out-of-sample polygons are scored for the threshold."
    )
    gold_first: bool = Field(
        True,
        description="Choose on gold sites alone when they carry >= min_support polygons: their targets are "
        "the reference, consensus targets understate precision (merged or shifted consensus fields).",
    )
    precision_z: float = Field(
        1.2816,
        ge=0,
        description="The Wilson lower bound at this z must reach the target (0 = point estimate).",
    )
    confidence: Literal["certainty", "field"] = Field(
        "certainty", description="Polygon confidence: mean winning-class or mean field probability."
    )
    second_opinion: Literal["oos", "final"] = Field(
        "oos",
        description="Single-labeller sites: their out-of-sample probabilities (a model that never saw that "
        "labeller's polygons there) or the final model's.",
    )

    def for_device(self, cuda: bool) -> LearnParams:
        """The effective parameters on this device (CUDA takes the ``gpu_*`` values)."""
        if not cuda:
            return self
        return self.model_copy(
            update={
                "base_width": self.gpu_base_width,
                "steps": self.gpu_steps,
                "batch_size": self.gpu_batch_size,
                "crop_px": self.gpu_crop_px,
                "infer_batch_size": self.gpu_infer_batch_size,
            }
        )


SUBSTAGES = ("label_issues",)  # keys of settings.learn that belong to the other learn stages


def params_from_catalog(catalog: Catalog) -> LearnParams:
    return LearnParams(**{k: v for k, v in catalog.settings.learn.items() if k not in SUBSTAGES})
