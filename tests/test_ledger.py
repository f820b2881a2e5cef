"""Tests for the ledger: records, results.tsv, best(), recover(), kill safety and the lab lock.

Real SQLite files in tmp_path and real subprocesses (killed with SIGKILL where a test
says so). Run: `python -m pytest tests/test_ledger.py -q`.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from datetime import datetime, timezone

import pytest

from autoresearch_kit.ledger import (
    COLUMNS,
    INTERRUPTED,
    TSV_HEADER,
    LabLockedError,
    Ledger,
    tsv_row,
)
from autoresearch_kit.runner import RunResult

HW = {"device": "cpu", "device_name": "test cpu", "torch": "2.x"}


def _result(status="ok", val_bpb=1.0, **kw) -> RunResult:
    return RunResult(status=status, val_bpb=val_bpb if status == "ok" else None, **kw)


def _run(led: Ledger, parent, desc, status="ok", val_bpb=1.0, kind="candidate", decision=None,
         commit=None, mem=2.0) -> str:
    eid = led.start(parent, f"hash-{desc}", f"diff {desc}", desc, "mutate", "60s", HW, kind=kind)
    led.finish(eid, _result(status, val_bpb, peak_memory_gb=mem, reason="" if status == "ok" else "boom"),
               commit=commit)
    if decision:
        led.decide(eid, decision, reason=f"why {desc}")
    return eid


def _tsv(lab) -> list[str]:
    return (lab / "results.tsv").read_text().splitlines()


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# ---- records --------------------------------------------------------------------------------


def test_record_round_trip_keeps_every_field(tmp_path):
    lab = tmp_path / "lab"
    meta = {"model": "gpt-x", "tokens_used": 1234, "prompt_tokens": 1000, "attempts": 2,
            "api_key": "sk-abcdefghijklmnopqrstuv", "Authorization": "Bearer xyz", "client_secret": "s",
            "nested": {"OPENAI_API_KEY": "k", "max_tokens": 50}, "access-token": "t", "note": "sk-live0123456789abcdef"}
    curve = [{"step": 1, "loss": 4.5, "lr": 1e-3}, {"step": 2, "loss": 4.25, "lr": 1e-3}]
    result = RunResult(status="ok", val_bpb=1.23456789, reason="", steps=17, tokens=34816, flops=1.5e12,
                       peak_memory_gb=3.25, mfu=0.41, params=123456, training_seconds=9.5, total_seconds=12.25,
                       wall_seconds=14.0, eval_seconds=1.75, eval_tokens=4096, budget="10s", seed=7,
                       device="cpu: test", torch_version="2.13.0", log_path="/x/run.log", log_tail="done\n",
                       curve=curve, extra={"causal": True})
    with Ledger(lab) as led:
        base = led.start(None, "h0", "", "baseline", "human", "10s", HW, kind="baseline")
        led.finish(base, _result(val_bpb=1.5))
        eid = led.start(base, "h1", "--- a\n+++ b\n", "lower lr", "llm", "10s", HW, proposal_meta=meta,
                        commit="0123456789abcdef")
        assert led.get(eid)["status"] == "running"
        led.finish(eid, result)
        led.decide(eid, "keep", reason="clear win", decided_by="autopilot", within_noise=True)

    with Ledger(lab) as led:  # everything survives a close and reopen
        rec = led.get("0002")
        assert led.get(2) == rec  # ids may be given as ints
        records = led.records()
        df = led.history()

    assert set(rec) == set(COLUMNS)
    for f in fields(RunResult):  # every RunResult field has a home in the record
        if f.name != "status":
            assert f.name in rec, f.name
            assert rec[f.name] == getattr(result, f.name), f.name
    assert (rec["id"], rec["parent_id"], rec["kind"], rec["status"]) == ("0002", "0001", "candidate", "ok")
    assert (rec["decision"], rec["decision_reason"], rec["decided_by"], rec["within_noise"]) == (
        "keep", "clear win", "autopilot", True)
    assert (rec["source_hash"], rec["diff"], rec["description"], rec["proposer"]) == (
        "h1", "--- a\n+++ b\n", "lower lr", "llm")
    assert rec["commit"] == "0123456789abcdef"
    assert rec["hardware"] == HW
    # credentials never reach the database file; token counts do
    assert rec["proposal_meta"] == {"model": "gpt-x", "tokens_used": 1234, "prompt_tokens": 1000, "attempts": 2,
                                    "nested": {"max_tokens": 50}}
    raw = (lab / "ledger.sqlite").read_bytes() + b"".join(p.read_bytes() for p in lab.glob("ledger.sqlite-*"))
    for secret in (b"sk-abcdefghijklmnopqrstuv", b"Bearer xyz", b"sk-live0123456789abcdef"):
        assert secret not in raw
    stamps = [datetime.fromisoformat(rec[k]) for k in ("created_at", "started_at", "finished_at", "decided_at")]
    assert all(s.utcoffset().total_seconds() == 0 for s in stamps)
    assert stamps == sorted(stamps) and datetime.now(timezone.utc) >= stamps[-1]
    assert [r["id"] for r in records] == ["0001", "0002"] and records[1] == rec
    assert list(df["id"]) == ["0001", "0002"] and df.loc["0002", "val_bpb"] == pytest.approx(1.23456789)
    assert str(df["finished_at"].dtype).startswith("datetime64") and df.loc["0002", "curve"] == curve
    with Ledger(lab, readonly=True) as ro:  # the fast table for panels: everything but the curves
        light = ro.history(curves=False)
    assert light.loc["0002", "curve"] == [] and light.loc["0002", "val_bpb"] == df.loc["0002", "val_bpb"]
    assert list(light.columns) == list(df.columns)


def test_unknown_runresult_fields_are_kept_in_extra(tmp_path):
    with Ledger(tmp_path) as led:
        eid = led.start(None, "h", "", "baseline", "human", "10s", HW, kind="baseline")
        rec = led.finish(eid, {"status": "ok", "val_bpb": 1.1, "tokens_per_second": 9.5, "extra": {"a": 1}})
    assert rec["extra"] == {"a": 1, "tokens_per_second": 9.5}


def test_bad_calls_say_what_to_do(tmp_path):
    with Ledger(tmp_path) as led:
        with pytest.raises(ValueError, match="kind must be one of"):
            led.start(None, "h", "", "x", "human", "10s", HW, kind="trial")
        with pytest.raises(KeyError, match="no experiments yet"):
            led.start("0007", "h", "", "x", "human", "10s", HW)
        eid = led.start(None, "h", "", "x", "human", "10s", HW)
        with pytest.raises(ValueError, match="only a finished run"):
            led.decide(eid, "keep")
        led.finish(eid, _result("crash", reason="CUDA OOM"))
        with pytest.raises(ValueError, match="cannot be kept.*crash.*CUDA OOM"):
            led.decide(eid, "keep")
        with pytest.raises(ValueError, match="is not running"):
            led.finish(eid, _result())
        with pytest.raises(ValueError, match="'keep', 'discard' or None"):
            led.decide(eid, "maybe")
        with pytest.raises(ValueError, match="status must be one of"):
            led.start(None, "h", "", "y", "human", "10s", HW)
            led.finish("0002", {"status": "great"})
        with pytest.raises(KeyError, match="ids run from 0001 to 0002"):
            led.get("0042")
        led.decide(eid, "discard", "crashed")  # a crash may be discarded
    with pytest.raises(RuntimeError, match="closed"):
        led.records()


# ---- results.tsv ----------------------------------------------------------------------------


def test_results_tsv_matches_the_original_format_and_follows_every_change(tmp_path):
    lab = tmp_path / "lab"
    header = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    with Ledger(lab) as led:
        assert _tsv(lab) == [header]
        base = led.start(None, "h0", "", "baseline", "human", "60s", HW, kind="baseline")
        assert _tsv(lab) == [header]  # running: not an outcome yet
        led.finish(base, _result(val_bpb=0.9979, peak_memory_gb=44.04), commit="a1b2c3d4e5f6a7b8")
        assert _tsv(lab) == [header, "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline"]  # the baseline is the first keep

        c1 = led.start(base, "h1", "d", "increase LR to 0.04", "llm", "60s", HW, commit="b2c3d4e5f6")
        led.finish(c1, _result(val_bpb=0.9932, peak_memory_gb=44.2))
        # undecided: a row that says so (`autoresearch decide` or the next run asks)
        assert _tsv(lab)[-1] == "b2c3d4e\t0.993200\t44.2\tundecided\tincrease LR to 0.04"
        led.decide(c1, "keep", "better")
        assert _tsv(lab)[-1] == "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR to 0.04"

        c2 = _run(led, c1, "switch to\tGeLU\nactivation", val_bpb=1.005, decision="discard", commit="c3d4e5f60")
        c3 = _run(led, c1, "double model width (OOM)", status="crash", commit="d4e5f6a7b")
        c4 = _run(led, c1, "too long", status="timeout", commit=None, mem=None)
        led.reject(c1, "h5", "d5", "remove the optimizer", "llm", "pointless")
        c6 = _run(led, c1, "undecided still", val_bpb=0.98)
        c7 = _run(led, c1, "stopped by the user", status="aborted", commit="e5f6a7b8c")
        lines = _tsv(lab)
        # a failed run has the ledger's status; only `crash` carries the original's 0.000000,
        # the others have no score at all (an analysis that drops CRASH rows must not read 0.0)
        assert lines == [header,
                         "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline",
                         "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR to 0.04",
                         "c3d4e5f\t1.005000\t2.0\tdiscard\tswitch to GeLU activation",
                         "d4e5f6a\t0.000000\t0.0\tcrash\tdouble model width (OOM)",
                         "\t\t0.0\ttimeout\ttoo long",
                         "\t0.980000\t2.0\tundecided\tundecided still",
                         "e5f6a7b\t\t0.0\taborted\tstopped by the user"]
        led.decide(c6, "discard", "")
        assert _tsv(lab)[-2] == "\t0.980000\t2.0\tdiscard\tundecided still"
        led.decide(c6, None)  # a decision can be withdrawn; the row says undecided again
        assert _tsv(lab)[-2] == "\t0.980000\t2.0\tundecided\tundecided still"
        assert len(_tsv(lab)) == 8
        led.decide(c2, "keep", "changed my mind")
        assert _tsv(lab)[3].endswith("\tkeep\tswitch to GeLU activation")
        assert (c3, c4) == ("0004", "0005")

    # the original analysis notebook's reading of the file still works
    import pandas as pd

    df = pd.read_csv(lab / "results.tsv", sep="\t")
    assert list(df.columns) == list(TSV_HEADER)
    df["status"] = df["status"].str.strip().str.upper()
    assert set(df["status"]) == {"KEEP", "CRASH", "TIMEOUT", "UNDECIDED", "ABORTED"}
    valid = df[df["status"] != "CRASH"].reset_index(drop=True)
    assert valid.loc[0, "val_bpb"] == pytest.approx(0.9979)  # baseline_bpb in the notebook
    assert valid["val_bpb"].min() == pytest.approx(0.98)     # no 0.0 from a stopped run
    assert df[df["status"].isin(["TIMEOUT", "ABORTED"])]["val_bpb"].isna().all()
    assert df[df["status"] == "KEEP"]["val_bpb"].min() == pytest.approx(0.9932)
    assert not list(lab.glob(".results.tsv.tmp"))


# ---- best -----------------------------------------------------------------------------------


def test_best_is_the_lowest_kept_run_or_the_baseline(tmp_path):
    with Ledger(tmp_path) as led:
        assert led.best() is None
        base = _run(led, None, "baseline", val_bpb=1.00, kind="baseline")
        assert led.best()["id"] == base  # an undecided baseline is the one to beat
        _run(led, base, "worse kept", val_bpb=1.05, decision="keep")
        assert led.best()["id"] == base
        _run(led, base, "better but discarded", val_bpb=0.90, decision="discard")
        _run(led, base, "better but undecided", val_bpb=0.91)
        _run(led, base, "noise rerun", val_bpb=0.92, kind="noise")
        _run(led, base, "crashed", status="crash")
        assert led.best()["id"] == base
        kept = _run(led, base, "better kept", val_bpb=0.95, decision="keep")
        assert led.best()["id"] == kept
        assert led.best()["val_bpb"] == pytest.approx(0.95)
        led.decide(kept, "discard", "on reflection, noise")
        led.decide(base, "discard", "bad baseline")  # an explicitly discarded baseline no longer counts
        assert led.best()["description"] == "worse kept"


# ---- recover --------------------------------------------------------------------------------


def test_recover_marks_runs_of_a_dead_process_aborted(tmp_path):
    lab = tmp_path / "lab"
    with Ledger(lab) as led:
        _run(led, None, "baseline", kind="baseline")
    # another process starts a run and ends without finishing it (as a kernel that died would)
    code = """
        import sys
        from autoresearch_kit.ledger import Ledger
        led = Ledger(sys.argv[1])
        eid = led.start("0001", "h", "a diff", "in flight", "llm", "60s", {"device": "cpu"})
        print(eid, flush=True)
        import os; os._exit(0)  # no finish, no close
    """
    proc = _python(code, str(lab))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "0002"

    with Ledger(lab) as led:
        before = led.get("0002")
        assert before["status"] == "running"
        mine = led.start("0001", "h3", "", "my own run", "human", "60s", HW)
        assert led.recover() == ["0002"]
        after = led.get("0002")
        assert (after["status"], after["reason"]) == ("aborted", INTERRUPTED)
        assert {k: v for k, v in after.items() if k not in ("status", "reason")} == \
            {k: v for k, v in before.items() if k not in ("status", "reason")}
        assert led.get(mine)["status"] == "running"  # a run of this very Ledger is alive
        assert _tsv(lab)[-1] == "\t\t0.0\taborted\tin flight"
        assert led.recover() == []


# ---- kill safety ----------------------------------------------------------------------------

_WRITER = """
    import sys
    from autoresearch_kit.ledger import Ledger
    led = Ledger(sys.argv[1])
    led.recover()
    parent = None
    i = 0
    while True:
        eid = led.start(parent, f"h{i}", "diff " * 50, f"exp {i}", "mutate", "60s", {"device": "cpu"},
                        kind="baseline" if parent is None else "candidate")
        if i % 5 == 3:
            led.finish(eid, {"status": "crash", "reason": "boom", "log_tail": "x" * 2000})
        else:
            led.finish(eid, {"status": "ok", "val_bpb": 1.0 - i * 1e-4, "peak_memory_gb": 1.0,
                             "curve": [{"step": s, "loss": 3.0} for s in range(50)]})
            led.decide(eid, "keep" if i % 2 else "discard", "auto", decided_by="autopilot")
        if i % 7 == 6:
            led.reject(eid, "r", "d", "rejected one", "llm", "no")
        parent = parent or eid
        i += 1
        if i == 3:
            print("writing", flush=True)
