"""Tests for the git-backed workspace: the kept line, experiment refs, diff, checkout.

Every test drives a real git repository in tmp_path, with the user's git configuration
made hostile or absent to prove the workspace does not depend on it.
Run: `python -m pytest tests/test_workspace.py -q`.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from autoresearch_kit.ledger import Ledger
from autoresearch_kit.runner import RunResult
from autoresearch_kit.workspace import Workspace

PROGRAM = "# goal\nLower val_bpb.\n"


def _src(lr: float, extra: str = "") -> str:
    return f'"""tiny train.py"""\nLR = {lr}\nDEPTH = 2\n{extra}print("train", LR)\n'


@pytest.fixture(autouse=True)
def _no_git_identity(tmp_path, monkeypatch):
    """A machine where git was never configured, plus a global config that would break commits."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[commit]\n\tgpgsign = true\n[gpg]\n\tprogram = false\n"
                                     "[user]\n\tuseConfigOnly = true\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                "EMAIL", "GIT_CONFIG_GLOBAL"):
        monkeypatch.delenv(var, raising=False)


def _git(lab, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", "-C", str(lab), *args], capture_output=True, text=True, check=True,
                          env=env).stdout


def _session(lab) -> Workspace:
    """Baseline, then: 0002 kept, 0003 discarded, 0004 crashed, 0005 kept (from 0002)."""
    ws = Workspace(lab)
    ws.init(_src(0.01), PROGRAM)
    ws.commit_experiment("0001", _src(0.01), None, "baseline")
    ws.keep("0001")
    ws.commit_experiment("0002", _src(0.02), "0001", "raise LR to 0.02")
    ws.keep("0002")
    ws.commit_experiment("0003", _src(0.05), "0002", "raise LR to 0.05")
    ws.commit_experiment("0004", _src(0.02, "import nonexistent\n"), "0002", "import a missing module")
    ws.commit_experiment("0005", _src(0.02, "DEPTH = 3\n"), "0002", "deeper:\tthree layers")
    ws.keep("0005")
    return ws


def test_kept_line_has_one_commit_per_kept_experiment_and_every_experiment_is_reachable(tmp_path):
    lab = tmp_path / "lab"
    ws = _session(lab)

    # the kept line: newest first, descriptions as messages, init commit at the root
    assert [(e, m) for _, e, m in ws.log()] == [("0005", "deeper: three layers"), ("0002", "raise LR to 0.02"),
                                                ("0001", "baseline"), (None, "init: starting train.py and program.md")]
    assert _git(lab, "log", "--format=%s", "kept").splitlines()[0] == "deeper: three layers"
    assert (lab / "train.py").read_text() == _src(0.02, "DEPTH = 3\n") == ws.source("kept")
    assert ws.head_id() == "0005"

    # discarded and crashed experiments stay reachable, parented on their parent experiment
    refs = _git(lab, "for-each-ref", "--format=%(refname)", "refs/experiments/").split()
    assert refs == [f"refs/experiments/000{i}" for i in range(1, 6)]
    for eid in ("0003", "0004", "0005"):
        assert _git(lab, "rev-parse", f"refs/experiments/{eid}^").strip() == ws.commit("0002")
    assert ws.source("0003") == _src(0.05)
    assert _git(lab, "show", "refs/experiments/0004:train.py") == _src(0.02, "import nonexistent\n")
    assert "Experiment: 0003\nParent: 0002" in _git(lab, "log", "-1", "--format=%B", "refs/experiments/0003")

    # only train.py and program.md are versioned; the lab's other files are ignored
    assert _git(lab, "ls-tree", "--name-only", "kept").split() == ["program.md", "train.py"]
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "results.tsv", "progress.png", ".lock"):
        (lab / name).write_text("x")
    (lab / "runs" / "0003").mkdir(parents=True)
    (lab / "runs" / "0003" / "run.log").write_text("log")
    assert _git(lab, "status", "--porcelain") == ""
    # the commits carry the workspace's own identity, not the (absent) user's
    assert _git(lab, "log", "-1", "--format=%an <%ae>", "kept") == "autoresearch_kit <autoresearch_kit@localhost>\n"


def test_diff_between_experiments_is_a_patch_git_can_apply(tmp_path):
    lab = tmp_path / "lab"
    ws = _session(lab)
    d = ws.diff("0003", "0005")
    assert d.startswith("diff --git a/train.py b/train.py")
    assert "-LR = 0.05\n+LR = 0.02\n" in d and "+DEPTH = 3\n" in d
    assert ws.diff("0002", "0002") == ""
    # the patch turns 0003's train.py into 0005's
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "train.py").write_text(ws.source("0003"))
    (scratch / "p.diff").write_text(d)
    subprocess.run(["git", "apply", "p.diff"], cwd=scratch, check=True, capture_output=True)
    assert (scratch / "train.py").read_text() == ws.source("0005")
    # program.md edits by the human are versioned with the next experiment
    (lab / "program.md").write_text(PROGRAM + "Focus: optimizer.\n")
    ws.commit_experiment("0006", _src(0.03), "0005", "LR 0.03")
    assert ws.program("0006").endswith("Focus: optimizer.\n") and ws.program("0005") == PROGRAM
    assert "+Focus: optimizer." in ws.diff("0005", "0006", path=None)
    assert "Focus" not in ws.diff("0005", "0006")


