"""The results viewer's HTML page: a summary, a sortable table of queries, per-query images.

The page is one static file with inline CSS and a few lines of inline JavaScript (no external
assets). Clicking a column header sorts the table by that column (ascending, then descending on
the next click); rows of rendered queries link to their section. Images are linked relative to
the page, so the page's folder can be moved or zipped.
"""
from __future__ import annotations

import html
import os
import urllib.parse
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..search.render import REPORT_CSS

__all__ = ["Cell", "Column", "Section", "write_page"]


@dataclass(frozen=True)
class Column:
    """A table column: its header, whether it sorts as numbers, a tooltip."""

    label: str
    numeric: bool = True
    tip: str = ""


@dataclass(frozen=True)
class Cell:
    """A table cell: the text shown and the value it sorts by (numbers for numeric columns)."""

    text: str
    sort: Union[float, int, str]


@dataclass(frozen=True)
class Section:
    """A rendered query: its anchor (``q12``), heading, image file and caption."""

    anchor: str
    heading: str
    image: str
    caption: str = ""


_CSS = REPORT_CSS + """
p.summary { margin: 4px 0; font-size: 15px; }
table.sortable { border-collapse: collapse; font-size: 14px; margin-top: 8px; }
table.sortable th, table.sortable td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4;
                                       text-align: right; }
table.sortable th { cursor: pointer; background: #eceff1; position: sticky; top: 0;
                    user-select: none; white-space: nowrap; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
table.sortable td.text, table.sortable th.text { text-align: left; }
table.sortable tr.plain td { color: #888; }
td.right { color: #2e7d32; } td.wrong { color: #c62828; }
div.scroll { max-height: 480px; overflow-y: auto; display: inline-block; }
"""

# Sort the table by the clicked column; numeric columns by data-v as numbers, others as text.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var up = th.getAttribute("aria-sort") !== "ascending", num = th.dataset.num === "1";
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var c = num ? Number(x) - Number(y) : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _link(path: str, page_dir: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    return urllib.parse.quote(relative.replace(os.sep, "/"))


def _cell(cell: Cell, column: Column, anchor: Optional[str]) -> str:
    text = html.escape(cell.text)
    if anchor:
        text = f'<a href="#{html.escape(anchor)}">{text}</a>'
    css = [] if column.numeric else ["text"]
    if cell.text in ("right", "wrong"):
        css.append(cell.text)
    cls = f' class="{" ".join(css)}"' if css else ""
    return f'<td{cls} data-v="{html.escape(str(cell.sort))}">{text}</td>'


def _header(column: Column) -> str:
    css = "" if column.numeric else ' class="text"'
    tip = f' title="{html.escape(column.tip)}"' if column.tip else ""
    return f'<th{css}{tip} data-num="{int(column.numeric)}">{html.escape(column.label)}</th>'


def write_page(path: str, title: str, summary: Sequence[str], columns: Sequence[Column],
               rows: Sequence[Sequence[Cell]], anchors: Sequence[Optional[str]],
               sections: Sequence[Section], table_note: str = "") -> str:
    """Write the viewer page.

    Args:
        path: the HTML file (its folder is created).
        title: page title.
        summary: lines shown above the table (one metric line per model, say).
        columns: the table's columns.
        rows: one list of cells per query, in ``columns`` order.
        anchors: per row, the anchor of its rendered section, or None (not rendered).
        sections: the rendered queries, in page order; images must exist.
        table_note: a line under the table heading.

    Returns:
        ``path``.

    Raises:
        FileNotFoundError: a section's image does not exist.
        ValueError: a row with another number of cells than ``columns``.
    """
    page_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(page_dir, exist_ok=True)
    head = "".join(_header(c) for c in columns)
    body = []
    for cells, anchor in zip(rows, anchors):
        if len(cells) != len(columns):
            raise ValueError(f"write_page: a row of {len(cells)} cells for {len(columns)} columns")
        tds = "".join(_cell(cell, col, anchor if k == 0 else None)
                      for k, (cell, col) in enumerate(zip(cells, columns)))
        body.append(f'<tr{"" if anchor else " class=plain"}>{tds}</tr>')
    figures = []
    for s in sections:
        if not os.path.isfile(s.image):
            raise FileNotFoundError(f"viewer image {s.image} not found")
        link = _link(s.image, page_dir)
        caption = f'<p class="caption">{html.escape(s.caption)}</p>' if s.caption else ""
        figures.append(
            f'<section id="{html.escape(s.anchor)}"><h2>{html.escape(s.heading)}</h2>'
            f'<figure><a href="{link}"><img src="{link}" alt="{html.escape(s.anchor)}" '
            f'loading="lazy"></a></figure>{caption}</section>')
    lines = "".join(f'<p class="summary">{html.escape(line)}</p>' for line in summary)
    note = f'<p class="caption">{html.escape(table_note)}</p>' if table_note else ""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body><header><h1>"
        f"{html.escape(title)}</h1></header>\n<main>\n"
        f"<section>{lines}</section>\n"
        f'<section><h2>Queries</h2>{note}<div class="scroll"><table class="sortable">'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
        + "\n</tbody></table></div></section>\n" + "\n".join(figures)
        + f"\n</main><script>{_SCRIPT}</script></body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
