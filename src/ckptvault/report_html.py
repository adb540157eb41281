"""The HTML report of a tree of runs (``ckptvault report ROOT``): ONE self-contained page.

Runs with their config, the registry, a sortable and filterable table of every checkpoint (from the
catalog), storage over time and each run's metric curves (from :mod:`ckptvault.reporting`). The
page needs no network (inline CSS and JS, PNGs as ``data:`` URIs).

Everything on it comes from untrusted files, so every value passes :func:`_e`: control, bidi and
surrogate characters spelled out (:func:`ckptvault.visible.visible_str`), then ``html.escape``. No
data is ever placed in the script, whose hash is therefore fixed: the Content-Security-Policy
allows exactly that script and that style, no base URL and no form target -- a second line of
defence should anything ever slip through. A run whose curves cannot be drawn shows why; it never
fails the page.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any

from .catalog.registry import Registry, RegistryError
from .catalog.store import Catalog, CatalogRow
from .errors import CheckpointError
from .reporting import FAILED, KEPT, STATUSES, Trajectory, plot_png, storage_png, trajectory
from .visible import number_text, size_text, visible_str

_MAX_METRIC_COLUMNS = 12  # beyond this, the report's table puts the rest in one column


def _e(value: Any) -> str:
    """Data as HTML text or attribute value: acting characters spelled out, then HTML-escaped."""
    if value is None:
        return ""
    text = number_text(value) if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return html.escape(visible_str(text), quote=True)


def _human(n: Any) -> str:
    # A catalog row of the wrong type is shown as it is (then escaped by the caller).
    return size_text(n) if _is_number(n) else str(n)


def _number(value: Any) -> str:
    if value is None:
        return ""
    return number_text(value) if _is_number(value) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _size(value: Any) -> int:
    """A size to add up; a catalog row whose size is not an integer counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _order(value: Any) -> tuple[int, Any]:
    """A sort key for values of any type (the catalog is a file anyone could have edited)."""
    return (0, value) if _is_number(value) else (1, str(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _tags(catalog: Catalog) -> dict[str, dict[str, str]]:
    """Tags per checkpoint path. The catalog's rows do not carry them, so its database is read
    directly (read-only); a catalog without them (another schema) just shows none."""
    tags: dict[str, dict[str, str]] = {}
    try:
        db = sqlite3.connect(f"{catalog.path.as_uri()}?mode=ro", uri=True)
        try:
            for path, key, value in db.execute(
                "SELECT c.path, t.key, t.value FROM tags t JOIN checkpoints c ON c.id = t.checkpoint"
            ):
                tags.setdefault(str(path), {})[str(key)] = "" if value is None else str(value)
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    return tags


@dataclass(frozen=True)
class _Registered:
    model: str
    version: int
    checkpoint: str
    step: Any
    aliases: tuple[str, ...]


def _registry(root: str | os.PathLike[str]) -> tuple[list[_Registered], list[str]]:
    """Every registered version with its aliases, and the problems met reading the registry."""
    registry = Registry(root)
    entries: list[_Registered] = []
    problems: list[str] = []
    for name in registry.names():
        try:
            doc = registry.show(name)
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        aliases = doc.get("aliases") if isinstance(doc.get("aliases"), dict) else {}
        for version in doc["versions"]:
            if not isinstance(version, dict) or not isinstance(version.get("version"), int):
                continue
            number = version["version"]
            entries.append(
                _Registered(
                    model=name,
                    version=number,
                    checkpoint=str(version.get("checkpoint", "")),
                    step=version.get("step"),
                    aliases=tuple(sorted(a for a, v in (aliases or {}).items() if v == number)),
                )
            )
    return entries, problems


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #eee;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right}tr[hidden]{display:none}
.failed{color:#b00020;font-weight:bold}.ok{color:#1a7f37}.muted{color:#888}
.alias{background:#efe7fb;border-radius:3px;padding:0 .3em;white-space:nowrap}
input#filter{font:inherit;padding:.3em .5em;width:28em}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{margin:0;white-space:pre-wrap;max-width:50em}
#checkpoints td{white-space:nowrap}.scroll{overflow-x:auto}
code{font-size:.92em}
"""

# The report's only script. No data is ever placed in it (the data is in the escaped HTML), so its
# hash is fixed and the Content-Security-Policy can allow exactly it.
_JS = """
(function () {
  "use strict";
  var table = document.getElementById("checkpoints");
  if (!table) { return; }
  var body = table.tBodies[0];
  var input = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-v");
    if (numeric) { return raw === null || raw === "" ? NaN : parseFloat(raw); }
    return (raw === null ? cell.textContent : raw).toLowerCase();
  }
  function sortBy(index, descending) {
    var numeric = headers[index].getAttribute("data-type") === "num";
    var sign = descending ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, index, numeric), y = key(b, index, numeric);
      if (numeric) {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) === isNaN(y) ? 0 : (isNaN(x) ? 1 : -1); }
        return (x - y) * sign;
      }
      return x < y ? -sign : (x > y ? sign : 0);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (th, i) {
      if (i === index) { th.setAttribute("aria-sort", descending ? "descending" : "ascending"); }
      else { th.removeAttribute("aria-sort"); }
    });
  }
  function filter(text) {
    var needle = text.trim().toLowerCase();
    var visible = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var match = needle === "" || row.textContent.toLowerCase().indexOf(needle) !== -1;
      row.hidden = !match;
      if (match) { visible += 1; }
    });
    shown.textContent = visible + " of " + body.rows.length + " checkpoints shown";
  }
  function fromFragment() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var sort = params.get("sort");
    if (sort) {
      var descending = sort.charAt(0) === "-";
      var name = descending ? sort.slice(1) : sort;
      headers.forEach(function (th, i) {
        if (th.getAttribute("data-key") === name) { sortBy(i, descending); }
      });
    }
    var text = params.get("filter");
    if (text !== null) { input.value = text; }
    filter(input.value);
  }
  headers.forEach(function (th, i) {
    th.addEventListener("click", function () { sortBy(i, th.getAttribute("aria-sort") === "ascending"); });
  });
  input.addEventListener("input", function () {
    filter(input.value);
    try {
      var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
      if (input.value) { params.set("filter", input.value); } else { params.delete("filter"); }
      history.replaceState(null, "", "#" + params.toString());
    } catch (e) { /* a file: URL may refuse; the filter works without it */ }
  });
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    style = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
    return (
        f"default-src 'none'; img-src data:; style-src 'sha256-{style}'; script-src 'sha256-{digest}'; "
        "base-uri 'none'; form-action 'none'"
    )


