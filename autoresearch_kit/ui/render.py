"""HTML renderings for cell-by-cell use: a Proposal, a RunResult, a Lab's history.

    from autoresearch_kit.ui import show
    show(proposal, mode="split")    # description, rationale, highlighted diff
    show(result)                    # a RunResult or ledger record: status, numbers, loss curve
    show(lab)                       # history table, best so far, progress plot

Each function returns a self-contained HTML string (inline styles, images as base64
PNG), so the library objects can hook them into `_repr_html_` without importing
ipywidgets:

    from autoresearch_kit.ui.render import proposal_html, run_result_html, lab_html
    class RunResult:
        def _repr_html_(self):
            from autoresearch_kit.ui.render import run_result_html
            return run_result_html(self)

The panel (`ui/panel.py`) builds its sections from the same functions.
"""

from __future__ import annotations

import base64
import html as _html
import math
import re
from typing import Any, Iterable, Sequence

from autoresearch_kit.ui.diff import diff_html, diff_stats

_STATUS_COLOURS = {"ok": "#1a7f37", "crash": "#cf222e", "timeout": "#cf222e", "diverged": "#cf222e",
                   "invalid": "#cf222e", "aborted": "#bf8700", "running": "#0969da", "rejected": "#6e7781"}
_DECISION_COLOURS = {"keep": "#1a7f37", "discard": "#6e7781"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Field of a dict (ledger record) or attribute of an object (RunResult, Proposal)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _esc(x: Any) -> str:
    return _html.escape("" if x is None else str(x))


def badge(text: str, colour: str = "#6e7781") -> str:
    """A small rounded label, e.g. a status or a proposer name."""
    return (f'<span style="display:inline-block;padding:0 7px;border-radius:10px;font-size:11px;'
            f'line-height:18px;border:1px solid {colour};color:{colour};font-weight:600">{_esc(text)}</span>')


def png_img(png: bytes, *, alt: str = "plot", max_width: str = "760px") -> str:
    """An <img> tag carrying the PNG inline (works in saved notebooks and widget HTML)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}" style="max-width:{max_width};width:100%">'


def fmt_bpb(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def delta_html(value: Any, ref: Any, ref_name: str) -> str:
    """'-0.0123 vs parent' coloured green when lower (better), red when higher."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (value, ref)):
        return f'<span style="color:#6e7781">no {ref_name} to compare</span>'
    d = value - ref
    colour = "#1a7f37" if d < 0 else "#cf222e" if d > 0 else "#6e7781"
    return f'<span style="color:{colour};font-weight:600">{d:+.4f}</span> vs {ref_name} ({fmt_bpb(ref)})'


# --- Proposal -------------------------------------------------------------------------------

def proposal_header_html(proposal: Any) -> str:
    """Description, proposer, +/- counts and rationale of a Proposal (no diff)."""
    plus, minus = diff_stats(_get(proposal, "diff", "") or "")
    meta = _get(proposal, "metadata", {}) or {}
    extras = []
    if meta.get("model"):
        extras.append(_esc(meta["model"]))
    if meta.get("attempts"):
        extras.append(f"{meta['attempts']} attempt(s)")
    if meta.get("tokens"):
        extras.append(f"{meta['tokens']} tokens")
    parent = _get(proposal, "parent_id")
    extras.append(f"parent {_esc(parent)}" if parent else "")
    rationale = _get(proposal, "rationale", "") or ""
    return (f'<div style="margin:2px 0 6px 0">'
            f'<div style="font-size:15px;font-weight:600">{_esc(_get(proposal, "description", ""))}</div>'
            f'<div style="margin:3px 0;font-size:12px;color:#57606a">'
            f'{badge(_get(proposal, "proposer", "?"), "#8250df")} '
            f'<span style="color:#1a7f37;font-weight:600">+{plus}</span> '
            f'<span style="color:#cf222e;font-weight:600">&minus;{minus}</span> '
            f'{" · ".join(e for e in extras if e)}</div>'
            + (f'<div style="font-size:13px;color:#24292f;white-space:pre-wrap">{_esc(rationale)}</div>'
               if rationale else "")
            + "</div>")


def proposal_html(proposal: Any, *, mode: str = "unified") -> str:
    """A Proposal as HTML: header (description, rationale, +/- counts) and its highlighted diff."""
    return ("<div>" + proposal_header_html(proposal)
            + diff_html(_get(proposal, "diff", "") or "", mode=mode) + "</div>")


# --- RunResult ------------------------------------------------------------------------------

def _fmt_count(n: Any) -> str:
    if not isinstance(n, (int, float)) or n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def run_summary_rows(result: Any) -> list[tuple[str, str]]:
    """(name, value) pairs worth a glance after a run."""
    rows = [("val_bpb", fmt_bpb(_get(result, "val_bpb"))), ("steps", _fmt_count(_get(result, "steps"))),
            ("tokens", _fmt_count(_get(result, "tokens"))), ("FLOPs", _fmt_count(_get(result, "flops"))),
            ("params", _fmt_count(_get(result, "params")))]
    ts, ws = _get(result, "training_seconds"), _get(result, "wall_seconds")
    if ts:
        rows.append(("training", f"{ts:.1f} s"))
    if ws:
        rows.append(("wall", f"{ws:.1f} s"))
    if _get(result, "peak_memory_gb"):
        rows.append(("peak memory", f"{_get(result, 'peak_memory_gb'):.2f} GB"))
    if _get(result, "mfu"):
        rows.append(("MFU", f"{100 * _get(result, 'mfu'):.1f}%"))
    for name in ("budget", "device"):
        if _get(result, name):
            rows.append((name, _esc(_get(result, name))))
    return rows


def _stats(rows: Sequence[tuple[str, str]]) -> str:
    """Numbers as small labelled tiles in a wrapping row (compact under JupyterLab's table CSS)."""
    tiles = "".join(f'<div style="min-width:56px"><div style="font-size:11px;color:#57606a">{k}</div>'
                    f'<div style="font-weight:600;font-variant-numeric:tabular-nums">{v}</div></div>'
                    for k, v in rows)
    return f'<div style="display:flex;flex-wrap:wrap;gap:4px 18px;margin:4px 0;font-size:12px">{tiles}</div>'


def run_result_html(result: Any, *, references: Sequence[tuple] = (), title: str = "", plot: bool = True) -> str:
    """A RunResult (or ledger record) as HTML: status, summary numbers, its loss curve.

    Parameters
    ----------
    result : RunResult or dict
        Anything with the RunResult fields.
    references : sequence of (label, curve, role)
        Curves to draw beside this run's (e.g. the parent's, role "parent").
    title : str
        Heading shown before the status badge.
    plot : bool
        Include the loss curve (the panel draws it separately).
    """
    from autoresearch_kit.ui.curves import curves_png

    status = _get(result, "status", "?")
    head = (f'<div style="font-weight:600;margin-bottom:4px">{_esc(title)} '
            f'{badge(status, _STATUS_COLOURS.get(status, "#6e7781"))}</div>')
    reason = _get(result, "reason", "") or ""
    failure = ""
    if status != "ok":
        tail = _get(result, "log_tail", "") or ""
        failure = (f'<div style="color:#cf222e;margin:4px 0">{_esc(reason)}</div>' if reason else "") + (
            f'<details><summary style="cursor:pointer;color:#57606a">log tail</summary>'
            f'<pre style="font-size:11px;max-height:240px;overflow:auto;background:#f6f8fa;padding:6px">'
            f'{_esc(tail)}</pre></details>' if tail else "")
    curve = _get(result, "curve", []) or []
    img = ""
    if curve and plot:
        png = curves_png(list(references) + [("this run", curve, "run")], budget=_get(result, "budget") or None,
                         width=6.0, height=2.6)
        img = f'<div style="flex:1;min-width:320px">{png_img(png, alt="loss curve", max_width="620px")}</div>'
    return (f'<div style="display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start">'
            f'<div style="flex:1;min-width:260px">{head}{_stats(run_summary_rows(result))}{failure}</div>{img}</div>')


# --- Lab history ----------------------------------------------------------------------------

_TABLE_COLUMNS = ("id", "parent_id", "status", "decision", "val_bpb", "isolation", "proposer", "description",
                  "reason")
_FAILED = ("crash", "timeout", "diverged", "invalid", "aborted")



from autoresearch_kit.sandbox import isolation_label  # noqa: E402  (stdlib only)

def _records_frame(records: Iterable[dict]):
    import pandas as pd

    rows = []
    for r in records:
        row = {c: r.get(c) for c in _TABLE_COLUMNS}
        row["id"] = r.get("id", r.get("exp_id"))
        row["isolation"] = isolation_label(r)  # a score made without the sandbox says so
        # the human's reason for a decision or rejection; for a failed run, why it failed
        row["reason"] = r.get("decision_reason") or (r.get("reason") if r.get("status") in _FAILED else "") or ""
        if r.get("kind") not in (None, "candidate"):
            row["status"] = f"{r.get('status')} ({r.get('kind')})"
        rows.append(row)
    return pd.DataFrame(rows, columns=list(_TABLE_COLUMNS))


def gain_sigma_text(verdict: dict | None) -> str:
    """ "+0.0123 (+2.3σ)": a verdict's gain over the parent and that gain in sigmas ("" without a gain)."""
    if not verdict or verdict.get("gain") is None:
        return ""
    gain, sigma = verdict["gain"], verdict.get("sigma")
    return f"{gain:+.4f} ({gain / sigma:+.1f}σ)" if sigma else f"{gain:+.4f} (σ ?)"


def history_table_html(records: Sequence[dict], *, best_id: str | None = None, last: int | None = 15,
                       verdicts: dict | None = None) -> str:
    """The experiments as a pandas HTML table (newest first), kept rows green, the best bold.

    With ``verdicts`` (``{exp_id: Lab.verdict(exp_id)}``) a "gain (σ)" column shows each
    candidate's gain over its parent and that gain in sigmas, as the rule saw it.
    """
    df = _records_frame(records)
    if df.empty:
        return '<div style="color:#6e7781">no experiments yet</div>'
    df = df.iloc[::-1]
    if last:
        df = df.head(last)
    if verdicts is not None:
        df.insert(list(df.columns).index("val_bpb") + 1, "gain (σ)",
                  [gain_sigma_text(verdicts.get(i)) for i in df["id"]])
    df["val_bpb"] = df["val_bpb"].map(fmt_bpb)
    # a run that finished but is not decided yet: say so (an empty cell reads as "nothing")
    df["decision"] = [d if isinstance(d, str) and d else ("pending" if st == "ok" else "")
                      for d, st in zip(df["decision"], df["status"])]
    df = df.fillna("").rename(columns={"parent_id": "parent"})

    def style_row(row):
        # a translucent tint with the theme's text colour: an opaque light green under a dark
        # theme's white text was unreadable
        colour = "rgba(46,160,67,0.18)" if row["decision"] == "keep" else ""
        weight = "font-weight:700;" if best_id is not None and row["id"] == best_id else ""
        fg = "color:var(--jp-content-font-color1, inherit);" if colour else ""
        return [f"background-color:{colour};{fg}{weight}" if colour or weight else "" for _ in row]

    try:
        styler = df.style.apply(style_row, axis=1).hide(axis="index").set_table_attributes(
            'style="border-collapse:collapse;font-size:12px"').set_properties(
            **{"text-align": "left", "padding": "2px 8px", "border-bottom": "1px solid #eaeef2"})
        return styler.to_html()
    except ImportError:  # Styler needs jinja2; plain HTML is fine without it
        return df.to_html(index=False, border=0)


def _records_from(lab_or_records: Any) -> list[dict]:
    if isinstance(lab_or_records, list):
        return lab_or_records
    ledger = getattr(lab_or_records, "ledger", None)
    if ledger is not None and hasattr(ledger, "records"):
        return list(ledger.records())
    if hasattr(lab_or_records, "records"):
        return list(lab_or_records.records())
    return []


def progress_png(records: Any, *, width: float = 7.5, height: float = 3.4, dpi: int = 96) -> bytes:
    """The progress plot (val_bpb over experiments, kept labelled, running best) as PNG bytes.

    Draws with `autoresearch_kit.plots.progress_plot` (the same figure `autoresearch report`
    writes) into an Agg figure of our own, so it is safe off the main thread; falls back to
    a local drawing if that module is unavailable.
    """
    from autoresearch_kit.ui.curves import MPL_LOCK

    with MPL_LOCK:
        try:
            from autoresearch_kit.plots import progress_plot
        except ImportError:
            return _progress_png(list(records), width=width, height=height, dpi=dpi)
        return _plots_png(progress_plot, records, width=width, height=height, dpi=dpi)


def _plots_png(progress_plot, records, *, width: float, height: float, dpi: int) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    progress_plot(records, ax=ax, max_label=30)
    ax.title.set_fontsize(10)
    ax.xaxis.label.set_fontsize(9)
    ax.yaxis.label.set_fontsize(9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _progress_png(records: Sequence[dict], *, width: float, height: float, dpi: int) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys, kept, best_x, best_y, best = [], [], [], [], [], math.inf
    for i, r in enumerate(records):
        v = r.get("val_bpb")
        if not isinstance(v, (int, float)) or not math.isfinite(v) or r.get("status") != "ok":
            continue
        xs.append(i)
        ys.append(v)
        is_base = r.get("kind") == "baseline" or r.get("parent_id") in (None, "")
        if r.get("decision") == "keep" or is_base:
            kept.append((i, v, r))
            if v < best:
                best = v
        if best < math.inf:
            best_x.append(i)
            best_y.append(best)
    if xs:
        ax.scatter(xs, ys, color="#afb8c1", s=18, label="discarded / undecided", zorder=2)
        if kept:
            ax.scatter([k[0] for k in kept], [k[1] for k in kept], color="#1a7f37", s=30, label="kept", zorder=3)
            for i, v, r in kept:
                text = str(r.get("description", ""))[:28]
                ax.annotate(text, (i, v), textcoords="offset points", xytext=(4, 5), fontsize=7, color="#1a7f37")
        if best_x:
            ax.step(best_x, best_y, where="post", color="#1a7f37", alpha=0.6, linewidth=1.2, label="running best")
        ax.legend(fontsize=8, frameon=False, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no finished experiments yet", ha="center", va="center", color="#6e7781",
                transform=ax.transAxes)
    ax.set_xlabel("experiment #", fontsize=9)
    ax.set_ylabel("val_bpb (lower is better)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def lab_html(lab: Any, *, last: int | None = 15) -> str:
    """A Lab (or Ledger, or list of records) as HTML: best so far, counts, table, progress plot."""
    records = _records_from(lab)
    best = None
    try:
        best = lab.best() if hasattr(lab, "best") else None
    except Exception:  # an empty lab has no best yet; the table still renders
        best = None
    best_id = _get(best, "id") if best else None
    n_ok = sum(1 for r in records if r.get("status") == "ok")
    n_keep = sum(1 for r in records if r.get("decision") == "keep")
    n_fail = sum(1 for r in records if r.get("status") in ("crash", "timeout", "diverged", "invalid"))
    path = getattr(lab, "path", None)
    head = (f'<div style="font-size:14px;margin-bottom:4px"><b>Lab</b> {_esc(path) if path else ""} — '
            f'{len(records)} experiments, {n_ok} scored, {n_keep} kept, {n_fail} failed; '
            f'best val_bpb <b>{fmt_bpb(_get(best, "val_bpb")) if best else "—"}</b>'
            + (f" ({_esc(best_id)}: {_esc(_get(best, 'description', ''))})" if best else "") + "</div>")
    plot = png_img(progress_png(records), alt="progress plot", max_width="640px") if records else ""
    return (f'<div>{head}<div style="display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start">'
            f'<div style="flex:1;min-width:360px;overflow:auto">{history_table_html(records, best_id=best_id, last=last)}</div>'
            f'<div style="flex:1;min-width:360px">{plot}</div></div></div>')


class Rendered:
    """An HTML snippet that Jupyter displays (what `show` returns)."""

    def __init__(self, html: str) -> None:
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        # what a text-only front end (a console, nbconvert to text) shows instead of the HTML
        text = _html.unescape(re.sub(r"<(style|script)[^>]*>.*?</\1>|<[^>]+>", " ", self.html, flags=re.S))
        text = re.sub(r"data:image/\S+", "", text)
        text = re.sub(r"[ \t]+", " ", text).strip()
        return text[:2000] + (" ..." if len(text) > 2000 else "")


def show(obj: Any, **kwargs: Any) -> Rendered:
    """Render a kit object for a notebook cell: a Proposal (its diff), a RunResult or ledger
    record (summary and curve), a Lab or Ledger (history and progress plot).

    Parameters
    ----------
    obj : Proposal, RunResult, dict, Lab or Ledger
        What to show. A dict is read as a ledger record.
    **kwargs
        Passed to the renderer (e.g. ``mode="split"`` for a proposal's diff).

    Examples
    --------
    >>> show(lab.propose(), mode="split")        # doctest: +SKIP
    """
    if hasattr(obj, "diff") and hasattr(obj, "source") and hasattr(obj, "description"):
        return Rendered(proposal_html(obj, **kwargs))
    if isinstance(obj, dict) or (hasattr(obj, "status") and hasattr(obj, "curve")):
        title = kwargs.pop("title", None)
        if title is None:
            # a RunResult from lab.run_budgeted carries its ledger id in extra, a record in id
            exp_id = _get(obj, "id") or (_get(obj, "extra") or {}).get("exp_id") or ""
            title = f"{exp_id} {_get(obj, 'description', '') or ''}".strip()
        return Rendered(run_result_html(obj, title=title, **kwargs))
    if hasattr(obj, "records") or hasattr(obj, "ledger"):
        return Rendered(lab_html(obj, **kwargs))
    msg = (f"show() renders a Proposal, a RunResult, a ledger record (dict), a Lab or a Ledger; "
           f"got {type(obj).__name__}.")
    raise TypeError(msg)


def tree_html(records: Sequence[dict], *, parent_id: str | None = None, include_rejected: bool = False) -> str:
    """The experiments as a tree (child under parent): where the lab branched, and what came of it.

    Kept experiments are green, the current parent is marked; noise/rerun records (repeats
    of an experiment) are left out, and rejected proposals unless `include_rejected`.
    """
    shown = [r for r in records if r.get("kind") in (None, "baseline", "candidate")
             and (include_rejected or r.get("status") != "rejected")]
    ids = {r.get("id") for r in shown}
    children: dict[Any, list[dict]] = {}
    for r in shown:
        parent = r.get("parent_id") if r.get("parent_id") in ids else None
        children.setdefault(parent, []).append(r)
    if not shown:
        return '<div style="color:#6e7781">no experiments yet</div>'

    lines: list[str] = []

    def walk(node_parent: Any, prefix: str) -> None:
        kids = children.get(node_parent, [])
        for i, r in enumerate(kids):
            last = i == len(kids) - 1
            branch = "└─ " if last else "├─ "
            decision, status = r.get("decision"), r.get("status")
            colour = ("#1a7f37" if decision == "keep" else "#cf222e" if status in _FAILED
                      else "#6e7781" if decision == "discard" or status == "rejected" else "#24292f")
            label = fmt_bpb(r.get("val_bpb")) if status == "ok" else status
            here = " ◀ parent" if parent_id is not None and r.get("id") == parent_id else ""
            lines.append(f'<div style="white-space:pre;color:{colour}">'
                         f'<span style="color:#8c959f">{_esc(prefix + branch)}</span>'
                         f'<b>{_esc(r.get("id"))}</b> {_esc(label)} {_esc(decision or "")} '
                         f'<span style="color:#57606a">{_esc(str(r.get("description", ""))[:70])}</span>'
                         f'<b>{_esc(here)}</b></div>')
            walk(r.get("id"), prefix + ("   " if last else "│  "))

    walk(None, "")
    return f'<div style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px">{"".join(lines)}</div>'
