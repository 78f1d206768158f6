"""Page content: label issues, pseudo-labels, dataset properties, changes since the previous version, use."""

from __future__ import annotations

from tasks.report.pages import fig, fmt, fmt_delta, h2, para, table, thumb_rows


def _missing(names: list[str], what: str) -> dict:
    names = ", ".join(names) if names else "its artifacts"
    return {
        "kind": "missing",
        "text": f"{what}: this version has no {names} (the stage that writes them has not "
        "run or is not part of this pipeline yet).",
    }


def issues(m: dict) -> list[dict]:
    li = m["label_issues"]
    if not li["available"]:
        return [_missing(li["missing"], "Label issues")]
    blocks = []
    if li["missing"]:
        blocks.append(_missing(li["missing"], "Partly available"))
    if li.get("n_issues") is not None:
        blocks += [
            para(
                f"{fmt(li['n_issues'], 'int')} issues"
                + (
                    f" on {fmt(li['sites_with_issues'], 'int')} sites"
                    if li.get("sites_with_issues") is not None
                    else ""
                )
                + (f", ranked by {li['score_column']}" if li.get("score_column") else "")
                + "."
            ),
            table(["kind", "issues"], [[k, fmt(v, "int")] for k, v in li["by_kind"].items()])
            if li["by_kind"]
            else para(""),
            h2("Ranked issues"),
            _rows_table(li["top"], li["n_issues"]),
        ]
        rows = thumb_rows(
            m["assets"]["issues"],
            lambda e: (
                f"#{e['rank']}: {e['site_id']}" + (f" · {e['labeller_id']}" if e.get("labeller_id") else "")
            ),
        )
        if rows:
            blocks += [h2("Thumbnails"), {"kind": "thumbs", "rows": rows, "px": m["settings"]["thumb_px"]}]
    if li.get("assignments"):
        blocks += [h2("Assignments"), _rows_table(li["assignments"]["top"], li["assignments"]["n"])]
    return blocks


def _rows_table(rows: list[dict], total) -> dict:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return table(
        ["#", *cols],
        [
            [
                i + 1,
                *(fmt(r.get(k), "f3") if isinstance(r.get(k), float) else (r.get(k) or "–") for k in cols),
            ]
            for i, r in enumerate(rows)
        ],
        total=total,
    )


def pseudo(m: dict) -> list[dict]:
    pl, a = m["pseudo_labels"], m["assets"]["figures"]
    if not pl["available"]:
        return [_missing(pl["missing"], "Pseudo-labels")]
    blocks = [_missing(pl["missing"], "Partly available")] if pl["missing"] else []
    if "rows" in pl:
        blocks += [
            h2("Coverage"),
            {
                "kind": "kv",
                "items": [
                    ("pseudo-label polygons (kept)", f"{fmt(pl['rows'], 'int')} ({fmt(pl['kept'], 'int')})"),
                    ("sites with a kept pseudo-label", fmt(pl["sites_kept"], "int")),
                    ("unlabelled sites", fmt(pl["unlabelled_sites"], "int")),
                    ("coverage of unlabelled sites", fmt(pl["coverage"], "pct")),
                    *((f"source: {k}", fmt(v, "int")) for k, v in pl["by_source"].items()),
                    ("mean confidence", fmt(pl.get("mean_confidence"))),
                ],
            },
            h2("Confidence"),
            fig(
                a.get("pseudo_confidence"),
                "confidence histogram",
                "Mean predicted field probability per polygon.",
            ),
        ]
    th = pl.get("thresholds")
    if th:
        blocks += [
            h2("Precision and recall at the chosen threshold"),
            para(
                "Per class, the lowest confidence whose out-of-sample polygons reach the target precision, "
                "measured "
                "on gold and multi-labeller sites."
            ),
            table(
                ["class", "threshold", "precision", "recall", "target precision", "polygons kept", "sites"],
                [
                    [
                        r["class"],
                        fmt(r.get("threshold")),
                        fmt(r.get("precision")),
                        fmt(r.get("recall")),
                        fmt(r.get("target_precision")),
                        fmt(r.get("n_polygons"), "int"),
                        fmt(r.get("n_sites"), "int"),
                    ]
                    for r in th
                ],
            ),
        ]
    rows = thumb_rows(m["assets"]["pseudo"], lambda e: e["site_id"])
    if rows:
        blocks += [h2("Examples"), {"kind": "thumbs", "rows": rows, "px": m["settings"]["thumb_px"]}]
    return blocks