"""


def _check_consistent(lab) -> list[dict]:
    db = sqlite3.connect(lab / "ledger.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Ledger(lab, readonly=True) as led:
        recs = led.records()
    assert [r["id"] for r in recs] == [f"{i:04d}" for i in range(1, len(recs) + 1)]  # no gap, no half record
    for r in recs:  # a finished record is whole: its run fields came in the same transaction
        if r["status"] == "ok":
            assert r["finished_at"] and r["val_bpb"] is not None
        if r["status"] in ("ok", "crash"):
            assert r["finished_at"]
    expected = ["\t".join(TSV_HEADER)] + [line for r in recs if (line := tsv_row(r)) is not None]
    assert _tsv(lab) == expected
    return recs


def test_a_writer_killed_mid_write_leaves_a_consistent_ledger(tmp_path):
    lab = tmp_path / "lab"
    n_before = 0
    for delay in (0.13, 0.31, 0.22):  # three kills at different points of the write loop
        proc = _python(_WRITER, str(lab))
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        with Ledger(lab) as led:  # opens (lock died with the writer) and rewrites results.tsv
            aborted = led.recover()
            assert len(aborted) <= 1  # at most the run in flight at the kill
        recs = _check_consistent(lab)
        for r in recs:
            if r["status"] == "ok":
                assert len(r["curve"]) == 50
            if r["status"] == "crash":
                assert r["log_tail"] == "x" * 2000
        assert len(recs) > n_before + 3  # the writer made progress each round
        n_before = len(recs)



_SUICIDE = """
    import os, signal, sys
    from autoresearch_kit.ledger import Ledger
    where = sys.argv[2]
    led = Ledger(sys.argv[1])
    base = led.start(None, "h", "", "baseline", "human", "60s", {}, kind="baseline")
    led.finish(base, {"status": "ok", "val_bpb": 1.0})
    eid = led.start(base, "h2", "d", "candidate", "llm", "60s", {})
    if where == "in-transaction":   # SIGKILL after the UPDATE ran, before COMMIT
        real = Ledger._update
        def _update(self, db, exp_id, values):
            real(self, db, exp_id, values)
            os.kill(os.getpid(), signal.SIGKILL)
        Ledger._update = _update
        led.finish(eid, {"status": "ok", "val_bpb": 0.5})
    else:                           # SIGKILL after decide() committed, before results.tsv is rewritten
        led.finish(eid, {"status": "ok", "val_bpb": 0.5})
        Ledger._write_tsv = lambda self, **kw: os.kill(os.getpid(), signal.SIGKILL)
        led.decide(eid, "keep", "better")
