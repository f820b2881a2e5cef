"""The review panel: one ipywidgets view of a Lab's current step.

    lab = Lab("my_lab", budget="60s")
    lab.panel()                 # == autoresearch_kit.ui.Panel(lab)

What it shows, top to bottom: the lab's state (best so far, experiment count); the
proposal (description, rationale, a highlighted diff with a unified/side-by-side
toggle, +/- counts) with Approve / Reject (+ reason) / Edit / Stop and an Autopilot
toggle; a feedback box the agent reads on the next proposal; the live loss curves
while the candidate trains (this run, its parent, the best so far, the budget's
progress); the outcome against the parent and the best with keep/discard buttons
prefilled by the lab's rule; the results table and the progress plot.

Threads: the kernel must stay free while a candidate trains (so Stop can be clicked),
so proposing and running happen on a worker thread; metric events arrive on the
runner's thread and go to `LiveCurve`, which throttles redraws. Widgets are updated
from those threads (ipywidgets sends comm messages from any thread). One worker runs
at a time; `wait()` joins it (tests and headless notebooks use it).

The panel keeps no state the ledger does not have: a new Panel on the same lab (after
a kernel restart) shows the history and, if the last run was never decided, its result
with the keep/discard buttons.
"""

from __future__ import annotations

import html as _html
import math
import threading
import time
from typing import Any, Callable

import ipywidgets as w

from autoresearch_kit.propose.base import Proposal
from autoresearch_kit.ui.curves import _EDGE, LiveCurve
from autoresearch_kit.ui.diff import diff_html, hunk_summary, parse_unified, select_hunks
from autoresearch_kit.ui.render import (
    badge,
    delta_html,
    fmt_bpb,
    history_table_html,
    proposal_header_html,
    progress_png,
    run_result_html,
    tree_html,
)

_FINISHED = ("ok", "crash", "timeout", "diverged", "invalid", "aborted")
_BOX = {"border": "1px solid #d0d7de", "padding": "8px 12px", "margin": "0 0 8px 0"}


def _card(children: list, title: str = "") -> w.VBox:
    head = [w.HTML(f'<div style="font-weight:600;color:#57606a;font-size:12px;'
                   f'text-transform:uppercase;letter-spacing:.04em">{title}</div>')] if title else []
    card = w.VBox(head + children, layout=w.Layout(**_BOX))
    card.add_class("ark-card")   # the browser test measures the cards
    return card


def _message_html(text: str, kind: str = "info") -> str:
    colours = {"info": ("#ddf4ff", "#0969da"), "error": ("#ffebe9", "#cf222e"), "ok": ("#dafbe1", "#1a7f37"),
               "warn": ("#fff8c5", "#9a6700")}
    bg, fg = colours.get(kind, colours["info"])
    return (f'<div style="background:{bg};border-left:4px solid {fg};padding:6px 10px;margin:2px 0;'
            f'white-space:pre-wrap;font-size:13px">{_html.escape(text)}</div>')


def _error_text(exc: BaseException) -> str:
    """What a person can act on: a ProposalError's reason, else the exception's message (no traceback)."""
    reason = getattr(exc, "reason", None)
    if reason:
        return f"The proposer gave up: {reason}"
    if type(exc) in (ValueError, FileNotFoundError, RuntimeError):
        return str(exc)   # the kit's own messages already say what to do
    return f"{type(exc).__name__}: {exc}"


def sigma_badge(verdict: dict) -> str:
    """The noise next to a verdict: the gain over the parent in sigmas, and sigma itself
    (green kept, amber within noise, grey otherwise); a hint where noise is not measured."""
    sigma, gain = verdict.get("sigma"), verdict.get("gain")
    if gain is None:
        return ""
    if not sigma:
        return ('<span style="font-size:11px;color:#6e7781" title="lab.measure_noise() reruns the parent with '
                'other seeds to measure run-to-run noise">gain {:+.4f}, noise not measured</span>'.format(gain))
    colour = "#1a7f37" if verdict.get("keep") else "#9a6700" if verdict.get("within_noise") else "#6e7781"
    noise = "within noise, " if verdict.get("within_noise") else ""
    return badge(f"{noise}gain {gain:+.4f} = {gain / sigma:+.1f}σ (σ {sigma:.4f})", colour)


def verdict_column(lab: Any, records: list[dict]) -> dict[str, dict]:
    """Lab.verdict for each finished candidate among `records` (for the results table's sigma column)."""
    out = {}
    for r in records:
        if r.get("kind") == "candidate" and r.get("status") == "ok" and r.get("parent_id"):
            try:
                out[r["id"]] = dict(lab.verdict(r["id"]) or {})
            except Exception:  # noqa: BLE001 - a record the rule cannot judge has no column value
                continue
    return out


def notify_js(text: str, key: str) -> str:
    """A script for the browser: if the tab is in the background, put `text` in its title (until
    the tab is shown again) and, where the person allowed this site's notifications, show one.

    It runs once per `key` (a re-rendered output, e.g. a notebook scrolled back into view, does
    not announce again) and needs nothing beyond the browser (no extension, no package).
    """
    import json

    return ("(function(){var k=%s,m=%s;var d=window.__arkNotified=window.__arkNotified||{};"
            "if(d[k])return;d[k]=1;if(!document.hidden)return;"
            "var old=document.title;document.title='\u2713 '+m+' \u2014 '+old;"
            "var back=function(){if(!document.hidden){document.title=old;"
            "document.removeEventListener('visibilitychange',back);}};"
            "document.addEventListener('visibilitychange',back);"
            "try{if(window.Notification&&Notification.permission==='granted'){"
            "new Notification('autoresearch',{body:m});}}catch(e){}})();") % (json.dumps(key), json.dumps(text))


