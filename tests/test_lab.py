"""Tests of the Lab: the loop, decisions, rejections, human edits, resume, lock, checkout, noise.

Every run is real (a subprocess training a tiny GPT on the tiny fixture data under a
2000-token budget, a few seconds each); the proposer is a small deterministic one
defined here, so the tests do not depend on which edits the offline mutator picks.

    python -m pytest tests/test_lab.py -x -q
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_train_source  # shared with test_panel.py; test_cli imports it from here

from autoresearch_kit.lab import Lab, _looks_like_source, format_record
from autoresearch_kit.ledger import LabLockedError, Ledger
from autoresearch_kit.propose.base import Proposal
from autoresearch_kit.runner import RunResult
from autoresearch_kit.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
BUDGET = "2000-tokens"


class LRProposer:
    """Proposes MATRIX_LR = each value in turn (a real edit of the parent's source)."""

    name = "lrtest"

    def __init__(self, values=(0.03, 0.01, 0.05, 0.015, 0.04)):
        self.values = list(values)
        self.contexts = []

    def propose(self, ctx):
        self.contexts.append(ctx)
        for v in self.values:
            lines = [f"MATRIX_LR = {v!r}  # lrtest" if line.startswith("MATRIX_LR =") else line
                     for line in ctx.parent_source.splitlines()]
            new = "\n".join(lines) + "\n"
            if new != ctx.parent_source and Proposal.from_source("", new, "").source_hash not in ctx.seen_hashes:
                return Proposal.from_source(ctx.parent_source, new, f"MATRIX_LR -> {v}", proposer=self.name,
                                            rationale="test", parent_id=ctx.parent_id)
        raise AssertionError("LRProposer ran out of values")


@pytest.fixture(scope="module")
def base_lab(tiny_data, tmp_path_factory):
    """A lab with its baseline run, made once; tests work on copies of the directory."""
    root = tmp_path_factory.mktemp("baselab")
    (root / "train.py").write_text(tiny_train_source())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTORESEARCH_DATA", str(tiny_data))
        mp.setenv("AUTORESEARCH_CACHE", str(root / "cache"))
        mp.setenv("AUTORESEARCH_DEVICE", "cpu")
        mp.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
        mp.chdir(root)                  # no program.md here: the lab starts from the template
        with Lab(root / "lab", train=root / "train.py", budget=BUDGET, proposer=LRProposer(), verbose=False) as lab:
            base = lab.baseline()
            assert base["status"] == "ok", base["reason"] + base["log_tail"]
    return root / "lab"


@pytest.fixture()
def lab_dir(base_lab, tmp_path, kit_env):
    dst = tmp_path / "lab"
    shutil.copytree(base_lab, dst)
    return dst


def _open(path, **kw) -> Lab:
    kw.setdefault("budget", BUDGET)
    kw.setdefault("proposer", LRProposer())
    kw.setdefault("verbose", False)
    return Lab(path, **kw)


def test_new_lab_layout_and_baseline(base_lab):
    for name in ("program.md", "train.py", ".git", "ledger.sqlite", "results.tsv", "runs/0001/run.log",
                 "runs/0001/train.py"):
        assert (base_lab / name).exists(), name
    # program.md came from the template (no program.md in the directory the test ran from)
    assert (base_lab / "program.md").read_text() == (ROOT / "autoresearch_kit/templates/program.md").read_text()
    rows = (base_lab / "results.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert rows[1].split("\t")[3:] == ["keep", "baseline"]


def test_step_rule_keep_discard_and_checkout_branches(lab_dir):
    with _open(lab_dir) as lab:
        base = lab.best()
        assert lab.baseline()["id"] == base["id"] == "0001"      # done already: no second run
        assert len(lab.ledger) == 1

        lab.threshold = -1.0                    # any candidate that runs ok beats this threshold
        seen = []
        kept = lab.step(approve=lambda p: seen.append(p) or True)
        assert seen and seen[0].parent_id == "0001"
        assert kept["status"] == "ok" and kept["decision"] == "keep" and kept["decided_by"] == "rule"
        assert lab.parent_id == kept["id"] == "0002"
        assert (lab_dir / "train.py").read_text() == seen[0].source == (lab_dir / "runs/0002/train.py").read_text()
        assert lab.workspace.commit("0002") == kept["commit"]

        lab.threshold = 10.0                    # nothing beats its parent by 10 bits per byte
        disc = lab.step()
        assert disc["decision"] == "discard" and disc["decided_by"] == "rule" and disc["parent_id"] == "0002"
        assert "does not beat parent 0002" in disc["decision_reason"]
        assert lab.parent_id == "0002"         # a discard leaves the kept line alone

        # the verdict is the rule: val_bpb against the parent's
        v = lab.verdict(disc["id"])
        assert v["gain"] == pytest.approx(kept["val_bpb"] - disc["val_bpb"])

        # continue from the baseline: the next kept experiment branches the tree
        lab.checkout("0001")
        assert lab.parent_id == "0001"
        assert (lab_dir / "train.py").read_text() == lab.workspace.source("0001")
        lab.threshold = -1.0
        branch = lab.step()
        assert branch["parent_id"] == "0001" and branch["decision"] == "keep"
        assert lab.parent_id == branch["id"]
        assert "lines/0002" in lab.workspace.lines()                  # the old line is still there
        assert not lab.workspace._is_ancestor(lab.workspace.commit("0002"), lab.workspace.commit(branch["id"]))
        never = lab.ledger.start("0001", "x", "", "never finished", "human", BUDGET, {})
        with pytest.raises(ValueError, match="ran ok"):
            lab.checkout(never)

        rows = [line.split("\t") for line in (lab_dir / "results.tsv").read_text().splitlines()[1:]]
        assert [r[3] for r in rows] == ["keep", "keep", "discard", "keep"]
        assert rows[1][0] == kept["commit"][:7]
        hist = lab.history()
        assert list(hist["id"][:4]) == ["0001", "0002", "0003", "0004"]
        assert "<table" in lab._repr_html_() and "0004" in lab._repr_html_()


def test_reject_reason_and_feedback_reach_next_context(lab_dir):
    prop = LRProposer()
    with _open(lab_dir, proposer=prop) as lab:
        rec = lab.step(approve=lambda p: "learning rate changes are boring")
        assert rec["status"] == "rejected" and rec["decided_by"] == "human"
        assert rec["decision_reason"] == "learning rate changes are boring"
        assert (lab_dir / "runs" / rec["id"]).exists() is False      # never ran
        assert len((lab_dir / "results.tsv").read_text().splitlines()) == 2   # header + baseline only

        ctx = lab.context(feedback="try the warm-down instead")
        last = ctx.history[-1]
        assert (last.exp_id, last.status, last.reason) == (rec["id"], "rejected", "learning rate changes are boring")
        # the reason is feedback too (the offline proposer reads only feedback), with the step's own
        assert ctx.feedback == "learning rate changes are boring try the warm-down instead"
        assert rec["source_hash"] in ctx.seen_hashes                 # never proposed twice
        assert ctx.parent_id == "0001" and ctx.parent_val_bpb == pytest.approx(lab.best()["val_bpb"])

        # False rejects with no reason
        rec2 = lab.step(approve=lambda p: False)
        assert rec2["status"] == "rejected" and rec2["decision_reason"] == ""
        assert prop.contexts[-1].history[-1].exp_id == rec["id"]    # the proposer saw the rejection


def test_human_edit_is_recorded_as_human(lab_dir):
    with _open(lab_dir) as lab:
        def edit(p):
            return p.source.replace("WARMDOWN_FRAC = 0.4", "WARMDOWN_FRAC = 0.5")

        rec = lab.step(approve=edit)
        assert rec["status"] == "ok" and rec["proposer"] == "human"
        assert rec["proposal_meta"]["edited_from"] == "lrtest"
        assert rec["description"].endswith("(edited)")
        assert "+WARMDOWN_FRAC = 0.5" in rec["diff"] and "MATRIX_LR" in rec["diff"]
        assert "WARMDOWN_FRAC = 0.5" in (lab_dir / "runs" / rec["id"] / "train.py").read_text()

        # a human edit that cannot run is refused before anything is recorded
        n = len(lab.ledger)
        broken = lambda p: Proposal.from_source(p.source, p.source + "\ndef broken(:\n", "oops")  # noqa: E731
        with pytest.raises(ValueError, match="cannot run"):
            lab.step(approve=broken)
        assert len(lab.ledger) == n

        # submit(): a human proposal made by hand
        p = lab.submit(lab.workspace.source(lab.parent_id).replace("GRAD_CLIP = 0.0", "GRAD_CLIP = 1.0"),
                       "clip gradients at 1")
        assert p.proposer == "human" and p.parent_id == lab.parent_id and "+GRAD_CLIP = 1.0" in p.diff


def test_answer_strings_source_vs_reason():
    assert _looks_like_source("import torch\nX = 1\n")
    assert not _looks_like_source("duplicate")              # parses as Python, but one word is a reason
    assert not _looks_like_source("too big\nand slow to import")


def test_second_lab_on_same_directory_is_refused(lab_dir):
    lab = _open(lab_dir)
    try:
        with pytest.raises(LabLockedError, match="already open"):
            _open(lab_dir)
        # a read-only look is fine while it is open
        assert len(Ledger(lab_dir, readonly=True).records()) == 1
    finally:
        lab.close()
    with _open(lab_dir) as again:          # closed: it opens again
        assert again.parent_id == "0001"


_KILL_SCRIPT = r"""
import sys, pathlib
sys.path.insert(0, {tests!r})
from test_lab import LRProposer
from autoresearch_kit.lab import Lab
marker = pathlib.Path({marker!r})
lab = Lab({lab!r}, budget="400000-tokens", proposer=LRProposer(), verbose=False)
def on_event(ev):
    marker.write_text(str(ev.get("step")))
lab.step(on_event=on_event)
"""


def _run_dir_processes(run_dir: Path) -> list[int]:
    """Live processes working in a run directory (the training child)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # run_dir itself, or run_dir/files where bubblewrap starts the sandboxed child
            if Path(os.readlink(proc / "cwd")) in (run_dir, run_dir / "files") and \
                    (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _kill_run_dir_processes(run_dir: Path) -> None:
    """Kill what still runs in a run directory (only if the test failed to see it die)."""
    for pid in _run_dir_processes(run_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def test_resume_after_sigkill_mid_run(lab_dir, tmp_path):
    before = Ledger(lab_dir, readonly=True).records()
    tsv_before = (lab_dir / "results.tsv").read_text()
    marker = tmp_path / "started"
    script = _KILL_SCRIPT.format(tests=str(ROOT / "tests"), marker=str(marker), lab=str(lab_dir))
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():          # training has started: the experiment is "running"
            assert proc.poll() is None, "the lab process ended before training started"
            assert time.monotonic() < deadline, "training did not start within 60 s"
            time.sleep(0.05)
        running = Ledger(lab_dir, readonly=True).records()[-1]
        assert running["status"] == "running"
        run_dir = (lab_dir / "runs" / "0002").resolve()
        assert _run_dir_processes(run_dir), "the training child is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5      # the child dies with its Lab (Linux: PR_SET_PDEATHSIG)
        while _run_dir_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if sys.platform.startswith("linux"):
            assert _run_dir_processes(run_dir) == [], "the training child outlived the killed Lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_run_dir_processes((lab_dir / "runs" / "0002").resolve())

    with _open(lab_dir) as lab:
        assert lab.recovered == ["0002"]
        recs = lab.ledger.records()
        assert recs[:-1] == before                              # nothing else changed
        assert recs[-1]["status"] == "aborted" and recs[-1]["decision"] is None
        assert lab.parent_id == "0001"
        tsv = (lab_dir / "results.tsv").read_text()
        assert tsv.startswith(tsv_before) and tsv[len(tsv_before):].split("\t")[3] == "aborted"
        # its commit was made before the kill: reopening records it (and its results.tsv row shows it)
        assert recs[-1]["commit"] == lab.workspace.commit("0002") is not None
        assert tsv[len(tsv_before):].split("\t")[0] == recs[-1]["commit"][:7]
        # and the lab goes on from where it was: the next proposal edits the same parent
        ctx = lab.context()
        assert ctx.parent_id == "0001" and recs[-1]["source_hash"] in ctx.seen_hashes


_KILLED_BETWEEN_WRITES = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_lab import BUDGET, LRProposer
from autoresearch_kit.lab import Lab
from autoresearch_kit.runner import RunResult
from autoresearch_kit.workspace import Workspace
lab = Lab({lab!r}, budget=BUDGET, proposer=LRProposer(), verbose=False)
p = lab.propose()          # an experiment that ran ok (its run is not what this test is about)
eid = lab.ledger.start(p.parent_id, p.source_hash, p.diff, p.description, p.proposer, BUDGET, {{}})
sha = lab.workspace.commit_experiment(eid, p.source, p.parent_id, p.description)
lab.ledger.finish(eid, RunResult(status="ok", val_bpb=0.5, seed=42), commit=sha)
Workspace.keep = lambda self, exp_id, **kw: os.kill(os.getpid(), signal.SIGKILL)  # dies before git moves
lab.decide(eid, keep=True)
"""


def test_kill_between_keep_in_ledger_and_git_is_repaired_on_open(lab_dir):
    script = _KILLED_BETWEEN_WRITES.format(tests=str(ROOT / "tests"), lab=str(lab_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rec = Ledger(lab_dir, readonly=True).get("0002")
    assert rec["decision"] == "keep"                                  # the ledger has the keep ...
    assert Workspace(lab_dir).head_id() == "0001"                     # ... git does not, yet
    with _open(lab_dir, verbose=True) as lab:
        assert lab.parent_id == "0002" == lab.workspace.head_id()
        assert (lab_dir / "train.py").read_text() == lab.workspace.source("0002")
        assert lab.context().parent_id == "0002"                      # the next proposal edits it


def test_tip_follows_keeps_discards_and_checkouts_across_sessions(lab_dir):
    with _open(lab_dir) as lab:
        parent_src = lab.workspace.source("0001")
        kept = _committed_run(lab, "0001", parent_src.replace("GRAD_CLIP = 0.0", "GRAD_CLIP = 1.0"), 0.5)
        lab.decide(kept, keep=True)
        assert lab.parent_id == kept == lab.workspace.head_id()
        # a person overrides the keep: the kept line goes back to the candidate's parent
        rec = lab.decide(kept, keep=False, reason="a fluke")
        assert rec["decision"] == "discard" and lab.parent_id == "0001" == lab.workspace.head_id()
        assert (lab_dir / "train.py").read_text() == parent_src and lab.best()["id"] == "0001"
        lab.checkout(kept)                                            # continue from it anyway
    with _open(lab_dir) as lab:                                       # ... which the next session knows
        assert lab.parent_id == kept == lab.workspace.head_id()
        with sqlite3.connect(lab_dir / "ledger.sqlite") as db:        # a lab from before the ledger had a tip
            db.execute("DELETE FROM state")
    with _open(lab_dir) as lab:                                       # adopts the workspace's
        assert lab.parent_id == kept and lab.ledger.tip() == kept


def test_keyboard_interrupt_records_aborted_then_reraises(lab_dir):
    import _thread

    with pytest.warns(UserWarning, match="another budget"):   # the lab's baseline ran under 2000 tokens
        lab = _open(lab_dir, budget="400000-tokens")
    with lab:
        fired = threading.Event()

        def ctrl_c(ev):                       # the user presses Ctrl-C once training is under way
            if not fired.is_set():
                fired.set()
                _thread.interrupt_main()

        with pytest.raises(KeyboardInterrupt):
            lab.autopilot(steps=3, on_event=ctrl_c)
        recs = lab.ledger.records()
        assert [r["status"] for r in recs] == ["ok", "aborted"]   # the loop stopped at the first
        assert "KeyboardInterrupt" in recs[-1]["reason"]

        # the panel's Stop button: aborted, no exception
        stop = threading.Event()
        rec = lab.step(on_event=lambda ev: stop.set(), stop=stop, decide=False)
        assert rec["status"] == "aborted" and "stop" in rec["reason"]


def test_ctrl_c_while_recording_a_finished_run_keeps_its_result(lab_dir, monkeypatch):
    from autoresearch_kit import runner

    monkeypatch.setattr(runner, "run_budgeted", lambda *a, **kw: RunResult(status="ok", val_bpb=0.9, seed=42))
    real, finishes = Ledger._update, []

    def update(self, db, exp_id, values):
        if "finished_at" in values:
            finishes.append(exp_id)
            if len(finishes) == 1:
                raise KeyboardInterrupt      # Ctrl-C just as the result is written
        return real(self, db, exp_id, values)

    monkeypatch.setattr(Ledger, "_update", update)
    with _open(lab_dir) as lab:
        with pytest.raises(KeyboardInterrupt):
            lab.step()
        rec = lab.ledger.records()[-1]
        assert finishes == [rec["id"], rec["id"]]
        assert (rec["status"], rec["val_bpb"]) == ("ok", 0.9) and rec["commit"] == lab.workspace.commit(rec["id"])


def test_autopilot_with_a_broken_baseline_stops_after_one_try(tmp_path, kit_env):
    broken = tmp_path / "broken.py"
    broken.write_text("import os\nprint('no harness here')\n")   # the integrity check refuses it: no run
    with _open(tmp_path / "lab", train=broken) as lab:
        with pytest.raises(RuntimeError, match="did not run"):
            lab.autopilot(steps=2)
        assert [(r["kind"], r["status"]) for r in lab.ledger.records()] == [("baseline", "invalid")]


def test_measure_noise_sets_sigma(lab_dir):
    with _open(lab_dir) as lab:
        n = lab.measure_noise(k=2)
        assert n["exp_id"] == "0001" and len(n["values"]) == 3
        assert n["sigma"] == pytest.approx(statistics.stdev(n["values"]))
        assert n["sigma"] > 0                                  # other seeds give other scores
        recs = lab.ledger.records()
        assert [r["kind"] for r in recs] == ["baseline", "noise", "noise"]
        assert {r["seed"] for r in recs} == {42, 43, 44}
        assert lab.parent_id == "0001" and lab.best()["id"] == "0001"   # reruns are not candidates
        assert len((lab_dir / "results.tsv").read_text().splitlines()) == 2
    with _open(lab_dir) as again:                              # sigma survives a restart
        assert again.sigma == pytest.approx(n["sigma"])


def _committed_run(lab: Lab, parent: str, source: str, val: float) -> str:
    """An experiment recorded and committed as the Lab does, with a made-up score (no run)."""
    h = Proposal.from_source("", source, "").source_hash
    eid = lab.ledger.start(parent, h, "", f"made up {val}", "test", BUDGET, {})
    sha = lab.workspace.commit_experiment(eid, source, parent, f"made up {val}")
    lab.ledger.finish(eid, RunResult(status="ok", val_bpb=val, seed=42), commit=sha)
    return eid


def _fake_run(led: Ledger, parent, kind, val, seed=42, src="a"):
    eid = led.start(parent, src, "", f"{kind} {val}", "test", BUDGET, {}, kind=kind)
    led.finish(eid, RunResult(status="ok", val_bpb=val, seed=seed))
    return eid


def test_within_noise_rule_with_synthetic_scores(tmp_path, kit_env):
    path = tmp_path / "lab"
    lab = _open(path, train=ROOT / "train.py")
    led = lab.ledger
    base = _fake_run(led, None, "baseline", 1.00, src="base")
    _fake_run(led, base, "noise", 1.01, seed=43, src="base")
    _fake_run(led, base, "noise", 0.99, seed=44, src="base")      # sigma = 0.01
    small = _fake_run(led, base, "candidate", 0.995, src="small")  # gain 0.005 < 2 sigma
    big = _fake_run(led, base, "candidate", 0.95, src="big")       # gain 0.05 > 2 sigma
    worse = _fake_run(led, base, "candidate", 1.02, src="worse")
    lab.close()

    lab = _open(path)
    assert lab.sigma == pytest.approx(0.01)
    v = lab.verdict(small)   # at seed 42, the parent's run at 42; SE of a two-run difference: sigma * sqrt(2)
    assert v["within_noise"] and not v["keep"] and v["band"] == pytest.approx(0.02 * 2**0.5)
    assert "within noise" in v["reason"] and f"lab.confirm({small!r})" in v["reason"]
    assert lab.verdict(big)["keep"] and not lab.verdict(big)["within_noise"]
    assert not lab.verdict(worse)["keep"] and not lab.verdict(worse)["within_noise"]

    # a confirmation rerun at seed 43: the mean of the two paired differences, band 2 sigma * sqrt(2/2)
    _fake_run(lab.ledger, small, "rerun", 0.965, seed=43, src="small")
    v2 = lab.verdict(small)
    assert v2["val_bpb"] == pytest.approx(0.98) and v2["band"] == pytest.approx(0.02)
    assert v2["gain"] == pytest.approx(0.025) and v2["pairs"] == 2
    assert v2["keep"] and not v2["within_noise"]                  # gain 0.025 > 0.02

    # without noise measurements the same small gain is simply kept
    lab.sigma = None
    assert lab.verdict(small)["keep"]
    lab.sigma = 0.01
    rec = lab.ledger.decide(worse, "discard", "x", decided_by="human")
    assert "discard [human]" in format_record(rec)
    lab.close()


def test_new_lab_rules_for_starting_files(tmp_path, kit_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # no program.md / train.py here: the templates
    with _open(tmp_path / "a") as lab:
        assert (lab.path / "train.py").read_text() == (ROOT / "autoresearch_kit/templates/train.py").read_text()
    # files in the current directory win over the templates
    (tmp_path / "train.py").write_text(tiny_train_source())
    (tmp_path / "program.md").write_text("# my program\n")
    with _open(tmp_path / "b") as lab:
        assert (lab.path / "program.md").read_text() == "# my program\n"
        assert (lab.path / "train.py").read_text() == tiny_train_source()
    # a directory that already holds its own train.py keeps it (over the current directory's)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "train.py").write_text(tiny_train_source().replace("GRAD_CLIP = 0.0", "GRAD_CLIP = 2.0"))
    with _open(tmp_path / "own") as lab:
        assert "GRAD_CLIP = 2.0" in (lab.path / "train.py").read_text()
        assert "GRAD_CLIP = 2.0" in lab.workspace.source("kept")
    # an explicit path that does not exist is an error that says what to do, and creates nothing
    with pytest.raises(FileNotFoundError, match="pass the path of an existing train.py"):
        _open(tmp_path / "c", train="nope.py")
    assert not (tmp_path / "c" / "ledger.sqlite").exists()
    # a git repository that is not a lab is refused (its train.py would be overwritten)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a lab"):
        _open(repo)


def test_default_proposer_follows_the_environment_like_the_cli(tmp_path, kit_env, monkeypatch):
    for k in ("AUTORESEARCH_PROPOSER", "AUTORESEARCH_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    with Lab(tmp_path / "a", verbose=False) as lab:
        assert lab.proposer.name == "mutate"                     # offline by default
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")   # README: the endpoint switches it
    with Lab(tmp_path / "a", verbose=False) as lab:
        assert lab.proposer.name == "llm"
    monkeypatch.setenv("AUTORESEARCH_PROPOSER", "mutate")        # ... unless forced
    with Lab(tmp_path / "a", verbose=False) as lab:
        assert lab.proposer.name == "mutate"


def test_missing_data_is_a_clear_error_and_records_nothing(lab_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "nothing"))
    with _open(lab_dir) as lab:
        with pytest.raises(FileNotFoundError, match="autoresearch prepare"):
            lab.step()
        assert len(lab.ledger) == 1


def test_a_file_is_not_a_lab(tmp_path, kit_env):
    f = tmp_path / "notes.txt"
    f.write_text("not a lab")
    with pytest.raises(ValueError, match="a lab is a directory"):
        Lab(f)
    assert f.read_text() == "not a lab"          # nothing was created or overwritten


def test_switching_proposer_by_name_drops_the_old_proposers_settings(lab_dir):
    with _open(lab_dir, proposer="llm", proposer_kwargs={"base_url": "http://127.0.0.1:9/v1", "model": "m"}) as lab:
        lab.proposer = "mutate"
        assert type(lab.proposer).__name__ == "MutateProposer"   # was: TypeError about base_url/model


# ---- hand edits, a lost ledger or .git, a full disk, undecided experiments --------------------


def _fake_runs(monkeypatch, *scores):
    """runner.run_budgeted answering with these val_bpb in turn (the Lab's bookkeeping is what is tested)."""
    from autoresearch_kit import runner

    it = iter(scores)
    monkeypatch.setattr(runner, "run_budgeted",
                        lambda *a, **kw: RunResult(status="ok", val_bpb=next(it), seed=42, peak_memory_gb=0.1))


def _edit(src: str) -> str:
    return src.replace("MATRIX_LR =", "MATRIX_LR = 0.02  # by hand\nOLD_MATRIX_LR =", 1)


def test_a_hand_edit_of_train_py_is_the_next_experiment_never_overwritten(lab_dir, monkeypatch):
    _fake_runs(monkeypatch, 9.0, 0.5)
    proposer = LRProposer()
    with _open(lab_dir, proposer=proposer) as lab:
        kept = (lab_dir / "train.py").read_text()
        mine = _edit(kept)
        (lab_dir / "train.py").write_text(mine)
        assert lab.hand_edit() == mine
        rec = lab.step()                                   # the edit runs, the agent is not asked
        assert proposer.contexts == []
        assert (rec["proposer"], rec["description"]) == ("human", "hand edit of train.py")
        assert lab.workspace.source(rec["id"]) == mine and rec["decision"] == "discard"   # 9.0: worse
        # discarded: train.py is the kept version again, the edit lives on in git
        assert (lab_dir / "train.py").read_text() == kept and lab.hand_edit() is None
        rec = lab.step()                                   # now the agent proposes again
        assert rec["proposer"] == "lrtest" and len(proposer.contexts) == 1


def test_a_hand_edit_blocks_a_keep_that_would_overwrite_it(lab_dir, monkeypatch):
    _fake_runs(monkeypatch, 0.5)
    with _open(lab_dir) as lab:
        rec = lab.step(decide=False)                       # the agent's candidate, undecided
        mine = _edit((lab_dir / "train.py").read_text())
        (lab_dir / "train.py").write_text(mine)            # meanwhile a person edits train.py
        with pytest.raises(ValueError, match=r"train\.py has edits that have not run yet.*Nothing was changed"):
            lab.decide(rec["id"], keep=True)
        with pytest.raises(ValueError, match=f"{lab_dir / 'train.py'} has edits"):
            lab.checkout(rec["id"])
        assert lab.ledger.get(rec["id"])["decision"] is None and lab.parent_id == "0001"
        assert (lab_dir / "train.py").read_text() == mine
        lab.decide(rec["id"], keep=False)                  # a discard moves nothing: allowed
        assert (lab_dir / "train.py").read_text() == mine


def test_a_broken_hand_edit_stops_with_the_file_named(lab_dir):
    with _open(lab_dir) as lab:
        (lab_dir / "train.py").write_text((lab_dir / "train.py").read_text() + "\ndef broken(:\n")
        with pytest.raises(ValueError, match=f"{lab_dir / 'train.py'} was edited by hand and cannot run"):
            lab.propose()
        assert len(lab.ledger) == 1


def test_rejecting_a_hand_edit_keeps_it_in_git_and_restores_train_py(lab_dir):
    with _open(lab_dir) as lab:
        kept = (lab_dir / "train.py").read_text()
        (lab_dir / "train.py").write_text(_edit(kept))
        rec = lab.step(approve=lambda p: "not now")
        assert rec["status"] == "rejected" and rec["proposer"] == "human"
        assert lab.workspace.source(rec["id"]) == _edit(kept)
        assert (lab_dir / "train.py").read_text() == kept


def test_a_git_commit_by_hand_on_the_kept_line_becomes_the_next_experiment(lab_dir, monkeypatch):
    _fake_runs(monkeypatch, 0.5)
    mine = _edit((lab_dir / "train.py").read_text())
    (lab_dir / "train.py").write_text(mine)
    git = ["git", "-C", str(lab_dir), "-c", "user.name=me", "-c", "user.email=me@x"]
    subprocess.run([*git, "commit", "-qam", "try a lower learning rate"], check=True)
    hand = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with _open(lab_dir) as lab:                     # opening used to park it as lines/init and overwrite
        assert lab.workspace.lines() == {f"lines/hand-{hand[:7]}": hand}
        assert lab.workspace.head_id() == "0001" and (lab_dir / "train.py").read_text() == mine
        rec = lab.step()
        assert (rec["proposer"], rec["description"]) == ("human", "try a lower learning rate")
        assert rec["decision"] == "keep" and lab.workspace.source("kept") == mine


def test_a_lost_ledger_is_refused_then_recovered_from_results_tsv_and_git(lab_dir, monkeypatch):
    from autoresearch_kit.lab import recover_ledger
    from autoresearch_kit.ledger import LedgerLostError

    _fake_runs(monkeypatch, 0.5, 9.0, 0.4)
    with _open(lab_dir) as lab:
        for _ in range(2):
            lab.step()
        lab.step(approve=lambda p: "no")
        lab.step(decide=False)
        before = {r["id"]: r for r in lab.ledger.records()}
        budget = lab.budget
    tsv = (lab_dir / "results.tsv").read_text()
    (lab_dir / "ledger.sqlite").unlink()
    with pytest.raises(LedgerLostError, match="autoresearch recover"):
        _open(lab_dir)
    assert (lab_dir / "results.tsv").read_text() == tsv and not (lab_dir / "ledger.sqlite").exists()
    (lab_dir / "results.tsv").unlink()                 # both gone: git's refs still say it is a lab
    with pytest.raises(LedgerLostError):
        _open(lab_dir)
    (lab_dir / "results.tsv").write_text(tsv)
    out = recover_ledger(lab_dir)
    assert out["experiments"] == len(before) and out["tip"] == "0002"
    assert (lab_dir / "results.tsv").read_text() == tsv
    with _open(lab_dir) as lab:
        after = {r["id"]: r for r in lab.ledger.records()}
        for k in ("status", "decision", "commit", "parent_id", "source_hash", "description", "kind", "budget"):
            assert {i: r[k] for i, r in after.items()} == {i: r[k] for i, r in before.items()}, k
        # the lab keeps its budget and its data pin (a recovered lab must stay comparable)
        assert lab.budget == budget and after["0001"]["budget"] == str(budget)
        ran = [i for i, r in before.items() if r["proposal_meta"].get("manifest_hash")]
        assert ran and all(after[i]["proposal_meta"]["manifest_hash"] == before[i]["proposal_meta"]["manifest_hash"]
                           for i in ran)
        # scores as precise as results.tsv keeps them
        assert {i: r["val_bpb"] for i, r in after.items()} == \
            {i: (round(r["val_bpb"], 6) if r["val_bpb"] is not None else None) for i, r in before.items()}
        assert lab.parent_id == "0002" and lab.undecided()[0]["id"] == "0005"


def test_a_damaged_ledger_is_moved_aside_by_recovery(lab_dir):
    from autoresearch_kit.lab import recover_ledger
    from autoresearch_kit.ledger import LedgerLostError

    (lab_dir / "ledger.sqlite").write_bytes(b"\0garbage" * 512)
    with pytest.raises(LedgerLostError, match="damaged"):
        _open(lab_dir)
    out = recover_ledger(lab_dir)
    assert out["moved_aside"].read_bytes() == b"\0garbage" * 512
    with _open(lab_dir) as lab:
        assert lab.ledger.get("0001")["status"] == "ok" and lab.parent_id == "0001"


def test_a_deleted_git_directory_is_a_clear_error(lab_dir):
    shutil.rmtree(lab_dir / ".git")
    with pytest.raises(RuntimeError, match=r"lost its git repository .*missing.*Nothing was changed"):
        _open(lab_dir)
    assert not (lab_dir / ".git").exists()


def test_a_binary_program_md_names_the_file(lab_dir):
    (lab_dir / "program.md").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    with _open(lab_dir) as lab, pytest.raises(ValueError, match=f"{lab_dir / 'program.md'} is not UTF-8 text"):
        lab.propose()


def test_disk_full_while_recording_keeps_the_result_for_the_next_open(lab_dir, monkeypatch):
    from autoresearch_kit.lab import DiskFullError

    _fake_runs(monkeypatch, 0.625)
    real = Ledger.finish

    def full(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "finish", full)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with _open(lab_dir) as lab:
        with pytest.raises(DiskFullError, match=r"^disk full: the result of experiment 0002 \(val_bpb 0.625000\)"
                                                r".*result.pending.json, recorded when the lab opens next"):
            lab.step()
    assert (lab_dir / "runs" / "0002" / "result.pending.json").is_file()
    monkeypatch.setattr(Ledger, "finish", real)
    with _open(lab_dir) as lab:
        assert lab.pending_recorded == ["0002"] and lab.recovered == []
        rec = lab.ledger.get("0002")
        assert (rec["status"], rec["val_bpb"]) == ("ok", 0.625)
        assert lab.undecided()[0]["id"] == "0002"
    assert not (lab_dir / "runs" / "0002" / "result.pending.json").exists()


def test_disk_full_on_a_real_small_filesystem(lab_dir, monkeypatch, tmp_path):
    """A lab on a tiny tmpfs filled up just as the finished run is recorded: real ENOSPC."""
    from autoresearch_kit.lab import DiskFullError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs for a small real filesystem")
    try:
        shutil.copytree(lab_dir, mnt / "lab", ignore=shutil.ignore_patterns("cache"))
        lab_dir = mnt / "lab"
        _fake_runs(monkeypatch, 0.75)
        real = Ledger.finish

        def fill_then_finish(self, *a, **kw):
            if not (mnt / "filler").exists():
                with open(mnt / "filler", "wb") as f:   # the disk fills up while the run trained
                    try:
                        while True:
                            f.write(b"x" * (1 << 16))
                            f.flush()
                    except OSError:
                        pass
            return real(self, *a, **kw)

        monkeypatch.setattr(Ledger, "finish", fill_then_finish)
        monkeypatch.setattr(time, "sleep", lambda s: None)
        with _open(lab_dir) as lab:
            try:
                lab.step(decide=False)
                raised = None
            except DiskFullError as e:
                raised = str(e)
        assert raised is None or raised.startswith("disk full: ")
        (mnt / "filler").unlink()
        monkeypatch.setattr(Ledger, "finish", real)
        with _open(lab_dir) as lab:
            rec = lab.ledger.get("0002")
            assert (rec["status"], rec["val_bpb"]) == ("ok", 0.75)     # never lost as "aborted"
        assert "\tundecided\t" in (lab_dir / "results.tsv").read_text().splitlines()[-1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_one_run_at_a_time_per_lab_and_a_second_view_can_attach(lab_dir, monkeypatch):
    from autoresearch_kit import runner

    started, release = threading.Event(), threading.Event()

    def slow_run(*a, on_event=None, **kw):
        on_event({"step": 0, "loss": 5.0, "progress": 0.1})
        started.set()
        release.wait(30)
        on_event({"step": 1, "loss": 4.0, "progress": 1.0})
        return RunResult(status="ok", val_bpb=0.5, seed=42)

    monkeypatch.setattr(runner, "run_budgeted", slow_run)
    with _open(lab_dir) as lab:
        first = lab.propose()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", lab.run_budgeted(first)))
        t.start()
        assert started.wait(30)
        assert lab.running["exp_id"] == "0002" and lab.running["events"][0]["step"] == 0   # what a late view missed
        seen = []
        stop_watching = lab.watch_run(seen.append)
        with pytest.raises(RuntimeError, match="experiment 0002 .* is running in this lab: one run at a time"):
            lab.run_budgeted(lab.submit(_edit(first.source), "a second one"))
        release.set()
        t.join(30)
        stop_watching()
        assert out["r"].val_bpb == 0.5 and [e["step"] for e in seen] == [1] and lab.running is None
        assert [r["id"] for r in lab.ledger.records()] == ["0001", "0002"]    # the refused run left no record


def test_timeout_phase_reads_a_real_training_curve(lab_dir):
    from autoresearch_kit.lab import timeout_phase

    with _open(lab_dir) as lab:
        base = lab.ledger.get("0001")          # a real run: the harness's own step events
    assert len(base["curve"]) >= 4
    # had the hard limit struck after this run's last step, it was past its budget: the machine's
    assert timeout_phase({**base, "status": "timeout"}) == "evaluation"
    half = base["curve"][: len(base["curve"]) // 2]
    assert timeout_phase({**base, "status": "timeout", "curve": half}) == "training"
    assert timeout_phase({**base, "status": "timeout", "curve": []}) == "setup"


def test_a_machine_timeout_is_named_and_sizes_the_next_hard_limit(lab_dir, monkeypatch):
    from autoresearch_kit import runner

    monkeypatch.delenv("AUTORESEARCH_HARD_LIMIT", raising=False)
    monkeypatch.delenv("AUTORESEARCH_GRACE", raising=False)
    limits = []

    def timed_out(*a, hard_limit=None, **kw):
        limits.append(hard_limit)
        return RunResult(status="timeout", reason="killed at the hard limit of 400 s (after step 15)",
                         curve=[{"step": 14, "progress": 0.94}, {"step": 15, "progress": 1.0}],
                         extra={"hard_limit": 400.0})

    monkeypatch.setattr(runner, "run_budgeted", timed_out)
    with _open(lab_dir) as lab:
        assert lab._sized_hard_limit() is None            # the baseline's few seconds fit the default
        rec = lab.step()
        assert "the machine was too slow or busy, not a fault of train.py" in rec["reason"]
        assert lab._sized_hard_limit() == 800              # twice the limit it outgrew
        lab.step()
    assert limits == [None, 800]


# ---- the data pin ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Prepared data other than tiny_data (other documents, same bytes tokenizer)."""
    import numpy as np
    from conftest import _fake_docs

    from autoresearch_kit.data.shards import bytes_encoding, write_prepared

    enc = bytes_encoding()
    rng = np.random.default_rng(7)

    def stream(docs):
        return np.array([t for d in docs for t in [256, *enc.encode_ordinary(d)]], dtype=np.uint16)

    d = tmp_path_factory.mktemp("other") / "other-bytes"
    write_prepared(d, encoding=enc, train=stream(_fake_docs(300, rng)), val=stream(_fake_docs(50, rng)),
                   source={"dataset": "other", "sha256": "other-text"}, tokenizer_info={"kind": "bytes"})
    return d


def test_a_lab_is_pinned_to_the_data_it_was_created_with(lab_dir, tiny_data, other_data, monkeypatch, tmp_path):
    from autoresearch_kit.data.prepare import manifest_hash

    pin = __import__("json").loads((lab_dir / "data.json").read_text())
    assert pin["manifest_hash"] == manifest_hash(tiny_data) and pin["data"].startswith("fake, bytes")
    with _open(lab_dir) as lab:
        assert lab.ledger.get("0001")["proposal_meta"]["manifest_hash"] == pin["manifest_hash"]
    monkeypatch.setenv("AUTORESEARCH_DATA", str(other_data))
    with pytest.raises(ValueError) as e:
        _open(lab_dir)
    msg = str(e.value)
    assert "\n" not in msg and "pinned to fake, bytes" in msg and "other, bytes" in msg
    assert manifest_hash(tiny_data) in msg and manifest_hash(other_data) in msg and "rebaseline" in msg
    with _open(lab_dir, data_dir=tiny_data) as lab:        # the refusal released the lock; the right data opens
        assert len(lab.ledger) == 1
    copy = tmp_path / "same-data-elsewhere"                # the same data prepared again / moved: still the lab's
    shutil.copytree(tiny_data, copy)
    with _open(lab_dir, data_dir=copy) as lab:
        assert lab.data_pin["manifest_hash"] == pin["manifest_hash"]


def test_a_lab_pins_its_scored_set_and_every_record_shows_it(lab_dir, monkeypatch):
    # issue 11: the scored text and the evaluation context are pinned when the lab is made
    # (from the baseline train.py's CPU_SEQ_LEN, 32 in the tiny one) and are the same for a
    # candidate that lowers SEQ_LEN, or runs after someone changed the environment.
    pin = __import__("json").loads((lab_dir / "data.json").read_text())
    assert pin["eval"] == {"tokens": 4096, "seq_len": 32,
                           "seq_len_from": "CPU_SEQ_LEN of the baseline train.py (cpu)"}
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "1000")
    monkeypatch.setenv("AUTORESEARCH_EVAL_SEQ_LEN", "8")
    with _open(lab_dir) as lab:
        base = lab.ledger.get("0001")
        assert base["extra"]["eval"]["seq_len"] == 32 and base["extra"]["eval"]["tokens"] == 4096
        assert "[val first 4,096 tok, ctx 32]" in format_record(base)
        src = lab.workspace.source("0001").replace("CPU_SEQ_LEN = 32", "CPU_SEQ_LEN = 16")
        lab.run_budgeted(lab.submit(src, "shorter context"))
        rec = lab.ledger.records(curves=False)[-1]
        assert rec["status"] == "ok", rec["reason"]
        assert (rec["extra"]["eval"]["seq_len"], rec["extra"]["eval"]["tokens"]) == (32, 4096)
        assert "ctx 32" in format_record(rec)
    (lab_dir / "data.json").write_text(__import__("json").dumps({k: v for k, v in pin.items() if k != "eval"}))
    with _open(lab_dir) as lab:                      # a pin from before scored sets: it gets one at its next run
        lab.run_budgeted(lab.submit(src.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.021"), "lr"))
        assert lab.data_pin["eval"]["tokens"] == 1000 and lab.data_pin["eval"]["seq_len"] == 8


def test_prepare_on_other_data_while_a_lab_is_open_stops_the_next_run(lab_dir, other_data, monkeypatch):
    with _open(lab_dir) as lab:
        monkeypatch.setenv("AUTORESEARCH_DATA", str(other_data))   # `prepare` moved LATEST meanwhile
        with pytest.raises(ValueError, match="is pinned to"):
            lab.step()
        assert len(lab.ledger) == 1                                 # nothing ran, nothing recorded


def test_a_lab_from_before_pins_adopts_the_current_data(lab_dir, tiny_data):
    (lab_dir / "data.json").unlink()
    with _open(lab_dir) as lab:
        assert lab.data_pin["data_dir"] == str(tiny_data)


def test_rebaseline_starts_a_new_root_on_the_new_data(lab_dir, tiny_data, other_data, monkeypatch):
    from autoresearch_kit.data.prepare import manifest_hash

    with _open(lab_dir, threshold=-1.0) as lab:
        kept = lab.step()                                  # 0002 kept on the old data
        assert kept["decision"] == "keep"
    monkeypatch.setenv("AUTORESEARCH_DATA", str(other_data))
    with _open(lab_dir, rebaseline=True, threshold=-1.0) as lab:
        assert lab.rebaseline_pending and lab.data_pin["manifest_hash"] == manifest_hash(tiny_data)
        rec = lab.step()                                   # the re-baseline runs first, then the candidate
        recs = lab.ledger.records(curves=False)
        base = recs[2]
        assert base["kind"] == "baseline" and base["parent_id"] is None and base["decision"] == "keep"
        assert "re-baselined from fake, bytes" in base["description"] and "experiment 0002" in base["description"]
        assert lab.workspace.source(base["id"]) == lab.workspace.source("0002")   # the parent's train.py
        assert base["proposal_meta"]["manifest_hash"] == manifest_hash(other_data)
        assert rec["parent_id"] == base["id"] and not lab.rebaseline_pending
        pin = lab.data_pin
        assert pin["manifest_hash"] == manifest_hash(other_data) and pin["baseline"] == base["id"]
        assert pin["history"][-1]["manifest_hash"] == manifest_hash(tiny_data)
        assert lab.best()["id"] in (base["id"], rec["id"])  # never a score made on the old data
        with pytest.raises(ValueError, match="other data"):
            lab.checkout("0002")
        with pytest.raises(ValueError, match="other data"):
            lab.confirm("0002")
        assert lab.ledger.get("0002")["decision"] == "keep"  # the old line is still there
    with _open(lab_dir) as lab:                              # now pinned to the new data: opens without the flag
        assert lab.baseline()["id"] == base["id"]
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tiny_data))
    with pytest.raises(ValueError, match="is pinned to other, bytes"):
        _open(lab_dir)


# ---- noise by default -----------------------------------------------------------------------------


def _lr_edit(source: str, value: float) -> str:
    lines = [f"MATRIX_LR = {value!r}" if line.startswith("MATRIX_LR =") else line for line in source.splitlines()]
    return "\n".join(lines) + "\n"


def test_a_new_lab_measures_its_noise_and_keeps_no_within_noise_gain(tmp_path, kit_env, monkeypatch):
    """Regression: with nothing asked, a gain smaller than the seed noise is not kept."""
    monkeypatch.delenv("AUTORESEARCH_NOISE_RUNS")
    (tmp_path / "train.py").write_text(tiny_train_source())
    with _open(tmp_path / "lab", train=tmp_path / "train.py") as lab:
        assert lab.noise_runs == 2
        base = lab.baseline()
        recs = lab.ledger.records(curves=False)
        assert [r["kind"] for r in recs] == ["baseline", "noise", "noise"] and [r["seed"] for r in recs] == [42, 43, 44]
        assert lab.sigma == pytest.approx(statistics.stdev(r["val_bpb"] for r in recs)) and lab.sigma > 0
        assert lab.baseline()["id"] == base["id"] and len(lab.ledger) == 3          # measured once
        # tiny LR nudges: with ~15 steps the score moves far less than between seeds; the verdict
        # compares each with the parent at the same seed, so a nudge that "wins" there wins by a
        # gain far inside the noise (up to four nudges until one wins at seed 42)
        src = lab.workspace.source(base["id"])
        lr = float(next(l for l in src.splitlines() if l.startswith("MATRIX_LR =")).split("=")[1].split("#")[0])
        verdicts = []
        for f in (1.0001, 0.9999, 1.001, 0.999):
            eid = lab.run_budgeted(Proposal.from_source(src, _lr_edit(src, lr * f), f"MATRIX_LR x{f}",
                                                        parent_id=base["id"])).extra["exp_id"]
            verdicts.append(lab.verdict(eid))
            if verdicts[-1]["gain"] > 0:
                break
        gains = [v["gain"] for v in verdicts]
        assert all(v["paired"] and v["pairs"] == 1 for v in verdicts)     # at the parent's seed 42
        assert max(gains) > 0 and max(abs(g) for g in gains) < lab.sigma, (gains, lab.sigma)
        win = verdicts[gains.index(max(gains))]
        assert win["within_noise"] and not win["keep"] and "sigma" in win["reason"]
        rec = lab.decide(win["exp_id"])
        assert rec["decision"] == "discard" and rec["within_noise"] and lab.parent_id == base["id"]
        lab.sigma = None                       # what the old default (threshold 0, no noise) did with it
        assert lab.verdict(win["exp_id"])["keep"]
    with _open(tmp_path / "lab") as again:     # sigma is the lab's: it survives a restart, nothing reruns
        assert again.sigma and len(again.ledger) == 3 + len(verdicts)


def test_noise_runs_is_configurable_skippable_and_checked(tmp_path, kit_env, lab_dir, monkeypatch):
    with pytest.raises(ValueError, match="noise_runs must be a whole number"):
        _open(tmp_path / "bad", noise_runs=-1)
    assert not (tmp_path / "bad").exists()                 # refused before anything was created
    monkeypatch.setenv("AUTORESEARCH_NOISE_RUNS", "two")
    with pytest.raises(ValueError, match="AUTORESEARCH_NOISE_RUNS"):
        _open(tmp_path / "bad")
    monkeypatch.setenv("AUTORESEARCH_NOISE_RUNS", "1")
    with _open(lab_dir, noise_runs=0) as lab:              # the argument wins; 0 skips
        assert lab.noise_runs == 0 and lab.baseline()["id"] == "0001" and len(lab.ledger) == 1
    # a lab without sigma (made with noise off) learns it before its next candidate
    with _open(lab_dir) as lab:
        assert lab.noise_runs == 1 and lab.sigma is None
        lab.recheck_below, lab.recheck_until_paired = 0, False   # no reruns: the kinds are exact below
        rec = lab.step()
        assert [r["kind"] for r in lab.ledger.records(curves=False)] == ["baseline", "noise", "candidate"]
        assert lab.sigma is not None and rec["id"] == "0003" and "sigma" in rec["decision_reason"]


# ---- paired decisions -----------------------------------------------------------------------------


def test_paired_rule_with_synthetic_scores(tmp_path, kit_env):
    """A consistent small gain at every seed is real although it is within the unpaired
    band; a gain that flips sign between seeds is noise although its mean is positive."""
    path = tmp_path / "lab"
    lab = _open(path, train=ROOT / "train.py")
    led = lab.ledger
    base = _fake_run(led, None, "baseline", 1.00, src="base")
    _fake_run(led, base, "noise", 1.02, seed=43, src="base")
    _fake_run(led, base, "noise", 0.98, seed=44, src="base")          # sigma 0.02
    steady = _fake_run(led, base, "candidate", 0.995, src="steady")    # -0.005 at every seed
    _fake_run(led, steady, "rerun", 1.0148, seed=43, src="steady")
    _fake_run(led, steady, "rerun", 0.9751, seed=44, src="steady")
    flaky = _fake_run(led, base, "candidate", 0.97, src="flaky")       # +0.03, -0.03, +0.01
    _fake_run(led, flaky, "rerun", 1.05, seed=43, src="flaky")
    _fake_run(led, flaky, "rerun", 0.97, seed=44, src="flaky")
    lab.close()
    lab = _open(path)
    v = lab.verdict(steady)
    assert v["paired"] and v["pairs"] == 3 and v["keep"] and not v["within_noise"]
    assert v["gain"] == pytest.approx(0.0050333, abs=1e-6) and v["band"] < 0.001 and "paired over 3 seeds" in v["reason"]
    assert v["gain"] < 2 * lab.sigma / 3 ** 0.5                  # the unpaired band would have called it noise
    f = lab.verdict(flaky)
    assert f["paired"] and f["gain"] > 0 and f["within_noise"] and not f["keep"]
    lab.close()


def test_confirm_reruns_the_parent_at_the_candidates_seeds(lab_dir):
    with _open(lab_dir, threshold=-1.0) as lab:                 # noise off (conftest): the parent has one run
        cand = lab.step()
        out = lab.confirm(cand["id"], k=2)
        recs = lab.ledger.records(curves=False)
        reruns = [(r["kind"], r["parent_id"], r["seed"]) for r in recs[2:]]
        assert sorted(reruns) == [("noise", "0001", 43), ("noise", "0001", 44),
                                  ("rerun", cand["id"], 43), ("rerun", cand["id"], 44)]
        v = out["verdict"]
        assert v["paired"] and v["pairs"] == 3 and v["paired_se"] > 0 and lab.sigma is not None
        again = lab.confirm(cand["id"], k=1)                      # seed 45 for both, nothing run twice
        assert again["verdict"]["pairs"] == 4 and len(lab.ledger) == len(recs) + 2


def test_the_one_line_record_shows_sigma_beside_the_rules_decision(tmp_path, kit_env):
    lab = _open(tmp_path / "lab", train=ROOT / "train.py")
    base = _fake_run(lab.ledger, None, "baseline", 1.00, src="base")
    _fake_run(lab.ledger, base, "noise", 1.02, seed=43, src="base")
    cand = _fake_run(lab.ledger, base, "candidate", 0.99, src="c")
    lab.close()
    with _open(tmp_path / "lab") as lab:
        line = format_record(lab.decide(cand, keep=None))
        assert "discard (within noise) (sigma 0.014142, gain +0.7 sigma) [rule]" in line   # vs the parent's seed 42
        human = format_record(lab.decide(cand, keep=False, reason="not convinced"))
        assert "sigma" not in human and "discard (within noise) [human]" in human


def _lab_with_made_up_noise(tmp_path):
    """A lab on the tiny train.py whose baseline (committed, kept) and two noise reruns
    have made-up scores 1.00, 1.01, 0.99 (sigma 0.01): (lab, its source, the baseline id)."""
    (tmp_path / "train.py").write_text(tiny_train_source())
    lab = _open(tmp_path / "lab", train=tmp_path / "train.py")
    src = lab.workspace.source("kept")
    h = Proposal.from_source("", src, "").source_hash
    base = lab.ledger.start(None, h, "", "baseline", "baseline", BUDGET, {}, kind="baseline")
    sha = lab.workspace.commit_experiment(base, src, None, "baseline")
    lab.ledger.finish(base, RunResult(status="ok", val_bpb=1.00, seed=42), commit=sha)
    lab.ledger.decide(base, "keep", "baseline", decided_by="rule", tip=base)
    _fake_run(lab.ledger, base, "noise", 1.01, seed=43, src=h)
    _fake_run(lab.ledger, base, "noise", 0.99, seed=44, src=h)
    return lab, src, base


def test_gains_inside_the_band_are_rerun_until_the_lab_knows_its_paired_noise(tmp_path, kit_env):
    """docs/NOISE.md: without a paired SD the one-seed band is sigma * 2 * sqrt(2), several
    times the real SE; a gain inside it is rerun (for real, at seed 43) until two reruns
    have given the lab its paired SD, then only narrow wins are."""
    lab, src, base = _lab_with_made_up_noise(tmp_path)
    a = _committed_run(lab, base, _lr_edit(src, 0.0201), 0.99)    # +0.01 = 0.7 SE: inside the 2 SE band
    b = _committed_run(lab, base, _lr_edit(src, 0.0202), 0.985)
    c = _committed_run(lab, base, _lr_edit(src, 0.0203), 0.99)
    worse = _committed_run(lab, base, _lr_edit(src, 0.0204), 1.02)
    lab.close()
    with _open(tmp_path / "lab") as lab:
        assert not lab.verdict(a)["keep"] and lab.paired_noise()["sd"] is None
        n = len(lab.ledger)
        assert lab.recheck(worse) is False and len(lab.ledger) == n        # a loss teaches nothing worth a run
        lab.recheck_until_paired = False
        assert lab.recheck(a) is False and len(lab.ledger) == n            # off: the band decides alone
        lab.recheck_until_paired = True
        assert lab.recheck(a) is True and lab.recheck(b) is True
        new = lab.ledger.records(curves=False)[n:]
        assert [(r["kind"], r["parent_id"], r["seed"]) for r in new] == [("rerun", a, 43), ("rerun", b, 43)]
        assert lab.paired_noise()["sd"] is not None and lab.paired_noise()["df"] >= 2
        assert lab.recheck(c) is False and len(lab.ledger) == n + 2       # known now: no more learning runs


def test_a_batch_reruns_its_gains_inside_the_band_until_the_lab_knows_its_paired_noise(tmp_path, kit_env):
    """decide_batch learns the paired SD as step does: its candidates that beat the parent
    inside the band are rerun for real at seed 43, best first, until the SD is known; a
    loss is never rerun, and the batch ends decided with at most one keep."""
    lab, src, base = _lab_with_made_up_noise(tmp_path)
    a = _committed_run(lab, base, _lr_edit(src, 0.0201), 0.99)    # inside the band, as above
    b = _committed_run(lab, base, _lr_edit(src, 0.0202), 0.985)   # the batch's best
    worse = _committed_run(lab, base, _lr_edit(src, 0.0204), 1.02)
    lab.close()
    with _open(tmp_path / "lab") as lab:
        assert not any(lab.verdict(i)["keep"] for i in (a, b, worse)) and lab.paired_noise()["sd"] is None
        n = len(lab.ledger)
        lab.decide_batch([a, b, worse])
        reruns = [(r["parent_id"], r["seed"]) for r in lab.ledger.records(curves=False)[n:] if r["kind"] == "rerun"]
        assert reruns[0] == (b, 43) and (worse, 43) not in reruns
        decisions = [lab.ledger.get(i)["decision"] for i in (a, b, worse)]
        assert None not in decisions and decisions.count("keep") <= 1 and decisions[2] == "discard"
        if decisions.count("keep") == 0:   # neither survived: both taught the lab, which now knows its SD
            assert reruns == [(b, 43), (a, 43)] and lab.paired_noise()["sd"] is not None


def test_a_batch_keeps_one_even_when_its_reruns_narrow_every_siblings_band(tmp_path, kit_env, monkeypatch):
    """Reruns (made up here: recorded, not trained) that give the lab its paired SD narrow
    the band of every sibling, also of one rechecked earlier: the batch is judged afresh,
    its best keep wins, and no sibling is kept beside it."""
    lab, src, base = _lab_with_made_up_noise(tmp_path)
    ids = [_committed_run(lab, base, _lr_edit(src, 0.0201 + i / 1e4), v) for i, v in enumerate(SCORES42)]
    lab.close()
    later = dict(zip(ids, SCORES43))

    def made_up_rerun(exp_id, k, kind, on_event=None, stop=None, seeds=None):
        _fake_run(lab.ledger, exp_id, kind, later[exp_id], seed=43, src=lab.ledger.get(exp_id)["source_hash"])
        return lab._scores(exp_id)

    with _open(tmp_path / "lab") as lab:
        monkeypatch.setattr(lab, "_rerun", made_up_rerun)
        assert not any(lab.verdict(i)["keep"] for i in ids) and lab.paired_noise()["sd"] is None
        lab.decide_batch(ids)
        decisions = [lab.ledger.get(i)["decision"] for i in ids]
        assert decisions.count("keep") == 1, [lab.verdict(i)["reason"] for i in ids]
        kept = ids[decisions.index("keep")]
        assert lab.parent_id == kept
        for i in ids:   # every sibling the rule alone would keep now lost to the kept one
            if i != kept and lab.verdict(i)["keep"]:
                assert "a batch keeps only its best" in lab.ledger.get(i)["decision_reason"]
                assert lab.verdict(i)["val_bpb"] >= lab.verdict(kept)["val_bpb"]


SCORES42 = [0.985, 0.99, 0.99]   # the batch's seed-42 scores: each inside the one-seed band
SCORES43 = [0.996, 0.998, None]  # their reruns at seed 43 (the parent scored 1.01 there)


def test_a_narrow_win_is_rerun_once_before_it_is_kept(tmp_path, kit_env):
    """Made-up scores for the parent's three seeds (sigma 0.01) and a 2.5-SE one-run win;
    recheck reruns the candidate for real at seed 43 (the parent has it), and the rule then
    judges the mean of both runs."""
    lab, src, base = _lab_with_made_up_noise(tmp_path)
    narrow = _committed_run(lab, base, _lr_edit(src, 0.0201), 0.965)   # gain 0.035 = 2.5 SE (sigma * sqrt 2)
    wide = _committed_run(lab, base, _lr_edit(src, 0.0199), 0.90)      # 7 SE
    lab.close()
    with _open(tmp_path / "lab") as lab:
        assert lab.sigma == pytest.approx(0.01) and lab.verdict(narrow)["keep"]
        n = len(lab.ledger)
        assert lab.recheck(wide) is False and len(lab.ledger) == n        # a clear win is not rerun
        lab.recheck_below = 0
        assert lab.recheck(narrow) is False and len(lab.ledger) == n      # 0 turns it off
        lab.recheck_below = 3.0
        assert lab.recheck(narrow) is True
        new = lab.ledger.records(curves=False)[n:]
        assert [(r["kind"], r["parent_id"], r["seed"], r["status"]) for r in new] == [("rerun", narrow, 43, "ok")]
        v = lab.verdict(narrow)                   # the real rerun scores nothing like the made-up 0.975
        assert v["val_bpb"] == pytest.approx((0.965 + new[0]["val_bpb"]) / 2) and not v["keep"]
        assert lab.recheck(narrow) is False       # once: it has two runs now


def test_a_lab_with_no_scored_run_follows_new_data_and_relative_paths_resolve(tmp_path, kit_env, other_data,
                                                                              monkeypatch):
    from autoresearch_kit.data.prepare import manifest_hash

    with _open(tmp_path / "lab", train=ROOT / "train.py"):     # `autoresearch init`: pinned, nothing scored
        pass
    monkeypatch.chdir(other_data.parent)
    with _open(tmp_path / "lab", data_dir=other_data.name) as lab:   # a relative --data, other data
        assert lab.data_dir == other_data and lab.data_pin["manifest_hash"] == manifest_hash(other_data)
        assert lab.data_pin["history"]                                # the move is recorded, not silent


def test_token_budget_scores_show_the_compute_they_used():
    base = {"id": "0002", "kind": "candidate", "status": "ok", "val_bpb": 1.5, "training_seconds": 12.34,
            "flops": 4.1e12, "description": "wider", "decision": "keep", "decided_by": "rule", "extra": {}}
    assert "val_bpb 1.500000 (12.3 s, 4.1e+12 FLOPs)" in format_record({**base, "budget": "100k-tokens"})
    assert "(12.3 s, 4.1e+12 FLOPs)" in format_record({**base, "budget": "1e15-flops"})
    assert "FLOPs" not in format_record({**base, "budget": "60s"})   # the clock is the budget: nothing to add


def test_calibrate_turns_a_seconds_budget_into_the_tokens_the_baseline_trains(tmp_path, kit_env):
    (tmp_path / "train.py").write_text(tiny_train_source())
    with Lab(tmp_path / "lab", train=tmp_path / "train.py", budget="3s", proposer=LRProposer(), verbose=False,
             calibrate=True) as lab:
        base = lab.baseline()
        assert base["status"] == "ok", base["reason"]
        recs = lab.ledger.records(curves=False)
        cal, first = recs[0], recs[1]
        assert [cal["kind"], first["kind"]] == ["calibration", "baseline"]
        assert cal["budget"] == "3s" and cal["status"] == "ok" and cal["tokens"] > 0
        assert lab.budget.kind == "tokens" and lab.budget.tokens == cal["tokens"]
        assert first["budget"] == str(lab.budget) and first["tokens"] == cal["tokens"]
        assert lab.parent_id == first["id"]                       # the calibration is never a parent
        rows = (lab.path / "results.tsv").read_text().splitlines()
        assert len(rows) == 2 and "baseline" in rows[1]            # and no results.tsv row
    with _no_warning():                                            # reopened with the same flags: no budget warning
        with Lab(tmp_path / "lab", budget="3s", proposer=LRProposer(), verbose=False, calibrate=True) as lab:
            assert str(lab.budget) == first["budget"]
            assert len(lab.ledger) == 2


def test_a_new_cpu_lab_given_no_budget_calibrates_and_says_so(tmp_path, kit_env, monkeypatch, capsys):
    # docs/NOISE.md: a seconds budget on a CPU measures the load; the default is its tokens
    from autoresearch_kit import config

    monkeypatch.delenv("AUTORESEARCH_BUDGET", raising=False)
    monkeypatch.setitem(config.DEFAULT_SECONDS, "cpu", 3.0)       # the default budget, short for a test
    (tmp_path / "train.py").write_text(tiny_train_source())
    assert Lab(tmp_path / "given", train=tmp_path / "train.py", budget="3s", verbose=False).calibrate is False
    assert Lab(tmp_path / "off", train=tmp_path / "train.py", calibrate=False, verbose=False).calibrate is False
    assert Lab(tmp_path / "gpu", train=tmp_path / "train.py", device="cuda", verbose=False).calibrate is False
    with Lab(tmp_path / "lab", train=tmp_path / "train.py", proposer=LRProposer(), noise_runs=0) as lab:
        assert lab.calibrate is True and str(lab.budget) == "3s"
        base = lab.baseline()
        assert base["status"] == "ok", base["reason"]
        cal = lab.ledger.records(curves=False)[0]
        assert cal["kind"] == "calibration" and cal["budget"] == "3s"
        assert lab.budget.kind == "tokens" and base["budget"] == f"{cal['tokens']}-tokens"
        note = lab.calibration_note()
        assert note.startswith(f"calibrated: 3s trained {cal['tokens']:,} tokens here")
        assert "--no-calibrate" in note
    assert note in capsys.readouterr().out
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "3s")                # a budget asked for is used as given
    assert Lab(tmp_path / "env", train=tmp_path / "train.py", verbose=False).calibrate is False


def test_a_lab_stopped_between_calibration_and_baseline_keeps_the_calibrated_tokens(tmp_path, kit_env, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BUDGET", raising=False)
    (tmp_path / "train.py").write_text(tiny_train_source())
    lab = Lab(tmp_path / "lab", train=tmp_path / "train.py", proposer=LRProposer(), noise_runs=0, verbose=False)
    cal = lab.ledger.start(None, "src", "", "calibration: tokens trained in 60s", "baseline", "60s", {},
                           kind="calibration")
    lab.ledger.finish(cal, RunResult(status="ok", val_bpb=1.0, seed=42, tokens=1536, training_seconds=60.0))
    lab.close()   # killed here: no baseline yet
    with Lab(tmp_path / "lab", proposer=LRProposer(), noise_runs=0, verbose=False) as lab:
        assert str(lab.budget) == "1536-tokens"
        base = lab.baseline()
        assert base["status"] == "ok" and base["budget"] == "1536-tokens", base["reason"]
        assert [r["kind"] for r in lab.ledger.records(curves=False)] == ["calibration", "baseline"]


def test_a_bad_thread_setting_fails_before_the_lab_is_made(tmp_path, kit_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CPU_THREADS", "many")
    with pytest.raises(ValueError, match="AUTORESEARCH_CPU_THREADS must be auto, torch or a positive number"):
        Lab(tmp_path / "lab", train=ROOT / "train.py", verbose=False)
    assert not (tmp_path / "lab").exists()


def test_a_baseline_whose_scoring_takes_long_says_how_to_score_a_span(tmp_path, kit_env):
    lab = _open(tmp_path / "lab", train=ROOT / "train.py", budget="60s")
    eid = lab.ledger.start(None, "base", "", "baseline", "test", "60s", {}, kind="baseline")
    lab.ledger.finish(eid, RunResult(status="ok", val_bpb=1.0, seed=42, tokens=10_000, training_seconds=60.0,
                                     eval_seconds=48.0, eval_tokens=490_000))
    note = lab.eval_note()
    assert note.startswith("scoring 490,000 validation tokens took 48 s per run (training 60 s)")
    assert "AUTORESEARCH_EVAL_TOKENS=N" in note
    assert lab.eval_note({**lab.ledger.get(eid), "eval_seconds": 4.0}) == ""   # 4 s of 60: the default CPU lab
    lab.close()


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.got = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.got if "budget" in str(w.message)], [str(w.message) for w in self.got]


# ---- one-seed verdicts: paired at the parent's seed, a standard error for the runs on each side ------


def test_a_one_seed_candidate_is_compared_with_its_parent_at_the_same_seed(tmp_path, kit_env):
    """After the noise runs the parent has seeds 42-44; a one-run candidate (seed 42) is compared
    with the parent's seed-42 score, not with the mean of its three runs, and its SE is that of
    a difference of two runs; a candidate at a seed the parent lacks is compared unpaired."""
    from autoresearch_kit.lab import _SIGMA_NOTE

    path = tmp_path / "lab"
    lab = _open(path, train=ROOT / "train.py")
    led = lab.ledger
    base = _fake_run(led, None, "baseline", 1.00, src="base")
    _fake_run(led, base, "noise", 0.97, seed=43, src="base")
    _fake_run(led, base, "noise", 0.97, seed=44, src="base")           # mean 0.98, sigma 0.01732
    same = _fake_run(led, base, "candidate", 0.985, src="same")         # seed 42: better than 1.00
    other = _fake_run(led, base, "candidate", 0.90, seed=45, src="other")
    lab.close()
    with _open(path) as lab:
        sigma = statistics.stdev([1.00, 0.97, 0.97])
        assert lab.sigma == pytest.approx(sigma) and lab.paired_noise()["sd"] is None
        v = lab.verdict(same)
        assert v["paired"] and v["pairs"] == 1 and v["parent_val_bpb"] == pytest.approx(1.00)
        assert v["gain"] == pytest.approx(0.015)              # vs the 3-seed mean it would be -0.005: "worse"
        assert v["se"] == pytest.approx(sigma * 2**0.5) and v["band"] == pytest.approx(2 * sigma * 2**0.5)
        assert v["within_noise"] and not v["keep"] and "at the same seed 42" in v["reason"]
        assert "sigma*sqrt(2/1)" in v["reason"] and _SIGMA_NOTE.search(v["reason"])
        u = lab.verdict(other)                                # seed 45: the parent never ran it
        assert not u["paired"] and u["pairs"] == 0 and u["parent_val_bpb"] == pytest.approx(0.98)
        assert u["se"] == pytest.approx(sigma * (1 + 1 / 3) ** 0.5) and u["keep"]
        assert "unpaired" in u["reason"] and _SIGMA_NOTE.search(u["reason"])
        line = format_record(lab.decide(same))
        assert "discard (within noise) (sigma 0.017321, gain +0.9 sigma) [rule]" in line


def test_a_measured_paired_sd_sets_the_one_seed_band(tmp_path, kit_env):
    """Two candidates confirmed at 2 and 3 seeds measure the lab's paired-difference SD (pooled,
    3 df); a new one-seed candidate's band is 2 of it, narrower than the sigma fallback, so a
    gain the fallback calls noise is kept, and the reason says where its SE came from."""
    path = tmp_path / "lab"
    lab = _open(path, train=ROOT / "train.py")
    led = lab.ledger
    base = _fake_run(led, None, "baseline", 1.00, src="base")
    _fake_run(led, base, "noise", 1.02, seed=43, src="base")
    _fake_run(led, base, "noise", 0.98, seed=44, src="base")            # sigma 0.02
    a = _fake_run(led, base, "candidate", 0.99, src="a")                 # diffs 0.010, 0.012
    _fake_run(led, a, "rerun", 1.008, seed=43, src="a")
    lab.close()
    with _open(path) as lab:
        one = lab.paired_noise()                          # 1 df: measured, but too few to use
        assert one["df"] == 1 and one["sd"] is None and one["sd_any"] == pytest.approx(statistics.stdev([0.01, 0.012]))
    lab = _open(path)
    b = _fake_run(lab.ledger, base, "candidate", 0.995, src="b")         # diffs 0.005, 0.006, 0.003
    _fake_run(lab.ledger, b, "rerun", 1.014, seed=43, src="b")
    _fake_run(lab.ledger, b, "rerun", 0.977, seed=44, src="b")
    new = _fake_run(lab.ledger, base, "candidate", 0.99, src="new")      # one seed, gain 0.01 = 0.5 sigma
    lab.close()
    with _open(path) as lab:
        pooled = lab.paired_noise()
        var = (statistics.variance([0.01, 0.012]) + 2 * statistics.variance([0.005, 0.006, 0.003])) / 3
        assert pooled["df"] == 3 and pooled["experiments"] == 2 and pooled["sd"] == pytest.approx(var ** 0.5)
        v = lab.verdict(new)
        assert v["paired"] and v["pairs"] == 1 and v["paired_sd"] == pytest.approx(pooled["sd"])
        assert v["se"] == pytest.approx(pooled["sd"]) and v["band"] == pytest.approx(2 * pooled["sd"])
        assert v["keep"] and v["gain"] == pytest.approx(0.01) and v["gain"] < 2 * lab.sigma * 2**0.5
        assert "paired SD" in v["reason"] and "pooled from 2 experiments, 3 df" in v["reason"]
        assert "sigma" in v["reason"] and "gain +" in v["reason"]
        assert lab.verdict(b)["pairs"] == 3 and "paired over 3 seeds" in lab.verdict(b)["reason"]


def test_sigma_is_pooled_over_every_experiment_with_reruns(tmp_path, kit_env):
    path = tmp_path / "lab"
    lab = _open(path, train=ROOT / "train.py")
    base = _fake_run(lab.ledger, None, "baseline", 1.00, src="base")
    _fake_run(lab.ledger, base, "noise", 1.02, seed=43, src="base")
    c = _fake_run(lab.ledger, base, "candidate", 0.95, src="c")
    _fake_run(lab.ledger, c, "rerun", 0.96, seed=43, src="c")
    _fake_run(lab.ledger, c, "rerun", 0.93, seed=44, src="c")
    lab.close()
    with _open(path) as lab:    # sqrt((1 * var(base) + 2 * var(c)) / 3), not the last measurement's alone
        want = ((statistics.variance([1.00, 1.02]) + 2 * statistics.variance([0.95, 0.96, 0.93])) / 3) ** 0.5
        assert lab.sigma == pytest.approx(want)


def test_measure_noise_on_a_kept_candidate_reruns_its_parent_at_the_same_seeds(lab_dir):
    with _open(lab_dir, threshold=-1.0, noise_runs=0) as lab:     # keeps anything: the tip is a candidate
        cand = lab.step()
        assert cand["decision"] == "keep" and lab.parent_id == cand["id"]
        n = lab.measure_noise(k=1)
        new = [(r["kind"], r["parent_id"], r["seed"]) for r in lab.ledger.records(curves=False)[2:]]
        assert new == [("noise", cand["id"], 43), ("noise", "0001", 43)]
        assert n["exp_id"] == cand["id"] and n["pairs"] == 2 and len(n["values"]) == 2
        assert n["paired_sd"] is None and lab.paired_noise()["df"] == 1       # measured, 1 df
        assert lab.sigma == pytest.approx(n["sigma"]) and n["sigma"] > 0
        v = lab.verdict(cand["id"])
        assert v["paired"] and v["pairs"] == 2
        unpaired = lab.measure_noise(k=1, paired=False)                 # seed 44 for the tip only
        assert unpaired["pairs"] == 2 and len(lab.ledger) == 5


def test_the_noise_measurement_says_when_a_seconds_budget_measures_the_load(tmp_path, kit_env):
    # issue 11 item 5: reruns of one train.py at very different speeds = sigma is the machine's load
    lab = _open(tmp_path / "lab", train=ROOT / "train.py", budget="15s")
    assert lab.load_note() == ""                                  # no baseline yet: nothing to say
    led = lab.ledger
    base = led.start(None, "base", "", "baseline", "test", "15s", {}, kind="baseline")
    led.finish(base, RunResult(status="ok", val_bpb=1.0, seed=42, tokens=36_000, training_seconds=15.0))

    def rerun(seed, tokens):
        eid = led.start(base, "base", "", "noise", "rerun", "15s", {}, kind="noise")
        led.finish(eid, RunResult(status="ok", val_bpb=1.0, seed=seed, tokens=tokens, training_seconds=15.0))

    rerun(43, 35_000)
    assert lab.load_note(base) == ""                              # 2.4k and 2.3k tok/s: the seeds
    rerun(44, 18_000)                                             # 1.2k tok/s: another job took a core
    note = lab.load_note(base)
    assert note.startswith("the same train.py trained at 1.2k to 2.4k tok/s over these runs (x2.0)")
    assert "--calibrate" in note
    lab.close()
    with _open(tmp_path / "lab", budget="36k-tokens") as lab:    # tokens fit whatever the load
        assert lab.load_note(base) == ""


def test_the_verdict_says_when_a_seconds_budget_run_trained_at_another_speed(tmp_path, kit_env):
    # issue 11 item 7: the throughput check is the verdict's, so the panel and the API see it
    lab = _open(tmp_path / "lab", train=ROOT / "train.py", budget="15s")
    led = lab.ledger

    def run(parent, val, tokens, src):
        eid = led.start(parent, src, "", f"run {val}", "test", "15s", {}, kind="baseline" if parent is None else "candidate")
        led.finish(eid, RunResult(status="ok", val_bpb=val, seed=42, tokens=tokens, training_seconds=15.0))
        return eid

    base = run(None, 1.0, 36_000, "base")               # 2.4k tok/s
    slow = run(base, 0.99, 18_000, "slow")               # 1.2k tok/s
    same = run(base, 0.99, 40_000, "same")
    v = lab.verdict(slow)
    assert v["throughput_note"].startswith("1.2k tok/s vs the parent's 2.4k (x0.5)")
    assert lab.verdict(same)["throughput_note"] == ""
    lab.close()
    with _open(tmp_path / "lab", budget="36k-tokens") as lab:   # a token budget is not affected by load
        assert lab.verdict(slow)["throughput_note"] == ""


def test_recovery_reads_the_budget_of_an_older_commit_from_its_run_log(tmp_path):
    # Commits made before the Budget trailer: the harness's first line names the budget.
    from autoresearch_kit.lab import _budget_from_log

    log = tmp_path / "run.log"
    log.write_text("CPU requested: training on CPU\nrun: budget 2k-tokens | seed 42 | data x (vocab 257, ...)\n")
    assert _budget_from_log(log) == "2k-tokens"
    log.write_text("no such line\n")
    assert _budget_from_log(log) is None and _budget_from_log(tmp_path / "missing.log") is None


def test_git_status_in_a_lab_shows_only_what_the_user_changed(lab_dir, monkeypatch):
    import subprocess

    from autoresearch_kit.workspace import GITIGNORE

    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=lab_dir, capture_output=True,
                              text=True, check=True).stdout

    # a lab made by an older kit: its .gitignore lacked the files the lab now writes
    (lab_dir / ".gitignore").write_text("\n".join(line for line in GITIGNORE.splitlines()
                                                  if line not in ("data.json", "results.tsv.*")) + "\n")
    _fake_runs(monkeypatch, 0.5, 0.4)
    with _open(lab_dir) as lab:
        lab.step()
    assert (lab_dir / "data.json").is_file()
    (lab_dir / "results.tsv.before-recover").write_text("x")
    assert status() == ""   # the kit's files (ledger, runs, data pin, ...) are not the user's changes
    (lab_dir / "train.py").write_text((lab_dir / "train.py").read_text() + "# mine\n")
    assert status().split() == ["M", "train.py"]


def test_an_aborted_experiment_written_back_into_train_py_runs_again(lab_dir, monkeypatch):
    # Stopped by a Ctrl-C, a full machine or a lost worker, it never got a result: a person who
    # puts its train.py back (from git) wants it run, not silently put back to the kept version.
    from autoresearch_kit import runner

    results = iter([RunResult(status="aborted", reason="stopped by the user", seed=42),
                    RunResult(status="ok", val_bpb=0.5, seed=42, peak_memory_gb=0.1)])
    monkeypatch.setattr(runner, "run_budgeted", lambda *a, **kw: next(results))
    with _open(lab_dir) as lab:
        first = lab.step()
        assert first["status"] == "aborted"
        source = lab.workspace.source(first["id"])
        (lab_dir / "train.py").write_text(source)
        assert lab.hand_edit() == source
        again = lab.step()
        assert again["proposer"] == "human" and again["status"] == "ok" and again["id"] != first["id"]
        assert lab.workspace.source(again["id"]) == source
