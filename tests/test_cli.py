"""Tests of the `autoresearch` command: init, run (autopilot and the y/n/e/q prompt), status,
report, and the errors a user meets (exit 2, one line, no traceback).

Runs are real and tiny (the shrunk train.py of test_lab, 2000-token budget, the offline
mutate proposer). `main(argv)` is called in-process where possible; `python -m
autoresearch_kit` once as a real subprocess.

    python -m pytest tests/test_cli.py -x -q
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autoresearch_kit.cli import ProgressBar, _lab_dir, main
from autoresearch_kit.lab import Lab, is_lab
from autoresearch_kit.ledger import Ledger
from autoresearch_kit.workspace import Workspace
from test_lab import BUDGET, tiny_train_source

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "autoresearch_kit" / "templates"


def test_templates_match_the_repository_files():
    # `autoresearch init` must start from the same train.py/program.md as the repository
    assert (TEMPLATES / "train.py").read_text() == (ROOT / "train.py").read_text(), \
        "copy train.py to autoresearch_kit/templates/train.py"
    assert (TEMPLATES / "program.md").read_text() == (ROOT / "program.md").read_text(), \
        "copy program.md to autoresearch_kit/templates/program.md"


def test_init_creates_a_lab_from_the_templates(tmp_path, capsys):
    d = tmp_path / "mylab"
    assert main(["init", str(d)]) == 0
    assert is_lab(d)
    assert (d / "program.md").read_text() == (TEMPLATES / "program.md").read_text()
    assert (d / "train.py").read_text() == (TEMPLATES / "train.py").read_text()
    assert Workspace(d).initialized and Workspace(d).head_id() is None   # no experiment yet
    assert f"autoresearch run --lab {d}" in capsys.readouterr().out

    assert main(["init", str(d)]) == 2
    assert "already a lab" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "other"), "--train", str(tmp_path / "missing.py")]) == 2
    assert "missing.py not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_lab(tiny_data, tmp_path_factory):
    """`autoresearch init` + `autoresearch run --steps 2 --budget 2000-tokens --yes`, once."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny_train.py").write_text(tiny_train_source())
    d = root / "lab"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTORESEARCH_DATA", str(tiny_data))
        mp.setenv("AUTORESEARCH_CACHE", str(root / "cache"))
        mp.setenv("AUTORESEARCH_DEVICE", "cpu")
        mp.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        assert main(["init", str(d), "--train", str(root / "tiny_train.py")]) == 0
        rc = main(["run", "--lab", str(d), "--steps", "2", "--budget", BUDGET, "--yes", "--proposer", "mutate"])
    assert rc == 0, out.getvalue()
    return d, out.getvalue()