def properties(m: dict) -> list[dict]:
    p, a = m["properties"], m["assets"]["figures"]
    cb, sb, idim, ks = (
        p["class_balance"],
        p["spatial_balance"],
        p["intrinsic_dimension"],
        p["label_sharpness"],
    )
    return [
        h2("Class balance"),
        para(
            "How evenly the classes are represented; a rare class is learnt poorly and its errors are "
            "hidden by "
            "aggregate scores."
        ),
        {
            "kind": "kv",
            "items": [
                ("field share of consensus pixels", fmt(cb["field_share"], "pct")),
                *((f"field pixels: {k}", fmt(v, "pct")) for k, v in cb["field_pixels_by_class"].items()),
                ("image-level imbalance (largest / smallest class)", fmt(cb["item_imbalance_ratio"], "f2")),
            ],
        },
        fig(a.get("balance"), "class and spatial balance"),
        h2("Spatial balance"),
        para(
            "Whether labels cover the region evenly: 1 means labelled sites are spread over scenes in "
            "equal numbers, "
            "values near 0 mean they bunch in a few scenes."
        ),
        {
            "kind": "kv",
            "items": [
                ("normalised entropy of labelled sites over scenes", fmt(sb["labelled_entropy"])),
                ("coefficient of variation of the labelled share", fmt(sb["labelled_share_cv"])),
            ],
        },
        table(
            ["scene", "sites", "labelled", "gold"],
            [
                [s["scene_id"], fmt(s["sites"], "int"), fmt(s["labelled"], "int"), fmt(s["gold"], "int")]
                for s in sb["scenes"]
            ],
        ),
        h2("Intrinsic dimension of the tiles"),
        para(
            "The number of degrees of freedom the image patches actually vary in; generalisation error "
            "grows with it "
            "(Konz & Mazurowski 2024), so a higher value needs more labels for the same accuracy."
        ),
        {
            "kind": "kv",
            "items": [
                ("MLE (Levina–Bickel, k = " + str(idim["k"]) + ")", fmt(idim["mle"], "f1")),
                ("TwoNN", fmt(idim["twonn"], "f1")),
                ("patches", fmt(idim["n_patches"], "int")),
                ("features", f"{idim['features']} ({fmt(idim['n_features'], 'int')} values)"),
            ],
        },
        h2("Label sharpness K_F"),
        para(
            "K_F = max |y_j − y_k| / ‖x_j − x_k‖ over patch pairs (Konz & Mazurowski 2024): how close two "
            "patches with "
            "different labels can look; high sharpness means small image changes flip the label, which makes "
            "generalisation and robustness harder."
        ),
        {
            "kind": "kv",
            "items": [
                ("K_F", fmt(ks["k_f"], "f3")),
                ("labelled patches", fmt(ks["n_patches"], "int")),
                ("field patches", fmt(ks["field_patches"], "int")),
                ("label", ks["label"]),
            ],
        },
    ]


def changes(m: dict) -> list[dict]:
    ch = m["changes"]
    if not ch.get("previous_version_id"):
        return [para("This is the first version with a report: nothing to compare against.")]
    rows = []
    for r in ch["headline"]:
        d, cls = r["delta"], "same"
        if d and r["better"]:
            cls = "better" if (d > 0) == (r["better"] == "up") else "worse"
        rows.append(
            [
                r["label"],
                fmt(r["previous"], r["format"]),
                fmt(r["current"], r["format"]),
                {"text": fmt_delta(d, r["format"]), "cls": cls},
            ]
        )

    def ids(key, n_key=None):
        v = ch[key]
        n = ch[n_key] if n_key else len(v)
        more = f" … and {n - len(v)} more" if n > len(v) else ""
        return (", ".join(v) + more) if v else "none"

    note = ch.get("site_labels_note")  # the previous version's label fingerprints were of another kind
    site_items = (
        []
        if note
        else [
            (f"labels changed ({ch['n_sites_changed']})", ids("sites_changed", "n_sites_changed")),
            (
                f"newly labelled ({ch['n_sites_newly_labelled']})",
                ids("sites_newly_labelled", "n_sites_newly_labelled"),
            ),
            (
                f"no longer labelled ({ch['n_sites_no_longer_labelled']})",
                ids("sites_no_longer_labelled", "n_sites_no_longer_labelled"),
            ),
        ]
    )
    site_items += [("sites added", ids("sites_added")), ("sites removed", ids("sites_removed"))]
    return [
        para(
            f"Compared with version {ch['previous_version_id']} "
            f"({ch.get('previous_created_at') or 'date unknown'})."
        ),
        h2("Headline metrics"),
        table(["metric", "previous", "this version", "change"], rows),
        h2("Sites"),
        *([para(note)] if note else []),
        {"kind": "kv", "items": site_items},
        h2("Labellers"),
        {"kind": "kv", "items": [("added", ids("labellers_added")), ("gone", ids("labellers_gone"))]},
    ]


def use(m: dict) -> list[dict]:
    c = m["catalog"]
    return [
        h2("Intended use"),
        para(c["intended_use"] or "The catalog states no intended use (top-level `intended_use`)."),
        h2("Limitations"),
        para(c["limitations"] or "The catalog states no limitations (top-level `limitations`)."),
        h2("About the dataset"),
        para(c["description"] or "–"),
    ]
