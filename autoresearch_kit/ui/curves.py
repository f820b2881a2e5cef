"""Loss curves: matplotlib (Agg) figures rendered to PNG, and a live widget fed by metric events.

`curves_png` draws training-loss curves (this run, its parent, the best so far) into PNG
bytes with the object-oriented matplotlib API on an Agg canvas: no pyplot state, so it
is safe on the runner's event thread. `LiveCurve` wraps an `ipywidgets.Image`, a
progress bar and a status line; `add_event` can be called from any thread and redraws at
most `max_fps` times a second (a 4M-parameter model on CPU logs ~10 steps/s; redrawing
each one would cost more than training).

    live = LiveCurve(budget="60s")
    live.reset(references=[("parent 0001", parent_curve)])
    lab.run_budgeted(proposal, on_event=live.add_event)
    live.finish("ok")
"""

from __future__ import annotations

import io
import math
import threading
import time
from typing import Any, Iterable, Sequence

# matplotlib is not thread-safe even across separate Figures (shared font and text caches):
# every drawing in ui/ (live curves on the runner's thread, plots on the panel's worker) holds this.
MPL_LOCK = threading.RLock()

# (label, curve, colour, linestyle) per reference; the live run is drawn last, on top.
# ipywidgets gives each leaf widget a 2 px margin on every side: at width 100% that is 4 px
# wider than its box (a horizontal scrollbar under the card). Full-width leaves keep only
# the vertical margin.
_EDGE = "2px 0"

_PALETTE = {"run": "#0969da", "parent": "#6e7781", "best": "#1a7f37", "other": "#bf8700"}
# role "batch<i>": the i-th run of a batch drawn beside its siblings (solid, one colour each)
_BATCH = ("#0969da", "#cf222e", "#8250df", "#bf8700", "#1a7f37", "#e16f24", "#0598bc", "#bf3989")


def _budget(budget: Any):
    if budget is None:
        return None
    from autoresearch_kit.config import Budget

    return Budget.parse(budget) if not hasattr(budget, "kind") else budget


