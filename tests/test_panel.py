"""Tests of the notebook UI: the diff view, the live curves, and the panel's buttons on a real Lab.

The panel tests drive a real Lab (real subprocess runs of a shrunk train.py on the tiny
fixture data, a 2000-token budget, a few seconds each) by clicking the widgets'
buttons in Python, as a person would in JupyterLab, and check the ledger afterwards.
The proposer is a small deterministic one, so the diffs are known.

    python -m pytest tests/test_panel.py -x -q
"""

from __future__ import annotations

import math
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_train_source

from autoresearch_kit.lab import Lab
from autoresearch_kit.propose.base import Proposal, ProposalError
from autoresearch_kit.ui import Panel
from autoresearch_kit.ui.curves import LiveCurve, curves_png
from autoresearch_kit.ui.diff import diff_html, diff_stats, parse_unified
from autoresearch_kit.ui.render import lab_html, proposal_html, run_result_html, tree_html

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "2000-tokens"
PNG = b"\x89PNG"


class KnobProposer:
    """Sets MATRIX_LR to each value in turn; records every context it was given."""

    name = "knobs"

    def __init__(self, values=(0.03, 0.01, 0.05, 0.015, 0.04, 0.025)):
        self.values, self.contexts = list(values), []

    def propose(self, ctx):
        self.contexts.append(ctx)
        for v in self.values:
            new = "\n".join(f"MATRIX_LR = {v!r}" if line.startswith("MATRIX_LR =") else line
                            for line in ctx.parent_source.splitlines()) + "\n"
            if new != ctx.parent_source and Proposal.from_source("", new, "").source_hash not in ctx.seen_hashes:
                return Proposal.from_source(ctx.parent_source, new, f"MATRIX_LR -> {v}", proposer=self.name,
                                            rationale="a different Muon step size", parent_id=ctx.parent_id)
        raise ProposalError("out of learning rates to try")


class GivingUp:
    name = "gives-up"

    def propose(self, ctx):
        raise ProposalError("the model replied without a diff three times")


# --- pure views --------------------------------------------------------------------------

DIFF = """--- a/train.py
+++ b/train.py
@@ -10,4 +10,5 @@
 DEPTH = 4
-MATRIX_LR = 0.02
+MATRIX_LR = 0.03
+WEIGHT_DECAY = 0.1
 HEAD_DIM = 64
 x = "<b>not html</b>"
"""


def test_diff_parsing_counts_and_line_numbers():
    assert diff_stats(DIFF) == (2, 1)
    (hunk,) = parse_unified(DIFF)
    tags = [(ln.tag, ln.old_no, ln.new_no) for ln in hunk.lines]
    assert tags == [(" ", 10, 10), ("-", 11, None), ("+", None, 11), ("+", None, 12), (" ", 12, 13), (" ", 13, 14)]


@pytest.mark.parametrize("mode", ["unified", "split"])
def test_diff_html_shows_changes_escaped_and_highlighted(mode):
    out = diff_html(DIFF, mode=mode)
    assert "+2" in out and "&minus;1" in out
    assert "<b>not html</b>" not in out           # source text is escaped, never rendered
    assert "0.03" in out and "0.02" in out and "WEIGHT_DECAY" in out
    assert "rgba(46,160,67,0.15)" in out and "rgba(248,81,73,0.15)" in out  # added / removed tints
    # dark theme: no opaque light background under the theme's (white) text; code takes the theme's colour
    assert not re.search(r"background:#[0-9a-fA-F]{6}", out)
    assert "color:var(--jp-content-font-color1" in out
    assert "color:" in out                        # pygments inline colours
    # side by side pairs the removed line with the first added one on the same row
    row = next(r for r in out.split("<tr>") if "0.02" in r)
    assert ("0.03" in row) == (mode == "split")


def test_diff_html_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unified"):
        diff_html(DIFF, mode="sideways")


def _events(n, base=3.0, dt=0.1):
    return [{"step": i, "loss": base + 5 * math.exp(-i / 10), "elapsed": i * dt, "tokens": 1000 * i,
             "progress": i / n} for i in range(n)]


