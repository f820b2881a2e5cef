"""The offline proposer: valid, distinct, reproducible edits of the constants block that
learn from the ledger.

    python -m pytest tests/test_mutate.py -q
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from autoresearch_kit.propose.base import ProposalError, source_hash
from autoresearch_kit.propose.edits import validate
from autoresearch_kit.propose.mutate import MutateProposer, find_knobs
from propose_samples import SYNTHETIC_TRAIN, context, entry, real_train

# "MATRIX_LR 0.04 -> 0.05", "CPU_DEPTH|GPU_DEPTH 4|8 -> 5|9", "ACTIVATION "relu2" -> "gelu"", joined by ", "
_CHANGE = r"[A-Z][A-Z0-9_]*(?:\[\d+\]|\.\w+)*(?:\|[A-Z][A-Z0-9_]*)* \S+ -> \S+"
DESCRIPTION = re.compile(rf"^{_CHANGE}(?:, {_CHANGE})?$")

SOURCES = {"synthetic": SYNTHETIC_TRAIN, "real": real_train()}


def _twenty(parent: str, seed: int) -> list:
    p, ctx, out = MutateProposer(seed=seed), context(parent), []
    for step in range(20):
        ctx.seed = step
        proposal = p.propose(ctx)
        ctx.seen_hashes.add(proposal.source_hash)        # the lab records each one
        out.append(proposal)
    return out


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_twenty_proposals_are_valid_distinct_and_reproducible(which):
    parent = SOURCES[which]
    if parent is None:
        pytest.skip("train.py has not landed yet")
    first = _twenty(parent, seed=7)
    hashes = {p.source_hash for p in first}
    assert len(hashes) == 20 and source_hash(parent) not in hashes
    for p in first:
        assert validate(parent, p.source) == [], p.description       # compiles, integrity, not empty
        assert DESCRIPTION.match(p.description), p.description
        assert p.proposer == "mutate" and p.metadata["proposer"] == "mutate" and p.rationale
        plus, minus = p.lines_changed
        assert 1 <= plus == minus <= 4                               # one or two knobs, a line each
    again = _twenty(parent, seed=7)
    assert [p.description for p in again] == [p.description for p in first]
    other = _twenty(parent, seed=8)
    assert [p.description for p in other] != [p.description for p in first]


def test_only_the_literal_changes_comments_and_layout_survive():
    p = MutateProposer(seed=1)
    for step in range(30):
        prop = p.propose(context(seed=step))
        removed = [l[1:] for l in prop.diff.splitlines() if l.startswith("-") and not l.startswith("---")]
        added = [l[1:] for l in prop.diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
        for old, new in zip(removed, added):
            name_old, name_new = old.split("=")[0], new.split("=")[0]
            assert name_old == name_new                           # same constant, same spacing
            if "#" in old:
                assert old[old.index("#"):] == new[new.index("#"):]  # comment untouched


def test_descriptions_read_like_a_researcher_wrote_them():
    descs = {MutateProposer(seed=s).propose(context(seed=s)).description for s in range(60)}
    text = "\n".join(descs)
    assert re.search(r"MATRIX_LR 0\.04 -> 0\.0(5|32|6|27|8|2)\b", text)
    assert re.search(r"TOTAL_BATCH_SIZE 2\*\*12 -> 2\*\*1[13]\b", text)
    assert re.search(r"DEPTH 4 -> [2356]\b", text)
    assert re.search(r'ACTIVATION "relu2" -> "(gelu|silu)"', text)       # alternatives from the comment
    assert "SEED_OFFSET" not in text and "LOG_EVERY" not in text and "compile" not in text
    assert re.search(r"N_KV 2\|4 -> (4\|8|1\|2)", text)                     # both branches of the IfExp
    assert re.search(r"PRESETS\.dropout 0\.0\|0\.0 -> 0\.(1|05)\|0\.(1|05)", text)


def test_avoids_seen_hashes_and_says_when_everything_was_tried():
    tiny = "from autoresearch_kit import harness\nUSE_BIAS = False  # toggle\nrun = harness.start()\nrun.finish(None)\n"
    ctx = context(tiny)
    first = MutateProposer().propose(ctx)
    assert first.description == "USE_BIAS False -> True"
    ctx.seen_hashes.add(first.source_hash)
    with pytest.raises(ProposalError, match="every single change .* has been tried"):
        MutateProposer().propose(ctx)
    # same seeds, the first answer seen: a different proposal comes back
    ctx = context(seed=3)
    a = MutateProposer(seed=2).propose(ctx)
    ctx.seen_hashes.add(a.source_hash)
    b = MutateProposer(seed=2).propose(ctx)
    assert b.source_hash != a.source_hash


def test_a_change_already_tried_from_an_older_parent_is_not_repeated():
    base = SYNTHETIC_TRAIN
    tried = base.replace("DEPTH = 4 ", "DEPTH = 5 ")
    parent = base.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")     # kept since then
    history = [entry("0002", base, tried, "DEPTH 4 -> 5", decision="discard"),
               entry("0003", base, parent, "MATRIX_LR 0.04 -> 0.05", decision="keep")]
    descs = [MutateProposer(seed=s, p_two=0.0).propose(context(parent, history=history, seed=s)).description
             for s in range(80)]
    assert "DEPTH 4 -> 5" not in descs
    assert any(d.startswith("DEPTH 4 -> ") for d in descs)           # other depths are still fair game


def _depth_up_share(history, seeds=range(300)) -> float:
    small = ("from autoresearch_kit import harness\nDEPTH = 4\nMATRIX_LR = 0.04\nWARMDOWN_RATIO = 0.5\n"
             "run = harness.start()\nrun.finish(None)\n")
    counts = Counter()
    for s in seeds:
        d = MutateProposer(seed=s, p_two=0.0).propose(context(small, history=history(small), seed=s)).description
        counts["up" if re.match(r"DEPTH 4 -> [56]$", d) else "other"] += 1
    return counts["up"] / sum(counts.values())


def test_directions_that_helped_are_preferred_and_failures_avoided():
    def kept(small):       # depth went up twice (2 -> 3 -> 4) and was kept each time
        a = small.replace("DEPTH = 4", "DEPTH = 2")
        b = small.replace("DEPTH = 4", "DEPTH = 3")
        return [entry("0002", a, b, "DEPTH 2 -> 3", decision="keep"), entry("0003", b, small, "DEPTH 3 -> 4", decision="keep")]

    def failed(small):     # depth up crashed and was discarded
        return [entry("0002", small, small.replace("DEPTH = 4", "DEPTH = 8"), "DEPTH 4 -> 8", status="crash", decision=None),
                entry("0003", small, small.replace("DEPTH = 4", "DEPTH = 7"), "DEPTH 4 -> 7", decision="discard")]

    neutral = _depth_up_share(lambda small: [])
    assert _depth_up_share(kept) > 1.5 * neutral
    assert _depth_up_share(failed) < 0.6 * neutral     # expected ~0.3x: (0.3 * 0.6) weight on "up"


def test_rationale_says_why_a_direction_is_preferred():
    small = "from autoresearch_kit import harness\nDEPTH = 4\nrun = harness.start()\nrun.finish(None)\n"
    hist = [entry("0002", small.replace("DEPTH = 4", "DEPTH = 3"), small, "DEPTH 3 -> 4", decision="keep")]
    for s in range(20):
        p = MutateProposer(seed=s).propose(context(small, history=hist, seed=s))
        if p.metadata["changes"][0]["direction"] == 1:
            assert "helped before (kept)" in p.rationale
            break
    else:
        pytest.fail("never moved DEPTH up although it was kept")


def test_device_pairs_or_picks_cpu_and_gpu_knobs():
    parent = real_train()
    if parent is None:
        pytest.skip("train.py has not landed yet")
    labels = [s.label for s in find_knobs(parent)]
    assert "CPU_DEPTH|GPU_DEPTH" in labels and "MATRIX_LR" in labels
    cuda = [s.label for s in find_knobs(parent, "cuda")]
    assert "GPU_DEPTH" in cuda and not any(l.startswith("CPU_") for l in cuda)
    for s in range(10):
        d = MutateProposer(seed=s, device="cpu").propose(context(parent, seed=s)).description
        assert "GPU_" not in d


def test_no_knobs_or_a_broken_parent_is_a_clear_error():
    with pytest.raises(ProposalError, match="no UPPER_CASE constants"):
        MutateProposer().propose(context("import torch\nx = torch.zeros(3)\n"))
    with pytest.raises(ProposalError, match="does not parse"):
        MutateProposer().propose(context("DEPTH = = 4\n"))


def test_asking_again_gives_a_new_idea_reproducibly():
    ctx = context(seed=11)
    p = MutateProposer(seed=4)
    runs = [p.propose(ctx).description for _ in range(3)]
    assert len(set(runs)) > 1                                   # "New proposal" is not a no-op
    q = MutateProposer(seed=4)
    assert [q.propose(ctx).description for _ in range(3)] == runs


def _share(feedback: str, pattern: str) -> float:
    """Fraction of 60 seeded first proposals whose description matches `pattern`."""
    descs = [MutateProposer(seed=s, p_two=0.0).propose(context(feedback=feedback, seed=s)).description
             for s in range(60)]
    return sum(bool(re.search(pattern, d)) for d in descs) / len(descs)


def test_feedback_steers_the_offline_proposer():
    any_lr = r"^\w*_LR [\d.e-]+ -> "
    neutral = _share("", any_lr)
    steered = _share("please try a higher learning rate", any_lr)
    assert steered > 2 * neutral and steered > 0.4
    up = [MutateProposer(seed=s, p_two=0.0).propose(context(feedback="deeper model?", seed=s)).metadata["changes"][0]
          for s in range(30)]
    depth = [c for c in up if c["name"] == "DEPTH"]
    assert len(depth) > 10 and sum(c["direction"] == 1 for c in depth) > 0.6 * len(depth)


def test_feedback_that_rules_a_knob_out_turns_the_proposer_away_from_it():
    any_lr = r"^\w*_LR [\d.e-]+ -> "
    neutral = _share("", any_lr)
    assert _share("learning rate changes are done", any_lr) < neutral / 2
    # a negation in one clause does not cancel what another clause asks for
    assert _share("leave the depth alone, but try a higher learning rate", any_lr) > 2 * neutral


def test_default_device_is_the_training_device(monkeypatch):
    """A CPU lab's offline proposer never ships untested GPU_* changes (and a CUDA one no CPU_*)."""
    parent = real_train()
    if parent is None:
        pytest.skip("train.py has not landed yet")
    for device, other in (("cpu", "GPU_"), ("cuda", "CPU_")):
        monkeypatch.setenv("AUTORESEARCH_DEVICE", device)
        p, ctx, touched = MutateProposer(seed=3), context(parent), set()
        for step in range(25):
            ctx.seed = step
            proposal = p.propose(ctx)
            ctx.seen_hashes.add(proposal.source_hash)
            changed = [l[1:] for l in proposal.diff.splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
            assert changed and not any(l.startswith(other) for l in changed), proposal.diff
            assert other not in proposal.description
            touched |= {c["name"] for c in proposal.metadata["changes"]}
        assert p.device == device and proposal.metadata["device"] == device
        own = "CPU_" if device == "cpu" else "GPU_"
        assert any(n.startswith(own) for n in touched) and any("_" not in n or not n.startswith(("CPU_", "GPU_"))
                                                                for n in touched)   # own and shared knobs


def test_a_lab_gives_the_offline_proposer_its_device(tmp_path, kit_env, monkeypatch):
    from autoresearch_kit.lab import Lab

    monkeypatch.delenv("AUTORESEARCH_DEVICE")
    with Lab(tmp_path / "lab", proposer="mutate", device="cpu", verbose=False) as lab:
        assert lab.proposer.device == "cpu"
        for _ in range(15):
            p = lab.propose()
            assert "GPU_" not in p.description, p.description
            lab.reject(p, "not run: only the proposal is tested")
