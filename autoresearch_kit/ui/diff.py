"""Diff view: a unified diff of train.py rendered as readable HTML (unified or side by side).

Pure functions returning HTML strings with inline styles (JupyterLab keeps inline
styles in widget HTML and in trusted outputs; CSS classes would need a stylesheet).
Python syntax is highlighted with pygments when it is installed (IPython depends on it,
so it is there in any Jupyter); without it the diff is plain but still coloured.

    from autoresearch_kit.ui.diff import diff_html, diff_stats
    html = diff_html(proposal.diff, mode="split")

No ipywidgets here: `Proposal._repr_html_` and the panel both use these functions.
"""

from __future__ import annotations

import html as _html
import re
from dataclasses import dataclass, field

# GitHub-like colours: readable on a white JupyterLab theme, still distinguishable in dark.
# Translucent tints over JupyterLab's own background (its theme variables, with light
# fallbacks outside Lab): light and dark themes both keep their text colour readable. Opaque
# light greens under a dark theme's white text made knob names unreadable (issue 13).
_ADD_BG, _DEL_BG, _HUNK_BG = "rgba(46,160,67,0.15)", "rgba(248,81,73,0.15)", "rgba(56,139,253,0.12)"
_ADD_NO_BG, _DEL_NO_BG = "rgba(46,160,67,0.25)", "rgba(248,81,73,0.25)"
_BG, _NO_BG = "var(--jp-layout-color1, #ffffff)", "var(--jp-layout-color2, #f6f8fa)"
_FG, _DIM = "var(--jp-content-font-color1, #1f2328)", "var(--jp-ui-font-color2, #6e7781)"
_BORDER = "var(--jp-border-color1, #d0d7de)"
_FONT = ("font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,'Liberation Mono',monospace;"
         "font-size:12px;line-height:1.45")
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@(.*)$")


@dataclass
class DiffLine:
    """One line of a hunk: tag is ' ' (context), '+' (added) or '-' (removed)."""

    tag: str
    text: str
    old_no: int | None
    new_no: int | None


@dataclass
class Hunk:
    header: str
    lines: list[DiffLine] = field(default_factory=list)


def diff_stats(diff: str) -> tuple[int, int]:
    """(+added, -removed) line counts of a unified diff (file headers excluded)."""
    plus = minus = 0
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            plus += 1
        elif line.startswith("-") and not line.startswith("---"):
            minus += 1
    return plus, minus


def parse_unified(diff: str) -> list[Hunk]:
    """Split a unified diff into hunks with old/new line numbers.

    Lines before the first hunk (``---``/``+++`` headers, ``diff --git``) are skipped;
    ``\\ No newline at end of file`` markers are dropped.
    """
    hunks: list[Hunk] = []
    old_no = new_no = 0
    for raw in diff.splitlines():
        m = _HUNK_RE.match(raw)
        if m:
            old_no, new_no = int(m.group(1)), int(m.group(2))
            hunks.append(Hunk(header=raw))
            continue
        if not hunks or raw.startswith("\\"):
            continue
        tag, text = (raw[:1] or " "), raw[1:]
        if tag == "+":
            hunks[-1].lines.append(DiffLine("+", text, None, new_no))
            new_no += 1
        elif tag == "-":
            hunks[-1].lines.append(DiffLine("-", text, old_no, None))
            old_no += 1
        else:
            hunks[-1].lines.append(DiffLine(" ", text, old_no, new_no))
            old_no += 1
            new_no += 1
    return hunks


def select_hunks(new_source: str, diff: str, keep: "set[int] | list[int]") -> str:
    """The train.py that takes only some hunks of a proposal's diff.

    Parameters
    ----------
    new_source : str
        The proposal's train.py (all hunks applied).
    diff : str
        Its unified diff against the parent.
    keep : set of int
        Indices (0-based, in diff order) of the hunks to keep; the others go back to the
        parent's lines. All of them gives `new_source`, none the parent.

    Returns
    -------
    str
        The train.py with the chosen hunks.

    Raises
    ------
    ValueError
        When the diff does not describe `new_source` (its lines are not where the hunk says).
    """
    keep = set(keep)
    new = new_source.split("\n")
    out: list[str] = []
    pos = 0
    for i, h in enumerate(parse_unified(diff)):
        new_start = int(_HUNK_RE.match(h.header).group(2))
        new_lines = [ln.text for ln in h.lines if ln.tag != "-"]
        old_lines = [ln.text for ln in h.lines if ln.tag != "+"]
        # a hunk with no new-side lines names the line after which it applies
        start = new_start - 1 if new_lines else new_start
        if start < pos or new[start:start + len(new_lines)] != new_lines:
            msg = f"hunk {i + 1} of the diff does not match the proposal's train.py: it cannot be taken apart."
            raise ValueError(msg)
        out.extend(new[pos:start])
        out.extend(new_lines if i in keep else old_lines)
        pos = start + len(new_lines)
    out.extend(new[pos:])
    return "\n".join(out)


def hunk_summary(hunk: Hunk, width: int = 48) -> str:
    """One line naming a hunk by its first changed line (for a checkbox label)."""
    first = next((ln for ln in hunk.lines if ln.tag != " " and ln.text.strip()), None)
    line_no = first.new_no or first.old_no if first is not None else None
    text = first.text.strip() if first is not None else hunk.header
    text = text if len(text) <= width else text[:width - 1] + "…"
    return f"line {line_no}: {first.tag}{text}" if first is not None else text


def _highlighter():
    """Return a function text -> HTML for one line of Python, or None without pygments."""
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:  # optional: plain escaped text is still a readable diff
        return None
    lexer, fmt = PythonLexer(stripnl=False, ensurenl=False), HtmlFormatter(nowrap=True, noclasses=True)

    def one(text: str) -> str:
        return highlight(text, lexer, fmt).rstrip("\n")

    return one


