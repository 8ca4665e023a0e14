"""Self-contained HTML reports (fMRIPrep-like): a navbar, a summary box, sections.

A :class:`Report` holds :class:`Section` objects; each section holds parts
(paragraphs, tables, figures, notes, key-value lists). :meth:`Report.to_html`
renders one HTML page with its CSS inline and every figure embedded as a
base64 PNG, so the page loads nothing from anywhere: no CDN, no external
file. A tiny inline script only marks on ``<body>`` how many images loaded
(``data-figures-total``, ``data-figures-loaded``, ``data-figures-ok``), which
tests read with headless Chromium.

Stages that did not run are shown with ``note(..., kind="missing")``: the page
says so plainly, and the navbar and the summary flag that section.

The workflow writes the page with the project's output writer::

    report = Report("sub-01", subtitle="task-pieman, model smollm2-135m")
    report.summary({"Participant": "01", "Runs": 2})
    sec = report.add_section("Atoms")
    sec.figure(figures.atoms_figure(t, D), "The 64 atoms ...")
    writer.write_text(report.to_html(), path)
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import io
import logging
import re
import sys
from importlib import resources
from string import Template
from typing import Any, Mapping, Optional

import pandas as pd

from .. import __version__

logger = logging.getLogger(__name__)

NOTE_KINDS = ("info", "warning", "missing")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TEMPLATE = "report.html"


def _esc(value: Any) -> str:
    """HTML-escape any value's ``str``."""
    return _html.escape(str(value), quote=True)


def _slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug or "section"


def _figure_png(fig_or_png: Any, dpi: int) -> bytes:
    """PNG bytes of a matplotlib Figure (which is then closed) or of PNG bytes as given."""
    if isinstance(fig_or_png, (bytes, bytearray, memoryview)):
        data = bytes(fig_or_png)
        if not data.startswith(_PNG_MAGIC):
            raise ValueError("Section.figure: the bytes given are not a PNG image "
                             "(they lack the PNG signature); pass a matplotlib Figure or PNG bytes")
        return data
    from matplotlib.figure import Figure

    if not isinstance(fig_or_png, Figure):
        raise TypeError(f"Section.figure: expected a matplotlib Figure or PNG bytes, "
                        f"got {type(fig_or_png).__name__}")
    buf = io.BytesIO()
    try:
        fig_or_png.savefig(buf, format="png", dpi=dpi, bbox_inches="tight",
                           facecolor="white")
    finally:
        if "matplotlib.pyplot" in sys.modules:  # else the figure cannot be one pyplot holds
            sys.modules["matplotlib.pyplot"].close(fig_or_png)
    return buf.getvalue()