"""


@pytest.mark.parametrize("where", ["in-transaction", "before-tsv"])
def test_kill_at_the_two_critical_points_of_a_write(tmp_path, where):
    lab = tmp_path / "lab"
    proc = _python(_SUICIDE, str(lab), where)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == -signal.SIGKILL, err
    stale = _tsv(lab)
    with Ledger(lab) as led:
        rec = led.get("0002")
        if where == "in-transaction":  # the half-done finish() is rolled back entirely
            assert (rec["status"], rec["val_bpb"], rec["finished_at"]) == ("running", None, None)
            assert led.recover() == ["0002"]
        else:  # the decision committed; reopening brought results.tsv up to date
            assert (rec["status"], rec["val_bpb"], rec["decision"]) == ("ok", 0.5, "keep")
            # the kill had left the file one write behind the database: the candidate undecided
            assert stale == ["\t".join(TSV_HEADER), "\t1.000000\t0.0\tkeep\tbaseline",
                             "\t0.500000\t0.0\tundecided\tcandidate"]
            assert _tsv(lab)[-1] == "\t0.500000\t0.0\tkeep\tcandidate"
    recs = _check_consistent(lab)
    assert [r["status"] for r in recs] == ["ok", "aborted" if where == "in-transaction" else "ok"]


def test_tip_is_recorded_with_the_decision_and_survives_reopening(tmp_path):
    with Ledger(tmp_path / "lab") as led:
        assert led.tip() is None                                  # nothing kept yet
        base = _run(led, None, "baseline", kind="baseline")
        led.decide(base, "keep", "baseline", decided_by="rule", tip=base)
        cand = _run(led, base, "candidate")
        led.decide(cand, "discard", "worse")                       # no tip given: unchanged
        assert led.tip() == base
        with pytest.raises(KeyError, match="No experiment '0009'"):
            led.set_tip("9")
        with pytest.raises(ValueError, match="cannot be kept"):   # a refused decision moves nothing
            led.decide(_run(led, base, "broken", status="crash"), "keep", tip="0003")
        assert led.tip() == base
        led.set_tip(cand)
    assert Ledger(tmp_path / "lab", readonly=True).tip() == cand


class _CommitFailsOnce:
    """A connection whose next COMMIT fails, as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.failed = conn, False

    def execute(self, sql, *args):
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_failed_commit_or_interrupt_rolls_back_and_the_ledger_keeps_working(tmp_path):
    with Ledger(tmp_path / "lab") as led:
        base = _run(led, None, "baseline", kind="baseline")
        real = led._conn
        led._conn = _CommitFailsOnce(real)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            led.start(base, "h", "", "lost", "human", "60s", HW)
        led._conn = real
        assert len(led) == 1 and not real.in_transaction       # rolled back, nothing half-written
        with pytest.raises(KeyboardInterrupt):                # Ctrl-C inside a write
            with led._tx() as db:
                db.execute("UPDATE experiments SET description = 'half' WHERE id = ?", (base,))
                raise KeyboardInterrupt
        assert led.get(base)["description"] == "baseline" and not real.in_transaction
        eid = led.start(base, "h", "", "next", "human", "60s", HW)   # later writes work
        assert eid == "0002" and _tsv(tmp_path / "lab")[-1].endswith("baseline")