def test_curves_png_and_renderings():
    png = curves_png([("parent", _events(50), "parent"), ("this run", _events(30, 2.9), "run")], budget="5s")
    assert png.startswith(PNG) and len(png) > 5000
    rec = {"id": "0003", "status": "crash", "reason": "exit code 1", "log_tail": "Traceback ...\nKeyError: 'x'",
           "curve": _events(5), "budget": "5s"}
    html = run_result_html(rec)
    assert "crash" in html and "exit code 1" in html and "KeyError" in html and "data:image/png;base64" in html
    p = Proposal.from_source("A = 1\n", "A = 2\n", "bump A", proposer="mutate", rationale="why not")
    html = proposal_html(p)
    assert "bump A" in html and "why not" in html and "mutate" in html and "+1" in html


def test_show_titles_a_run_by_its_experiment_id_and_reads_as_text():
    from autoresearch_kit.runner import RunResult
    from autoresearch_kit.ui import show

    # what lab.run_budgeted returns: the ledger id rides in extra
    res = RunResult(status="ok", val_bpb=1.2345, budget="5s", curve=_events(5), extra={"exp_id": "0007"})
    out = show(res)
    assert "0007" in out._repr_html_() and "1.2345" in out._repr_html_()
    text = repr(out)                              # a console or nbconvert --to text shows this
    assert "0007" in text and "1.2345" in text and "<" not in text and "base64" not in text


def test_tree_shows_where_the_lab_branched():
    recs = [{"id": "0001", "parent_id": None, "kind": "baseline", "status": "ok", "val_bpb": 2.0, "decision": "keep",
             "description": "baseline"},
            {"id": "0002", "parent_id": "0001", "kind": "candidate", "status": "ok", "val_bpb": 1.9,
             "decision": "keep", "description": "wider"},
            {"id": "0003", "parent_id": "0002", "kind": "candidate", "status": "crash", "val_bpb": None,
             "decision": "discard", "description": "deeper"},
            {"id": "0004", "parent_id": "0001", "kind": "candidate", "status": "ok", "val_bpb": 1.95,
             "decision": "keep", "description": "other branch"},
            {"id": "0005", "parent_id": "0004", "kind": "noise", "status": "ok", "val_bpb": 1.96, "decision": None,
             "description": "noise rerun"}]
    text = re.sub("<[^>]+>", "", tree_html(recs, parent_id="0004").replace("</div>", "\n"))
    assert [line for line in text.splitlines() if line] == ["└─ 0001 2.0000 keep baseline",
                                 "   ├─ 0002 1.9000 keep wider",
                                 "   │  └─ 0003 crash discard deeper",
                                 "   └─ 0004 1.9500 keep other branch ◀ parent"]


def test_live_curve_throttles_redraws_and_draws_the_last_event():
    live = LiveCurve("10s", max_fps=2.0)
    live.reset([("parent", _events(50), "parent")])
    start = live.redraws
    for ev in _events(200):                       # 200 events in well under a second
        live.add_event(ev)
    time.sleep(0.8)                               # the trailing redraw fires within 1/max_fps
    assert 1 <= live.redraws - start <= 4
    assert bytes(live.image.value).startswith(PNG)
    assert "step 199" in live.status.value and "left of 10s" in live.status.value
    assert live.progress.value == pytest.approx(199 / 200)


