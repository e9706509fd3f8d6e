"""The report card's HTML: one self-contained page (inline CSS, figures as base64 PNG), built from ``report.json``.

Kept apart from :mod:`pellucid.training.outputs.report` so the page can change without touching the evaluation; every
value shown comes from the JSON dict, so the page and the file never disagree.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f5f6f8}
header{background:#15324b;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;font-size:13px;opacity:.9}main{padding:12px 32px 40px;max-width:1280px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:18px 0;padding:14px 20px}
h2{font-size:18px;margin:4px 0 10px;color:#15324b}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border-bottom:1px solid #e3e6ea;padding:5px 8px;
text-align:left;vertical-align:top}th{background:#eef1f5}td.value{font-family:ui-monospace,Menlo,monospace;
white-space:nowrap}td.def{color:#4a5560;font-size:12px}.none{color:#9aa3ad}.flag{color:#b3261e;font-weight:600}
.ok{color:#1e7b34;font-weight:600}.notes{font-size:12px;color:#6b4e00;background:#fff8e1;padding:6px 10px;
border-radius:4px;margin:8px 0}.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.side{display:grid;grid-template-columns:1fr 1fr;gap:18px}figure{margin:0}figure img{max-width:100%;
border:1px solid #e3e6ea;border-radius:4px}figcaption{font-size:12px;color:#4a5560;margin-top:3px}
.headline{display:flex;flex-wrap:wrap;gap:12px}.card{background:#eef1f5;border-radius:6px;padding:8px 12px;
min-width:150px}.card b{display:block;font-size:18px}.card span{font-size:12px;color:#4a5560}
"""


def _format(value: Any, unit: str | None = None) -> str:
    if value is None:
        return '<span class="none">n/a</span>'
    if isinstance(value, bool):
        return str(value)
    text = f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
    return f"{text} {html.escape(unit)}" if unit else text


def _image(out: Path, file: str, caption: str) -> str:
    encoded = base64.b64encode((out / file).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _metric_table(metrics: list[Mapping[str, Any]], roles: list[str], labels: Mapping[str, str]) -> str:
    head = "".join(f"<th>{html.escape(labels[r])}</th>" for r in roles)
    rows = []
    for metric in metrics:
        direction = {True: "↑ higher is better", False: "↓ lower is better"}.get(metric["higher_is_better"], "")
        values = []
        for role in roles:
            value = metric.get(role)
            flagged = metric["name"].endswith("_flagged") and value is not None
            css = ("flag" if value else "ok") if flagged else ""
            shown = ("FLAGGED" if value else "not flagged") if flagged else _format(value, metric.get("unit"))
            values.append(f'<td class="value {css}">{shown}</td>')
        rows.append(f"<tr><td><b>{html.escape(metric['name'])}</b></td>{''.join(values)}"
                    f'<td class="def">{html.escape(metric["definition"])} {direction}</td></tr>')
    return f"<table><tr><th>metric</th>{head}<th>definition</th></tr>{''.join(rows)}</table>"


def _headline(report: Mapping[str, Any], roles: list[str]) -> str:
    cards = []
    for role in roles:
        model = report["models"][role]
        for name in ("accuracy", "balanced_accuracy", "auroc", "dice", "iou"):
            if name in model["task_metrics"]:
                value = model["task_metrics"][name]  # None: undefined on this split (e.g. AUROC of one class)
                shown = "undefined" if value is None else f"{value:.3f}"
                cards.append(f'<div class="card"><b>{shown}</b>'
                             f"<span>{html.escape(role)} {name}</span></div>")
        for element, name in (("localization", "pointing_game"), ("transparency", "deletion_faithfulness"),
                              ("actionability", "shortcut_flagged")):
            row = next((m for m in report["elements"][element]["metrics"] if m["name"] == name), None)
            if row is not None and row.get(role) is not None:
                shown = ("FLAGGED" if row[role] else "not flagged") if name.endswith("_flagged") else _format(row[role])
                cards.append(f'<div class="card"><b>{shown}</b><span>{html.escape(role)} {name}</span></div>')
    return f'<div class="headline">{"".join(cards)}</div>'


def render_html(report: Mapping[str, Any], out: str | Path) -> str:
    """The report page; figure files listed in ``report`` are read from ``out`` and embedded."""
    out = Path(out)
    roles = list(report["models"])
    labels = {role: report["models"][role]["name"] for role in roles}
    data = report["data"]
    sections = [f"<section><h2>Summary</h2>{_headline(report, roles)}<table><tr><th></th>"
                + "".join(f"<th>{html.escape(labels[r])}</th>" for r in roles) + "</tr>"
                + "".join(f"<tr><td>{html.escape(key)}</td>"
                          + "".join(f'<td class="value">{_format(report["models"][r].get(key))}</td>' for r in roles)
                          + "</tr>" for key in ("checkpoint", "samples")) + "</table></section>"]
    for element, content in report["elements"].items():
        parts = [f'<section id="{element}"><h2>{html.escape(content["title"])}</h2>',
                 _metric_table(content["metrics"], roles, labels)]
        notes = [f"{labels[r]}: {html.escape(n)}" for r in roles for n in content["notes"].get(r, [])]
        if notes:
            parts.append('<div class="notes">' + "<br>".join(notes) + "</div>")
        columns = []
        for role in roles:
            items = "".join(_image(out, f["file"], f["caption"]) for f in content["figures"].get(role, []))
            columns.append(f"<div><h3>{html.escape(labels[role])}</h3><div class=\"figures\">{items or '—'}</div>"
                           "</div>")
        parts.append(f'<div class="{"side" if len(roles) > 1 else ""}">{"".join(columns)}</div></section>')
        sections.append("".join(parts))
    title = "pellucid report card — " + " vs ".join(labels[r] for r in roles)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>data: {html.escape(str(data.get('config') or data.get('class')))} · split {html.escape(data['split'])}"
            f" · created {html.escape(report['created'])}</p><p>The five elements of interpretability (Wang et al., "
            "IEEE Access 2024): localization, visual recognizability, physical attribution, model transparency, "
            "actionability.</p></header><main>" + "".join(sections) + "</main></body></html>")
