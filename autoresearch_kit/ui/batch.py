"""The batch panel: review N proposals, run them at once, watch N curves, stop any one.

    lab = Lab("my_lab")
    lab.batch_panel(4)            # == autoresearch_kit.ui.BatchPanel(lab, 4)

Top to bottom: the parent; one card per proposal of the batch (its description, the diff,
and Run / Skip with a reason a skipped one is recorded with, as a rejection the proposer
reads); "Run the batch" (the approved ones train at the same time on the lab's Dask
workers, see `Lab.run_batch`); while they train, one chart with every run's loss curve
against the parent's and a row per run with its phase, progress and its own Stop; then
each run's outcome and the batch's decision (its best that beats the parent beyond noise
is kept). Proposing and running happen on a worker thread, so the kernel stays free for
Stop; `wait()` joins it (tests, headless notebooks).
"""

from __future__ import annotations

import html as _html
import threading
import time
from typing import Any

import ipywidgets as w

from autoresearch_kit.ui.curves import budget_status, curves_png
from autoresearch_kit.ui.diff import diff_html

_BOX = {"border": "1px solid var(--jp-border-color1, #d0d7de)", "padding": "8px 12px", "margin": "0 0 8px 0"}


def _note(text: str, kind: str = "info") -> str:
    colour = {"info": "var(--jp-brand-color1, #0969da)", "error": "var(--jp-error-color1, #cf222e)",
              "ok": "var(--jp-success-color1, #1a7f37)"}[kind]
    return f'<div style="color:{colour};font-size:13px">{_html.escape(text)}</div>'


class _Card:
    """One proposal of the batch: its diff and Run / Skip (with a reason)."""

    def __init__(self, index: int, proposal) -> None:
        self.proposal = proposal
        self.choice = w.ToggleButtons(options=[("Run", "run"), ("Skip", "skip")], value="run",
                                      layout=w.Layout(width="auto"), style={"button_width": "70px"})
        self.reason = w.Text(placeholder="why skip it (the proposer reads this)",
                             layout=w.Layout(width="100%", display="none"))
        self.choice.observe(lambda ch: setattr(self.reason.layout, "display", "" if ch["new"] == "skip" else "none"),
                            names="value")
        title = w.HTML(f'<b>{index + 1}. {_html.escape(proposal.description)}</b>'
                       + (f'<div style="font-size:12px;color:var(--jp-ui-font-color2,#57606a)">'
                          f'{_html.escape(proposal.rationale[:300])}</div>' if proposal.rationale else ""))
        self.widget = w.VBox([w.HBox([title, self.choice], layout=w.Layout(justify_content="space-between")),
                              w.HTML(diff_html(proposal.diff, max_height="260px")), self.reason],
                             layout=w.Layout(**_BOX))


class _Row:
    """One run while the batch trains: phase, progress bar, its own Stop."""

    def __init__(self, lab, exp_id: str, description: str) -> None:
        self.exp_id = exp_id
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info", layout=w.Layout(width="240px"))
        self.text = w.HTML(f"<code>{exp_id}</code> {_html.escape(description[:60])}: starting...")
        self.stop = w.Button(description="Stop", button_style="warning", layout=w.Layout(width="70px"))
        self.stop.on_click(lambda _b: (lab.stop_run(exp_id), setattr(self.stop, "disabled", True)))
        self.widget = w.HBox([self.stop, self.bar, self.text])