# ---- lock -----------------------------------------------------------------------------------

_HOLDER = """
    import sys, time
    from autoresearch_kit.ledger import Ledger
    led = Ledger(sys.argv[1])
    print("ready", flush=True)
    time.sleep(120)
"""

_OPENER = """
    import sys
    from autoresearch_kit.ledger import Ledger, LabLockedError
    try:
        Ledger(sys.argv[1])
    except LabLockedError as e:
        print("LOCKED", e)
    else:
        print("OPENED")
"""


def test_second_open_fails_clearly_and_the_lock_dies_with_its_process(tmp_path):
    lab = tmp_path / "lab"
    led = Ledger(lab)
    eid = led.start(None, "h", "", "baseline", "human", "60s", HW, kind="baseline")

    # another process is refused, with who holds it and what to do
    out = _python(_OPENER, str(lab)).communicate(timeout=60)[0]
    assert out.startswith("LOCKED")
    assert f"process {os.getpid()}" in out and "lab.close()" in out and "readonly=True" in out
    # so is this process
    with pytest.raises(LabLockedError, match="current process"):
        Ledger(lab)
    # read-only access works meanwhile and sees live writes, but cannot write
    ro = Ledger(lab, readonly=True)
    assert ro.get(eid)["status"] == "running"
    led.finish(eid, _result(val_bpb=1.1))
    assert ro.get(eid)["status"] == "ok"
    with pytest.raises(RuntimeError, match="readonly=True"):
        ro.decide(eid, "keep")
    led.close()
    led.close()  # twice is fine
    assert _python(_OPENER, str(lab)).communicate(timeout=60)[0].strip() == "OPENED"

    # a holder killed with SIGKILL leaves no stale lock behind
    holder = _python(_HOLDER, str(lab))
    assert holder.stdout.readline().strip() == "ready"
    with pytest.raises(LabLockedError, match=f"process {holder.pid} "):
        Ledger(lab)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with Ledger(lab) as led2:
        assert led2.get(eid)["val_bpb"] == pytest.approx(1.1)
    assert ro.get(eid)["status"] == "ok"
    ro.close()


