"""The building blocks of the HTML reports: one stylesheet, escaping, number formats, figures
as data URIs, tables, cards, sections and the page around them.

Shared by the run and comparison report (``reporting/report.py``) and the sweep report
(``reporting/sweep_report.py``), so every page looks the same. Every function that takes text
from run files escapes it (``esc``); ``table_html`` is the exception, its cells are HTML
escaped by the caller. A figure whose file is missing becomes a visible note, never an error.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from inat_finetune.reporting import plots

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da;
        --best: #fff8c5; --best-line: #d4a72c; --bad: #d00000; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
p.meta, .muted { color: var(--muted); font-size: 13px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
       padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
nav { margin: 16px 0; padding: 10px 14px; background: var(--soft); border-radius: 8px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: var(--best); font-weight: 600; }
tr.best td:first-child { border-left: 4px solid var(--best-line); }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 0 6px; margin-left: 6px;
         border-radius: 10px; background: var(--best-line); color: #fff; vertical-align: middle; }
dl.kv { display: grid; grid-template-columns: max-content minmax(0, 1fr) max-content minmax(0, 1fr);
        gap: 2px 16px; font-size: 14px; margin: 8px 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 12px 0 20px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.missing { color: var(--bad); }
details.run { border: 1px solid var(--line); border-radius: 8px; padding: 4px 16px 8px; margin: 12px 0; }
details.run > summary { cursor: pointer; font-weight: 600; font-size: 16px; padding: 6px 0; }
details.run h2 { font-size: 17px; margin-top: 20px; }
.scroll { overflow-x: auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(value: Any) -> str:
    return plots.percent(value, digits=2)


def count_text(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def duration_text(value: Any) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def figure_html(path: Path | None, alt: str, caption: str = "") -> str:
    if path is None or not path.is_file():
        return (
            f'<p class="missing">Figure not available: {esc(alt)} (its input file is missing).</p>'
        )
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption_html = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{caption_html}</figure>'
    )


def table_html(
    header: list[str],
    rows: list[list[str]],
    numeric: set[int] | None = None,
    row_classes: list[str] | None = None,
) -> str:
    """``rows`` hold HTML already escaped by the caller; ``numeric`` columns are right-aligned."""
    numeric = numeric or set()
    row_classes = row_classes or [""] * len(rows)

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        (f'<tr class="{row_class}">' if row_class else "<tr>")
        + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row, row_class in zip(rows, row_classes, strict=True)
    )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def kv_html(items: dict[str, Any]) -> str:
    cells = "".join(f"<dt>{esc(k)}</dt><dd>{esc(_plain(v))}</dd>" for k, v in items.items())
    return f'<dl class="kv">{cells}</dl>'


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def cards_html(items: list[tuple[str, str]]) -> str:
    cards = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div></div>'
        for label, value in items
    )
    return f'<div class="cards">{cards}</div>'


def section_html(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page_html(title: str, header: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"{header}<nav>{links}</nav>{body}</main></body></html>\n"
    )


def generated_at() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M")