class BatchPanel:
    """A batch of `n` proposals from the lab's parent, reviewed, run at once and decided.

    Parameters
    ----------
    lab : Lab
        The lab (its cluster, or N local workers, runs the batch).
    n : int
        Proposals per batch.
    propose : bool
        Ask for the first batch at once (default) or wait for "Propose".
    """

    def __init__(self, lab, n: int = 2, *, propose: bool = True) -> None:
        self.lab = lab
        self.n = int(n)
        self.cards: list[_Card] = []
        self.rows: dict[str, _Row] = {}
        self.events: dict[str, list[dict]] = {}
        self.records: list[dict] = []
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()
        self._last_draw = 0.0
        self._parent_curve: list[dict] = []
        self.header = w.HTML("")
        self.count = w.BoundedIntText(value=self.n, min=1, max=64, description="batch of",
                                      layout=w.Layout(width="150px"))
        self.propose_button = w.Button(description="Propose", icon="lightbulb-o")
        self.run_button = w.Button(description="Run the batch", button_style="success", icon="play", disabled=True)
        self.stop_all = w.Button(description="Stop all", button_style="danger", disabled=True)
        self.message = w.HTML("")
        self.proposals_box = w.VBox([])
        self.image = w.Image(format="png", layout=w.Layout(width="100%", max_width="760px"))
        self.runs_box = w.VBox([])
        self.outcome = w.HTML("")
        self.propose_button.on_click(lambda _b: self._start(self._propose))
        self.run_button.on_click(lambda _b: self._start(self._run))
        self.stop_all.on_click(lambda _b: self.lab.stop_run())
        self.widget = w.VBox([self.header, w.HBox([self.count, self.propose_button, self.run_button, self.stop_all]),
                              self.message, self.proposals_box, self.runs_box, self.image, self.outcome])
        self._refresh_header()
        if propose:
            self._start(self._propose)

    # ---- threads ------------------------------------------------------------------------------------

    def _start(self, fn) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.message.value = _note("busy: wait for the batch in progress (or stop it)", "error")
            return
        self._thread = threading.Thread(target=self._guard, args=(fn,), name="autoresearch-batch-panel", daemon=True)
        self._thread.start()

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is shown in one line, never a dead panel
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            self.message.value = _note(str(reason), "error")
        finally:
            self.propose_button.disabled = False
            self.stop_all.disabled = True

    def wait(self, timeout: float | None = None) -> None:
        """Join the worker thread (proposing or running)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- steps --------------------------------------------------------------------------------------

    def _refresh_header(self) -> None:
        pid = self.lab.parent_id
        rec = self.lab.ledger.get(pid) if pid else None
        bpb = f"val_bpb {rec['val_bpb']:.6f}" if rec and rec["val_bpb"] is not None else "no baseline yet"
        self.header.value = (f"<b>Batch</b> from parent <code>{pid or '-'}</code> ({bpb}); the lab's budget "
                             f"{_html.escape(str(self.lab.budget))}")

    def _propose(self) -> None:
        self.propose_button.disabled = True
        self.run_button.disabled = True
        self.outcome.value = ""
        self.message.value = _note(f"asking {getattr(self.lab.proposer, 'name', 'the proposer')} for "
                                   f"{self.count.value} proposals...")
        proposals = self.lab.propose_batch(int(self.count.value))
        self.cards = [_Card(i, p) for i, p in enumerate(proposals)]
        self.proposals_box.children = [c.widget for c in self.cards]
        self.message.value = _note(f"{len(proposals)} proposals: choose Run or Skip for each, then Run the batch")
        self.run_button.disabled = False

    def _run(self) -> None:
        chosen = [c for c in self.cards if c.choice.value == "run"]
        for c in self.cards:
            if c.choice.value == "skip":
                self.lab.reject(c.proposal, c.reason.value.strip())
        self.cards = []
        self.proposals_box.children = []
        self.run_button.disabled = True
        self.propose_button.disabled = True
        if not chosen:
            self.message.value = _note("every proposal was skipped (recorded as rejected): Propose again")
            return
        parent = self.lab.parent_id
        self._parent_curve = (self.lab.ledger.get(parent).get("curve") or []) if parent else []
        self.events = {}
        self.rows = {}
        self.runs_box.children = []
        self.stop_all.disabled = False
        self.message.value = _note(f"running {len(chosen)} at once on the lab's workers...")
        self.records = self.lab.run_batch([c.proposal for c in chosen], on_event=self._on_event)
        self._draw(force=True)
        self._show_outcome(parent)
        self._refresh_header()

    # ---- live view ----------------------------------------------------------------------------------

    def _on_event(self, event: dict) -> None:
        exp_id = event.get("exp_id")
        if exp_id is None:   # a rerun of the batch's best (recheck): not one of the batch's rows
            return
        with self._mu:
            if exp_id not in self.rows:
                batch = (self.lab.running or {}).get("batch") or {}
                desc = (batch.get(exp_id) or {}).get("description", "")
                self.rows[exp_id] = _Row(self.lab, exp_id, desc)
                self.runs_box.children = [r.widget for r in self.rows.values()]
            self.events.setdefault(exp_id, []).append(dict(event))
            row = self.rows[exp_id]
        frac, text = budget_status(event, self.lab.budget)
        row.bar.value = frac
        row.text.value = f"<code>{exp_id}</code> {_html.escape(text)}"
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        with self._mu:
            series = [(f"parent {self.lab.parent_id}", self._parent_curve, "parent")] if self._parent_curve else []
            series += [(exp_id, list(ev), f"batch{i}") for i, (exp_id, ev) in enumerate(self.events.items())]
        self.image.value = curves_png(series, budget=self.lab.budget, title="the batch, live")

    def _show_outcome(self, parent: str | None) -> None:
        lines = []
        for rec in self.records:
            row = self.rows.get(rec["id"])
            if row is not None:
                row.stop.disabled = True
                row.bar.bar_style = {"ok": "success", "aborted": "warning"}.get(rec["status"], "danger")
            bpb = f"{rec['val_bpb']:.6f}" if rec["val_bpb"] is not None else rec["status"]
            decision = rec["decision"] or "undecided"
            colour = "var(--jp-success-color1, #1a7f37)" if decision == "keep" else "inherit"
            why = rec["decision_reason"] or rec["reason"] or ""
            lines.append(f'<tr><td><code>{rec["id"]}</code></td><td>{_html.escape(rec["description"])}</td>'
                         f'<td>{bpb}</td><td style="color:{colour};font-weight:600">{decision}</td>'
                         f'<td style="font-size:12px">{_html.escape(why[:200])}</td></tr>')
        kept = [r["id"] for r in self.records if r["decision"] == "keep"]
        head = (f"kept {kept[0]}: the new parent" if kept else f"nothing kept: the parent stays {parent}")
        self.outcome.value = (f"<div><b>{head}</b></div><table style='font-size:13px'><tr><th>id</th><th>edit</th>"
                              f"<th>val_bpb</th><th>decision</th><th>why</th></tr>{''.join(lines)}</table>")
        self.message.value = _note("batch done: Propose the next one", "ok")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