def test_readonly_needs_an_existing_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="No ledger"):
        Ledger(tmp_path / "nowhere", readonly=True)
    with Ledger(tmp_path / "lab") as led:
        _run(led, None, "baseline", kind="baseline")
    # after the writer closed (WAL checkpointed), a read-only open still reads everything
    with Ledger(tmp_path / "lab", readonly=True) as ro:
        assert [r["description"] for r in ro.records()] == ["baseline"]
        assert "1 experiments" in repr(ro)


# ---- a lost or damaged ledger; a read-only lab -------------------------------------------------


def _lab_with_history(tmp_path):
    lab = tmp_path / "lab"
    with Ledger(lab) as led:
        base = _run(led, None, "baseline", kind="baseline")
        _run(led, base, "lower lr", val_bpb=0.9, decision="keep", commit="abc1234")
    return lab


@pytest.mark.parametrize("damage", ["deleted", "empty", "garbage", "emptied table"])
def test_a_lost_ledger_stops_with_a_message_and_never_overwrites_results_tsv(tmp_path, damage):
    lab = _lab_with_history(tmp_path)
    tsv = (lab / "results.tsv").read_text()
    db = lab / "ledger.sqlite"
    for suffix in ("-wal", "-shm"):
        (lab / f"ledger.sqlite{suffix}").unlink(missing_ok=True)
    if damage == "deleted":
        db.unlink()
    elif damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 100)
    else:
        con = sqlite3.connect(db)
        con.execute("DELETE FROM experiments")
        con.commit()
        con.close()
    with pytest.raises(Exception, match="autoresearch recover") as info:
        Ledger(lab)
    assert type(info.value).__name__ == "LedgerLostError"
    assert (lab / "results.tsv").read_text() == tsv           # the history is untouched
    assert not db.exists() if damage == "deleted" else True   # and no new ledger was started
    with Ledger(tmp_path / "new") as led:                     # a lab without history still starts
        assert len(led) == 0


def _ro_mount(tmp_path):
    """A tmpfs (root only) we can remount read-only; None when this machine cannot."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        return None
    return mnt


def test_status_reads_a_lab_on_a_read_only_filesystem(tmp_path):
    mnt = _ro_mount(tmp_path)
    if mnt is None:
        pytest.skip("needs root and tmpfs to make a read-only filesystem")
    try:
        lab = mnt / "lab"
        with Ledger(lab) as led:
            base = _run(led, None, "baseline", kind="baseline")
            led.decide(base, "keep", tip=base)
            _run(led, base, "second", val_bpb=0.7, decision="keep")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        # what status/report hit before: a WAL database opened read-only wants to create its -shm
        with pytest.raises(sqlite3.OperationalError):
            sqlite3.connect(f"{(lab / 'ledger.sqlite').as_uri()}?mode=ro", uri=True).execute(
                "SELECT COUNT(*) FROM experiments").fetchone()
        with Ledger(lab, readonly=True) as led:
            assert [r["description"] for r in led.records()] == ["baseline", "second"]
            assert led.best()["val_bpb"] == pytest.approx(0.7)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