def test_live_curve_takes_events_from_other_threads():
    live = LiveCurve("2000-tokens", max_fps=20.0)
    live.reset()
    threads = [threading.Thread(target=lambda: [live(ev) for ev in _events(50)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live.finish("ok")
    assert len(live.events) == 150 and live.progress.bar_style == "success"


def test_live_curve_names_the_phase_ticks_without_events_and_ends_finished():
    live = LiveCurve("10s", max_fps=20.0)
    live.reset([], eval_s=30.0)
    assert live.phase()[0] == "starting" and "<b>starting</b>" in live.status.value
    live.add_event({"step": 0, "loss": 5.0, "progress": 0.0, "elapsed": 0.0})
    assert live.phase()[0] == "warm-up"
    live.add_event({"step": 10, "loss": 3.0, "progress": 0.25, "elapsed": 2.5})
    name, detail = live.phase()
    assert name == "training" and "~8s of training left then ~30s scoring" in detail
    live.add_event({"step": 40, "loss": 2.0, "progress": 1.0, "elapsed": 10.0})
    time.sleep(2.3)                               # no event comes while the runner scores: the clock ticks
    assert "<b>evaluating</b>" in live.status.value and "scoring for" in live.status.value
    assert "left of 10s" not in live.status.value   # not "0.0 s left" while it is scored
    live.finish("ok", "ok: val_bpb 1.2345")
    assert live.phase() is None and "val_bpb 1.2345" in live.status.value
    time.sleep(1.3)                               # the ticker is gone: nothing overwrites the final line
    assert live.status.value.endswith("ok: val_bpb 1.2345</span>")
    live.reset([], running=False)                 # a finished run redrawn: no phase at all
    live.events.extend(_events(5))
    live.finish("crash")
    assert "starting" not in live.status.value and "finished (crash)" in live.status.value


def test_live_curve_of_a_run_attached_late_counts_from_its_start():
    live = LiveCurve("10s")
    live.reset([], started=time.time() - 42)
    assert live.phase() == ("starting", "42s")
    live.finish("aborted")


def test_sigma_stands_next_to_every_verdict():
    from autoresearch_kit.ui.panel import sigma_badge
    from autoresearch_kit.ui.render import history_table_html

    kept = {"keep": True, "within_noise": False, "gain": 0.0123, "sigma": 0.005}
    noise = {"keep": False, "within_noise": True, "gain": 0.004, "sigma": 0.005}
    worse = {"keep": False, "within_noise": False, "gain": -0.02, "sigma": 0.005}
    assert "gain +0.0123 = +2.5σ (σ 0.0050)" in sigma_badge(kept) and "#1a7f37" in sigma_badge(kept)
    assert "within noise, gain +0.0040 = +0.8σ (σ 0.0050)" in sigma_badge(noise)
    # a worse run is not "beyond noise" (the old badge said so for any run with a sigma)
    assert "gain -0.0200 = -4.0σ" in sigma_badge(worse) and "beyond" not in sigma_badge(worse)
    assert sigma_badge({"gain": None, "sigma": 0.005}) == ""
    recs = [{"id": "0001", "status": "ok", "val_bpb": 2.0, "kind": "baseline"},
            {"id": "0002", "parent_id": "0001", "status": "ok", "val_bpb": 1.9877, "kind": "candidate"}]
    table = history_table_html(recs, verdicts={"0002": kept})
    assert "gain (σ)" in table and "+0.0123 (+2.5σ)" in table
    assert "gain (σ)" not in history_table_html(recs)


def test_notify_js_titles_a_background_tab_once():
    from autoresearch_kit.ui.panel import notify_js

    js = notify_js('experiment 0002 ok: val_bpb 1.2 "quoted"', key="k1")
    assert "document.hidden" in js and "document.title" in js and "Notification.permission" in js
    assert '"experiment 0002 ok: val_bpb 1.2 \\"quoted\\""' in js    # a JSON string, not spliced text
    assert '"k1"' in js and "__arkNotified" in js


# --- the panel on a real lab ---------------------------------------------------------------

@pytest.fixture(scope="module")
def base_lab(tiny_data, tmp_path_factory):
    """A lab with its baseline run, made once; tests work on copies."""
    root = tmp_path_factory.mktemp("panellab")
    (root / "train.py").write_text(tiny_train_source())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AUTORESEARCH_DATA": str(tiny_data), "AUTORESEARCH_CACHE": str(root / "cache"),
                     "AUTORESEARCH_DEVICE": "cpu", "AUTORESEARCH_EVAL_TOKENS": "4096"}.items():
            mp.setenv(k, v)
        mp.chdir(root)
        with Lab(root / "lab", train=root / "train.py", budget=BUDGET, proposer="mutate", verbose=False) as lab:
            assert lab.baseline()["status"] == "ok"
    return root / "lab"


@pytest.fixture()
def lab(base_lab, tmp_path, kit_env):
    shutil.copytree(base_lab, tmp_path / "lab")
    lab = Lab(tmp_path / "lab", budget=BUDGET, proposer=KnobProposer(), verbose=False)
    yield lab
    lab.close()


def _ready(panel, state="proposed", timeout=120):
    assert panel.wait(timeout), "the panel's background step did not finish"
    assert panel.state == state, (panel.state, panel.errors, panel.message.value)


def test_approve_runs_with_live_curves_then_keep_moves_the_parent(lab):
    panel = lab.panel()
    _ready(panel)
    assert "MATRIX_LR" in panel.diff.value and "0.03" in panel.diff.value
    assert "MATRIX_LR -&gt; 0.03" in panel.proposal_head.value or "MATRIX_LR -> 0.03" in panel.proposal_head.value
    panel.diff_mode.value = "split"
    assert panel.diff.value.count("<td") > 0 and "width:50%" in panel.diff.value

    panel.approve_button.click()
    _ready(panel, "ran")
    rec = lab.ledger.records()[-1]
    assert rec["id"] == panel.exp_id == "0002" and rec["status"] == "ok" and rec["decision"] is None
    assert rec["proposer"] == "knobs" and "MATRIX_LR = 0.03" in rec["diff"]
    # the live curve got the run's step events and drew them, with the parent for comparison
    assert len(panel.live.events) == len(rec["curve"]) > 0
    assert bytes(panel.live.image.value).startswith(PNG) and panel.live.progress.bar_style == "success"
    assert any(r[2] == "parent" for r in panel.live.references)
    # the outcome: val_bpb against the parent, and the rule's verdict preselected
    assert f"{rec['val_bpb']:.4f}" in panel.outcome.value and "vs parent" in panel.outcome.value
    # the end of the run is announced to a tab in the background (a script in the hidden output)
    assert panel.notices[-1].startswith("experiment 0002 ok: val_bpb")
    (out,) = panel.notifier.outputs
    assert "document.title" in out["data"]["application/javascript"]
    assert panel.live.phase() is None and "ok: val_bpb" in panel.live.status.value
    verdict = lab.verdict(rec["id"])
    assert (panel.keep_button.button_style == "success") == verdict["keep"]
    # sigma next to the verdict, in the outcome and in the results table's row (issue 11)
    g = verdict["gain"]
    assert verdict["sigma"] is None                # these tests' labs skip the noise runs
    assert f"gain {g:+.4f}, noise not measured" in panel.outcome.value
    assert "gain (σ)" in panel.table.value and f"{g:+.4f} (σ ?)" in panel.table.value
    assert not panel.keep_button.disabled and not panel.discard_button.disabled

    panel.decision_reason.value = "looks good"
    panel.keep_button.click()
    _ready(panel)                                  # decided, and the next proposal is up
    rec = lab.ledger.get("0002")
    assert rec["decision"] == "keep" and rec["decided_by"] == "human" and rec["decision_reason"] == "looks good"
    assert lab.parent_id == "0002" and panel.proposal.parent_id == "0002"
    # the decided run's curve and outcome stay visible, labelled as the previous experiment
    assert "previous experiment 0002 (kept)" in panel.outcome.value
    assert panel.live.title == "previous: 0002 (kept)" and "previous experiment 0002" in panel.live.status.value
    assert "0002" in panel.table.value and bytes(panel.plot.value).startswith(PNG)
    assert "◀ parent" in panel.tree.value and "0002" in panel.tree.value


def test_reject_records_reason_and_the_next_proposal_reads_it(lab):
    panel = lab.panel()
    _ready(panel)
    panel.reject_button.click()                   # no reason: refused with a hint, nothing recorded
    assert panel.state == "proposed" and "why" in panel.message.value.lower()
    assert len(lab.ledger) == 1
    panel.reject_reason.value = "learning rate changes are done; try the model"
    panel.reject_button.click()
    _ready(panel)
    rej = lab.ledger.records()[-1]
    assert rej["status"] == "rejected" and rej["decision_reason"] == "learning rate changes are done; try the model"
    ctx = lab.proposer.contexts[-1]               # the context of the proposal now shown
    assert any(h.reason == rej["decision_reason"] and h.status == "rejected" for h in ctx.history)
    assert rej["decision_reason"] in ctx.feedback   # as feedback too: the offline proposer reads only that
    assert panel.proposal.description != rej["description"]


def test_feedback_box_reaches_the_next_proposal(lab):
    panel = Panel(lab, propose=False)
    assert panel.state == "idle" and not panel.new_button.disabled
    panel.feedback.value = "keep the model size fixed"
    panel.new_button.click()
    _ready(panel)
    assert lab.proposer.contexts[-1].feedback == "keep the model size fixed"
    assert panel.feedback.value == ""             # read once


def test_edit_runs_the_human_version(lab):
    panel = lab.panel()
    _ready(panel)
    panel.edit_button.click()
    assert panel.editor_box.layout.display == "flex" and "MATRIX_LR = 0.03" in panel.editor.value
    panel.editor.value = panel.editor.value.replace("WEIGHT_DECAY = 0.0", "WEIGHT_DECAY = 0.05")
    panel.editor_description.value = "LR 0.03 and a little weight decay"
    panel.editor_run.click()
    _ready(panel, "ran")
    rec = lab.ledger.records()[-1]
    assert rec["proposer"] == "human" and rec["description"] == "LR 0.03 and a little weight decay"
    assert "WEIGHT_DECAY = 0.05" in rec["diff"] and "MATRIX_LR = 0.03" in rec["diff"]
    assert rec["status"] == "ok"


def test_edit_that_cannot_run_is_explained_not_run(lab):
    panel = lab.panel()
    _ready(panel)
    panel.open_editor()
    panel.editor.value = "def broken(:\n"
    panel.editor_run.click()
    _ready(panel)
    assert "cannot run" in panel.message.value and "Traceback" not in panel.message.value
    assert len(lab.ledger) == 1


def test_stop_aborts_and_keeps_the_partial_curve(lab):
    lab.budget = "60s"                            # long enough to be stopped mid-run
    panel = lab.panel()
    _ready(panel)
    panel.approve_button.click()
    deadline = time.monotonic() + 60
    while len(panel.live.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert panel.state == "running" and not panel.stop_button.disabled
    panel.stop_button.click()
    _ready(panel, "ran")
    rec = lab.ledger.records()[-1]
    assert rec["status"] == "aborted" and len(rec["curve"]) >= 3
    assert panel.live.progress.bar_style == "warning"
    assert panel.keep_button.disabled and not panel.discard_button.disabled   # only a scored run can be kept


def test_proposer_error_is_shown_as_its_reason(lab):
    lab.proposer = GivingUp()
    panel = lab.panel()
    _ready(panel, "idle")
    assert "the model replied without a diff three times" in panel.message.value
    assert "Traceback" not in panel.message.value and not panel.new_button.disabled


def test_a_failing_button_says_why_and_does_not_stick(lab):
    # e.g. a typo in the proposer's name: it fails when the panel first asks for it, in the
    # click handler itself, where ipywidgets would only log the error and the buttons would
    # stay in "proposing" (Stop on, New proposal off) for good
    panel = Panel(lab, propose=False)
    lab.proposer = "gpt4"
    panel.new_button.click()
    _ready(panel, "idle")
    assert "Unknown proposer 'gpt4'" in panel.errors[-1] and "Traceback" not in panel.message.value
    assert not panel.new_button.disabled and panel.stop_button.disabled
    lab.proposer = KnobProposer()                 # fixed: the same panel carries on
    panel.new_button.click()
    _ready(panel)


def test_stop_during_the_baseline_says_to_approve_again(tmp_path, tiny_data, kit_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tiny_data))
    (tmp_path / "train.py").write_text(tiny_train_source())
    with Lab(tmp_path / "fresh", train=tmp_path / "train.py", budget="60s", proposer=KnobProposer(),
             verbose=False) as fresh:
        panel = fresh.panel()
        _ready(panel)
        panel.approve_button.click()              # no baseline yet: it trains first
        deadline = time.monotonic() + 60
        while not (panel.state == "running" and len(panel.live.events) >= 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        panel.stop_button.click()
        _ready(panel)                             # back to the proposal, not run
        assert fresh.ledger.records()[-1]["kind"] == "baseline" and fresh.ledger.records()[-1]["status"] == "aborted"
        assert "Approve again" in panel.message.value and "Fix the lab" not in panel.message.value
        assert not panel.approve_button.disabled


def test_autopilot_runs_n_steps_decided_by_the_rule(lab):
    panel = lab.panel()
    _ready(panel)
    panel.autopilot_steps.value = 2
    shown = []                                    # what the toggle said while it ran
    panel.autopilot.observe(lambda ch: shown.append(ch["new"]), names="description")
    said = []
    panel.message.observe(lambda ch: said.append(ch["new"]), names="value")
    panel.autopilot.value = True                  # the toggle, as clicked
    _ready(panel, timeout=240)
    recs = [r for r in lab.ledger.records() if r["kind"] == "candidate"]
    assert len(recs) == 2 and all(r["decided_by"] == "autopilot" for r in recs)
    assert [r["decision"] == "keep" for r in recs] == [lab.verdict(r["id"])["keep"] for r in recs]
    assert panel.autopilot.value is False
    # the step count was on show while it ran (the run's own message used to hide it)
    assert shown[:2] == ["Autopilot 1/2", "Autopilot 2/2"] and panel.autopilot.description == "Autopilot"
    assert any("Autopilot 2/2: Training:" in m for m in said)


def test_full_width_parts_have_no_side_margin_and_the_editor_label_fits():
    """ipywidgets' 2 px side margin on a 100%-wide leaf made the card 4 px too wide."""
    from autoresearch_kit.ui.panel import Panel

    class NoLab:
        budget = BUDGET

    panel = Panel(NoLab(), propose=False)
    leaves = [panel.stream, panel.diff, panel.editor_description, panel.editor, panel.feedback, panel.plot,
              panel.live.image, panel.live.progress]
    assert all(x.layout.width == "100%" and x.layout.margin == "2px 0" for x in leaves)
    assert panel.editor_description.style.description_width == "initial"


def test_new_panel_after_restart_offers_the_undecided_run(lab, tmp_path):
    lab.run_budgeted(lab.propose())               # ran, never decided; then the kernel "restarts"
    lab.close()
    lab2 = Lab(tmp_path / "lab", budget=BUDGET, proposer=KnobProposer(), verbose=False)
    try:
        panel = lab2.panel()
        assert panel.state == "ran" and panel.exp_id == "0002"
        assert "never decided" in panel.message.value and "MATRIX_LR" in panel.diff.value
        assert panel.live.events and not panel.discard_button.disabled
        # a finished run is never shown as starting (nor as "0 s left")
        status = panel.live.status.value
        assert "finished (ok): val_bpb" in status and "starting" not in status and "left" not in status
        assert panel.live.phase() is None
        panel.discard_button.click()
        _ready(panel)
        assert lab2.ledger.get("0002")["decision"] == "discard"
        assert "0002" in lab_html(lab2)
    finally:
        lab2.close()


class StreamingProposer(KnobProposer):
    """Like the LLM proposer: `propose(ctx, on_token=...)` streams its reply through the hook."""

    name = "streams"

    def __init__(self):
        super().__init__()
        self.on_token = None                      # what LLMProposer offers; the panel looks for it
        self.seen_hook = None

    def propose(self, ctx, *, on_token=None):
        self.seen_hook = on_token
        for word in "I will try a larger Muon step size .".split():
            if on_token is not None:
                on_token(word + " ")
            time.sleep(0.25)                      # slower than the panel's 5 redraws/s
        return super().propose(ctx)


def test_streamed_proposer_text_is_shown_while_it_thinks(lab):
    lab.proposer = StreamingProposer()
    panel = lab.panel()
    _ready(panel)
    assert lab.proposer.seen_hook is not None     # the panel passed its hook for this proposal
    assert "I will try a larger Muon" in panel.stream.value
    assert panel.stream.layout.display == "none"  # hidden again once the proposal is shown


def test_a_second_panel_attaches_to_the_run_in_progress_and_cannot_start_another(lab, monkeypatch):
    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    started, release = threading.Event(), threading.Event()

    def slow_run(*a, on_event=None, stop=None, **kw):
        on_event({"step": 0, "loss": 5.0, "progress": 0.2, "tokens": 400, "elapsed": 0.1})
        started.set()
        while not release.is_set() and not stop.is_set():
            time.sleep(0.05)
        on_event({"step": 1, "loss": 4.0, "progress": 1.0, "tokens": 2000, "elapsed": 0.2})
        return RunResult(status="ok", val_bpb=2.5, seed=42, curve=[])

    monkeypatch.setattr(runner, "run_budgeted", slow_run)
    first = lab.panel()
    _ready(first)
    first.approve_button.click()
    assert started.wait(30)
    second = lab.panel()                      # the browser tab reloaded, the cell ran again
    assert second.state == "running" and second.approve_button.disabled
    assert "already training" in second.message.value and [e["step"] for e in second.live.events] == [0]
    # nothing else trains beside it, from a cell either
    with pytest.raises(RuntimeError, match="one run at a time"):
        lab.run_budgeted(lab.propose())
    release.set()
    _ready(first, "ran")
    _ready(second, "ran")
    assert second.exp_id == first.exp_id == "0002" and [e["step"] for e in second.live.events] == [0, 1]
    second.keep_button.click()               # decided from the new panel
    _ready(second)
    assert lab.ledger.get("0002")["decision"] == "keep"
    assert [r["id"] for r in lab.ledger.records()] == ["0001", "0002"]


def test_stop_from_the_attached_panel_ends_the_run(lab, monkeypatch):
    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    started = threading.Event()

    def slow_run(*a, on_event=None, stop=None, **kw):
        started.set()
        assert stop.wait(30)
        return RunResult(status="aborted", reason="stopped (stop event)", seed=42)

    monkeypatch.setattr(runner, "run_budgeted", slow_run)
    first = lab.panel()
    _ready(first)
    first.approve_button.click()
    assert started.wait(30)
    second = lab.panel()
    second.stop_button.click()
    _ready(second, "ran")
    assert lab.ledger.get("0002")["status"] == "aborted"


def test_approve_with_the_editor_open_runs_what_the_editor_shows(lab, monkeypatch):
    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    ran = []
    monkeypatch.setattr(runner, "run_budgeted",
                        lambda src, *a, **kw: ran.append(src) or RunResult(status="ok", val_bpb=2.5, seed=42))
    panel = lab.panel()
    _ready(panel)
    panel.edit_button.click()
    panel.editor.value = panel.editor.value.replace("WEIGHT_DECAY = 0.0", "WEIGHT_DECAY = 0.05")
    panel.approve_button.click()             # not the original proposal: the edit on screen
    _ready(panel, "ran")
    assert "WEIGHT_DECAY = 0.05" in ran[-1] and panel.editor_box.layout.display == "none"
    assert lab.ledger.records()[-1]["proposer"] == "human"
    panel.discard_button.click()
    _ready(panel)
    panel.edit_button.click()                # editor open, nothing changed: the proposal runs as it is
    panel.approve_button.click()
    _ready(panel, "ran")
    assert lab.ledger.records()[-1]["proposer"] == "knobs" and panel.editor_box.layout.display == "none"


def test_kept_rows_use_a_tint_with_the_themes_text_colour():
    from autoresearch_kit.ui.render import history_table_html

    out = history_table_html([{"id": "0001", "kind": "baseline", "status": "ok", "decision": "keep", "val_bpb": 1.0,
                               "description": "baseline"}])
    assert "rgba(46,160,67,0.18)" in out and "var(--jp-content-font-color1" in out and "#dafbe1" not in out


class TwoKnobs:
    """One proposal that changes two knobs far apart in train.py: a diff of two hunks."""

    name = "two-knobs"

    def propose(self, ctx):
        src = ctx.parent_source
        new = re.sub(r"^ROPE_BASE = .*$", "ROPE_BASE = 20000.0", src, count=1, flags=re.M)
        new = re.sub(r"^WARMDOWN_FRAC = .*$", "WARMDOWN_FRAC = 0.6", new, count=1, flags=re.M)
        return Proposal.from_source(src, new, "ROPE_BASE 20000 and WARMDOWN_FRAC 0.6", proposer=self.name,
                                    parent_id=ctx.parent_id)


def test_part_of_a_multi_hunk_proposal_runs_as_a_human_edit(lab):
    lab.proposer = TwoKnobs()
    panel = lab.panel()
    _ready(panel)
    assert len(panel.hunk_boxes) == 2 and panel.hunks.layout.display == "flex"
    assert "ROPE_BASE" in panel.hunk_boxes[0].description and "WARMDOWN_FRAC" in panel.hunk_boxes[1].description
    panel.hunk_boxes[1].value = False             # untick the warm-down hunk
    assert panel.approve_button.description == "Approve 1 of 2 hunks"
    assert "20000" in panel.diff.value and "WARMDOWN_FRAC" not in panel.diff.value   # the diff of the choice
    panel.diff_mode.value = "split"               # a redraw keeps the ticks
    assert panel.hunk_boxes[1].value is False and "WARMDOWN_FRAC" not in panel.diff.value
    panel.approve_button.click()
    _ready(panel, "ran")
    rec = lab.ledger.records()[-1]
    assert rec["proposer"] == "human" and rec["description"] == "ROPE_BASE 20000 and WARMDOWN_FRAC 0.6 (hunks 1 of 2)"
    assert "+ROPE_BASE = 20000.0" in rec["diff"] and "WARMDOWN_FRAC" not in rec["diff"]
    assert rec["proposal_meta"]["edited_from"] == "two-knobs"


def test_no_hunk_ticked_runs_nothing(lab):
    lab.proposer = TwoKnobs()
    panel = lab.panel()
    _ready(panel)
    n = len(lab.ledger.records())
    for b in panel.hunk_boxes:
        b.value = False
    panel.approve()
    assert panel.state == "proposed" and len(lab.ledger.records()) == n and "tick at least one" in panel.message.value


def test_the_editor_shows_the_diff_of_its_text_live(lab):
    lab.proposer = TwoKnobs()
    panel = lab.panel()
    _ready(panel)
    panel.hunk_boxes[0].value = False             # the editor opens on the chosen hunks
    panel.open_editor()
    assert "WARMDOWN_FRAC = 0.6" in panel.editor.value and "ROPE_BASE = 20000.0" not in panel.editor.value
    assert "WARMDOWN_FRAC" in panel.editor_diff.value and "20000" not in panel.editor_diff.value
    panel.editor.value = panel.editor.value.replace("WARMDOWN_FRAC = 0.6", "WARMDOWN_FRAC = 0.7")
    assert "0.7" in panel.editor_diff.value and "0.6" not in panel.editor_diff.value   # redrawn as typed
    parent = lab.workspace.source(lab.parent_id)
    panel.editor.value = parent
    assert "no change from the parent" in panel.editor_diff.value
    panel.close_editor()
    assert panel.hunks.layout.display == "flex" and panel.hunk_boxes[0].value is False


def test_a_run_that_raises_stops_the_phase_clock(lab, monkeypatch):
    panel = lab.panel()
    _ready(panel)

    def broken(*a, **k):
        raise ValueError("the data moved: run prepare again")

    monkeypatch.setattr(lab, "run_budgeted", broken)
    panel.approve_button.click()
    _ready(panel)                                  # the proposal stays up, the error is shown
    assert "the data moved" in panel.errors[-1] and not panel.approve_button.disabled
    assert panel.live.phase() is None and "the run did not finish: the data moved" in panel.live.status.value

