"""The replay proposer: patch files made by real git / diff, and lists of edits.

    python -m pytest tests/test_replay.py -q
"""

from __future__ import annotations

import subprocess

import pytest

from autoresearch_kit.propose import make_proposer
from autoresearch_kit.propose.base import ProposalError, unified_diff
from autoresearch_kit.propose.replay import ReplayProposer, read_patch
from propose_samples import SYNTHETIC_TRAIN, context


def _git(cwd, *args) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def patches(tmp_path):
    """Three patches: git format-patch (Subject), diff -u with a # comment, a bare git diff."""
    repo, out = tmp_path / "repo", tmp_path / "patches"
    repo.mkdir(); out.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text(SYNTHETIC_TRAIN)
    _git(repo, "add", "train.py"); _git(repo, "commit", "-qm", "baseline")
    (repo / "train.py").write_text(SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05"))
    _git(repo, "commit", "-qam", "Raise MATRIX_LR to 0.05\n\nShort budgets like a hotter lr.")
    _git(repo, "format-patch", "-1", "-o", str(out), "--start-number", "1")

    a, b = tmp_path / "a.py", tmp_path / "train.py"
    a.write_text(SYNTHETIC_TRAIN); b.write_text(SYNTHETIC_TRAIN.replace("DEPTH = 4 ", "DEPTH = 6 "))
    diff = subprocess.run(["diff", "-u", "--label", "a/train.py", "--label", "b/train.py", str(a), str(b)],
                          capture_output=True, text=True).stdout
    (out / "0002-depth.diff").write_text("# Deeper model: 6 layers\n# more capacity per token\n" + diff)

    # made on top of the lr commit; its hunk is far from MATRIX_LR, so it applies to the baseline too
    (repo / "train.py").write_text(SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
                                   .replace("TIE_EMBEDDINGS = False", "TIE_EMBEDDINGS = True"))
    (out / "0003-tie_embeddings.patch").write_text(_git(repo, "diff"))
    (out / "notes.txt").write_text("not a patch")
    return out


def test_patches_replay_in_name_order_with_their_descriptions(patches):
    p = ReplayProposer(patches)
    assert p.remaining == 3
    ctx = context()
    first = p.propose(ctx)
    assert first.description == "Raise MATRIX_LR to 0.05" and "hotter lr" in first.rationale
    assert "+MATRIX_LR = 0.05" in first.diff and first.proposer == "replay"
    second = p.propose(ctx)
    assert second.description == "Deeper model: 6 layers" and "+DEPTH = 6 " in second.diff
    assert second.rationale == "more capacity per token"
    third = p.propose(ctx)
    assert third.description == "tie embeddings" and "+TIE_EMBEDDINGS = True" in third.diff
    assert third.metadata["item"] == "0003-tie_embeddings.patch"
    with pytest.raises(ProposalError, match="replay exhausted"):
        p.propose(ctx)
    p.reset()
    assert p.propose(ctx).description == "Raise MATRIX_LR to 0.05"


def test_patches_apply_to_a_parent_that_moved_on(patches):
    # the parent gained lines above the hunks since the patches were made
    parent = SYNTHETIC_TRAIN.replace("import math\n", "import math\nimport os\nimport sys\n")
    prop = ReplayProposer(patches).propose(context(parent))
    assert "import sys\n" in prop.source and "MATRIX_LR = 0.05" in prop.source


def test_already_run_items_are_skipped_and_bad_ones_reported(patches):
    ctx = context()
    done = ReplayProposer(patches).propose(ctx)
    ctx.seen_hashes.add(done.source_hash)            # a re-run notebook resumes after it
    p = ReplayProposer(patches)
    nxt = p.propose(ctx)
    assert nxt.description == "Deeper model: 6 layers" and nxt.metadata["skipped"] == ["0001-Raise-MATRIX_LR-to-0.05.patch"]

    (patches / "0000-prepare.patch").write_text(unified_diff("a = 1\n", "a = 2\n", path="prepare.py"))
    p = ReplayProposer(patches)
    with pytest.raises(ProposalError, match="0000-prepare.patch.*only train.py may be changed"):
        p.propose(ctx)
    assert p.propose(context()).description == "Raise MATRIX_LR to 0.05"      # consumed, moved on


def test_a_list_of_edits():
    p = ReplayProposer([("lr up", "MATRIX_LR = 0.04", "MATRIX_LR = 0.08"),
                        ("two knobs", [("DEPTH = 4", "DEPTH = 3"), ("SEQ_LEN = 128", "SEQ_LEN = 64")]),
                        ("broken", "DEPTH = 4", "DEPTH = (")])
    ctx = context()
    assert p.propose(ctx).description == "lr up"
    two = p.propose(ctx)
    assert "+DEPTH = 3 " in two.diff and "+SEQ_LEN = 64 " in two.diff
    with pytest.raises(ProposalError, match="does not compile"):
        p.propose(ctx)
    with pytest.raises(ProposalError, match="replay exhausted: all 3 items"):
        p.propose(ctx)


def test_bad_sources_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.patch"):
        ReplayProposer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ReplayProposer(tmp_path / "missing")
    with pytest.raises(TypeError, match="description, search, replace"):
        ReplayProposer([42])


def test_make_proposer_builds_a_replay(patches):
    assert make_proposer("replay", source=patches).propose(context()).description == "Raise MATRIX_LR to 0.05"
    assert make_proposer(str(patches)).remaining == 3


def test_read_patch_falls_back_to_the_file_name():
    item = read_patch(unified_diff(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN.replace("DEPTH = 4", "DEPTH = 5")),
                      "0007-warmer_start.diff")
    assert item.description == "warmer start"