def test_checkout_of_an_older_experiment_grows_a_new_branch_and_keeps_the_old_line(tmp_path):
    lab = tmp_path / "lab"
    ws = _session(lab)
    old_tip = ws.head()
    (lab / "program.md").write_text(PROGRAM + "edited by the human\n")

    ws.checkout("0001")
    assert (lab / "train.py").read_text() == _src(0.01)
    assert (lab / "program.md").read_text().endswith("edited by the human\n")  # the human's file is untouched
    assert ws.head_id() == "0001"
    assert ws.lines() == {"lines/0005": old_tip}
    ws.commit_experiment("0006", _src(0.001), "0001", "lower LR to 0.001")
    ws.keep("0006")

    assert [e for _, e, _ in ws.log()] == ["0006", "0001", None]
    assert [e for _, e, _ in ws.log("lines/0005")] == ["0005", "0002", "0001", None]
    assert _git(lab, "merge-base", "kept", "lines/0005").strip() == ws.commit("0001")  # a fork at 0001
    assert "lines/0005" in _git(lab, "branch", "--list")

    # moving forward along a line archives nothing; jumping across lines archives the one left
    ws.checkout("0005")
    assert ws.lines() == {"lines/0005": old_tip, "lines/0006": ws.commit("0006")}
    assert (lab / "train.py").read_text() == ws.source("0005")


def test_ledger_commit_column_resolves_in_the_lab_repository(tmp_path):
    lab = tmp_path / "lab"
    ws = Workspace(lab)
    ws.init(_src(0.01), PROGRAM)
    with Ledger(lab) as led:
        eid = led.start(None, "h", "", "baseline", "human", "60s", {}, kind="baseline")
        sha = ws.commit_experiment(eid, _src(0.01), None, "baseline")
        led.finish(eid, RunResult(status="ok", val_bpb=1.5), commit=sha)
        ws.keep(eid)
    commit, *_ = (lab / "results.tsv").read_text().splitlines()[1].split("\t")
    assert len(commit) == 7 and sha.startswith(commit)
    assert _git(lab, "show", f"{commit}:train.py") == _src(0.01)
    assert _git(lab, "status", "--porcelain") == ""  # ledger files are ignored


def test_reopening_a_workspace_resumes_it(tmp_path):
    lab = tmp_path / "lab"
    _session(lab)
    ws = Workspace(lab)
    tip = ws.head()
    assert ws.init("something else\n", "other program\n") == tip  # resume: nothing rewritten
    assert (lab / "train.py").read_text() == ws.source("0005")
    assert ws.experiments() == ["0001", "0002", "0003", "0004", "0005"]
    assert ws.commit_experiment("0003", _src(0.05), "0002", "again") == ws.commit("0003")  # idempotent
    assert "5 experiments" in repr(ws)


def test_mistakes_raise_with_what_to_do(tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    ws = Workspace(lab)
    with pytest.raises(RuntimeError, match=r"call init\(train_source, program_source\) first"):
        ws.commit_experiment("0001", "x", None, "baseline")
    ws.init(_src(0.01), PROGRAM)
    with pytest.raises(KeyError, match="no experiment is committed yet"):
        ws.source("0001")
    ws.commit_experiment("0001", _src(0.01), None, "baseline")
    with pytest.raises(KeyError, match="Parent experiment '0009' has no commit"):
        ws.commit_experiment("0002", _src(0.02), "0009", "orphan")
    with pytest.raises(ValueError, match="never reused"):
        ws.commit_experiment("0001", _src(0.5), None, "baseline again")
    with pytest.raises(KeyError, match="known experiments: 0001 .. 0001"):
        ws.diff("0001", "0042")

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match="install git"):
        Workspace(tmp_path / "other")


def test_a_lab_inside_another_git_repository_keeps_its_own_history(tmp_path):
    outer = tmp_path / "project"
    outer.mkdir()
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    _session(outer / "lab")
    assert (outer / "lab" / ".git").is_dir()
    # the project's repository gained no commits and no refs
    out = subprocess.run(["git", "-C", str(outer), "for-each-ref"], capture_output=True, text=True).stdout
    assert out == ""


def test_a_hand_commit_on_the_kept_line_is_named_and_never_lost(tmp_path):
    ws = Workspace(tmp_path / "lab")
    ws.init(_src(0.01), PROGRAM)
    ws.commit_experiment("0001", _src(0.01), None, "baseline")
    ws.keep("0001")
    assert ws.hand_commit() is None
    (tmp_path / "lab" / "train.py").write_text(_src(0.5))
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull}
    git = ["git", "-C", str(tmp_path / "lab"), "-c", "user.name=me", "-c", "user.email=me@x", "-c",
           "commit.gpgsign=false"]
    subprocess.run([*git, "commit", "-qam", "my own idea"], check=True, env=env)
    sha, subject = ws.hand_commit()
    assert subject == "my own idea" and ws.head_id() is None     # not an experiment, not init either
    ws.keep("0001", write=False)                                 # back to the experiment, file left alone
    assert ws.lines() == {f"lines/hand-{sha[:7]}": sha}          # once it was parked as lines/init
    assert ws.working_source() == _src(0.5) and ws.source(sha) == _src(0.5)
    ws.keep("0001")
    assert ws.working_source() == _src(0.01)


def test_a_binary_program_md_is_named(tmp_path):
    from autoresearch_kit.workspace import read_text

    ws = Workspace(tmp_path / "lab")
    ws.init(_src(0.01), PROGRAM)
    (tmp_path / "lab" / "program.md").write_bytes(b"# goal\n\xff\xd8\xff\xe0 jpeg")
    with pytest.raises(ValueError, match=r"program\.md is not UTF-8 text \(byte 0xff at offset 7\)"):
        ws.commit_experiment("0001", _src(0.01), None, "baseline")
    assert read_text(tmp_path / "lab" / "train.py") == _src(0.01)
