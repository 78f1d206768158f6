"""Page content: each module of the report as a list of blocks, built from ``metrics.json`` alone.

Numbers are formatted here and nowhere else; the template only lays blocks out (and escapes them).
"""

from __future__ import annotations

import json

from tasks.report.metrics import HEADLINE

PAGES = [
    ("index.html", "Overview"),
    ("provenance.html", "Provenance"),
    ("imagery.html", "Imagery"),
    ("labels.html", "Labels"),
    ("quality.html", "Labeller quality"),
    ("consensus.html", "Consensus and risk"),
    ("issues.html", "Label issues"),
    ("pseudo.html", "Pseudo-labels"),
    ("properties.html", "Dataset properties"),
    ("changes.html", "Changes"),
    ("use.html", "Intended use"),
]
FORMATS = {k: f for k, _, f, _ in HEADLINE}


def fmt(v, kind: str = "f3") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "bytes":
        return f"{v / 1e6:.2f} MB" if v >= 1e5 else f"{v / 1e3:.1f} kB"
    if kind.startswith("f"):
        return f"{v:.{int(kind[1:])}f}"
    return str(v)


def fmt_delta(d, kind: str) -> str:
    if d is None:
        return "–"
    return ("+" if d >= 0 else "−") + fmt(abs(d), kind)


def h2(text: str) -> dict:
    return {"kind": "h2", "text": text, "anchor": "".join(c if c.isalnum() else "-" for c in text.lower())}


def para(text: str, cls: str = "") -> dict:
    return {"kind": "p", "text": text, "cls": cls}


def table(columns, rows, caption: str = "", total: int | None = None) -> dict:
    more = f"Showing {len(rows)} of {total}." if total is not None and total > len(rows) else ""
    return {"kind": "table", "columns": columns, "rows": rows, "caption": caption, "more": more}


def fig(src: str | None, alt: str, caption: str = "") -> dict:
    if not src:
        return {"kind": "missing", "text": f"No data for the figure: {alt}."}
    return {"kind": "figure", "src": src, "alt": alt, "caption": caption}


def interval(r: dict, m: str, k: str = "f3") -> str:
    if r.get(f"{m}_mean") is None:
        return "–"
    return f"{fmt(r[f'{m}_mean'], k)} [{fmt(r[f'{m}_lo'], k)}, {fmt(r[f'{m}_hi'], k)}]"


def overview(m: dict) -> list[dict]:
    h = m["headline"]
    deltas = {r["key"]: r for r in m["changes"].get("headline", [])}
    cards = []
    for key, label, kind, better in HEADLINE:
        if h.get(key) is None:
            continue
        card = {"label": label, "value": fmt(h[key], kind), "delta": "", "cls": "same"}
        d = deltas.get(key, {}).get("delta")
        if d is not None:
            card["delta"] = fmt_delta(d, kind) + " since previous"
            if d and better:
                card["cls"] = "better" if (d > 0) == (better == "up") else "worse"
        cards.append(card)
    s = m["sizes"]
    size_rows = [[k.replace("_", " "), fmt(v, "int")] for k, v in s.items() if not isinstance(v, dict)]
    size_rows += [[f"sites: {r}", fmt(n, "int")] for r, n in s["sites_by_role"].items()]
    blocks = [
        {
            "kind": "kv",
            "items": [
                ("version", m["version_id"]),
                ("created", m["created_at"]),
                ("dataset", m["catalog"]["name"]),
                ("description", m["catalog"]["description"]),
            ],
        },
        h2("Headline"),
        {"kind": "stats", "items": cards},
        h2("Alerts"),
        {"kind": "alerts", "items": m["alerts"]},
        h2("Sizes"),
        table(["what", "count"], size_rows),
    ]
    return blocks


def provenance(m: dict) -> list[dict]:
    p = m["provenance"]
    if not p:
        return [{"kind": "missing", "text": "No provenance was passed to the report stage."}]
    cv, cat = p.get("code_version", {}) or {}, p.get("catalog", {}) or {}
    blocks = [
        h2("Code and catalog"),
        {
            "kind": "kv",
            "items": [
                ("package", cv.get("package") or "–"),
                ("git commit", cv.get("git_sha") or "–"),
                ("uncommitted changes", fmt(cv.get("git_dirty"))),
                ("catalog", cat.get("path") or "–"),
                ("catalog hash", cat.get("hash") or "–"),
            ],
        },
        h2("Inputs"),
        table(
            ["dataset", "file", "size", "BLAKE2b-128"],
            [
                [i.get("dataset", ""), i.get("path", ""), fmt(i.get("bytes"), "bytes"), i.get("hash", "")]
                for i in p.get("inputs", [])
            ],
        ),
    ]
    timings = [
        [st, step, fmt(sec, "s")]
        for st, steps in (p.get("stage_timings") or {}).items()
        for step, sec in steps.items()
    ]
    blocks += [
        h2("Stage timings"),
        table(["stage", "step", "seconds"], timings) if timings else para("No timings."),
    ]
    blocks += [
        h2("Parameters"),
        {"kind": "pre", "text": json.dumps(p.get("parameters", {}), indent=2, sort_keys=True)},
    ]
    return blocks