def x_key(budget: Any = None) -> tuple[str, str]:
    """Event field used on the x axis and its label, chosen by the budget kind.

    Seconds budgets plot training seconds, token budgets tokens, FLOP budgets the
    fraction of the budget; runs under the same budget then share an axis.
    """
    b = _budget(budget)
    kind = b.kind if b is not None else "seconds"
    return {"seconds": ("elapsed", "training seconds"), "tokens": ("tokens", "training tokens")}.get(
        kind, ("progress", "fraction of budget"))


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Centred moving average: per-step losses are noisy, and a centred window does not lag
    behind a falling curve the way an EMA does. The half-window defaults to ~1/10 of the points.
    """
    n = len(values)
    k = window if window is not None else max(1, min(25, n // 10))
    if k <= 1 or n == 0:
        return [float(v) for v in values]
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - k), min(n, i + k + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def curve_xy(curve: Iterable[dict], key: str = "elapsed") -> tuple[list[float], list[float]]:
    """x (the given event field, falling back to the step) and loss from a list of metric events."""
    xs, ys = [], []
    for ev in curve or []:
        loss = ev.get("loss")
        if loss is None or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        x = ev.get(key, ev.get("step"))
        if x is None:
            continue
        xs.append(float(x))
        ys.append(float(loss))
    return xs, ys


def curves_png(series: Sequence[tuple], *, budget: Any = None, title: str = "", width: float = 7.0,
               height: float = 3.0, dpi: int = 96, x_max: float | None = None) -> bytes:
    """Draw loss curves into PNG bytes.

    Parameters
    ----------
    series : sequence of (label, curve) or (label, curve, role)
        `curve` is a list of metric events (``{"step", "loss", "elapsed", "tokens", ...}``),
        as in ``RunResult.curve`` or a ledger record's ``curve``. `role` picks the style:
        "run" (bold blue, raw steps shown faintly), "parent" (grey dashed), "best" (green
        dotted) or "other".
    budget : Budget or str, optional
        Picks the x axis (see `x_key`).
    title : str
        Figure title.
    x_max : float, optional
        Fix the x range (e.g. to the budget) so a live curve grows into a stable frame.

    Returns
    -------
    bytes
        PNG image.
    """
    with MPL_LOCK:
        return _curves_png(series, budget=budget, title=title, width=width, height=height, dpi=dpi, x_max=x_max)


def _curves_png(series, *, budget, title, width, height, dpi, x_max) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, xlabel = x_key(budget)
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn, lows, x_hi = 0, [], 0.0
    for item in series:
        label, curve = item[0], item[1]
        role = item[2] if len(item) > 2 else "other"
        xs, ys = curve_xy(curve, key)
        if not xs:
            continue
        batch = role.startswith("batch") and role[5:].isdigit()
        color = _BATCH[int(role[5:]) % len(_BATCH)] if batch else _PALETTE.get(role, _PALETTE["other"])
        if key == "progress":
            xs = [100 * x for x in xs]
        sm = smooth(ys)
        x_hi = max(x_hi, max(xs))
        if role == "run" or batch:
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(xs, sm, color=color, linewidth=2.0, label=label)
        else:
            ax.plot(xs, sm, color=color, linewidth=1.4, label=label,
                    linestyle={"parent": "--", "best": ":"}.get(role, "-."))
        lows.append(min(sm[len(sm) // 5:] or sm))
        drawn += 1
    if drawn:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
        # Early losses (ln V ~ 8 for 4096 tokens) would squash the interesting part of the plot.
        ys_all = [y for line in ax.get_lines() for y in line.get_ydata()]
        lo = min(lows)
        hi = min(max(ys_all), lo + max(1.5, 3 * (sorted(ys_all)[len(ys_all) // 2] - lo)))
        span = max(hi - lo, 0.05)   # one point or a flat line still gets a visible range
        ax.set_ylim(lo - 0.05 * span, lo + 1.02 * span)
    else:
        ax.text(0.5, 0.5, "waiting for the first steps...", ha="center", va="center", color="#6e7781",
                transform=ax.transAxes)
    if x_max:
        # The budget fixes the frame; a run that overshoots (warm-up, last step) still shows whole.
        ax.set_xlim(0, max(x_max * (100 if key == "progress" else 1), x_hi))
    ax.set_xlabel(xlabel if key != "progress" else "% of budget", fontsize=9)
    ax.set_ylabel("train loss (smoothed)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt_amount(kind: str, amount: float) -> str:
    if kind == "seconds":
        return f"{amount:.0f} s" if amount >= 10 else f"{amount:.1f} s"
    if kind == "tokens":
        return f"{amount / 1e6:.2f}M tokens" if amount >= 1e5 else f"{amount:,.0f} tokens"
    return f"{amount:.3g} FLOPs"


def budget_status(event: dict, budget: Any, left: bool = True) -> tuple[float, str]:
    """(fraction done 0..1, one line of text) for the latest metric event under a budget.

    ``left=False`` leaves out the budget left (it reads "0 s left" while the run is scored).
    """
    b = _budget(budget)
    progress = event.get("progress")
    kind = b.kind if b is not None else "seconds"
    if progress is None and b is not None:
        used = {"seconds": event.get("elapsed"), "tokens": event.get("tokens")}.get(kind)
        progress = (used / b.amount) if used is not None else 0.0
    progress = min(max(float(progress or 0.0), 0.0), 1.0)
    parts = [f"step {event.get('step', '?')}"]
    if isinstance(event.get("loss"), (int, float)):
        parts.append(f"loss {event['loss']:.3f}")
    if b is not None and left:
        parts.append(f"{_fmt_amount(kind, max(b.amount * (1 - progress), 0.0))} left of {b}")
    if isinstance(event.get("tok_per_s"), (int, float)):
        parts.append(f"{event['tok_per_s']:,.0f} tok/s")
    return progress, " · ".join(parts)


class LiveCurve:
    """A loss-curve widget fed by metric events from any thread, redrawn at most `max_fps`/s.

    Parameters
    ----------
    budget : Budget or str, optional
        Drives the x axis, the progress bar and the "left" text.
    max_fps : float
        Redraw rate cap. The last event is always drawn (a trailing timer catches it).

    Attributes
    ----------
    widget : ipywidgets.VBox
        Progress bar + status line + image; put it in a layout or display it.
    events : list of dict
        Everything received since the last `reset`.
    """

    def __init__(self, budget: Any = None, *, max_fps: float = 2.0, width: float = 7.0, height: float = 3.0) -> None:
        import ipywidgets as w

        self.budget = _budget(budget)
        self.min_interval = 1.0 / max_fps
        self.size = (width, height)
        self.events: list[dict] = []
        self.references: list[tuple] = []
        self.title = ""
        self.redraws = 0
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._timer: threading.Timer | None = None
        self.image = w.Image(format="png", layout=w.Layout(width="100%", margin=_EDGE, max_width="760px"))
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                        layout=w.Layout(width="100%", margin=_EDGE, max_width="760px"))
        self.status = w.HTML("")
        self.widget = w.VBox([self.progress, self.status, self.image])
        self.eval_s: float | None = None         # how long the parent's scoring took: the estimate adds it
        self._t0: float | None = None            # monotonic start of the run shown (None: not running)
        self._arrivals: list[tuple[float, dict]] = []   # (arrival, event), the last two: for the phase
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Event()

    # --- the phase line (starting / warm-up / training / evaluating), ticked once a second ---

    def phase(self) -> tuple[str, str] | None:
        """(phase, detail) of the run in progress, as the CLI's progress line says it; None when none runs."""
        from autoresearch_kit.progress import run_phase

        with self._lock:
            if self._t0 is None:
                return None
            return run_phase(self._t0, list(self._arrivals), time.monotonic(), eval_s=self.eval_s)

    def _status_text(self, events: list[dict]) -> str:
        ph = self.phase()
        parts = []
        if ph is not None:
            parts.append(f"<b>{ph[0]}</b> {ph[1]}")
        if events:
            _, text = budget_status(events[-1], self.budget,
                                    left=ph is None or ph[0] in ("warm-up", "training"))
            parts.append(text)
        elif ph is None:
            parts.append("no steps")
        return f'<span class="ark-phase" style="font-size:12px;color:var(--jp-ui-font-color1, #57606a)">' \
               f'{" · ".join(parts)}</span>'

    def tick(self) -> None:
        """Redraw the status line from the clock (the phases without steps have no events to redraw on)."""
        if self._t0 is None:
            return
        with self._lock:
            events = self.events[-1:]
        self.status.value = self._status_text(events)

    def _tick_loop(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.tick()

    def _stop_ticker(self) -> None:
        self._ticking.set()
        self._t0 = None

    def reset(self, references: Sequence[tuple] = (), *, budget: Any = None, title: str = "",
              running: bool = True, started: float | None = None, eval_s: float | None = None) -> None:
        """Start showing a run: clear events, set the reference curves (parent, best), draw the empty frame.

        With ``running`` (the default) the status line names the phase and ticks once a second
        until `finish`; ``started`` is the run's start as ``time.time()`` (a run this view attached
        to late; default now), ``eval_s`` the parent's scoring time (the estimate adds it). A
        finished run being redrawn (a restored panel) passes ``running=False``.
        """
        self._stop_ticker()
        with self._lock:
            self._cancel_timer()
            self.events = []
            self._arrivals = []
            self.references = list(references)
            self.title = title
            self.eval_s = eval_s
            if budget is not None:
                self.budget = _budget(budget)
            if running:
                ago = max(time.time() - started, 0.0) if started is not None else 0.0
                self._t0 = time.monotonic() - ago
        self.progress.value = 0.0
        self.progress.bar_style = "info"
        if running:
            self._ticking = stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick_loop, args=(stop,), name="autoresearch-live-phase",
                                            daemon=True)
            self._ticker.start()
            self.tick()
        else:
            self.status.value = ""
        self.draw()

    def add_event(self, event: dict) -> None:
        """Record one metric event (a runner `step` message); redraw if the throttle allows."""
        if not isinstance(event, dict):
            return
        with self._lock:
            self.events.append(dict(event))
            now = time.monotonic()
            self._arrivals = [*self._arrivals[-1:], (now, dict(event))]
            due = now - self._last_draw >= self.min_interval
            if not due and self._timer is None:
                # Trailing redraw: the newest events show up even if no more arrive.
                self._timer = threading.Timer(self.min_interval - (now - self._last_draw), self._timed_draw)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.draw()

    # The runner's on_event signature: lab.run_budgeted(p, on_event=live)
    __call__ = add_event

    def _repr_mimebundle_(self, **kwargs):
        # `display(live)` shows the widget, so a cell can show it and then start the run
        return self.widget._repr_mimebundle_(**kwargs)

    def _timed_draw(self) -> None:
        with self._lock:
            self._timer = None
        self.draw()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def draw(self) -> None:
        """Render the current events and references now (any thread)."""
        with self._lock:
            self._last_draw = time.monotonic()
            events = list(self.events)
            series = list(self.references) + [("this run", events, "run")]
        x_max = None
        if self.budget is not None and self.budget.kind in ("seconds", "tokens"):
            x_max = self.budget.amount
        elif self.budget is not None:
            x_max = 1.0
        png = curves_png(series, budget=self.budget, title=self.title, width=self.size[0], height=self.size[1],
                         x_max=x_max)
        self.image.value = png
        self.redraws += 1
        if events:
            frac, _ = budget_status(events[-1], self.budget)
            self.progress.value = frac
            if self._t0 is not None:
                self.status.value = self._status_text(events)

    def finish(self, status: str = "ok", text: str = "") -> None:
        """Final redraw; colour the bar by outcome (green ok, red failure, orange aborted).

        The status line then says the run finished (with ``text``, or its last step), never a
        phase: a finished run is not "starting".
        """
        self._stop_ticker()
        with self._lock:
            self._cancel_timer()
            events = list(self.events)
        self.draw()
        self.progress.bar_style = {"ok": "success", "aborted": "warning"}.get(status, "danger")
        if status == "ok":
            self.progress.value = 1.0
        if not text:
            last = budget_status(events[-1], self.budget, left=False)[1] if events else "no steps"
            text = f"finished ({status}) · {last}"
        self.status.value = f'<span class="ark-phase" style="font-size:12px;color:var(--jp-ui-font-color1, #57606a)">' \
                            f'{text}</span>'
