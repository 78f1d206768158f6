"""Page content: labeller quality and consensus with risk (the pages with leaderboards and thumbnails)."""

from __future__ import annotations

from tasks.report.metrics import COMPONENTS, MEASURES
from tasks.report.pages import fig, fmt, h2, interval, para, table, thumb_rows


def quality(m: dict) -> list[dict]:
    q, a = m["quality"], m["assets"]["figures"]
    rank = "latent IoU (EM, every site)" if q["rank_by"] == "latent_iou" else "mean gold IoU"
    board = [
        [
            i + 1,
            r["labeller_id"],
            fmt(r["n_gold"], "int"),
            interval(r, "iou"),
            interval(r, "lacuna_score"),
            interval(r, "boundary_f"),
            fmt(r["latent_iou"]),
            fmt(r["rolling_score"]),
            fmt(r["trusted"]),
            fmt(r["drift_slope_per_day"], "f4"),
            fmt(r["drift_p_value"]),
        ]
        for i, r in enumerate(q["leaderboard"])
    ]
    comp = dict(MEASURES)
    blocks = [
        para(
            f"Scored on {fmt(q['gold_assignments'], 'int')} gold assignments; pooled gold IoU "
            f"{fmt(q['pooled_gold_iou'])}. Ranked by {rank}. Intervals are 90 % bootstrap intervals over "
            "gold tasks."
        ),
        h2("Leaderboard"),
        fig(a.get("leaderboard"), "leaderboard with intervals"),
        table(
            [
                "#",
                "labeller",
                "gold tasks",
                "IoU [90 %]",
                "Lacuna score [90 %]",
                "boundary F [90 %]",
                "latent IoU",
                "rolling score",
                "trusted",
                "drift /day",
                "drift p",
            ],
            board,
        ),
        h2("Components"),
        para(
            "Area: area-weighted accuracy; N: share of reference fields matched one-to-one; Edge: Lacuna "
            "ring "
            "measure (≈0.011 for a perfect boundary); Categorical: right class on correctly located area; "
            "IoU: "
            "field overlap; boundary F: boundary precision/recall within the tolerance."
        ),
        fig(a.get("components"), "components per labeller"),
        table(
            ["labeller", *(comp[c] for c in COMPONENTS)],
            [[r["labeller_id"], *(interval(r, c) for c in COMPONENTS)] for r in q["leaderboard"]],
        ),
        h2("Drift"),
        para(
            f"{q['trust_measure']} per gold task over time; dashed line: trust threshold "
            f"{fmt(q['trust_threshold'], 'f2')}."
        ),
        fig(a.get("drift"), "drift plot per labeller"),
        h2("Image-level labels"),
    ]
    if q["item_quality"]:
        blocks.append(
            table(
                ["labeller", "answers", "scored", "accuracy", "90 % interval", "against"],
                [
                    [
                        r["labeller_id"],
                        fmt(r.get("n_labels"), "int"),
                        fmt(r.get("n_scored"), "int"),
                        fmt(r.get("accuracy")),
                        f"[{fmt(r.get('accuracy_lo'))}, {fmt(r.get('accuracy_hi'))}]",
                        r.get("accuracy_basis") or "–",
                    ]
                    for r in q["item_quality"]
                ],
            )
        )
        blocks.append(
            fig(
                a.get("confusion"),
                "confusion matrices for image-level labels",
                "P(given class | true class) per labeller (Dawid–Skene); rows true, columns given.",
            )
        )
    else:
        blocks.append(
            {"kind": "missing", "text": "This version has no image-level labels (item_* artifacts)."}
        )
    return blocks


def consensus(m: dict) -> list[dict]:
    c, a = m["consensus"], m["assets"]["figures"]
    ref = c["reference"]
    ag = c["agreement"]
    q = c["mean_risk_quartiles"], c["risky_fraction_quartiles"]
    blocks = [
        para(
            f"{fmt(c['n_sites'], 'int')} sites have a consensus ("
            + ", ".join(f"{k}: {fmt(v, 'int')}" for k, v in c["methods"].items())
            + "); risk r = min(p, 1 − p) per pixel. Distributions use the "
            f"{fmt(c['n_scored_sites'], 'int')} non-gold "
            "sites (gold sites are clamped to the reference, risk 0)."
        ),
        h2("Site risk beside the published reference"),
        fig(
            a.get("risk_distribution"),
            "distribution of site risk beside the reference",
            f"Reference: {ref['source']}.",
        ),
        table(
            ["", "Q1", "median", "Q3"],
            [
                ["site mean risk, this version", *(fmt(v) for v in q[0])],
                ["site mean risk, reference", *(fmt(v) for v in ref["mean_risk_quartiles"])],
                ["share of risky pixels, this version", *(fmt(v) for v in q[1])],
                ["share of risky pixels, reference", *(fmt(v) for v in ref["risky_fraction_quartiles"])],
            ],
        ),
        para(
            f"Risky sites (mean risk > {fmt(c['risky_site_threshold'])}): "
            f"{fmt(c['risky_site_share'], 'pct')}."
        ),
        h2("Agreement"),
        {
            "kind": "kv",
            "items": [
                ("sites with ≥ 2 labellers", fmt(ag["sites"], "int")),
                ("mean pairwise IoU", fmt(ag["mean_pairwise_iou"])),
                ("Fleiss' κ", fmt(ag["fleiss_kappa"])),
                ("Krippendorff's α", fmt(ag["krippendorff_alpha"])),
            ],
        },
        h2("Map of site risk"),
        fig(a.get("map_risk"), "map of site risk"),
        h2(f"The {len(c['riskiest'])} riskiest sites"),
    ]
    by_id = {s["site_id"]: s for s in c["sites"]}
    rows = thumb_rows(
        m["assets"]["riskiest"],
        lambda e: (
            f"{e['site_id']}: mean risk {fmt(by_id.get(e['site_id'], {}).get('mean_risk'))}, risky pixels "
            f"{fmt(by_id.get(e['site_id'], {}).get('risky_fraction'), 'pct')}, "
            f"labellers {fmt(by_id.get(e['site_id'], {}).get('n_labellers'), 'int')}"
        ),
    )
    blocks.append(
        {"kind": "thumbs", "rows": rows, "px": m["settings"]["thumb_px"]} if rows else para("No scored site.")
    )
    return blocks