def imagery(m: dict) -> list[dict]:
    im, a = m["imagery"], m["assets"]["figures"]
    worst = sorted(im["tiles"], key=lambda t: -((t["nodata_fraction"] or 0) + (t["cloud_fraction"] or 0)))
    n = m["settings"]["max_table_rows"]
    return [
        {
            "kind": "stats",
            "items": [
                {"label": "scenes", "value": fmt(m["sizes"]["scenes"], "int"), "delta": ""},
                {"label": "tiles", "value": fmt(m["sizes"]["tiles"], "int"), "delta": ""},
                {"label": "nodata share", "value": fmt(im["nodata_share"], "pct"), "delta": ""},
                {"label": "cloud share", "value": fmt(im["cloud_share"], "pct"), "delta": ""},
            ],
        },
        h2("Coverage"),
        fig(
            a.get("map_coverage"), "map of scenes and sites", "Scene footprints (outlines) and sites by role."
        ),
        h2("Band histograms"),
        fig(
            a.get("bands"),
            "per-band histograms",
            "Valid pixels of every scene (decimated reads), 0.5–99.5 % range.",
        ),
        table(
            ["band", "median p02", "median p50", "median p98"],
            [
                [
                    b["band"],
                    fmt(b["median_p02"], "f1"),
                    fmt(b["median_p50"], "f1"),
                    fmt(b["median_p98"], "f1"),
                ]
                for b in im["band_stats"]
            ],
            "Medians over tiles of each tile's percentiles.",
        ),
        h2("Nodata and cloud"),
        fig(a.get("tile_quality"), "nodata and cloud fractions per scene and tile"),
        table(
            ["scene", "tiles", "mean nodata", "max nodata", "mean cloud", "mean valid"],
            [
                [
                    s["scene_id"],
                    fmt(s["tiles"], "int"),
                    fmt(s["mean_nodata_fraction"], "pct"),
                    fmt(s["max_nodata"], "pct"),
                    fmt(s["mean_cloud_fraction"], "pct"),
                    fmt(s["mean_valid_fraction"], "pct"),
                ]
                for s in im["scenes"]
            ],
            "Per scene",
        ),
        table(
            ["site", "scene", "nodata", "cloud", "valid"],
            [
                [
                    t["site_id"],
                    t["scene_id"],
                    fmt(t["nodata_fraction"], "pct"),
                    fmt(t["cloud_fraction"], "pct"),
                    fmt(t["valid_fraction"], "pct"),
                ]
                for t in worst[:n]
            ],
            "Tiles with the most nodata + cloud",
            total=len(worst),
        ),
    ]


def labels(m: dict) -> list[dict]:
    lb, a = m["labels"], m["assets"]["figures"]
    nf = lb["no_field_sites"]
    q = lb["area_ha_quantiles"]
    return [
        fig(a.get("label_counts"), "polygons by labeller and class; assignments by site role"),
        h2("By class"),
        table(
            ["class", "polygons", "area (ha)"],
            [[r["label"], fmt(r["polygons"], "int"), fmt(r["area_ha"], "f1")] for r in lb["by_class"]],
        ),
        h2("By labeller"),
        table(
            [
                "labeller",
                "reference",
                "assigned",
                "completed",
                "pending",
                "“no fields”",
                "polygons",
                "gold",
                "multi",
                "single",
            ],
            [
                [
                    r["labeller_id"],
                    fmt(r["is_reference"]),
                    fmt(r["assigned"], "int"),
                    fmt(r["completed"], "int"),
                    fmt(r["pending"], "int"),
                    fmt(r["no_fields"], "int"),
                    fmt(r["polygons"], "int"),
                    *(fmt(r["by_role"].get(k, 0), "int") for k in ("gold", "multi", "single")),
                ]
                for r in lb["by_labeller"]
            ],
        ),
        h2("By site role"),
        table(
            ["role", "sites", "completed assignments", "polygons"],
            [
                [k, fmt(v["sites"], "int"), fmt(v["completed_assignments"], "int"), fmt(v["polygons"], "int")]
                for k, v in lb["by_role"].items()
            ],
        ),
        h2("Polygon areas"),
        fig(a.get("polygon_area"), "polygon-area distribution"),
        para("Area quantiles (ha): " + ", ".join(f"{k} {fmt(v, 'f2')}" for k, v in q.items())),
        para(f"{fmt(lb['repaired_polygons'], 'int')} polygons were invalid as drawn and repaired at ingest."),
        h2("Sites labelled “no fields”"),
        para(
            f"{fmt(nf['n_any'], 'int')} sites have at least one completed assignment with no polygon; on "
            f"{fmt(nf['n_all'], 'int')} of them every labeller said “no fields”."
        ),
        table(
            ["site", "role", "said no fields", "drew fields"],
            [
                [r["site_id"], r["role"], ", ".join(r["said_no_fields"]), ", ".join(r["drew_fields"]) or "–"]
                for r in nf["sites"]
            ],
            total=nf["n_any"],
        ),
    ]


def thumb_rows(entries: list[dict], title) -> list[dict]:
    rows = []
    for e in entries:
        panels = [{"src": e["image"], "caption": "image"}]
        panels += [
            {"src": lp["src"], "caption": f"{lp['labeller_id']} ({lp['polygons']})"}
            for lp in e.get("labellers", [])
        ]
        for key, cap in (
            ("consensus", "consensus"),
            ("risk", "risk"),
            ("issue", "issue region"),
            ("pseudo", "pseudo-labels (kept)"),
            ("probability", "p(field)"),
        ):
            if e.get(key):
                panels.append({"src": e[key], "caption": cap})
        rows.append({"title": title(e), "panels": panels})
    return rows
