"""Alerts: catalog thresholds (``settings.report``) breached, and what got worse since last version."""

from __future__ import annotations

from tasks.report.params import ReportSettings


def alerts(m: dict, prev: dict | None, settings: ReportSettings, missing: list[str]) -> list[dict]:
    """Catalog thresholds breached, and what got worse since the previous version."""
    out: list[dict] = []
    h, ph = m["headline"], (prev or {}).get("headline", {})

    def warn(key, msg, level="warning"):
        out.append({"key": key, "level": level, "message": msg})

    share = h.get("risky_site_share")
    if share is not None and share > settings.max_risky_site_share:
        warn(
            "risky_site_share",
            f"{share:.1%} of scored sites are risky (mean risk > "
            f"{settings.risky_site_mean_risk}); threshold {settings.max_risky_site_share:.0%}.",
        )
    if share is not None and ph.get("risky_site_share") is not None:
        up = share - ph["risky_site_share"]
        if up > settings.max_risky_share_increase:
            warn(
                "risky_share_up",
                f"Share of risky sites up {up:+.1%} since the previous version "
                f"(threshold {settings.max_risky_share_increase:.0%}).",
            )
    for key, limit, what in (
        ("nodata_share", settings.max_nodata_share, "nodata"),
        ("cloud_share", settings.max_cloud_share, "cloud"),
    ):
        v = h.get(key)
        if v is not None and v > limit:
            warn(key, f"Mean tile {what} share is {v:.1%} (threshold {limit:.0%}).")
    for sc in m["imagery"]["scenes"]:
        v = sc.get("mean_nodata_fraction")
        if v is not None and v > settings.max_nodata_share:
            warn("scene_nodata", f"Scene {sc['scene_id']}: mean nodata {v:.1%} of its tiles.", "info")
    iou, piou = h.get("pooled_gold_iou"), ph.get("pooled_gold_iou")
    if iou is not None and piou is not None and piou - iou > settings.max_iou_drop:
        warn("iou_drop", f"Pooled gold IoU fell from {piou:.3f} to {iou:.3f}.")
    now = {r["labeller_id"]: r for r in m["quality"]["leaderboard"]}
    before = {r["labeller_id"]: r for r in (prev or {}).get("quality", {}).get("leaderboard", [])}
    for lid, r in sorted(now.items()):
        if before.get(lid, {}).get("trusted") and not r["trusted"]:
            warn("lost_trust", f"Labeller {lid} lost trust (rolling score {r['rolling_score']}).")
        elif not r["trusted"] and r["n_gold"]:
            warn(
                "untrusted",
                f"Labeller {lid} is not trusted (rolling score below the trust threshold).",
                "info",
            )
        if (r["drift_p_value"] or 1.0) < 0.05 and (r["drift_slope_per_day"] or 0.0) < 0:
            warn(
                "drift",
                f"Labeller {lid}: score drifting down ({r['drift_slope_per_day']:+.4f}/day, "
                f"p = {r['drift_p_value']:.3f}).",
                "info",
            )
    if missing:
        warn("missing", "Artifacts not in this version: " + ", ".join(sorted(set(missing))) + ".", "info")
    return out
