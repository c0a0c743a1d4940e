"""Build ``reports/index.html``: every metrics table and figure of a run in one offline file.

`dvc plots show` writes HTML that loads Vega from a CDN and does not render offline, so the
report embeds the PNG figures the stages write (base64) and renders the JSON metrics and
Markdown tables as HTML tables.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bonemet.utils import atomic_path

log = logging.getLogger(__name__)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{border-bottom:2px solid #446;padding-bottom:.3rem}h2{margin-top:2.2rem;color:#335}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5rem;vertical-align:top;max-width:48%}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8rem;color:#555;text-align:center}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.8rem}
.meta{color:#666;font-size:.85rem}
"""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}." if not isinstance(value, dict | list) else f"{prefix}{key}."))
        return {k.rstrip("."): v for k, v in out.items()}
    if isinstance(data, list):
        return {prefix.rstrip("."): json.dumps(data)[:200]}
    return {prefix.rstrip("."): data}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def metrics_table(data: dict[str, Any]) -> str:
    """Render a (possibly nested) metrics JSON as a two-column HTML table."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in _flatten(data).items())
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def markdown_table(text: str) -> str:
    """Render the pipe tables of a Markdown file as HTML (other lines as paragraphs)."""
    parts: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            body_html = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
            )
            parts.append(f"<table><tr>{cells}</tr>{body_html}</table>")
            rows.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
            continue
        flush()
        if stripped.startswith("#"):
            parts.append(f"<h3>{html.escape(stripped.lstrip('#').strip())}</h3>")
        elif stripped:
            parts.append(f"<p>{html.escape(stripped)}</p>")
    flush()
    return "\n".join(parts)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(path.stem.replace("_", " "))
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def build_report(
    out_path: str | Path,
    *,
    metrics_dir: str | Path,
    plot_dirs: Sequence[str | Path],
    title: str,
    extra_sections: Sequence[tuple[str, str | Path]],
    context: dict[str, str] | None = None,
) -> Path:
    """Write one self-contained HTML file with every metrics file and PNG figure.

    Args:
        out_path: the HTML file to write (atomically).
        metrics_dir: folder of ``*.json`` metrics and ``*.md`` tables (e.g. Table 1).
        plot_dirs: folders searched recursively for ``*.png`` figures, one section each.
        extra_sections: (heading, path) of further JSON/Markdown/text files to include
            (e.g. the validation report).
        context: key/value lines shown under the title (git commit, data hash, ...).
    """
    metrics_dir = Path(metrics_dir)
    body: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"generated": stamp, **(context or {})}
    body.append("<p class='meta'>" + " · ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in meta.items()) + "</p>")

    md_files = sorted(metrics_dir.glob("*.md")) if metrics_dir.is_dir() else []
    json_files = sorted(metrics_dir.glob("*.json")) if metrics_dir.is_dir() else []
    if md_files or json_files:
        body.append("<h2>Metrics</h2>")
    for path in md_files:
        table = markdown_table(path.read_text(encoding="utf-8"))
        body.append(f"<h3>{html.escape(path.name)}</h3>{table}")
    for path in json_files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("skipping %s: not valid JSON (%s)", path, exc)
            continue
        body.append(f"<h3>{html.escape(path.name)}</h3>{metrics_table(data if isinstance(data, dict) else {'value': data})}")

    for plot_dir in map(Path, plot_dirs):
        pngs = sorted(plot_dir.rglob("*.png")) if plot_dir.is_dir() else []
        if not pngs:
            continue
        body.append(f"<h2>Figures: {html.escape(plot_dir.name)}</h2>")
        body.extend(_figure(p) for p in pngs)

    for heading, path in extra_sections:
        path = Path(path)
        if not path.is_file():
            continue
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if path.suffix == ".md":
            body.append(markdown_table(path.read_text(encoding="utf-8")))
        else:
            text = path.read_text(encoding="utf-8")[:20000]
            body.append(f"<pre>{html.escape(text)}</pre>")

    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report written: %s (%d KiB)", out_path, len(page) // 1024)
    return out_path
