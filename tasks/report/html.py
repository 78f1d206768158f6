"""HTML rendering: one Jinja2 template with autoescape, fed with page blocks built from ``metrics.json``.

Autoescape is on and no value is ever marked safe, so every labeller id, class name and catalog text is
escaped exactly once, wherever it appears. Pages load one local stylesheet and no script; ``data:`` icons
stop browsers asking for a favicon that does not exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jinja2 import DictLoader, Environment, select_autoescape

from tasks.store.artifacts import unshare

STYLE = Path(__file__).with_name("style.css")  # package data (pyproject: "*.css")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · {{ dataset }}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{{ root }}assets/style.css">
</head>
<body>
<header>
  <div class="brand"><a href="{{ home }}">labelrefinery</a> · {{ dataset }}</div>
  <div class="meta">{{ subtitle }}</div>
  {% if nav %}<nav><ul>
  {%- for href, label in nav %}
    <li><a href="{{ href }}"{% if href == current %} aria-current="page"{% endif %}>{{ label }}</a></li>
  {%- endfor %}
  </ul></nav>{% endif %}
</header>
<main>
<h1>{{ title }}</h1>
{% for b in blocks %}{{ block(b) }}{% endfor %}
</main>
<footer>{{ footer }}</footer>
</body>
</html>
"""

BLOCKS = """
{% macro cell(c) -%}
{%- if c is mapping and c.href %}<a href="{{ c.href }}">{{ c.text }}</a>
{%- elif c is mapping %}<span class="{{ c.cls }}">{{ c.text }}</span>
{%- else %}{{ c }}{% endif -%}
{%- endmacro %}
{% macro block(b) %}
{%- if b.kind == "h2" %}<h2 id="{{ b.anchor }}">{{ b.text }}</h2>
{%- elif b.kind == "p" %}<p{% if b.cls %} class="{{ b.cls }}"{% endif %}>{{ b.text }}</p>
{%- elif b.kind == "pre" %}<pre>{{ b.text }}</pre>
{%- elif b.kind == "missing" %}<div class="missing"><strong>Not available.</strong> {{ b.text }}</div>
{%- elif b.kind == "stats" %}<div class="stats">
  {%- for s in b["items"] %}<div class="stat"><div class="v">{{ s.value }}</div>
  <div class="k">{{ s.label }}</div>
  {%- if s.delta %}<div class="d {{ s.cls }}">{{ s.delta }}</div>{% endif %}</div>{% endfor %}</div>
{%- elif b.kind == "alerts" %}
  {%- if b["items"] %}<ul class="alerts">
  {%- for a in b["items"] %}<li class="{{ a.level }}">{{ a.message }}</li>{% endfor %}</ul>
  {%- else %}<p class="ok">No alert: every catalog threshold is met.</p>{% endif %}
{%- elif b.kind == "kv" %}<dl class="kv">
  {%- for k, v in b["items"] %}<dt>{{ k }}</dt><dd>{{ cell(v) }}</dd>{% endfor %}</dl>
{%- elif b.kind == "table" %}<div class="scroll"><table>
  {%- if b.caption %}<caption>{{ b.caption }}</caption>{% endif %}
  <thead><tr>{% for c in b.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
  <tbody>{% for r in b.rows %}<tr>{% for c in r %}<td>{{ cell(c) }}</td>{% endfor %}</tr>{% endfor %}</tbody>
  </table></div>{% if b.more %}<p class="note">{{ b.more }}</p>{% endif %}
{%- elif b.kind == "figure" %}<figure><img src="{{ b.src }}" alt="{{ b.alt }}">
  {%- if b.caption %}<figcaption>{{ b.caption }}</figcaption>{% endif %}</figure>
{%- elif b.kind == "thumbs" %}<div class="thumbrows">{% for row in b.rows %}<div class="thumbrow">
  <div class="thumbtitle">{{ row.title }}</div><div class="panels">
  {%- for p in row.panels %}<figure class="thumb"><img src="{{ p.src }}" alt="{{ p.caption }}"
  width="{{ b.px }}" height="{{ b.px }}"><figcaption>{{ p.caption }}</figcaption></figure>{% endfor %}
  </div></div>
  {%- endfor %}</div>
{%- endif %}
{% endmacro %}
"""


def environment() -> Environment:
    env = Environment(
        loader=DictLoader(
            {"page.html": "{% from 'blocks.html' import block %}" + PAGE, "blocks.html": BLOCKS}
        ),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def render_page(env: Environment, path: Path, **context) -> int:
    """Write one page; return its size in bytes."""
    context.setdefault("nav", [])
    context.setdefault("current", "")
    context.setdefault("footer", "")
    text = env.get_template("page.html").render(**context)
    unshare(path).write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def copy_static(out_dir: Path) -> None:
    dst = out_dir / "assets"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STYLE, dst / "style.css")