def _code(text: str, hl) -> str:
    if not text:
        return "&nbsp;"
    return hl(text) if hl else _html.escape(text)


def _no(n: int | None) -> str:
    return "" if n is None else str(n)


def _td_no(n: int | None, bg: str) -> str:
    return (f'<td style="width:1%;min-width:3em;text-align:right;padding:0 6px;color:{_DIM};'
            f'background:{bg};user-select:none;vertical-align:top">{_no(n)}</td>')


def _td_code(content: str, bg: str, sign: str = "") -> str:
    mark = f'<span style="color:{_DIM};user-select:none">{sign}</span>' if sign else ""
    return (f'<td style="padding:0 8px;white-space:pre-wrap;word-break:break-all;background:{bg};'
            f'color:{_FG};vertical-align:top;text-align:left">{mark}{content}</td>')


def _hunk_row(h: Hunk, colspan: int) -> str:
    return (f'<tr><td colspan="{colspan}" style="background:{_HUNK_BG};color:{_DIM};padding:2px 8px;'
            f'text-align:left">{_html.escape(h.header)}</td></tr>')


def _unified_rows(hunks: list[Hunk], hl) -> list[str]:
    rows = []
    for h in hunks:
        rows.append(_hunk_row(h, 3))
        for ln in h.lines:
            bg, nobg = {"+": (_ADD_BG, _ADD_NO_BG), "-": (_DEL_BG, _DEL_NO_BG)}.get(ln.tag, (_BG, _NO_BG))
            sign = ln.tag if ln.tag != " " else " "
            rows.append("<tr>" + _td_no(ln.old_no, nobg) + _td_no(ln.new_no, nobg)
                        + _td_code(_code(ln.text, hl), bg, sign) + "</tr>")
    return rows


def _split_rows(hunks: list[Hunk], hl) -> list[str]:
    """Side by side: context on both sides; a run of '-' lines pairs with the '+' run after it."""
    rows = []
    for h in hunks:
        rows.append(_hunk_row(h, 4))
        i, lines = 0, h.lines
        while i < len(lines):
            ln = lines[i]
            if ln.tag == " ":
                code = _code(ln.text, hl)
                rows.append("<tr>" + _td_no(ln.old_no, _NO_BG) + _td_code(code, _BG)
                            + _td_no(ln.new_no, _NO_BG) + _td_code(code, _BG) + "</tr>")
                i += 1
                continue
            dels, adds = [], []
            while i < len(lines) and lines[i].tag == "-":
                dels.append(lines[i])
                i += 1
            while i < len(lines) and lines[i].tag == "+":
                adds.append(lines[i])
                i += 1
            for k in range(max(len(dels), len(adds))):
                d = dels[k] if k < len(dels) else None
                a = adds[k] if k < len(adds) else None
                left = (_td_no(d.old_no, _DEL_NO_BG) + _td_code(_code(d.text, hl), _DEL_BG, "-")) if d else (
                    _td_no(None, _NO_BG) + _td_code("", _NO_BG))
                right = (_td_no(a.new_no, _ADD_NO_BG) + _td_code(_code(a.text, hl), _ADD_BG, "+")) if a else (
                    _td_no(None, _NO_BG) + _td_code("", _NO_BG))
                rows.append("<tr>" + left + right + "</tr>")
    return rows


def diff_html(diff: str, *, mode: str = "unified", highlight: bool = True, max_height: str | None = "420px",
              title: str = "train.py") -> str:
    """Render a unified diff as an HTML table.

    Parameters
    ----------
    diff : str
        A unified diff (as in ``Proposal.diff``).
    mode : {"unified", "split"}
        One column with +/- lines, or old and new side by side.
    highlight : bool
        Python syntax colours (needs pygments; falls back to plain text).
    max_height : str or None
        CSS height after which the diff scrolls (None: no limit).
    title : str
        File name shown in the header bar.

    Returns
    -------
    str
        Self-contained HTML (inline styles only).
    """
    if mode not in ("unified", "split"):
        msg = f"diff mode must be 'unified' or 'split', got {mode!r}."
        raise ValueError(msg)
    plus, minus = diff_stats(diff)
    head = (f'<div style="background:{_NO_BG};color:{_FG};border-bottom:1px solid {_BORDER};padding:4px 8px;'
            f'font-weight:600;text-align:left">{_html.escape(title)} '
            f'<span style="color:#1a7f37">+{plus}</span> <span style="color:#cf222e">&minus;{minus}</span></div>')
    hunks = parse_unified(diff)
    if not hunks:
        body = f'<div style="padding:8px;color:{_DIM}">(no changes)</div>'
    else:
        hl = _highlighter() if highlight else None
        rows = _unified_rows(hunks, hl) if mode == "unified" else _split_rows(hunks, hl)
        cols = ('<colgroup><col style="width:3.5em"><col style="width:3.5em"><col></colgroup>' if mode == "unified"
                else '<colgroup><col style="width:3.5em"><col style="width:50%"><col style="width:3.5em">'
                     '<col style="width:50%"></colgroup>')
        body = (f'<table style="border-collapse:collapse;width:100%;table-layout:fixed;margin:0;{_FONT}">'
                f'{cols}{"".join(rows)}</table>')
    scroll = f"max-height:{max_height};overflow:auto;" if max_height else ""
    return (f'<div class="ark-diff" style="border:1px solid {_BORDER};border-radius:6px;overflow:hidden;{_FONT}">'
            f'{head}<div style="{scroll}">{body}</div></div>')