def test_run_yes_leaves_consistent_ledger_tsv_git_and_plot(cli_lab):
    d, out = cli_lab
    recs = Ledger(d, readonly=True).records()
    assert [r["kind"] for r in recs] == ["baseline", "candidate", "candidate"]
    assert all(r["proposer"] == "mutate" for r in recs[1:])
    assert all(r["decision"] in ("keep", "discard") and r["decided_by"] == "autopilot" for r in recs)
    assert "best: " in out and "0003" in out

    # results.tsv: one row per run, commits = the ledger's = the workspace's
    rows = [line.split("\t") for line in (d / "results.tsv").read_text().splitlines()]
    assert rows[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    ws = Workspace(d)
    for row, rec in zip(rows[1:], recs, strict=True):
        assert row[0] == rec["commit"][:7] == ws.commit(rec["id"])[:7]
        want = "crash" if rec["status"] != "ok" else rec["decision"]
        assert row[3] == want and row[4] == rec["description"]
    # the kept line ends at the last kept experiment, whose train.py is lab/train.py
    last_kept = [r["id"] for r in recs if r["decision"] == "keep"][-1]
    assert ws.head_id() == last_kept
    assert (d / "train.py").read_text() == ws.source(last_kept)
    assert (d / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _copy(cli_lab, tmp_path) -> Path:
    dst = tmp_path / "lab"
    shutil.copytree(cli_lab[0], dst)
    return dst


def test_status_and_report_via_python_m(cli_lab, tmp_path, kit_env):
    d = _copy(cli_lab, tmp_path)
    (d / "progress.png").unlink()
    st = subprocess.run([sys.executable, "-m", "autoresearch_kit", "status", "--lab", str(d)],
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    lines = st.stdout.splitlines()
    assert lines[0].split()[:5] == ["id", "parent", "kind", "status", "val_bpb"]
    assert [line.split()[0] for line in lines[1:4]] == ["0001", "0002", "0003"]
    assert "3 experiments" in st.stdout and "best 0" in st.stdout

    rp = subprocess.run([sys.executable, "-m", "autoresearch_kit", "report", "--lab", str(d)],
                        capture_output=True, text=True, timeout=120)
    assert rp.returncode == 0, rp.stderr
    png = d / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "3 experiments" in rp.stdout


def test_interactive_prompt_driven_by_stdin(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    d = _copy(cli_lab, tmp_path)
    editor = tmp_path / "editor.py"   # a scripted $EDITOR: adds a line to the file it is given
    editor.write_text("import sys\np = sys.argv[1]\nopen(p, 'a').write('\\nHUMAN_WAS_HERE = 1\\n')\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    monkeypatch.delenv("VISUAL", raising=False)
    # step 1: y, then enter = the rule's decision; step 2: e(dit), default description, enter;
    # step 3: n with a reason; step 4: q
    answers = "y\n\ne\n\n\nn\ntoo timid\nq\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    rc = main(["run", "--lab", str(d), "--steps", "4", "--budget", BUDGET, "--proposer", "mutate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("run it? [y]es / [n]o / [e]dit / [q]uit:") >= 4
    assert "\n+" in out and "\n-" in out and "@@" in out      # the diff was shown
    assert "stopped" in out

    recs = Ledger(d, readonly=True).records()[3:]
    assert recs[0]["decision"] in ("keep", "discard")
    assert recs[0]["proposer"] == "mutate" and recs[0]["decided_by"] == "rule"
    assert recs[1]["proposer"] == "human" and recs[1]["proposal_meta"]["edited_from"] == "mutate"
    assert recs[1]["description"].endswith("(edited)") and "+HUMAN_WAS_HERE = 1" in recs[1]["diff"]
    assert recs[2]["status"] == "rejected" and recs[2]["decision_reason"] == "too timid"
    assert len(recs) == 3                                       # q ran nothing


def test_missing_data_is_exit_2_with_the_command_to_run(tmp_path, kit_env, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "nothing"))
    rc = main(["run", "--lab", str(tmp_path / "lab"), "--yes", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "autoresearch prepare" in err and "Traceback" not in err
    assert not is_lab(tmp_path / "lab")                        # nothing was created


def test_lab_in_use_is_exit_2_but_status_still_reads(cli_lab, tmp_path, kit_env, capsys):
    d = _copy(cli_lab, tmp_path)
    with Lab(d, verbose=False):
        assert main(["run", "--lab", str(d), "--yes", "--steps", "1", "--budget", BUDGET]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {os.getpid()}" in err and "autoresearch status" in err
        assert main(["status", "--lab", str(d)]) == 0
        assert "0003" in capsys.readouterr().out


def test_user_errors_are_exit_2(tmp_path, kit_env, capsys):
    assert main(["run", "--lab", str(tmp_path / "x"), "--steps", "-1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["run", "--lab", str(tmp_path / "x"), "--proposer", "replay"]) == 2
    assert "--patches" in capsys.readouterr().err
    assert main(["status", "--lab", str(tmp_path / "x")]) == 2
    assert "not a lab" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "empty")]) == 0
    assert main(["report", "--lab", str(tmp_path / "empty")]) == 2
    assert "no finished experiments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                      # argparse: a bad budget
        main(["run", "--budget", "5 parsecs"])
    assert e.value.code == 2


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autoresearch") and "Traceback" not in err, err
    return err


def test_bad_flags_are_one_line(tmp_path, kit_env, capsys):
    # argparse would print the whole usage block first; a user needs the one line that matters
    with pytest.raises(SystemExit) as e:
        main(["run", "--budget", "5parsecs"])
    assert e.value.code == 2
    err = _one_line_error(capsys)
    assert "parsecs" in err and "use s, min, tokens or flops" in err and "autoresearch run --help" in err
    with pytest.raises(SystemExit) as e:
        main(["run", "--proposer", "gpt"])
    assert e.value.code == 2 and "invalid choice: 'gpt'" in _one_line_error(capsys)


def test_a_file_is_not_a_lab(tmp_path, kit_env, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("not a lab")
    for argv in (["run", "--lab", str(f), "--steps", "1"], ["status", "--lab", str(f)], ["init", str(f)]):
        assert main(argv) == 2, argv
        assert f"{f} is a file, not a lab directory" in _one_line_error(capsys)
    assert f.read_text() == "not a lab"


def test_status_outside_a_lab_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 2
    err = _one_line_error(capsys)
    assert "no lab here" in err and str(tmp_path) in err and "autoresearch init DIR" in err
    assert not (tmp_path / "lab").exists()


def test_unreachable_llm_endpoint_from_the_environment_stops_at_once(cli_lab, tmp_path, kit_env, monkeypatch,
                                                                     capsys):
    import socket

    # a port nothing listens on: bind, read the number, close
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = _copy(cli_lab, tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")   # the README's way to pick an LLM
    monkeypatch.delenv("AUTORESEARCH_PROPOSER", raising=False)
    rc = main(["run", "--lab", str(d), "--steps", "2", "--budget", BUDGET, "--yes"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "proposer llm" in captured.out                       # auto picked the LLM from the environment
    # the endpoint is checked before anything is asked or trained: one line, no give-up count
    assert captured.out.count("proposer gave up") == 0 and captured.err.count("cannot reach") == 1
    assert "cannot reach the LLM endpoint" in captured.err and "--proposer mutate" in captured.err
    assert len(Ledger(d, readonly=True).records()) == 3         # nothing new was recorded


def test_rejection_reason_steers_the_next_proposal(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    from autoresearch_kit import lab as lab_module

    d = _copy(cli_lab, tmp_path)
    seen = []
    real_context = lab_module.Lab.context

    def spy(self, feedback=""):
        ctx = real_context(self, feedback)
        seen.append(ctx.feedback)
        return ctx

    monkeypatch.setattr(lab_module.Lab, "context", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\ntry a higher MATRIX_LR\nq\n"))
    assert main(["run", "--lab", str(d), "--steps", "3", "--budget", BUDGET, "--proposer", "mutate"]) == 0
    # the offline proposer reads hints only from the feedback: the reason must reach it there
    assert seen[:2] == ["", "try a higher MATRIX_LR"], seen


def test_ctrl_c_names_the_aborted_experiment(cli_lab, tmp_path, kit_env):
    import signal
    import time

    d = _copy(cli_lab, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "autoresearch_kit", "run", "--lab", str(d), "--steps", "1",
                             "--budget", "60s", "--yes", "--proposer", "mutate"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:    # the progress bar's first line: the candidate is training
        lines.append(line)
        if line.startswith("exp 0004"):
            break
        assert time.monotonic() < deadline, "".join(lines)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "proposal (mutate): " in out                          # --yes says what it is about to train
    assert "interrupted: experiment 0004 interrupted and recorded as aborted" in out and "Traceback" not in out
    assert Ledger(d, readonly=True).get("0004")["status"] == "aborted"


def test_report_plots_the_ledger_by_experiment_id(tmp_path):
    from autoresearch_kit.plots import load_results, summary

    records = [
        {"id": "0001", "kind": "baseline", "status": "ok", "decision": "keep", "val_bpb": 2.0, "description": "b"},
        {"id": "0002", "kind": "noise", "status": "ok", "decision": None, "val_bpb": 2.01, "description": "b"},
        {"id": "0003", "kind": "candidate", "status": "ok", "decision": "keep", "val_bpb": 1.9, "description": "x"},
        {"id": "0004", "kind": "candidate", "status": "rejected", "decision": None, "val_bpb": None,
         "description": "y"},
        {"id": "0005", "kind": "candidate", "status": "aborted", "decision": None, "val_bpb": None,
         "description": "z"},
    ]
    df = load_results(records)
    # the ids `autoresearch status` shows; a noise rerun repeats the baseline and is no new point
    assert list(df["label"]) == ["0001", "0003", "0005"]
    assert list(df["outcome"]) == ["keep", "keep", "crash"]
    s = summary(records)
    assert (s["experiments"], s["kept"], s["failed"], s["best"]) == (3, 2, 1, 1.9)


def test_throughput_note_on_a_seconds_budget():
    from types import SimpleNamespace

    from autoresearch_kit.cli import _throughput_note
    from autoresearch_kit.config import Budget

    parent = {"id": "0001", "status": "ok", "tokens": 30_000, "training_seconds": 15.0}
    recs = {"0001": parent}
    lab = SimpleNamespace(budget=Budget.parse("15s"), ledger=SimpleNamespace(get=recs.__getitem__))
    fast = {"id": "0002", "parent_id": "0001", "status": "ok", "tokens": 90_000, "training_seconds": 15.0}
    same = {**fast, "tokens": 36_000}
    note = _throughput_note(lab, fast)
    assert "6.0k tok/s vs the parent's 2.0k (x3.0)" in note and "--budget N-tokens" in note
    assert _throughput_note(lab, same) == ""                   # within 1.5x: no note
    lab.budget = Budget.parse("50k-tokens")
    assert _throughput_note(lab, fast) == ""                   # a token budget is not affected by load


def test_default_lab_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _lab_dir(None) == tmp_path / "lab"
    (tmp_path / "ledger.sqlite").write_text("")
    assert _lab_dir(None) == tmp_path                          # the current directory is a lab
    assert _lab_dir("elsewhere") == Path("elsewhere")


def test_progress_bar_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar("exp 0002", stream=out)
    for i, p in enumerate((0.1, 0.2, 0.3, 0.6, 1.0)):
        bar({"step": i, "loss": 3.0 - p, "progress": p, "tok_per_s": 12_000})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4                                     # once per quarter, not per step
    assert lines[0].startswith("exp 0002  10%  step 0  loss 2.9000  12.0k tok/s")
    assert lines[-1].startswith("exp 0002 100%")


# ---- issue 13: undecided experiments, lost ledgers, late or internal-looking errors ------------


def _fake_runs(monkeypatch, *scores):
    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    it = iter(scores)
    monkeypatch.setattr(runner, "run_budgeted",
                        lambda *a, **kw: RunResult(status="ok", val_bpb=next(it), seed=42, peak_memory_gb=0.1))


def test_an_undecided_experiment_is_asked_again_and_has_a_row_and_a_point(cli_lab, tmp_path, kit_env,
                                                                          monkeypatch, capsys):
    d = _copy(cli_lab, tmp_path)
    _fake_runs(monkeypatch, 0.001, 0.002)
    # y to the proposal, then q at the decision prompt: the experiment ran and stays undecided
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\nq\n"))
    assert main(["run", "--lab", str(d), "--steps", "1", "--proposer", "mutate"]) == 0
    out = capsys.readouterr().out
    assert "0004 is undecided: `autoresearch decide`" in out
    row = (d / "results.tsv").read_text().splitlines()[-1].split("\t")
    assert row[1:4] == ["0.001000", "0.1", "undecided"]
    from autoresearch_kit.plots import load_results

    assert load_results(Ledger(d, readonly=True).records()).iloc[-1]["outcome"] == "pending"   # on the plot
    # the next run asks about it first (k), then q at the next proposal
    monkeypatch.setattr(sys, "stdin", io.StringIO("k\nq\n"))
    assert main(["run", "--lab", str(d), "--steps", "1", "--proposer", "mutate"]) == 0
    out = capsys.readouterr().out
    assert "experiment 0004 ran (val_bpb 0.001000" in out and "was not decided" in out
    rec = Ledger(d, readonly=True).get("0004")
    assert (rec["decision"], rec["decided_by"]) == ("keep", "human")
    assert (d / "results.tsv").read_text().splitlines()[-1].split("\t")[3] == "keep"


def test_autoresearch_decide(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    d = _copy(cli_lab, tmp_path)
    _fake_runs(monkeypatch, 0.5, 0.4)
    with Lab(d, verbose=False, proposer="mutate") as lab:
        a = lab.step(decide=False)["id"]
        b = lab.step(decide=False)["id"]
    assert main(["decide", "--lab", str(d), "--keep"]) == 2
    assert "need the experiment" in _one_line_error(capsys)
    assert main(["decide", a, "--lab", str(d), "--discard", "--reason", "looks like luck"]) == 0
    rec = Ledger(d, readonly=True).get(a)
    assert (rec["decision"], rec["decided_by"], rec["decision_reason"]) == ("discard", "human", "looks like luck")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))          # enter = the rule
    assert main(["decide", "--lab", str(d)]) == 0
    assert Ledger(d, readonly=True).get(b)["decision"] == "keep"
    assert main(["decide", "--lab", str(d)]) == 0
    assert "no experiment is waiting" in capsys.readouterr().out
    assert main(["decide", "0001", "--lab", str(d), "--keep"]) == 2
    assert "only a candidate that ran ok" in _one_line_error(capsys)
    # deciding a decided experiment again says what it overrides
    assert main(["decide", a, "--lab", str(d), "--keep"]) == 0
    assert f"experiment {a} was decided before (discard, by human: looks like luck)" in capsys.readouterr().out
    assert Ledger(d, readonly=True).get(a)["decision"] == "keep"


def test_a_lost_ledger_is_one_line_and_autoresearch_recover_rebuilds_it(cli_lab, tmp_path, kit_env, capsys):
    d = _copy(cli_lab, tmp_path)
    tsv = (d / "results.tsv").read_text()
    (d / "ledger.sqlite").unlink()
    for cmd in (["run", "--yes", "--steps", "1", "--budget", BUDGET], ["status"]):
        assert main([*cmd, "--lab", str(d)]) == 2
        assert "autoresearch recover --lab" in _one_line_error(capsys)
    assert (d / "results.tsv").read_text() == tsv and not (d / "ledger.sqlite").exists()
    assert main(["recover", "--lab", str(d)]) == 0
    assert "rebuilt the ledger" in capsys.readouterr().out
    assert main(["status", "--lab", str(d)]) == 0 and "3 experiments" in capsys.readouterr().out
    assert (d / "results.tsv").read_text() == tsv
    assert main(["recover", "--lab", str(d)]) == 2
    assert "nothing to recover" in _one_line_error(capsys)


def test_late_and_internal_looking_errors_are_one_early_line(cli_lab, tmp_path, kit_env, capsys):
    d = _copy(cli_lab, tmp_path)
    n = len(Ledger(d, readonly=True))
    assert main(["run", "--lab", str(d), "--noise", "-2", "--yes", "--steps", "1"]) == 2
    assert "--noise must be 0" in _one_line_error(capsys)
    for budget, says in (("-3s", "must be positive"), ("1e99-flops", "beyond what one experiment can spend")):
        with pytest.raises(SystemExit) as e:
            main(["run", "--lab", str(d), "--budget", budget])
        assert e.value.code == 2 and says in _one_line_error(capsys)
    (d / "program.md").write_bytes(b"\xff\xfe\0binary")
    assert main(["run", "--lab", str(d), "--yes", "--steps", "1", "--budget", BUDGET]) == 2
    assert f"{d / 'program.md'} is not UTF-8 text" in _one_line_error(capsys)
    assert len(Ledger(d, readonly=True)) == n                    # nothing trained for any of them
    shutil.rmtree(d / ".git")
    assert main(["run", "--lab", str(d), "--yes", "--steps", "1", "--budget", BUDGET]) == 2
    assert "lost its git repository" in _one_line_error(capsys)


def test_an_editor_that_fails_does_not_end_the_session(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    d = _copy(cli_lab, tmp_path)
    monkeypatch.setenv("EDITOR", "false")                        # exits 1
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("e\nq\n"))
    assert main(["run", "--lab", str(d), "--steps", "1", "--budget", BUDGET, "--proposer", "mutate"]) == 0
    out = capsys.readouterr().out
    assert "error: the editor exited with status 1" in out and out.count("run it? [y]es") == 2


def test_disk_full_is_one_line(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    import sqlite3
    import time

    d = _copy(cli_lab, tmp_path)
    _fake_runs(monkeypatch, 0.5)

    def full(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:   # the disk is full only here (the lab's data stays kit_env's)
        m.setattr(Ledger, "finish", full)
        m.setattr(time, "sleep", lambda s: None)
        assert main(["run", "--lab", str(d), "--yes", "--steps", "1", "--proposer", "mutate"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("autoresearch: error: disk full: the result of experiment 0004 (val_bpb 0.500000)")
    with Lab(d, verbose=False) as lab:
        assert lab.ledger.get("0004")["val_bpb"] == 0.5


def test_status_and_report_on_a_read_only_lab(cli_lab, tmp_path, kit_env, capsys):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to make a read-only filesystem")
    try:
        shutil.copytree(cli_lab[0], mnt / "lab")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert main(["status", "--lab", str(mnt / "lab")]) == 0
        assert "3 experiments" in capsys.readouterr().out
        assert main(["report", "--lab", str(mnt / "lab")]) == 2
        assert "pass --out PATH" in _one_line_error(capsys)
        assert main(["report", "--lab", str(mnt / "lab"), "--out", str(tmp_path / "p.png")]) == 0
        assert (tmp_path / "p.png").stat().st_size > 10_000
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_timeout_outside_the_training_window_is_the_machines(tmp_path):
    from autoresearch_kit.cli import _timeout_note
    from autoresearch_kit.lab import timeout_phase
    from autoresearch_kit.runner import RunResult

    class FakeLab:
        def __init__(self, rec):
            self.ledger = type("L", (), {"get": staticmethod(lambda i: rec)})()

    def rec(curve):
        return {"id": "0001", "status": "timeout", "curve": curve, "extra": {"hard_limit": 145.0}}

    done = rec([{"step": 9, "progress": 0.5}, {"step": 19, "progress": 1.0}])
    assert timeout_phase(done) == "evaluation"
    assert "train.py is not at fault" in _timeout_note(FakeLab(done), done) and "145 s" in _timeout_note(
        FakeLab(done), done)
    assert timeout_phase(rec([])) == "setup" and "before its first training step" in _timeout_note(
        FakeLab(rec([])), rec([]))
    mid = rec([{"step": 3, "progress": 0.4}])
    assert timeout_phase(mid) == "training" and _timeout_note(FakeLab(mid), mid) == ""
    # the last step is logged before the budget check refuses the next one: progress is one step short of 1
    last_step = rec([{"step": 30, "progress": 0.91}, {"step": 33, "progress": 0.97}])
    assert timeout_phase(last_step) == "evaluation"
    assert timeout_phase(rec([{"step": 30, "progress": 0.5}, {"step": 33, "progress": 0.56}])) == "training"
    assert timeout_phase(RunResult(status="ok", val_bpb=1.0)) is None


def test_progress_labels_never_overlap_the_legend(tmp_path):
    from autoresearch_kit.plots import progress_plot

    recs, best = [], 1.0
    for i in range(1, 13):   # every experiment kept and improving: the last label sits top right
        best -= 0.01
        recs.append({"id": f"{i:04d}", "kind": "baseline" if i == 1 else "candidate", "status": "ok",
                     "decision": "keep", "val_bpb": best if i < 12 else best + 0.05,
                     "description": f"a long description of experiment {i} that is cut"})
    recs.append({"id": "0013", "kind": "candidate", "status": "aborted", "decision": None, "val_bpb": None,
                 "description": "stopped"})
    recs.append({"id": "0014", "kind": "candidate", "status": "ok", "decision": "discard", "val_bpb": 0.99,
                 "description": "worse"})
    fig = progress_plot(recs)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = fig.legends[0].get_window_extent(r)
    labels = [t.get_window_extent(r) for t in ax.texts]
    assert len(labels) == 12
    assert not [b for b in labels if b.overlaps(legend)]
    ticks = [t.get_window_extent(r) for t in ax.get_xticklabels()] + [ax.xaxis.label.get_window_extent(r)]
    assert not [b for b in ticks if b.overlaps(legend)]      # nor the axis below it


def test_progress_bar_says_the_phase_the_time_and_what_is_left():
    now = [100.0]
    out = io.StringIO()
    bar = ProgressBar("exp 0002", stream=out, clock=lambda: now[0])
    bar.start()
    now[0] = 112.0
    assert bar.phase() == ("starting", "12s")                 # no step yet: the process is starting
    bar.tick()
    bar({"step": 0, "loss": 5.0, "progress": 0.0, "elapsed": 0.0})
    assert bar.phase()[0] == "warm-up"
    bar({"step": 10, "loss": 3.0, "progress": 0.25, "elapsed": 5.0})
    now[0] = 120.0
    assert bar.phase() == ("training", "20s, ~15s of training left")
    bar({"step": 38, "loss": 2.0, "progress": 0.97, "elapsed": 19.4})   # the last step: one short of 1
    now[0] = 150.0
    assert bar.phase() == ("evaluating", "50s, scoring for 30s")
    bar.tick()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "exp 0002 starting (12s)..." and lines[-1] == "exp 0002 evaluating (50s, scoring for 30s)..."


def test_progress_estimate_includes_the_parents_scoring_time():
    from autoresearch_kit.progress import run_phase

    now = [0.0]
    bar = ProgressBar("exp 0003", stream=io.StringIO(), clock=lambda: now[0], eval_s=40.0)
    bar.start()
    bar({"step": 10, "loss": 3.0, "progress": 0.5, "elapsed": 10.0})
    now[0] = 15.0
    assert bar.phase() == ("training", "15s, ~10s of training left then ~40s scoring")
    bar({"step": 20, "loss": 2.0, "progress": 1.0, "elapsed": 20.0})
    now[0] = 45.0
    assert bar.phase() == ("evaluating", "45s, scoring for 30s, ~10s left")
    now[0] = 95.0
    assert bar.phase() == ("evaluating", "95s, scoring for 80s, longer than last time")
    bar.close()
    # the panel's status line asks the same function
    assert run_phase(0.0, bar._events, 95.0, eval_s=40.0) == bar.phase()


def test_run_with_a_local_llm_shows_the_request_and_keeps_the_refused_reply(cli_lab, tmp_path, kit_env, capsys,
                                                                           monkeypatch):
    import json as _json

    from fake_openai import FakeOpenAI, Reply

    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTORESEARCH_MODEL", "AUTORESEARCH_PROPOSER"):
        monkeypatch.delenv(k, raising=False)
    d = _copy(cli_lab, tmp_path)
    good = _json.dumps({"knob": "WARMDOWN_FRAC", "value": 0.3, "why": "more time at the peak lr"})
    with FakeOpenAI([Reply("PROSE-MARKER: a higher learning rate", usage=None), Reply(good, usage=None)],
                    models=("SmolLM2-135M-Instruct",), n_ctx=8192) as server:
        rc = main(["run", "--lab", str(d), "--steps", "1", "--budget", BUDGET, "--yes", "--base-url", server.url,
                   "--timeout", "30"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"asking SmolLM2-135M-Instruct at {server.url} (" in out and "context 8192 (server /props)" in out
    assert "knobs mode via json_schema" in out and "reply 1 refused: the reply is not JSON" in out
    assert "    | PROSE-MARKER: a higher learning rate" in out and "tokens not reported" in out
    rec = Ledger(d, readonly=True).records()[-1]
    assert rec["description"] == "WARMDOWN_FRAC 0.4 -> 0.3" and rec["proposer"] == "llm"
    meta = rec["proposal_meta"]
    assert meta["edit_mode"] == "knobs" and meta["tokens"] is None and meta["prompt_tokens"] is None
    assert [r["reply"] for r in meta["refused"]] == ["PROSE-MARKER: a higher learning rate"]


def test_status_shows_training_seconds_and_the_compute_against_the_parent(cli_lab, tmp_path, kit_env, capsys):
    d = _copy(cli_lab, tmp_path)
    assert main(["status", "--lab", str(d)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train s" in lines[0]
    col = lines[0].index("train s")
    cells = [ln[col:].split()[0] for ln in lines[1:4]]
    assert cells[0][0].isdigit() and all(c.startswith(tuple("0123456789")) for c in cells)
    assert all(" x" in ln[col:col + 16] for ln in lines[2:4])   # candidates: a ratio to the parent's seconds


def test_a_dead_or_misnamed_llm_endpoint_fails_before_the_baseline_trains(tmp_path, kit_env, monkeypatch, capsys):
    import time

    from fake_openai import FakeOpenAI, Reply, free_port

    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTORESEARCH_MODEL", "AUTORESEARCH_PROPOSER"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "fresh"
    assert main(["init", str(d)]) == 0                         # no baseline yet: it would train first
    capsys.readouterr()
    with FakeOpenAI([Reply("unused")], models=("qwen3:8b",)) as server:
        for flags, words in ((["--base-url", f"http://127.0.0.1:{free_port()}/v1"], "start the LLM server"),
                             (["--base-url", server.url[:-3]], "missing /v1"),
                             (["--base-url", server.url, "--model", "qwen3:4b"], "it lists: qwen3:8b")):
            t0 = time.monotonic()
            rc = main(["run", "--lab", str(d), "--steps", "1", "--budget", BUDGET, "--yes", *flags])
            err = capsys.readouterr().err
            assert rc == 2 and time.monotonic() - t0 < 20, err
            assert words in err and len(err.strip().splitlines()) == 1
        assert not server.chats
    assert len(Ledger(d, readonly=True).records()) == 0          # nothing trained, not even the baseline


def test_a_hung_llm_server_stops_the_run_at_once_with_one_message(cli_lab, tmp_path, kit_env, monkeypatch, capsys):
    import time

    from fake_openai import FakeOpenAI, Reply

    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTORESEARCH_MODEL", "AUTORESEARCH_PROPOSER"):
        monkeypatch.delenv(k, raising=False)
    d = _copy(cli_lab, tmp_path)
    with FakeOpenAI([Reply("unused", delay=30)], models=("m",)) as server:
        t0 = time.monotonic()
        rc = main(["run", "--lab", str(d), "--steps", "3", "--budget", BUDGET, "--yes", "--base-url", server.url,
                   "--model", "m", "--edit-mode", "edits", "--timeout", "1", "--max-wait", "2"])
        secs = time.monotonic() - t0
        asked = len(server.chats)
    captured = capsys.readouterr()
    assert rc == 2 and secs < 15, captured
    assert "proposer gave up" not in captured.out                # no "1/3": the run stopped at the first
    text = captured.out + captured.err
    assert text.count("within 2 s") == 1 and "--max-wait" in captured.err   # said once, not twice
    assert asked <= 3 and len(Ledger(d, readonly=True).records()) == 3


def test_a_first_run_on_a_cpu_prepares_the_built_in_corpus_itself(tmp_path, monkeypatch, capsys):
    # `pip install -e . && autoresearch run`: no `autoresearch prepare` first, and no internet.
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    (tmp_path / "tiny_train.py").write_text(tiny_train_source())
    assert main(["init", str(tmp_path / "lab"), "--train", str(tmp_path / "tiny_train.py")]) == 0
    rc = main(["run", "--lab", str(tmp_path / "lab"), "--steps", "1", "--budget", BUDGET, "--yes",
               "--proposer", "mutate", "--noise-runs", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "preparing the built-in corpus" in out.out
    assert (tmp_path / "cache" / "data" / "builtin-bpe4096" / "manifest.json").is_file()
    recs = Ledger(tmp_path / "lab", readonly=True).records()
    assert recs[0]["kind"] == "baseline" and recs[0]["status"] == "ok"
    assert "builtin" in recs[0]["proposal_meta"]["data"]


def test_run_on_a_typo_of_a_lab_refuses_instead_of_starting_a_new_lab(cli_lab, kit_env, capsys):
    d, _ = cli_lab
    typo = d.parent / (d.name + "b")
    assert main(["run", "--lab", str(typo), "--steps", "1", "--budget", BUDGET, "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"--lab {d}" in err and "autoresearch init" in err and len(err.strip().splitlines()) == 1
    assert not typo.exists()   # nothing trained, nothing made


def test_report_out_makes_its_folder_and_a_bad_path_is_one_line(cli_lab, tmp_path, capsys):
    d = _copy(cli_lab, tmp_path)
    assert main(["report", "--lab", str(d), "--out", str(tmp_path / "figs" / "new" / "run1.png")]) == 0
    assert (tmp_path / "figs" / "new" / "run1.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", "--lab", str(d), "--out", str(tmp_path / "figs")]) == 0   # a folder: the png goes in it
    assert (tmp_path / "figs" / "progress.png").is_file()
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["report", "--lab", str(d), "--out", str(tmp_path / "afile" / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "--out" in err and len(err.strip().splitlines()) == 1


def test_the_runs_the_lab_adds_on_its_own_are_shown(tmp_path, kit_env, monkeypatch, capsys):
    # noise reruns of the baseline and the recheck of a narrow result cost a budget each:
    # each gets its line (they used to run silently, ids jumping from 0001 to 0004)
    (tmp_path / "tiny_train.py").write_text(tiny_train_source())
    assert main(["init", str(tmp_path / "lab"), "--train", str(tmp_path / "tiny_train.py")]) == 0
    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    scores = iter([0.5, 0.5002, 0.4998, 0.4999, 0.4999, 0.5, 0.5, 0.5])
    monkeypatch.setattr(runner, "run_budgeted", lambda *a, **kw: RunResult(
        status="ok", val_bpb=next(scores), seed=kw.get("seed", 42), peak_memory_gb=0.1))
    assert main(["run", "--lab", str(tmp_path / "lab"), "--steps", "1", "--budget", BUDGET, "--yes",
                 "--proposer", "mutate", "--noise-runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "noise: rerun of 0001 with seed 43 starting..." in out
    assert "0002  noise" in out and "undecided" not in out   # a rerun has nothing to decide
    assert "0004: beats its parent by" in out and "one more seed first" in out, out
    assert "rerun: rerun of 0004 with seed 43 starting..." in out and "0005  rerun" in out
    recs = Ledger(tmp_path / "lab", readonly=True).records()
    shown = {line.split()[0] for line in out.splitlines() if line[:4].isdigit()}
    assert {r["id"] for r in recs} <= shown, "every experiment the lab ran has a line"
