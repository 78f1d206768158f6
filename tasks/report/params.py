"""Report settings (alert thresholds, sample sizes) and the published reference the risk page compares to.

Thresholds live in the catalog (``settings.report``) so a project can tune alerts without code; the
defaults below are what an unconfigured catalog gets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Site-level consensus risk of the African crop-field labels (Estes et al. 2024, Lacuna platform): quartiles
# of the per-site mean risk and of the share of risky pixels, as published.
REFERENCE_RISK = {
    "source": "Estes et al. (2024), crop field boundary labels for Africa (Lacuna)",
    "mean_risk_quartiles": [0.073, 0.138, 0.209],
    "risky_fraction_quartiles": [0.049, 0.132, 0.268],
}


class ReportSettings(BaseModel):
    """``settings.report`` of the catalog; unknown keys are an error so typos do not silently do nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    risky_site_mean_risk: float = Field(
        0.209, ge=0, le=0.5, description="A site is risky when its mean risk exceeds this (reference Q3)."
    )
    max_risky_site_share: float = Field(
        0.25, ge=0, le=1, description="Alert above this share of risky sites."
    )
    max_risky_share_increase: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Alert when the risky-site share grew by more than this since last version.",
    )
    max_nodata_share: float = Field(0.15, ge=0, le=1, description="Alert when mean tile nodata exceeds this.")
    max_cloud_share: float = Field(0.10, ge=0, le=1, description="Alert when mean tile cloud exceeds this.")
    max_iou_drop: float = Field(
        0.02, ge=0, le=1, description="Alert when pooled gold IoU fell by more than this since last version."
    )
    n_riskiest: int = Field(20, ge=0, le=200, description="Riskiest sites shown as thumbnails.")
    n_issues: int = Field(20, ge=0, le=200, description="Label issues shown with thumbnails.")
    n_examples: int = Field(8, ge=0, le=100, description="Pseudo-label examples shown.")
    thumb_px: int = Field(160, ge=32, le=512, description="Thumbnail side in pixels.")
    max_table_rows: int = Field(50, ge=5, le=5000, description="Longest list printed on a page.")
    property_patches: int = Field(
        800, ge=50, le=20000, description="Image patches sampled for intrinsic dimension and sharpness."
    )
    patch_px: int = Field(32, ge=8, le=256, description="Side of a sampled patch (pixels on the site grid).")
    patch_feature_px: int = Field(8, ge=2, le=64, description="Patches are averaged down to this side.")
    mle_k: int = Field(20, ge=3, le=100, description="Neighbours of the Levina-Bickel MLE (Konz: k = 20).")
    seed: int = 0

    @model_validator(mode="after")
    def _patch_divides(self) -> ReportSettings:
        if self.patch_px % self.patch_feature_px:
            raise ValueError("patch_px must be a multiple of patch_feature_px (patches are block-averaged)")
        return self


def report_settings(raw: dict | None) -> ReportSettings:
    return ReportSettings(**(raw or {}))
