"""``index.html``: a run's pictures on one page, with its predictions table.

One self-contained file (inline CSS and JavaScript; no server, no network) that opens from the
output folder: one row per map of ``predictions.csv``, with the overlay and the contact sheet
linked relatively. A click on a column's header sorts by it (again: the other way); a class
filter hides the other classes' rows. The view lives in the URL's fragment
(``index.html#class=cat&sort=-score``), so it can be bookmarked. The rows are written in the page
as HTML, so it reads without JavaScript too; every name in it is HTML-escaped and every link
percent-encoded, so a file named ``<img onerror=...>.jpg`` shows as text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from ..io import probability_text
from .config import ExplainConfig, targets_text
from .folder import OutputFolder
from .outputs import overlay_file, sheet_file

__all__ = ["GALLERY", "GALLERY_ROWS", "gallery_html", "update_gallery"]

GALLERY = "index.html"
#: rows of the page at most (about 0.5 kB each), so that a run over millions of images still
#: gives a page a browser opens; predictions.csv has them all
GALLERY_ROWS = 20_000


def update_gallery(folder: OutputFolder, config: ExplainConfig) -> None:
    """Write ``index.html`` from the folder's ``predictions.csv`` and ``skipped.csv`` (with
    ``"html"`` in ``config.save``), atomically; without it, delete a gallery left by an earlier
    run, which would no longer show every image."""
    path = folder.out / GALLERY
    if "html" not in config.save:
        path.unlink(missing_ok=True)
        return
    page = gallery_html(
        folder.read_table("predictions.csv"),
        folder.read_table("skipped.csv"),
        config.save,
        f"{config.model}, {config.method} at {config.target_layer or 'the default layer'}, "
        f"targets {targets_text(config.targets)}",
    )
    folder.write_text(path, lambda file: file.write(page))


def gallery_html(
    predictions: Sequence[Mapping[str, str]],
    skipped: Sequence[Mapping[str, str]],
    save: frozenset[str] | set[str],
    caption: str = "",
    limit: int = GALLERY_ROWS,
) -> str:
    """The gallery page.

    Args:
        predictions: ``predictions.csv`` rows (``image``, ``class_id``, ``class_name``,
            ``score``, ``picture``).
        skipped: ``skipped.csv`` rows (``image``, ``reason``).
        save: the pictures the run wrote: a sheet column with ``"sheet"``, an overlay column
            with ``"png"``.
        caption: a line under the title (the run's model and method).
        limit: the first rows shown at most; the page says how many there are.

    Returns:
        The HTML text; names that are not UTF-8 show U+FFFD in place of their odd bytes.
    """
    images = len({row["image"] for row in predictions})
    rows = predictions[:limit]
    classes = sorted({row["class_name"] for row in rows})
    head = [
        ("image", "text", "image"),
        ("class_id", "number", "class id"),
        ("class_name", "text", "class"),
        ("score", "number", "p"),
    ]
    columns = (["sheet"] if "sheet" in save else []) + (["overlay"] if "png" in save else [])
    header = "".join(f"<th>{name}</th>" for name in columns) + "".join(
        f'<th data-key="{key}" data-type="{kind}">{label}</th>' for key, kind, label in head
    )
    body = "\n".join(_row(row, columns) for row in rows)
    cut = (
        f"<p>The first {limit} maps are below; predictions.csv has them all.</p>"
        if len(predictions) > limit
        else ""
    )
    # an option's value attribute, not its text, which HTML strips of outer spaces
    options = "".join(f'<option value="{_text(n)}">{_text(n)}</option>' for n in classes)
    gone = "".join(
        f"<tr><td>{_text(row['image'])}</td><td>{_text(row['reason'])}</td></tr>"
        for row in skipped[:limit]
    )
    missing = (
        f'<details><summary>{len(skipped)} images skipped (<a href="skipped.csv">skipped.csv'
        f"</a>)</summary><table><tr><th>image</th><th>reason</th></tr>{gone}</table></details>"
        if skipped
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cam-engine explain: {images} images</title>
<style>{_STYLE}</style></head>
<body>
<h1>cam-engine explain: {images} images, {len(predictions)} maps</h1>
<p>{_text(caption)}</p>
{cut}
<p><label>class <select id="class"><option value="">all</option>{options}</select></label>
<span id="count">{len(rows)} maps</span> ·
<a href="predictions.csv">predictions.csv</a></p>
{missing}
<table id="maps"><thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def _text(value: str) -> str:
    """``value`` as HTML text or attribute value: escaped, odd bytes of file names as U+FFFD."""
    readable = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(readable, quote=True)


def _link(path: str) -> str:
    """A relative URL of a file under the output folder, percent-encoded (``#``, ``?``, ``%``
    and spaces are file-name characters here), as an attribute value."""
    return html.escape(quote(path.encode("utf-8", "surrogateescape"), safe="/"), quote=True)


def _row(row: Mapping[str, str], columns: list[str]) -> str:
    links = {
        "sheet": sheet_file(row["picture"]),
        "overlay": overlay_file(row["picture"], row["class_id"]),
    }
    pictures = "".join(
        f'<td><a href="{_link(links[c])}"><img src="{_link(links[c])}" alt="{c}" '
        f'loading="lazy"></a></td>'
        for c in columns
    )
    score = float(row["score"])
    return (
        f'<tr data-class="{_text(row["class_name"])}">{pictures}<td>{_text(row["image"])}</td>'
        f'<td data-value="{int(row["class_id"])}">{int(row["class_id"])}</td>'
        f"<td>{_text(row['class_name'])}</td>"
        f'<td data-value="{score!r}">{probability_text(score)}</td></tr>'
    )


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th[data-key] { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " ▲"; }
th[aria-sort="descending"]::after { content: " ▼"; }
td[data-value] { text-align: right; font-variant-numeric: tabular-nums; }
img { display: block; height: 160px; max-width: 640px; object-fit: contain; }
"""

_SCRIPT = """
const table = document.getElementById("maps"), body = table.tBodies[0];
const rows = Array.from(body.rows), select = document.getElementById("class");
const heads = Array.from(table.tHead.rows[0].cells);
const view = () => new URLSearchParams(location.hash.slice(1));
function show() {
  const state = view(), cls = state.get("class") || "", sort = state.get("sort") || "";
  select.value = cls;
  let shown = 0;
  for (const row of rows) {
    row.hidden = cls !== "" && row.dataset.class !== cls;
    shown += !row.hidden;
  }
  const key = sort.replace(/^-/, ""), sign = sort.startsWith("-") ? -1 : 1;
  const col = heads.findIndex((th) => th.dataset.key === key);
  heads.forEach((th) => th.removeAttribute("aria-sort"));
  const order = rows.slice();
  if (col >= 0) {
    const numeric = heads[col].dataset.type === "number";
    const value = (row) =>
      numeric ? parseFloat(row.cells[col].dataset.value) : row.cells[col].textContent;
    const compare = (a, b) => numeric ? value(a) - value(b) : value(a).localeCompare(value(b));
    order.sort((a, b) => sign * compare(a, b));
    heads[col].setAttribute("aria-sort", sign > 0 ? "ascending" : "descending");
  }
  const sorted = document.createDocumentFragment();
  for (const row of order) sorted.appendChild(row);
  body.appendChild(sorted);
  document.getElementById("count").textContent = `${shown} of ${rows.length} maps shown`;
}
function set(name, value) {
  const state = view();
  if (value) state.set(name, value); else state.delete(name);
  location.hash = state.toString();
}
select.addEventListener("change", () => set("class", select.value));
table.tHead.addEventListener("click", (event) => {
  const th = event.target.closest("th[data-key]");
  if (!th) return;
  // numbers first from the largest, text from A; a second click turns the order round
  const first = th.dataset.type === "number" ? "-" + th.dataset.key : th.dataset.key;
  const now = view().get("sort");
  set("sort", now === first ? (first.startsWith("-") ? th.dataset.key : "-" + first) : first);
});
window.addEventListener("hashchange", show);
show();
"""