class Panel(w.VBox):
    """Review, run and decide a Lab's experiments from JupyterLab.

    Parameters
    ----------
    lab : autoresearch_kit.Lab
        The lab to drive (its proposer, budget, ledger).
    proposal : Proposal, optional
        Review this proposal first (e.g. one made with ``lab.propose()`` in a cell).
        Without one, the panel asks the lab's proposer for the next one at once.
    propose : bool
        Ask for a proposal on creation and after each decision (default True). With
        False, the "New proposal" button does it.
    autopilot_steps : int
        Default number of unattended steps for the Autopilot toggle.

    Examples
    --------
    >>> panel = Panel(lab)          # doctest: +SKIP
    >>> panel                       # doctest: +SKIP  (displays in a notebook)
    """

    def __init__(self, lab: Any, proposal: Any = None, *, propose: bool = True, autopilot_steps: int = 3) -> None:
        super().__init__(layout=w.Layout(width="100%", max_width="1100px"))
        self.add_class("ark-panel")   # a stable hook for the browser test and user CSS
        self.lab = lab
        self.proposal = proposal             # awaiting approval (None once it ran or was rejected)
        self.shown = proposal                # what the proposal card shows (also while/after it runs)
        self.exp_id: str | None = None       # the experiment shown in the outcome section
        self.state = "idle"
        self.auto_propose = propose
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._autopilot_stop = threading.Event()
        self._attached: str | None = None    # the experiment of a run started elsewhere, shown here
        self._tokens: list[str] = []
        self._last_token_draw = 0.0
        self._outcome_status: str | None = None
        self.errors: list[str] = []          # every message shown as an error, for tests and logs
        self._build(autopilot_steps)
        self.refresh()
        self._restore(proposal)

    _RELOAD_HINT = ('<div class="ark-reload-hint" style="font-size:11px;color:var(--jp-ui-font-color2, #6e7781)">'
                    'The panel lives in the kernel: if it reads "Error displaying widget: model not found" '
                    '(after a page reload or a kernel restart), re-run this cell.</div>')

    def _ipython_display_(self) -> None:
        """Show the panel, then one line that stays in the saved notebook: after a page reload
        JupyterLab can only say "model not found" where the panel was, and this says what to do."""
        from IPython.display import HTML, display

        display(self._repr_mimebundle_(), raw=True)
        display(HTML(self._RELOAD_HINT))

    # --- layout ---------------------------------------------------------------------------

    def _build(self, autopilot_steps: int) -> None:
        self.header = w.HTML()
        self.message = w.HTML()
        self.stream = w.Textarea(disabled=True, layout=w.Layout(width="100%", margin=_EDGE, height="110px",
                                                                display="none"))

        self.proposal_head = w.HTML()
        self.diff_mode = w.ToggleButtons(options=[("unified", "unified"), ("side by side", "split")],
                                         value="unified", style={"button_width": "100px"})
        self.diff_mode.observe(lambda _: self._show_proposal(), names="value")
        self.diff = w.HTML(layout=w.Layout(width="100%", margin=_EDGE))
        # per-hunk choice for a proposal of several hunks: unticked ones go back to the parent
        self.hunk_boxes: list[w.Checkbox] = []
        self.hunks = w.VBox(layout=w.Layout(display="none"))

        def button(label, style, icon, tip):
            return w.Button(description=label, button_style=style, icon=icon, tooltip=tip,
                            layout=w.Layout(width="auto", min_width="96px"))

        self.approve_button = button("Approve", "success", "play", "Train this candidate under the budget")
        self.reject_button = button("Reject", "danger", "times", "Record it as rejected (never run); "
                                    "the reason reaches the next proposal")
        self.reject_reason = w.Text(placeholder="why not? (the agent reads this)",
                                    layout=w.Layout(width="260px"))
        self.edit_button = button("Edit", "warning", "pencil", "Edit train.py yourself, then run it")
        self.stop_button = button("Stop", "", "stop", "End the running experiment now (recorded as aborted)")
        self.new_button = button("New proposal", "info", "refresh", "Ask the proposer (reads the feedback box)")
        self.autopilot = w.ToggleButton(value=False, description="Autopilot", icon="forward",
                                        tooltip="Run N steps unattended: propose, run, decide by the rule",
                                        layout=w.Layout(width="auto", min_width="110px"))
        self.autopilot_steps = w.BoundedIntText(value=autopilot_steps, min=1, max=1000, description="steps",
                                                layout=w.Layout(width="130px"), style={"description_width": "40px"})
        self.approve_button.on_click(self._guard(self.approve))
        self.reject_button.on_click(self._guard(self.reject))
        self.edit_button.on_click(self._guard(self.open_editor))
        self.stop_button.on_click(self._guard(self.stop))
        self.new_button.on_click(self._guard(self.new_proposal))
        self.autopilot.observe(self._on_autopilot, names="value")

        self.editor_description = w.Text(placeholder="one line: what your edit changes",
                                         description="description", layout=w.Layout(width="100%", margin=_EDGE),
                                         style={"description_width": "initial"})   # 80px clipped the label
        self.editor = w.Textarea(layout=w.Layout(width="100%", margin=_EDGE, height="360px"))
        self.editor_diff = w.HTML(layout=w.Layout(width="100%", margin=_EDGE))   # the edit's diff, live
        self.editor_diff.add_class("ark-editor-diff")
        self._editor_parent: str | None = None
        self.editor.observe(lambda _: self._show_editor_diff(), names="value")
        self.editor_run = button("Run my edit", "warning", "play", "Train your edited train.py")
        self.editor_cancel = button("Cancel", "", "", "Back to the proposal")
        self.editor_run.on_click(self._guard(self.run_edit))
        self.editor_cancel.on_click(self._guard(self.close_editor))
        self.editor_box = w.VBox([self.editor_description, self.editor_diff, self.editor,
                                  w.HBox([self.editor_run, self.editor_cancel])],
                                 layout=w.Layout(display="none", width="100%"))

        self.feedback = w.Textarea(placeholder="Feedback for the agent's next proposal (optional), e.g. "
                                   "'try a smaller learning rate; leave the model size alone'",
                                   layout=w.Layout(width="100%", margin=_EDGE, height="52px"))

        actions = w.HBox([self.approve_button, self.reject_button, self.reject_reason, self.edit_button,
                          self.stop_button], layout=w.Layout(flex_flow="row wrap", align_items="center",
 margin="6px 0"))
        steering = w.HBox([self.new_button, self.autopilot, self.autopilot_steps],
                          layout=w.Layout(flex_flow="row wrap", align_items="center"))
        self.proposal_card = _card([self.stream, self.proposal_head, self.diff_mode, self.hunks, self.diff,
                                    self.editor_box,
                                    actions, self.feedback, steering], "proposal")

        self.live = LiveCurve(getattr(self.lab, "budget", None))
        self.live_card = _card([self.live.widget], "training")

        self.outcome = w.HTML()
        self.keep_button = button("Keep", "", "check", "Keep: the kept line moves to this experiment")
        self.discard_button = button("Discard", "", "trash", "Discard: the parent stays; the record is kept")
        self.decision_reason = w.Text(placeholder="note (optional)", layout=w.Layout(width="260px"))
        self.keep_button.on_click(self._guard(lambda: self.decide(True)))
        self.discard_button.on_click(self._guard(lambda: self.decide(False)))
        self.decision_row = w.HBox([self.keep_button, self.discard_button, self.decision_reason],
                                   layout=w.Layout(align_items="center", margin="6px 0"))
        self.outcome_card = _card([self.outcome, self.decision_row], "outcome")

        self.table = w.HTML(layout=w.Layout(overflow="auto"))
        self.plot = w.Image(format="png", layout=w.Layout(width="100%", margin=_EDGE, max_width="720px"))
        self.tree = w.HTML(layout=w.Layout(overflow="auto"))
        self.history_tabs = w.Tab(children=[self.table, self.plot, self.tree])
        for i, title in enumerate(("results", "progress", "tree")):
            self.history_tabs.set_title(i, title)
        # the front end's side of "a run ended while this tab was in the background": a hidden
        # Output whose only content is a short script (tab title, and a notification when allowed)
        self.notifier = w.Output(layout=w.Layout(display="none"))
        self.notices: list[str] = []         # what was announced, for tests and logs
        self.children = [self.header, self.message, self.proposal_card, self.live_card, self.outcome_card,
                         self.history_tabs, self.notifier]

    # --- state ----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        """Enable exactly the actions that make sense now."""
        self.state = state
        has_prop = self.proposal is not None
        idle_like = state in ("idle", "proposed", "ran")
        self.approve_button.disabled = not (state == "proposed" and has_prop)
        self.reject_button.disabled = not (state == "proposed" and has_prop)
        self.edit_button.disabled = not (state == "proposed" and has_prop)
        self.editor_run.disabled = state != "proposed"
        self.stop_button.disabled = state not in ("running", "proposing") and not self.autopilot.value
        self.stop_button.button_style = "danger" if state == "running" else ""
        self.new_button.disabled = not idle_like or self.autopilot.value
        undecided = state == "ran" and self.exp_id is not None
        self.discard_button.disabled = not undecided
        # only a scored run can join the kept line
        self.keep_button.disabled = not undecided or self._outcome_status != "ok"
        self.decision_row.layout.display = "flex" if undecided else "none"
        self.live_card.layout.display = "flex" if state in ("running", "ran") or self.live.events else "none"
        self.outcome_card.layout.display = "flex" if self.exp_id is not None else "none"

    def _announce(self, text: str) -> None:
        """Tell a person whose tab is in the background that a run ended (see `notify_js`)."""
        self.notices.append(text)
        js = notify_js(text, key=f"{id(self)}-{len(self.notices)}")
        # the output message itself (IPython's formatter would start an InteractiveShell off a kernel)
        self.notifier.outputs = ({"output_type": "display_data", "metadata": {},
                                  "data": {"application/javascript": js, "text/plain": ""}},)

    def _say(self, text: str, kind: str = "info") -> None:
        if kind == "error":
            self.errors.append(text)
        self.message.value = _message_html(text, kind) if text else ""

    def _guard(self, fn: Callable[[], Any]) -> Callable[[Any], None]:
        """A button handler that shows its error in the panel: ipywidgets would only log it,
        leaving the buttons in the state the handler had set (e.g. stuck on "proposing")."""

        def handler(_button: Any = None) -> None:
            try:
                fn()
            except Exception as exc:
                self._say(_error_text(exc), "error")
                self._set_state("proposed" if self.proposal is not None else "idle")

        return handler

    def _proposer_name(self) -> str:
        """The proposer's name, or "" (building it may fail: the error shows when it is asked)."""
        try:
            return str(getattr(getattr(self.lab, "proposer", None), "name", "") or "")
        except Exception:
            return ""

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        """Run fn on the worker thread; report any exception in the panel, not as a traceback."""
        if self._worker is not None and self._worker.is_alive():
            self._say("Busy: wait for the current step to finish (or press Stop).", "warn")
            return

        def body():
            try:
                fn()
            except Exception as exc:  # shown to the person; the panel stays usable
                self._say(_error_text(exc), "error")
                self._set_state("proposed" if self.proposal is not None else "idle")

        self._worker = threading.Thread(target=body, name=f"autoresearch-panel-{name}", daemon=True)
        self._worker.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current background step (proposing, running, autopilot) is done.

        Returns True if nothing is running any more.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            t = self._worker
            if t is None or not t.is_alive():
                return True
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                return not t.is_alive()

    # --- ledger views ---------------------------------------------------------------------

    def _records(self, curves: bool = True) -> list[dict]:
        led = getattr(self.lab, "ledger", None)
        if led is None:
            return []
        # the table and plot need no curves: skipping them keeps a long lab's refresh fast
        return list(led.records(curves=curves)) if not curves else list(led.records())

    def _record(self, exp_id: str | None) -> dict | None:
        if not exp_id:
            return None
        led = getattr(self.lab, "ledger", None)
        try:
            return led.get(exp_id) if led is not None else None
        except Exception:  # an id the ledger does not know (e.g. parent of an imported proposal)
            return None

    def _best(self) -> dict | None:
        try:
            return self.lab.best()
        except Exception:  # no scored experiment yet
            return None

    def refresh(self) -> None:
        """Redraw the header, the results table and the progress plot from the ledger."""
        records = self._records(curves=False)
        best = self._best()
        budget = getattr(self.lab, "budget", "")
        proposer = self._proposer_name()
        n_keep = sum(1 for r in records if r.get("decision") == "keep")
        path = getattr(self.lab, "path", "")
        best_txt = (f'best val_bpb <b>{fmt_bpb(best.get("val_bpb"))}</b> '
                    f'<span style="color:#57606a">({_html.escape(str(best.get("id")))}: '
                    f'{_html.escape(str(best.get("description", ""))[:60])})</span>') if best else "no baseline yet"
        self.header.value = (
            f'<div style="display:flex;gap:14px;align-items:baseline;flex-wrap:wrap;margin-bottom:6px">'
            f'<span style="font-size:17px;font-weight:700">autoresearch</span>'
            f'<span style="color:#57606a" title="{_html.escape(str(path))}">'
            f'{_html.escape(getattr(path, "name", "") or str(path))}</span>'
            f'<span>{best_txt}</span>'
            f'<span style="color:#57606a">{len(records)} experiment{"" if len(records) == 1 else "s"} · {n_keep} kept · budget {budget}'
            f'{" · proposer " + _html.escape(proposer) if proposer else ""}</span></div>')
        verdicts = verdict_column(self.lab, records[-15:]) if hasattr(self.lab, "verdict") else {}
        self.table.value = history_table_html(records, best_id=best.get("id") if best else None, verdicts=verdicts)
        if records:
            self.plot.value = progress_png(records)
        self.tree.value = tree_html(records, parent_id=getattr(self.lab, "parent_id", None))

    def _attach(self, running: dict) -> None:
        """Show the lab's run in progress (started by another panel or a cell) instead of starting
        a second one: its curve so far, then live, then its outcome with keep/discard."""
        exp_id = running["exp_id"]
        rec = self._record(exp_id) or {}
        self._attached = exp_id
        self.shown = Proposal(source="", diff=rec.get("diff") or "", description=running.get("description", ""),
                              proposer=rec.get("proposer", ""), parent_id=rec.get("parent_id"),
                              rationale=(rec.get("proposal_meta") or {}).get("rationale", ""))
        self._show_proposal(f"experiment {exp_id} is training (started elsewhere: another panel or a cell)")
        parent = self._record(rec.get("parent_id")) or {}
        self.live.reset(self._references(rec.get("parent_id")), budget=getattr(self.lab, "budget", None),
                        title=f"{exp_id} {running.get('description', '')}"[:70], started=running.get("started"),
                        eval_s=parent.get("eval_seconds"))
        seen: set[int] = set()
        unwatch = self.lab.watch_run(lambda ev: None if id(ev) in seen else self.live.add_event(ev))
        for ev in list(running.get("events") or []):   # what this panel missed (the same dicts as live)
            seen.add(id(ev))
            self.live.add_event(ev)
        self._set_state("running")
        self._say(f"Experiment {exp_id} is already training in this lab (one run at a time): shown here live; "
                  f"Stop ends it, keep or discard it when it ends.", "info")

        def follow() -> None:
            try:
                while (getattr(self.lab, "running", None) or {}).get("exp_id") == exp_id:
                    time.sleep(0.2)
            finally:
                unwatch()
                self._attached = None
            done = self._record(exp_id) or {}
            status = done.get("status", "?")
            self.live.finish(status, f"{status}: val_bpb {fmt_bpb(done.get('val_bpb'))}" if status == "ok"
                             else f"{status}: {done.get('reason', '')}")
            self._announce(f"experiment {exp_id} {status}"
                           + (f": val_bpb {fmt_bpb(done.get('val_bpb'))}" if status == "ok" else ""))
            self.refresh()
            if done.get("decision") is None and done.get("kind") == "candidate" and status in _FINISHED:
                self.exp_id = exp_id
                self._show_proposal(f"ran as experiment {exp_id} ({status})")
                self._show_outcome(done)
                self._set_state("ran")
                self._say("", "info")
            else:   # decided where it was started (e.g. the autopilot) or a baseline/rerun
                self._show_proposal(f"ran as experiment {exp_id} ({status}{', ' + done['decision'] if done.get('decision') else ''})")
                self._set_state("idle")
                self._say(f"Experiment {exp_id} finished ({status}).", "ok")

        self._spawn("attach", follow)

    def _restore(self, proposal: Any) -> None:
        """Pick up where the ledger says we are (after a kernel restart too)."""
        running = getattr(self.lab, "running", None)
        if running:
            self._attach(running)
            return
        records = self._records()
        last = records[-1] if records else None
        if (last is not None and last.get("status") in _FINISHED and not last.get("decision")
                and last.get("kind") == "candidate"):
            self.exp_id = last.get("id")
            self.shown = Proposal(source="", diff=last.get("diff") or "", description=last.get("description", ""),
                                  proposer=last.get("proposer", ""), parent_id=last.get("parent_id"),
                                  rationale=(last.get("proposal_meta") or {}).get("rationale", ""))
            self._show_proposal(f"ran as experiment {self.exp_id} ({last.get('status')})")
            self._show_outcome(last)
            self.live.reset(self._references(last.get("parent_id")), title=f"{last.get('id')} (restored)",
                            running=False)   # it finished: no phase, no ticking clock
            for ev in last.get("curve") or []:
                self.live.events.append(ev)
            st = last.get("status", "ok")
            self.live.finish(st, f"finished ({st}): val_bpb {fmt_bpb(last.get('val_bpb'))}" if st == "ok"
                             else f"finished ({st}): {last.get('reason') or ''}")
            self._set_state("ran")
            self._say(f"Experiment {self.exp_id} ran but was never decided: keep or discard it.", "warn")
            return
        if proposal is not None:
            self.proposal = proposal
            self._show_proposal()
            self._set_state("proposed")
        elif self.auto_propose:
            self.new_proposal()
        else:
            self._show_proposal()
            self._set_state("idle")

    # --- proposal -------------------------------------------------------------------------

    def _show_proposal(self, note: str = "") -> None:
        """Render the shown proposal; `note` says what happened to it (running, ran as 0003)."""
        p = self.shown
        if p is None:
            self.proposal_head.value = '<div style="color:#6e7781">No proposal yet.</div>'
            self.diff.value = ""
            self.diff_mode.layout.display = "none"
            return
        self.diff_mode.layout.display = "flex"
        note_html = (f'<div style="font-size:12px;color:#57606a;margin-bottom:2px">{_html.escape(note)}</div>'
                     if note else "")
        self.proposal_head.value = note_html + proposal_header_html(p)
        self._build_hunks(p if p is self.proposal and p.source else None)
        self.diff.value = diff_html(self._selected_diff(), mode=self.diff_mode.value, max_height="460px")

    # --- per-hunk choice ------------------------------------------------------------------

    def _build_hunks(self, p: Any) -> None:
        """One checkbox per hunk for a proposal awaiting approval that has two or more."""
        hunks = parse_unified(p.diff) if p is not None else []
        if len(hunks) < 2:
            self.hunk_boxes = []
            self.hunks.children = []
            self.hunks.layout.display = "none"
            self._update_approve_label()
            return
        if getattr(self, "_hunks_of", None) is p and len(self.hunk_boxes) == len(hunks):
            self.hunks.layout.display = "flex"
            return   # the same proposal redrawn (the diff mode toggled, the editor closed): keep the ticks
        self._hunks_of = p
        boxes = []
        for i, h in enumerate(hunks):
            box = w.Checkbox(value=True, description=f"hunk {i + 1}: {hunk_summary(h)}", indent=False,
                             layout=w.Layout(width="auto", margin="0 12px 0 0"))
            box.observe(lambda _: self._on_hunks(), names="value")
            boxes.append(box)
        self.hunk_boxes = boxes
        self.hunks.children = [w.HTML('<span style="font-size:12px;color:var(--jp-ui-font-color2, #57606a)">'
                                      'take these hunks (unticked ones keep the parent\'s lines; a partial '
                                      'selection runs as your edit):</span>'),
                               w.HBox(boxes, layout=w.Layout(flex_flow="row wrap"))]
        self.hunks.layout.display = "flex"
        self._update_approve_label()

    def selected_hunks(self) -> list[int]:
        """Indices of the ticked hunks (all of them for a one-hunk proposal)."""
        if not self.hunk_boxes:
            return list(range(len(parse_unified(self.proposal.diff)))) if self.proposal is not None else []
        return [i for i, b in enumerate(self.hunk_boxes) if b.value]

    def _partial(self) -> bool:
        return bool(self.hunk_boxes) and not all(b.value for b in self.hunk_boxes)

    def _selected_diff(self) -> str:
        p = self.shown
        if p is None or not self._partial() or self.proposal is not p:
            return p.diff if p is not None else ""
        from autoresearch_kit.propose.base import unified_diff

        parent = select_hunks(p.source, p.diff, set())
        return unified_diff(parent, select_hunks(p.source, p.diff, self.selected_hunks()))

    def _on_hunks(self) -> None:
        self._update_approve_label()
        if self.shown is not None:
            self.diff.value = diff_html(self._selected_diff(), mode=self.diff_mode.value, max_height="460px")

    def _update_approve_label(self) -> None:
        if self._partial():
            n, total = len(self.selected_hunks()), len(self.hunk_boxes)
            self.approve_button.description = f"Approve {n} of {total} hunks"
        else:
            self.approve_button.description = "Approve"

    # --- the editor's live diff -----------------------------------------------------------

    def _show_editor_diff(self) -> None:
        """The diff of the editor's text against the parent, redrawn as it is typed."""
        if self._editor_parent is None or self.editor_box.layout.display != "flex":
            self.editor_diff.value = ""
            return
        from autoresearch_kit.propose.base import unified_diff

        d = unified_diff(self._editor_parent, self.editor.value)
        self.editor_diff.value = (diff_html(d, mode="unified", max_height="260px") if d.strip() else
                                  '<div style="color:var(--jp-ui-font-color2, #6e7781)">no change from the parent '
                                  'yet</div>')

    def _on_token(self, token: str) -> None:
        """Streamed proposer text (LLM): shown live, redrawn at most 5 times a second."""
        self._tokens.append(str(token))
        now = time.monotonic()
        if now - self._last_token_draw > 0.2:
            self._last_token_draw = now
            text = "".join(self._tokens)
            self.stream.value = text[-4000:]

    def _propose(self) -> None:
        feedback = self.feedback.value.strip()
        self._tokens = []
        proposer = getattr(self.lab, "proposer", None)
        streams = proposer is not None and hasattr(proposer, "on_token")
        if streams:
            self.stream.value = ""
            self.stream.layout.display = "flex"
        try:
            p = self.lab.propose(feedback=feedback, on_token=self._on_token if streams else None)
        finally:
            if streams:
                self.stream.value = "".join(self._tokens)[-4000:]   # the throttle may have held the tail
                self.stream.layout.display = "none"
        self.feedback.value = ""      # read once: it went into this proposal's context
        self.proposal = self.shown = p
        self._show_proposal()
        self._say("")
        self._set_state("proposed")

    def new_proposal(self) -> None:
        """Ask the lab's proposer for the next proposal (reads and clears the feedback box)."""
        self.proposal = self.shown = None
        self._show_proposal()
        self._set_state("proposing")
        self._say(f"Asking {self._proposer_name() or 'the proposer'} for a proposal...", "info")
        self._spawn("propose", self._propose)

    # --- run ------------------------------------------------------------------------------

    def _references(self, parent_id: str | None) -> list[tuple]:
        refs = []
        parent = self._record(parent_id)
        best = self._best()
        if parent and parent.get("curve"):
            refs.append((f"parent {parent['id']} ({fmt_bpb(parent.get('val_bpb'))})", parent["curve"], "parent"))
        if best and best.get("curve") and (not parent or best.get("id") != parent.get("id")):
            refs.append((f"best {best['id']} ({fmt_bpb(best.get('val_bpb'))})", best["curve"], "best"))
        return refs

    def _latest_id(self) -> str | None:
        records = self._records()
        return records[-1].get("id") if records else None

    def _has_baseline(self) -> bool:
        return any(r.get("kind") == "baseline" and r.get("status") == "ok" for r in self._records(curves=False))

    def _run_baseline(self) -> bool:
        """Run the lab's starting train.py with live curves (the lab would otherwise run it silently)."""
        self.live.reset([], budget=getattr(self.lab, "budget", None), title="baseline")
        self._set_state("running")
        self._say("No baseline yet: training the starting train.py first, to have a parent to compare with.")
        try:
            rec = self.lab.baseline(on_event=self.live.add_event, stop=self._stop)
        except BaseException as exc:
            self.live.finish("crash", f"the baseline did not finish: {_error_text(exc)}")
            raise
        status = rec.get("status", "?")
        self.live.finish(status, f"baseline: val_bpb {fmt_bpb(rec.get('val_bpb'))}" if status == "ok"
                         else f"baseline {status}: {rec.get('reason', '')}")
        self._announce(f"baseline {status}" + (f": val_bpb {fmt_bpb(rec.get('val_bpb'))}" if status == "ok" else ""))
        self.refresh()
        if status == "aborted" and self._stop.is_set():
            # the person pressed Stop: nothing to fix, the baseline is simply still missing
            self._say("Baseline stopped. Approve again to train it: every proposal is compared with it.", "warn")
            return False
        if status != "ok":
            self._say(f"The baseline did not run ({status}: {rec.get('reason')}). "
                      f"Fix the lab's train.py and try again.", "error")
            return False
        return True

    def _run(self, proposal: Any) -> Any:
        """Train `proposal` with live curves; returns the RunResult (worker thread)."""
        running = getattr(self.lab, "running", None)
        if running:   # another panel's (or a cell's) run: one at a time, and this proposal stays up
            msg = (f"Experiment {running['exp_id']} is training in this lab (started elsewhere): one run at a time. "
                   f"Wait for it, or re-run the panel cell to follow it here.")
            raise RuntimeError(msg)
        self._stop.clear()
        if not self._has_baseline() and not self._run_baseline():
            self.proposal = self.shown = proposal
            self._show_proposal()
            self._set_state("proposed")
            return None
        self.exp_id = None
        self.proposal = None
        self.shown = proposal
        self._show_proposal("training...")
        self.live.budget = self.live.budget or getattr(self.lab, "budget", None)
        parent_id = getattr(proposal, "parent_id", None) or getattr(self.lab, "parent_id", None)
        parent = self._record(parent_id) or {}
        self.live.reset(self._references(parent_id), budget=getattr(self.lab, "budget", None),
                        title=str(proposal.description)[:70], eval_s=parent.get("eval_seconds"))
        self._set_state("running")
        note = self.autopilot.description if self.autopilot.value else ""
        self._say(f"{note + ': ' if note else ''}Training: {proposal.description}", "info")
        try:
            result = self.lab.run_budgeted(proposal, on_event=self.live.add_event, stop=self._stop)
        except BaseException as exc:   # the phase clock must not tick on for a run that is over
            self.live.finish("crash", f"the run did not finish: {_error_text(exc)}")
            self.proposal = self.shown = proposal   # nothing lost: it can be approved again
            self._show_proposal()
            raise
        extra = getattr(result, "extra", {}) or {}
        self.exp_id = extra.get("exp_id") or self._latest_id()
        status = getattr(result, "status", "?")
        self.live.finish(status, f"{status}: val_bpb {fmt_bpb(getattr(result, 'val_bpb', None))}"
                         if status == "ok" else f"{status}: {getattr(result, 'reason', '')}")
        self._announce(f"experiment {self.exp_id} {status}"
                       + (f": val_bpb {fmt_bpb(getattr(result, 'val_bpb', None))}" if status == "ok" else ""))
        self._show_proposal(f"ran as experiment {self.exp_id} ({status})")
        rec = self._record(self.exp_id) or {}
        self._show_outcome(rec or result.to_dict())
        self.refresh()
        self._set_state("ran")
        self._say("", "info")
        return result

    def approve(self) -> None:
        """Approve: train the current proposal under the lab's budget (in the background)."""
        if self.proposal is None or self.state != "proposed":
            self._say("Nothing to approve yet.", "warn")
            return
        if self.editor_box.layout.display == "flex":   # the editor is open: run what it shows
            if self.editor.value != self.proposal.source:
                self.run_edit()
                return
            self.close_editor()
        p = self.proposal
        if self._partial():
            keep = self.selected_hunks()
            if not keep:
                self._say("No hunk is ticked: tick at least one, or Reject the proposal.", "warn")
                return
            total = len(self.hunk_boxes)
            source = select_hunks(p.source, p.diff, keep)
            description = f"{p.description} (hunks {', '.join(str(i + 1) for i in keep)} of {total})"[:200]
            self.run_edit(source, description, original=p)   # the human edit's path: submit, then run
            return
        self._spawn("run", lambda: self._run(p))

    def stop(self) -> None:
        """End the running experiment now: it is recorded as aborted, its partial curve kept."""
        self._stop.set()
        if getattr(self, "_attached", None) and hasattr(self.lab, "stop_run"):
            self.lab.stop_run()   # a run this panel attached to: its own stop event is the lab's
        self._autopilot_stop.set()
        if self.autopilot.value:
            self.autopilot.value = False
        self._say("Stopping...", "warn")

    # --- reject / edit --------------------------------------------------------------------

    def reject(self, reason: str | None = None) -> None:
        """Reject the proposal without running it; the reason reaches the next proposal."""
        if self.proposal is None or self.state != "proposed":
            self._say("Nothing to reject.", "warn")
            return
        reason = (reason if reason is not None else self.reject_reason.value).strip()
        if not reason:
            self._say("Say why in the box next to Reject: the agent reads it on the next proposal.", "warn")
            return
        p = self.proposal

        def body():
            self.lab.reject(p, reason)
            self.reject_reason.value = ""
            self.proposal = self.shown = None
            self.refresh()
            if self.auto_propose:
                self._propose_after("Rejected; asking for another proposal...")
            else:
                self._show_proposal()
                self._set_state("idle")
                self._say("Rejected. The reason goes into the next proposal's context.", "ok")

        self._set_state("busy")
        self._spawn("reject", body)

    def _propose_after(self, text: str) -> None:
        self.proposal = self.shown = None
        self._show_proposal()
        self._set_state("proposing")
        self._say(text, "info")
        self._propose()

    def open_editor(self) -> None:
        """Open the proposed train.py in a text area (your edit runs as proposer 'human')."""
        if self.proposal is None:
            self._say("Nothing to edit yet.", "warn")
            return
        p = self.proposal
        try:
            self._editor_parent = select_hunks(p.source, p.diff, set())
        except ValueError:   # a diff that does not describe its source: no live diff, the editor still works
            self._editor_parent = None
        self.editor_box.layout.display = "flex"
        self.editor.value = select_hunks(p.source, p.diff, self.selected_hunks()) if self._partial() else p.source
        self.editor_description.value = f"human edit: {p.description}"[:120]
        self._show_editor_diff()
        self.diff.layout.display = "none"
        self.diff_mode.layout.display = "none"
        self.hunks.layout.display = "none"

    def close_editor(self) -> None:
        self.editor_box.layout.display = "none"
        self.diff.layout.display = "flex"
        self._show_proposal()

    def run_edit(self, source: str | None = None, description: str | None = None, *,
                 original: Any = None) -> None:
        """Run the edited train.py (recorded as a human edit; `original`: the proposal it edits)."""
        source = source if source is not None else self.editor.value
        description = (description if description is not None else self.editor_description.value).strip()
        if not description:
            self._say("Give your edit a one-line description first.", "warn")
            return
        if self.state != "proposed":
            self._say("Wait for the current step to finish.", "warn")
            return

        def body():
            human = self.lab.submit(source, description, original=original if original is not None
                                    else self.proposal)
            self.close_editor()
            self._run(human)

        self._set_state("busy")
        self._spawn("edit", body)

    # --- decide ---------------------------------------------------------------------------

    def _verdict(self, exp_id: str) -> dict:
        try:
            return dict(self.lab.verdict(exp_id) or {})
        except Exception:  # no rule verdict for a failed run: the human decides
            return {}

    def _show_outcome(self, rec: dict) -> None:
        """val_bpb against the parent and the best, the noise flag, the rule's verdict."""
        exp_id = rec.get("id") or self.exp_id
        parent = self._record(rec.get("parent_id"))
        best = self._best()
        status = rec.get("status", "?")
        self._outcome_status = status
        lines = []
        if status == "ok":
            v = rec.get("val_bpb")
            lines.append(f'<div style="font-size:15px"><b>val_bpb {fmt_bpb(v)}</b> &nbsp; '
                         f'{delta_html(v, parent.get("val_bpb") if parent else None, "parent")} &nbsp;·&nbsp; '
                         f'{delta_html(v, best.get("val_bpb") if best else None, "best")}</div>')
        verdict = self._verdict(exp_id) if exp_id else {}
        keep = verdict.get("keep")
        if verdict:
            lines.append(f'<div style="margin-top:4px">rule says: <b>{"keep" if keep else "discard"}</b> '
                         f'{sigma_badge(verdict) if status == "ok" else ""} <span style="color:#57606a">'
                         f'{_html.escape(str(verdict.get("reason", "")))}</span></div>')
        decision = rec.get("decision")
        if decision:
            lines.append(f'<div style="margin-top:4px">decided: {badge(decision, "#1a7f37" if decision == "keep" else "#6e7781")}'
                         f' by {_html.escape(str(rec.get("decided_by") or ""))} '
                         f'{_html.escape(str(rec.get("decision_reason") or ""))}</div>')
        title = f"experiment {exp_id}"
        # the curve is in the training card just above: the outcome shows the numbers
        self.outcome.value = "".join(lines) + run_result_html(rec, title=title, plot=False)
        # prefill: the rule's choice is the highlighted button
        self.keep_button.button_style = "success" if keep else ""
        self.discard_button.button_style = "danger" if keep is False or (not verdict and status != "ok") else ""
        self.keep_button.description = "Keep (rule)" if keep else "Keep"
        self.discard_button.description = "Discard (rule)" if keep is False else "Discard"

    def _mark_past(self, exp_id: str, what: str) -> None:
        """Label the curve and outcome of a decided experiment as the previous one: the next
        proposal appears above them and must not read as theirs."""
        note = f"previous experiment {exp_id} ({what})"
        self.outcome.value = (f'<div class="ark-past" style="font-size:12px;font-weight:600;'
                              f'color:var(--jp-ui-font-color2, #57606a);margin-bottom:4px">{_html.escape(note)}: '
                              f'the next one shows here when it has run</div>' + self.outcome.value)
        self.live.title = f"previous: {exp_id} ({what})"
        self.live.draw()
        self.live.status.value = f'<span style="font-size:12px;color:var(--jp-ui-font-color2, #57606a)">{_html.escape(note)}</span>'

    def decide(self, keep: bool, reason: str | None = None) -> None:
        """Record the human's keep/discard for the experiment shown, then ask for the next proposal."""
        if self.exp_id is None or self.state != "ran":
            self._say("No finished experiment to decide.", "warn")
            return
        exp_id = self.exp_id
        reason = (reason if reason is not None else self.decision_reason.value).strip()

        def body():
            rec = self.lab.decide(exp_id, keep=keep, reason=reason, decided_by="human")
            self.decision_reason.value = ""
            self._show_outcome(rec if isinstance(rec, dict) and rec.get("id") else self._record(exp_id) or {})
            self._mark_past(exp_id, "kept" if keep else "discarded")
            self.refresh()
            self._set_state("decided")
            if self.auto_propose:
                self._propose_after(f"{exp_id} {'kept' if keep else 'discarded'}; asking for the next proposal...")
            else:
                self._set_state("idle")

        self._set_state("busy")
        self._spawn("decide", body)

    # --- autopilot ------------------------------------------------------------------------

    def _on_autopilot(self, change: dict) -> None:
        if change["new"]:
            if self.state not in ("idle", "proposed", "ran"):
                self._say("Autopilot starts once the current step is done.", "warn")
                self.autopilot.value = False
                return
            self.run_autopilot(self.autopilot_steps.value)
        else:
            self._autopilot_stop.set()

    def run_autopilot(self, steps: int) -> None:
        """Run `steps` unattended steps: propose, run, decide by the rule (decided_by 'autopilot')."""
        self._autopilot_stop.clear()
        if not self.autopilot.value:
            # the toggle's observer comes back here with the widget's step count
            self.autopilot_steps.value = steps
            self.autopilot.value = True
            return

        def body():
            done = 0
            try:
                if self.state == "ran" and self.exp_id is not None:
                    self._auto_decide(self.exp_id)
                while done < steps and not self._autopilot_stop.is_set():
                    # the count stays on the toggle while it runs (the message line is the run's)
                    self.autopilot.description = f"Autopilot {done + 1}/{steps}"
                    if self.proposal is None:
                        self._set_state("proposing")
                        self._say(f"Autopilot {done + 1}/{steps}: proposing...", "info")
                        self._propose()
                    if self._autopilot_stop.is_set():
                        break
                    self._say(f"Autopilot {done + 1}/{steps}: training...", "info")
                    if self._run(self.proposal) is None:
                        break
                    self._auto_decide(self.exp_id)
                    done += 1
            finally:
                self.autopilot.description = "Autopilot"
                self.autopilot.value = False
            self._say(f"Autopilot finished {done} step(s).", "ok")
            if self.auto_propose and self.proposal is None and not self._stop.is_set():
                self._propose_after("Asking for the next proposal...")
            else:
                self._set_state("proposed" if self.proposal is not None else "idle")

        self._spawn("autopilot", body)

    def _auto_decide(self, exp_id: str | None) -> None:
        if exp_id is None:
            return
        verdict = self._verdict(exp_id)
        keep = bool(verdict.get("keep", False))
        self.lab.decide(exp_id, keep=keep, reason=str(verdict.get("reason", "")), decided_by="autopilot")
        self._show_outcome(self._record(exp_id) or {})
        self.refresh()
        self.exp_id = exp_id
