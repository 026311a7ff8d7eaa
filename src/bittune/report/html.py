"""One self-contained HTML page from the report's sections (CSS inline, images as ``data:`` URIs, no scripts from
anywhere else). A one-line inline script marks ``<body data-images-ok>`` once every image has decoded, which the
headless-Chromium check reads."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from bittune.report.render import Section

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
header code{background:#3b434b;color:#fff}
img{max-width:980px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #d0d7de;font-size:13px}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px;border-bottom:1px solid #eaeef2;padding-bottom:6px}
table{border-collapse:collapse;font-size:13px;margin:8px 0;max-width:100%}
th,td{border:1px solid #d0d7de;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f6f8fa}
td{max-width:360px;overflow-wrap:anywhere}
tr:nth-child(even) td{background:#fbfcfd}
img{max-width:100%;height:auto;display:block;margin:8px 0}
pre{background:#f6f8fa;padding:10px;border-radius:6px;font-size:12px;overflow:auto;max-height:420px}
code{background:#eff1f3;padding:1px 4px;border-radius:4px;font-size:12px}
p{font-size:14px;line-height:1.45}
"""
# Sets data-images-ok when every <img> decoded (naturalWidth > 0): what the Chromium check looks for.
CHECK_SCRIPT = (
    "<script>addEventListener('load',function(){var i=[].slice.call(document.images);"
    "if(i.length&&i.every(function(x){return x.complete&&x.naturalWidth>0}))"
    "document.body.setAttribute('data-images-ok',String(i.length));});</script>"
)


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""  # key/value tables need no header row
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _md_table(md: str) -> str:
    """A Markdown pipe table (``quant.report.table``'s output) as HTML."""
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    return _table(cells[0], body) if cells else ""


def _image(folder: Path, name: str, alt: str) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def to_html(title: str, subtitle: str, sections: list[Section], folder: Path) -> str:
    """The page; ``folder`` holds the PNGs the sections name (they are embedded, not linked)."""
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    blocks = []
    for sec in sections:
        inner = []
        for part in sec.parts:
            kind = part[0]
            if kind == "p":
                inner.append(f"<p>{_inline(part[1])}</p>")
            elif kind == "md":
                inner.append(_md_table(part[1]))
            elif kind == "table":
                inner.append(_table(part[1], part[2]))
            elif kind == "img":
                inner.append(_image(folder, part[1], part[2]))
            elif kind == "pre":
                inner.append(f"<pre>{html.escape(part[1])}</pre>")
        blocks.append(f'<section id="{sec.id}"><h2>{html.escape(sec.title)}</h2>{"".join(inner)}</section>')
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>{_inline(subtitle)}</p>"
        f"</header><nav>{nav}</nav><main>{''.join(blocks)}</main>{CHECK_SCRIPT}</body></html>\n"
    )