class Section:
    """One titled part of a report, with an anchor for the navbar.

    Made by :meth:`Report.add_section`. Every method appends a part and
    returns the section, so calls can be chained.
    """

    def __init__(self, title: str, anchor: str, dpi: int = 110):
        self.title = str(title)
        self.anchor = anchor
        self.dpi = dpi
        self._parts: list[str] = []
        self.flags: list[tuple[str, str]] = []  # (kind, message) of warning / missing notes

    def text(self, text: str) -> "Section":
        """Add prose; blank lines separate paragraphs. The text is escaped."""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            if para.strip():
                self._parts.append(f"<p>{_esc(para.strip())}</p>")
        return self

    def table(self, df: pd.DataFrame, caption: Optional[str] = None,
              max_rows: int = 50, float_format: str = "{:.3g}", index: bool = False) -> "Section":
        """Add a table of a DataFrame (cells escaped), at most ``max_rows`` rows shown.

        Parameters
        ----------
        df : pandas.DataFrame, shape (n_rows, n_columns)
        caption : str, optional
            Said below the table; a truncation notice is appended when rows are cut.
        max_rows : int
            Rows beyond this are left out, and the caption says how many were shown.
        float_format : str
            ``str.format`` pattern for float cells.
        index : bool
            Whether to show the index as the first column.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"Section.table: expected a pandas DataFrame, got {type(df).__name__}")
        if max_rows < 1:
            raise ValueError(f"Section.table: max_rows must be >= 1, got {max_rows}")
        if df.empty:
            return self.note(f"{caption or 'Table'}: no rows.", kind="info")
        shown = df.head(max_rows)
        body = shown.to_html(escape=True, index=index, border=0, na_rep="n/a",
                             classes="report-table",
                             float_format=lambda x: float_format.format(x))
        cap = caption or ""
        if len(df) > max_rows:
            cap = f"{cap} (showing the first {max_rows} of {len(df)} rows)".strip()
        if cap:
            body = body.replace(">\n  <thead>", f">\n  <caption>{_esc(cap)}</caption>\n  <thead>", 1)
        self._parts.append(f'<div class="table-wrap">{body}</div>')
        return self

    def figure(self, fig_or_png: Any, caption: str, alt: Optional[str] = None) -> "Section":
        """Add a figure embedded as a base64 PNG ``<img>``.

        Parameters
        ----------
        fig_or_png : matplotlib.figure.Figure or bytes
            A Figure is rendered to PNG and closed; bytes must be a PNG file.
        caption : str
            What the figure shows and how to read it (escaped).
        alt : str, optional
            Alternative text; defaults to the caption's first sentence.
        """
        if not caption or not str(caption).strip():
            raise ValueError("Section.figure: a caption is required (say what the figure shows)")
        png = _figure_png(fig_or_png, self.dpi)
        alt_text = alt or re.split(r"(?<=[.:])\s", str(caption).strip(), maxsplit=1)[0]
        data = base64.b64encode(png).decode("ascii")
        self._parts.append(
            '<figure class="report-figure">'
            f'<img src="data:image/png;base64,{data}" alt="{_esc(alt_text)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")
        return self

    def html(self, raw: str) -> "Section":
        """Add raw HTML as given (not escaped: the caller vouches for it)."""
        self._parts.append(str(raw))
        return self

    def note(self, message: str, kind: str = "info") -> "Section":
        """Add a boxed note.

        ``kind="missing"`` is for a stage that did not run or an input that was
        absent: the box says "Not available", and the section is flagged in the
        navbar and the summary. ``"warning"`` is flagged too; ``"info"`` is not.
        """
        if kind not in NOTE_KINDS:
            raise ValueError(f"Section.note: kind must be one of {NOTE_KINDS}, got {kind!r}")
        self._parts.append(f'<div class="note note-{kind}">{_esc(message)}</div>')
        if kind != "info":
            self.flags.append((kind, str(message)))
        return self

    def keyvalues(self, items: Mapping[str, Any]) -> "Section":
        """Add a definition list of key: value pairs (both escaped)."""
        self._parts.append(_keyvalues_html(items))
        return self

    @property
    def flag(self) -> Optional[str]:
        """The worst note kind in the section: ``"missing"``, ``"warning"`` or None."""
        kinds = {k for k, _ in self.flags}
        return "missing" if "missing" in kinds else ("warning" if "warning" in kinds else None)

    def render(self) -> str:
        """This section as an HTML ``<section>`` element."""
        body = "\n".join(self._parts) or '<p class="empty">(empty section)</p>'
        return (f'<section class="report-section" id="{_esc(self.anchor)}">\n'
                f"<h2>{_esc(self.title)}</h2>\n{body}\n</section>")


def _keyvalues_html(items: Mapping[str, Any]) -> str:
    if not isinstance(items, Mapping):
        raise TypeError(f"keyvalues: expected a mapping, got {type(items).__name__}")
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items.items())
    return f'<dl class="keyvalues">{rows}</dl>'


class Report:
    """A self-contained HTML report.

    Parameters
    ----------
    title : str
        Page title, e.g. ``"Participant sub-01"``.
    subtitle : str, optional
        A line under the title (story, model, dataset).
    created : datetime, optional
        Shown in the header; defaults to now (local time).
    dpi : int
        Resolution at which matplotlib figures are embedded.
    """

    def __init__(self, title: str, subtitle: Optional[str] = None,
                 created: Optional[_dt.datetime] = None, dpi: int = 110):
        self.title = str(title)
        self.subtitle = subtitle
        self.created = created or _dt.datetime.now().astimezone()
        self.dpi = dpi
        self.sections: list[Section] = []
        self._summary: dict[str, Any] = {}

    def summary(self, items: Mapping[str, Any]) -> "Report":
        """Set (update) the key-value pairs of the summary box at the top."""
        if not isinstance(items, Mapping):
            raise TypeError(f"Report.summary: expected a mapping, got {type(items).__name__}")
        self._summary.update(items)
        return self

    def add_section(self, title: str, anchor: Optional[str] = None) -> Section:
        """Append a section and return it; ``anchor`` defaults to a slug of the title."""
        base = anchor or _slug(title)
        taken = {s.anchor for s in self.sections} | {"top", "summary"}
        anchor_, i = base, 2
        while anchor_ in taken:
            anchor_, i = f"{base}-{i}", i + 1
        section = Section(title, anchor_, dpi=self.dpi)
        self.sections.append(section)
        return section

    def _summary_html(self) -> str:
        flagged = [(s, k, m) for s in self.sections for k, m in s.flags]
        if not self._summary and not flagged:
            return ""
        parts = ['<section class="summary" id="summary">', "<h2>Summary</h2>"]
        if self._summary:
            parts.append(_keyvalues_html(self._summary))
        if flagged:
            items = "".join(
                f'<li><a href="#{_esc(s.anchor)}">{_esc(s.title)}</a>: '
                f'{"not available" if k == "missing" else "warning"} &mdash; {_esc(m)}</li>'
                for s, k, m in flagged)
            parts.append(f'<ul class="flags">{items}</ul>')
        parts.append("</section>")
        return "\n".join(parts)

    def to_html(self) -> str:
        """The whole page as one string (UTF-8 text, no external resources)."""
        template = Template(resources.files(__package__).joinpath("templates", _TEMPLATE)
                            .read_text(encoding="utf-8"))
        nav = "".join(
            f'<a href="#{_esc(s.anchor)}"'
            + (f' class="flag-{s.flag}"' if s.flag else "")
            + f">{_esc(s.title)}</a>" for s in self.sections)
        summary = self._summary_html()
        if summary:
            nav = '<a href="#summary">Summary</a>' + nav
        subtitle = f'<p class="subtitle">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        return template.substitute(
            title=_esc(self.title), brand=_esc(self.title), subtitle=subtitle,
            created=_esc(self.created.strftime("%Y-%m-%d %H:%M %Z").strip()),
            version=_esc(__version__), nav=nav, summary=summary,
            sections="\n".join(s.render() for s in self.sections))