def _validation_cell(row: CatalogRow) -> str:
    if row.validation_passed is None:
        return '<td data-v="-" class="muted">-</td>'
    level = _e(row.validation_level or "")
    if row.validation_passed:
        return f'<td data-v="ok" class="ok" title="{level}">ok</td>'
    return f'<td data-v="FAILED" class="failed" title="{level}">FAILED</td>'


def build_report(root: str | os.PathLike[str], *, curves: bool = True) -> str:
    """The HTML report of every checkpoint under ``root`` (see the module docstring)."""
    problems: list[str] = []
    with Catalog(root) as catalog:
        rows = catalog.find(sort="run_dir,step")
        try:
            runs = [r for r in catalog.runs() if isinstance(r.get("run_dir"), str)]
        except ValueError as exc:  # a run's config in the catalog is not JSON
            runs, problems = [], [f"the catalog's runs cannot be read: {exc}"]
        tags = _tags(catalog)
        base = catalog.root
    rows.sort(key=lambda r: (_order(r.run_dir), _order(r.step), _order(r.name)))
    registered, registry_problems = _registry(base)
    registry_problems += problems
    aliases_of: dict[str, list[str]] = {}
    for entry in registered:
        labels = [f"{entry.model}@{a}" for a in entry.aliases] or [f"{entry.model} v{entry.version}"]
        aliases_of.setdefault(entry.checkpoint, []).extend(labels)

    trajectories: dict[str, Trajectory] = {}
    for run in runs:
        # A run that cannot be read shows "no trajectory"; it never fails the page.
        with contextlib.suppress(CheckpointError, OSError, ValueError, TypeError, OverflowError):
            trajectories[run["run_dir"]] = trajectory(base / run["run_dir"])
    status_of: dict[str, frozenset[str]] = {}
    for run_dir, traj in trajectories.items():
        for mark in traj.marks:
            status_of[f"{run_dir}/{mark.name}" if run_dir else mark.name] = mark.statuses

    metric_names = sorted({str(k) for r in rows for k in r.metrics})
    columns, extra_metrics = metric_names[:_MAX_METRIC_COLUMNS], metric_names[_MAX_METRIC_COLUMNS:]
    failed = sum(1 for r in rows if r.validation_passed is False)
    total = sum(_size(r.size_bytes) for r in rows)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp())}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ckptvault report: {_e(base)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Checkpoints under <code>{_e(base)}</code></h1>",
        f'<p id="summary">{len(rows)} checkpoints in {len(runs)} runs, {_e(_human(total))} kept; '
        + (f'<span class="failed">{failed} FAILED validation</span>' if failed else "none failed validation")
        + "</p>",
        '<p><a href="#runs">runs</a> · <a href="#registry">registry</a> · '
        '<a href="#checkpoints-section">checkpoints</a> · <a href="#storage">storage</a> · '
        '<a href="#curves">metric curves</a></p>',
    ]

    # Runs.
    parts.append('<h2 id="runs">Runs</h2><table id="runs-table"><thead><tr>')
    parts.append("<th>run directory</th><th>run id</th><th>git commit</th><th>checkpoints</th>")
    parts.append("<th>size</th><th>config</th></tr></thead><tbody>")
    for run in runs:
        mine = [r for r in rows if r.run_dir == run["run_dir"]]
        size = sum(_size(r.size_bytes) for r in mine)
        config = run.get("config")
        config_html = (
            "<details><summary>config</summary><pre>"
            + _e(json.dumps(config, indent=1, sort_keys=True, default=str))
            + "</pre></details>"
            if config
            else '<span class="muted">-</span>'
        )
        parts.append(
            f"<tr><td><code>{_e(run['run_dir'] or '.')}</code></td><td>{_e(run.get('run_id') or '-')}</td>"
            f"<td><code>{_e(run.get('git_commit') or '-')}</code></td><td class=num>{len(mine)}</td>"
            f"<td class=num>{_e(_human(size))}</td><td>{config_html}</td></tr>"
        )
    parts.append("</tbody></table>")

    # Registry.
    parts.append('<h2 id="registry">Registry</h2>')
    if registered:
        parts.append('<table id="registry-table"><thead><tr><th>model</th><th>version</th><th>aliases</th>')
        parts.append("<th>checkpoint</th><th>step</th></tr></thead><tbody>")
        for entry in registered:
            alias_html = " ".join(
                f'<span class="alias">{_e(entry.model)}@{_e(alias)}</span> &rarr; '
                f"<code>{_e(entry.checkpoint)}</code>"
                for alias in entry.aliases
            )
            parts.append(
                f"<tr><td>{_e(entry.model)}</td><td class=num>{entry.version}</td><td>{alias_html}</td>"
                f"<td><code>{_e(entry.checkpoint)}</code></td><td class=num>{_e(entry.step)}</td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted">no registered models</p>')
    for problem in registry_problems:
        parts.append(f'<p class="failed">{_e(problem)}</p>')

    # Checkpoints.
    parts.append('<h2 id="checkpoints-section">Checkpoints</h2>')
    parts.append(
        '<p><input id="filter" type="search" placeholder="filter: any text in a row" '
        'aria-label="filter checkpoints"> <span id="shown"></span> '
        '<span class="muted">(click a header to sort; <code>#filter=TEXT&amp;sort=-step</code> in the '
        "address presets both)</span></p>"
    )
    header = [
        ("checkpoint", "text"),
        ("run", "text"),
        ("step", "num"),
        ("epoch", "num"),
        ("scope", "text"),
        ("created", "text"),
        ("size", "num"),
        ("validation", "text"),
        ("status", "text"),
        ("registry", "text"),
    ]
    parts.append('<div class="scroll"><table id="checkpoints" class="sortable"><thead><tr>')
    for name, kind in header:
        parts.append(f'<th data-key="{name}" data-type="{kind}">{name}</th>')
    for name in columns:
        parts.append(f'<th data-key="{_e(name)}" data-type="num">{_e(name)}</th>')
    if extra_metrics:
        parts.append('<th data-key="other metrics" data-type="text">other metrics</th>')
    parts.append('<th data-key="tags" data-type="text">tags</th></tr></thead><tbody>')
    for row in rows:
        statuses = status_of.get(row.path, frozenset())
        status_text = ", ".join(s for s in STATUSES if s in statuses and s not in (KEPT, FAILED))
        labels = aliases_of.get(row.path, [])
        created = str(row.created_at).replace("T", " ")[:19]
        cells = [
            f'<td data-v="{_e(row.path)}"><code>{_e(row.path)}</code></td>',
            f"<td>{_e(row.run_id or '-')}</td>",
            f'<td class=num data-v="{_e(row.step)}">{_e(row.step)}</td>',
            f'<td class=num data-v="{_e(row.epoch)}">{_e(row.epoch)}</td>',
            f"<td>{_e(row.scope or '')}</td>",
            f'<td data-v="{_e(row.created_at)}">{_e(created)}</td>',
            f'<td class=num data-v="{_e(row.size_bytes)}">{_e(_human(row.size_bytes))}</td>',
            _validation_cell(row),
            f"<td>{_e(status_text)}</td>",
            "<td>" + " ".join(f'<span class="alias">{_e(label)}</span>' for label in labels) + "</td>",
        ]
        metrics = {str(k): v for k, v in row.metrics.items()}
        for name in columns:
            value = metrics.get(name)
            exact = "" if value is None else repr(value)  # sorts by the exact value, shows 6 digits
            cells.append(f'<td class=num data-v="{_e(exact)}">{_e(_number(value))}</td>')
        if extra_metrics:
            rest = ", ".join(f"{k}={_number(metrics[k])}" for k in extra_metrics if k in metrics)
            cells.append(f"<td>{_e(rest)}</td>")
        row_tags = tags.get(row.path, {})
        cells.append("<td>" + _e(", ".join(f"{k}={v}" for k, v in sorted(row_tags.items()))) + "</td>")
        parts.append(f'<tr data-path="{_e(row.path)}">' + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")

    # Storage and curves.
    parts.append('<h2 id="storage">Storage used over time</h2>')
    parts.append(
        '<p class="muted">Cumulative size of the checkpoints kept now, by creation time (deleted ones '
        "are gone from the catalog; chunks shared between checkpoints are counted in each).</p>"
    )
    if rows:
        parts.append(_img(storage_png(rows), "cumulative bytes of kept checkpoints per run"))
    parts.append('<h2 id="curves">Metric curves</h2>')
    if not curves:
        parts.append('<p class="muted">left out (--no-curves)</p>')
    for run in runs:
        run_dir = run["run_dir"]
        parts.append(
            f"<h3><code>{_e(run_dir or '.')}</code> <span class=muted>{_e(run.get('run_id'))}</span></h3>"
        )
        found = trajectories.get(run_dir)
        if found is None:
            parts.append('<p class="muted">no trajectory</p>')
        elif curves:
            try:
                png = plot_png(found, title=run_dir or ".")
            except (ValueError, TypeError, OverflowError) as exc:  # values no axis can hold
                parts.append(f'<p class="failed">curves cannot be drawn: {_e(exc)}</p>')
                continue
            parts.append(_img(png, f"metric curves of {run_dir or '.'}"))
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)
