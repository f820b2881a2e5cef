"""Edit parsing, applying and validation shared by every proposer; make_proposer and the
callable `propose` module.

    python -m pytest tests/test_propose_edits.py -q
"""

from __future__ import annotations

import pytest

from autoresearch_kit.propose.base import HistoryEntry, ProposalContext, ProposalError, source_hash, unified_diff
from autoresearch_kit.propose.edits import (EditBlock, EditError, apply_edits, apply_reply, apply_unified_diff,
                                            clean_description, describe_change, make_proposal, parse_reply,
                                            validate)
from propose_samples import PROGRAM, SYNTHETIC_TRAIN, context, real_train

BLOCK = """DESCRIPTION: MATRIX_LR 0.04 -> 0.05
RATIONALE: A higher lr converges faster in a short budget.
It was stable at 0.06 in nanochat.

train.py
<<<<<<< SEARCH
MATRIX_LR = 0.04           # Muon-style lr for 2D weights
=======
MATRIX_LR = 0.05           # Muon-style lr for 2D weights
>>>>>>> REPLACE
"""


def test_parse_reply_reads_description_rationale_and_block():
    r = parse_reply(BLOCK)
    assert r.description == "MATRIX_LR 0.04 -> 0.05"
    assert r.rationale.startswith("A higher lr") and "nanochat" in r.rationale
    assert "<<<<<<<" not in r.rationale and "train.py" not in r.rationale
    assert len(r.blocks) == 1 and r.blocks[0].search.startswith("MATRIX_LR = 0.04")
    new = apply_reply(SYNTHETIC_TRAIN, r)
    assert "MATRIX_LR = 0.05           # Muon-style" in new and "MATRIX_LR = 0.04" not in new


@pytest.mark.parametrize("head", ["**Description:** DEPTH 4 -> 5", "description - DEPTH 4 -> 5",
                                  "## Description\nDEPTH 4 -> 5", 'DESCRIPTION: "DEPTH 4 -> 5"'])
def test_parse_reply_is_lenient_about_the_description_line(head):
    text = f"{head}\n\nRationale: deeper is better.\n\n```python\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n```\n"
    r = parse_reply(text)
    assert r.description == "DEPTH 4 -> 5"
    assert r.rationale == "deeper is better."
    assert apply_reply(SYNTHETIC_TRAIN, r).count("DEPTH = 5 ") == 1


def test_fenced_blocks_with_several_edits_and_a_path_line():
    text = ("DESCRIPTION: two knobs\n\ntrain.py\n```python\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 6\n"
            ">>>>>>> REPLACE\n```\n\n`train.py`\n```python\n<<<<<<< SEARCH\nSEQ_LEN = 128\n=======\nSEQ_LEN = 256\n"
            ">>>>>>> REPLACE\n```\n")
    new = apply_reply(SYNTHETIC_TRAIN, parse_reply(text))
    assert "DEPTH = 6 " in new and "SEQ_LEN = 256 " in new


@pytest.mark.parametrize("text", [
    "other.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n",
    "**prepare.py**\n```python\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n```\n",
    "```python autoresearch_kit/metric.py\n" + "x = 1\n" * 50 + "```\n",
    "```python\n# file: harness.py\n" + "x = 1\n" * 50 + "```\n",
])
def test_an_edit_to_another_file_is_refused(text):
    with pytest.raises(EditError, match="only train.py may be changed"):
        parse_reply(text)


def test_whole_file_reply_and_fragment():
    whole = SYNTHETIC_TRAIN.replace("DEPTH = 4 ", "DEPTH = 3 ")
    r = parse_reply(f"DESCRIPTION: shallower\nRATIONALE: faster steps.\n\n```python\n{whole}```\n")
    assert r.whole_file is not None and apply_reply(SYNTHETIC_TRAIN, r) == whole
    frag = parse_reply("DESCRIPTION: x\n```python\nDEPTH = 3\n```\n")
    with pytest.raises(EditError, match="fragment"):
        apply_reply(SYNTHETIC_TRAIN, frag)
    with pytest.raises(EditError, match="no SEARCH/REPLACE block"):
        apply_reply(SYNTHETIC_TRAIN, parse_reply("I think we should raise the learning rate."))


def test_malformed_block_says_what_is_missing():
    with pytest.raises(EditError, match="REPLACE"):
        parse_reply("<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n")
    with pytest.raises(EditError, match="======="):
        parse_reply("<<<<<<< SEARCH\nDEPTH = 4\n>>>>>>> REPLACE\n")


def test_apply_tolerates_trailing_whitespace_and_indentation_drift():
    # trailing spaces in the SEARCH (models add them) and a block quoted at the wrong indent
    blocks = [EditBlock("DEPTH = 4                  # transformer layers   ", "DEPTH = 5                  # transformer layers"),
              EditBlock("x = self.fc(x)\nif ACTIVATION == \"relu2\":\n    x = F.relu(x).square()",
                        "x = self.fc(x)\nif ACTIVATION == \"relu2\":\n    x = F.relu(x).square() * 0.5")]
    new = apply_edits(SYNTHETIC_TRAIN, blocks)
    assert "DEPTH = 5 " in new
    # the replacement was re-indented to the 8 spaces of the method body
    assert "\n            x = F.relu(x).square() * 0.5\n" in new
    compile(new, "train.py", "exec")


def test_apply_refuses_ambiguous_and_missing_search():
    with pytest.raises(EditError, match="matches 2 places.*include more surrounding lines"):
        apply_edits(SYNTHETIC_TRAIN, [EditBlock("super().__init__()", "pass")])
    # ambiguous only once whitespace is ignored: still refused, not applied at the first hit
    with pytest.raises(EditError, match="matches 2 places.*ignoring indentation"):
        apply_edits(SYNTHETIC_TRAIN, [EditBlock("          super().__init__()", "pass")])
    with pytest.raises(EditError, match="not found.*closest line.*MATRIX_LR = 0.04"):
        apply_edits(SYNTHETIC_TRAIN, [EditBlock("MATRIX_LR = 0.4", "MATRIX_LR = 0.5")])
    with pytest.raises(EditError, match="SEARCH part is empty"):
        apply_edits(SYNTHETIC_TRAIN, [EditBlock("", "import os")])


def test_validate_lists_each_problem():
    parent = SYNTHETIC_TRAIN
    assert validate(parent, parent.replace("DEPTH = 4", "DEPTH = 5")) == []
    assert "changes nothing" in validate(parent, parent + "   \n")[0]
    problems = validate(parent, parent.replace("DEPTH = 4", "DEPTH = = 5"))
    assert len(problems) == 1 and "does not compile" in problems[0] and "line 12" in problems[0]
    new = parent.replace("DEPTH = 4", "DEPTH = 5")
    past = HistoryEntry("0007", "DEPTH 4 -> 5", "ok", "discard", 1.9, source_hash=source_hash(new))
    problems = validate(parent, new, {source_hash(new)}, history=[past])
    assert "already tried" in problems[0] and "0007" in problems[0] and "DEPTH 4 -> 5" in problems[0]


def test_validate_runs_the_integrity_check():
    from autoresearch_kit import integrity  # noqa: F401  (landed: the check must be wired in)
    problems = validate(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN.replace("run.finish(model)\n", "print('done')\n"))
    assert problems and problems[0].startswith("integrity:") and "finish" in problems[0]


def test_clean_description_is_one_tsv_safe_line():
    assert clean_description("  **DEPTH\t4 -> 5**  \nmore text") == "DEPTH 4 -> 5"
    long = clean_description("x" * 300)
    assert len(long) == 120 and long.endswith("...")


def test_describe_change_names_constants_or_lines():
    assert describe_change(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN.replace("DEPTH = 4", "DEPTH = 6")) == "DEPTH 4 -> 6"
    body = SYNTHETIC_TRAIN.replace("x = F.gelu(x)", "x = F.gelu(x, approximate='tanh')")
    assert describe_change(SYNTHETIC_TRAIN, body) == "edit train.py (+1 -1 lines)"


def test_unified_diff_roundtrip_with_offset_and_other_file():
    new = SYNTHETIC_TRAIN.replace("WEIGHT_DECAY = 0.1 ", "WEIGHT_DECAY = 0.2 ")
    patch = unified_diff(SYNTHETIC_TRAIN, new)
    assert apply_unified_diff(SYNTHETIC_TRAIN, patch) == new
    # the parent grew 3 lines at the top since the patch was made: it still applies
    shifted = '"""a"""\n"""b"""\n"""c"""\n' + SYNTHETIC_TRAIN
    assert apply_unified_diff(shifted, patch) == '"""a"""\n"""b"""\n"""c"""\n' + new
    with pytest.raises(EditError, match="only train.py"):
        apply_unified_diff(SYNTHETIC_TRAIN, patch.replace("train.py", "prepare.py"))
    with pytest.raises(EditError, match="does not match"):
        apply_unified_diff(SYNTHETIC_TRAIN.replace("WEIGHT_DECAY = 0.1 ", "WEIGHT_DECAY = 0.3 "), patch)


def test_make_proposal_wraps_and_refuses():
    ctx = context()
    p = make_proposal(ctx, SYNTHETIC_TRAIN.replace("DEPTH = 4", "DEPTH = 5"), "", proposer="test",
                      metadata={"attempts": 1})
    assert p.description == "DEPTH 4 -> 5" and p.proposer == "test" and p.parent_id == "0001"
    assert p.metadata == {"proposer": "test", "attempts": 1} and p.lines_changed == (1, 1)
    with pytest.raises(ProposalError, match="does not compile"):
        make_proposal(ctx, SYNTHETIC_TRAIN + "\ndef (:\n", "bad", proposer="test")


def test_human_proposal_is_validated():
    from autoresearch_kit.propose import human_proposal
    p = human_proposal(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN.replace("DEPTH = 4", "DEPTH = 8"), "deeper\tmodel")
    assert p.proposer == "human" and p.description == "deeper model" and "+DEPTH = 8" in p.diff
    with pytest.raises(ProposalError, match="changes nothing"):
        human_proposal(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN, "nothing")


# ------------------------------------------------------------------ make_proposer / propose()

@pytest.fixture()
def clean_env(monkeypatch):
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTORESEARCH_MODEL", "OPENAI_MODEL", "AUTORESEARCH_PROPOSER"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_auto_is_offline_unless_an_endpoint_or_model_is_configured(clean_env, tmp_path):
    from autoresearch_kit.propose import LLMProposer, MutateProposer, ReplayProposer, make_proposer
    assert isinstance(make_proposer(), MutateProposer)
    clean_env.setenv("OPENAI_API_KEY", "sk-test-SECRET123")   # a stray key alone must not go online
    assert isinstance(make_proposer("auto", seed=3), MutateProposer)
    clean_env.setenv("AUTORESEARCH_MODEL", "gpt-test")
    p = make_proposer("auto", seed=3)
    assert isinstance(p, LLMProposer) and "SECRET" not in repr(p)
    clean_env.delenv("AUTORESEARCH_MODEL")
    clean_env.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert isinstance(make_proposer(), LLMProposer)
    clean_env.setenv("AUTORESEARCH_PROPOSER", "mutate")
    assert isinstance(make_proposer(), MutateProposer)
    (tmp_path / "0001-x.patch").write_text(unified_diff(SYNTHETIC_TRAIN, SYNTHETIC_TRAIN.replace("DEPTH = 4", "DEPTH = 5")))
    assert isinstance(make_proposer(str(tmp_path)), ReplayProposer)
    mine = MutateProposer(seed=9)
    assert make_proposer(mine) is mine


def test_make_proposer_rejects_unknown_names_and_arguments(clean_env):
    from autoresearch_kit.propose import make_proposer
    with pytest.raises(ValueError, match="Unknown proposer 'gpt'.*mutate"):
        make_proposer("gpt")
    with pytest.raises(TypeError, match="MutateProposer does not take temperature"):
        make_proposer("mutate", temperature=0.2)
    with pytest.raises(ValueError, match="no endpoint.*mutate"):
        make_proposer("llm")
    with pytest.raises(ValueError, match="needs patches"):
        make_proposer("replay")


def test_propose_module_is_callable(clean_env):
    from autoresearch_kit import propose
    ctx = context(seed=5)
    p = propose(ctx)
    assert p.proposer == "mutate" and p.source_hash not in ctx.seen_hashes
    assert propose(ctx, "mutate").description == p.description          # same seeds, same proposal
    assert propose.Proposal is type(p) and callable(propose.make_proposer)


def test_real_train_passes_validation_after_a_small_edit():
    src = real_train()
    if src is None:
        pytest.skip("train.py has not landed yet")
    assert validate(src, src.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.03")) == []
    ctx = ProposalContext(program=PROGRAM, parent_source=src)
    assert "MATRIX_LR = 0.02" in ctx.parent_source


def test_thinking_is_ignored_and_a_diff_block_is_accepted():
    new = SYNTHETIC_TRAIN.replace("WEIGHT_DECAY = 0.1 ", "WEIGHT_DECAY = 0.0 ")
    text = ("<think>maybe\n<<<<<<< SEARCH\nnonsense\n=======\nx\n>>>>>>> REPLACE\n</think>\n"
            "DESCRIPTION: no weight decay\nRATIONALE: short runs barely overfit.\n\n```diff\n"
            + unified_diff(SYNTHETIC_TRAIN, new) + "```\n")
    r = parse_reply(text)
    assert r.blocks == [] and r.description == "no weight decay"
    assert apply_reply(SYNTHETIC_TRAIN, r) == new


# R1 distills and Qwen3 through some servers: the template opens <think>, only </think> is in the reply
ORPHAN_THINK = ("Okay, the user wants a lower val_bpb. A draft:\n<<<<<<< SEARCH\nDEPTH = 4                  # transformer "
                "layers\n=======\nDEPTH = 8\n>>>>>>> REPLACE\nHmm, no: the lr.\n</think>\n\n" + BLOCK)


@pytest.mark.parametrize("text", [
    ORPHAN_THINK,
    "<think>first\n</think>\nstill thinking aloud: ```python\nDEPTH = 8\n```\n</think>\n" + BLOCK,  # the last one counts
    BLOCK + "\n<think>\nand now, cut off while thinking again:\n<<<<<<< SEARCH\nDEPTH = 4",       # unterminated tail
])
def test_reasoning_before_a_lone_closing_think_tag_is_not_the_answer(text):
    r = parse_reply(text)
    assert [b.replace for b in r.blocks] == ["MATRIX_LR = 0.05           # Muon-style lr for 2D weights"]
    assert r.description == "MATRIX_LR 0.04 -> 0.05" and "DEPTH" not in apply_reply(SYNTHETIC_TRAIN, r).split(
        "DEPTH = 4", 1)[1].split("\n", 1)[0]


def test_knob_reply_after_a_lone_closing_think_tag_is_the_answer():
    from autoresearch_kit.propose import knobs

    ks = knobs.find_knobs(SYNTHETIC_TRAIN, None)
    text = 'maybe {"knob": "DEPTH", "value": 8, "why": "x"}\n</think>\n{"knob": "MATRIX_LR", "value": 0.05, "why": "y"}'
    assert knobs.parse_reply(text, ks).knob.name == "MATRIX_LR"
    with pytest.raises(EditError, match="not JSON"):          # cut off while thinking: nothing to read
        knobs.parse_reply('<think>maybe {"knob": "DEPTH", "value": 8, "why": "x"}', ks)


def _whole(body: str) -> str:
    return f"DESCRIPTION: MATRIX_LR 0.05\nRATIONALE: faster.\n\n```python\n{body}```\n"


@pytest.mark.parametrize("cut, problem", [
    ("# ... (MLP and GPT unchanged) ...", "placeholder line '# ... (MLP and GPT unchanged) ...'"),
    ("# rest of the model as before", "placeholder line"),
    ("", "GPT is still used but no longer defined"),      # MLP went too, but only GPT called it
])
def test_a_whole_file_that_leaves_code_out_is_refused_asking_for_blocks(cut, problem):
    lines = SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05").split("\n")
    a = next(i for i, l in enumerate(lines) if l.startswith("class MLP"))
    b = next(i for i, l in enumerate(lines) if l.startswith("def lr_factor"))
    body = "\n".join(lines[:a] + ([cut] if cut else []) + lines[b:])
    compile(body, "train.py", "exec")                          # it compiles: only running it would crash
    with pytest.raises(EditError, match="not the complete train.py") as info:
        apply_reply(SYNTHETIC_TRAIN, parse_reply(_whole(body)))
    assert problem in str(info.value) and "SEARCH/REPLACE" in str(info.value)
    # a complete file, a parent's own "# ..." comment and a helper nobody calls any more are fine
    whole = SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
    assert apply_reply(SYNTHETIC_TRAIN, parse_reply(_whole(whole))) == whole
    parent = SYNTHETIC_TRAIN + "\n# ... unchanged below ...\n\ndef unused_helper():\n    return 1\n"
    edited = parent.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05").replace("\ndef unused_helper():\n    return 1\n", "")
    assert apply_reply(parent, parse_reply(_whole(edited))) == edited


# ---------------------------------------------------------------------------- unified diffs as local models write them

TWO_LRS = SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ").replace("WEIGHT_DECAY = 0.1 ",
                                                                                    "WEIGHT_DECAY = 0.2 ")
TWO_LRS_BODY = unified_diff(SYNTHETIC_TRAIN, TWO_LRS).split("\n", 3)[3]      # the lines after "@@ -15,10 +15,10 @@"


@pytest.mark.parametrize("header", [
    "@@ -15,3 +15,3 @@",           # counts too small: the WEIGHT_DECAY change after them must not be dropped
    "@@ -15,40 +15,41 @@",         # counts too large
    "@@ -15 +15 @@",               # counts missing
    "@@ -90,7 +90,8 @@",           # the wrong line numbers (the file has 80 lines)
    "@@ ... @@",                   # no numbers at all
    "@@",
])
def test_a_diff_with_a_wrong_hunk_header_applies_by_its_lines(header):
    patch = f"--- a/train.py\n+++ b/train.py\n{header}\n{TWO_LRS_BODY}"
    assert apply_unified_diff(SYNTHETIC_TRAIN, patch) == TWO_LRS
    # in a reply, with prose after the fence's last line and a blank context line that lost its space
    reply = (f"DESCRIPTION: two lrs\nRATIONALE: both.\n\n```diff\n{patch.replace(' ' + chr(10), chr(10))}\n\n"
             f"```\nThis should help.\n")
    assert apply_reply(SYNTHETIC_TRAIN, parse_reply(reply)) == TWO_LRS


def test_a_hunk_found_in_several_places_goes_nearest_its_line_or_is_refused_without_one():
    parent = "def a():\n    x = 1\n    return x\n\ndef b():\n    x = 1\n    return x\n"
    body = "     x = 1\n-    return x\n+    return x + 1\n"
    assert apply_unified_diff(parent, "@@ -6,3 +6,3 @@\n" + body) == parent[:-1] + " + 1\n"            # b, line 6
    assert apply_unified_diff(parent, "@@ -1,2 +1,2 @@\n" + body) == parent.replace("x\n\n", "x + 1\n\n", 1)  # a
    for header in ("@@ @@", "@@ -4,2 +4,2 @@"):       # no line to choose by, or one as near the first as the second
        with pytest.raises(EditError) as info:
            apply_unified_diff(parent, header + "\n" + body)
        msg = str(info.value)
        assert msg.startswith("hunk 1 of the patch") and "matches 2 places" in msg and "(lines 2, 6)" in msg
        assert "add unchanged lines" in msg and "\n" not in msg


def test_a_hunk_ignores_trailing_whitespace_and_keeps_train_py_s_own_context():
    parent = SYNTHETIC_TRAIN.replace("BATCH_SIZE = 16            # rows per step",
                                     "BATCH_SIZE = 16            # rows per step   ")      # trailing spaces
    patch = unified_diff(SYNTHETIC_TRAIN, TWO_LRS).replace("# tokens per optimizer step\n",
                                                           "# tokens per optimizer step  \n")
    want = TWO_LRS.replace("# rows per step", "# rows per step   ")
    assert apply_unified_diff(parent, patch) == want


def test_a_hunk_whose_lines_are_not_in_train_py_is_refused_saying_which_and_what_to_do():
    patch = unified_diff(SYNTHETIC_TRAIN, TWO_LRS)
    moved = "@@ -40,3 +40,3 @@\n     def forward(self, x):\n-        x = self.fc(x)\n+        x = self.fc(x) * 2\n"
    other = SYNTHETIC_TRAIN.replace("EMBEDDING_LR = 0.6 ", "EMBEDDING_LR = 0.7 ")   # train.py changed since
    with pytest.raises(EditError) as info:
        apply_unified_diff(other, moved + patch.split("\n", 2)[2])
    msg = str(info.value)
    assert msg.startswith("hunk 2 of the patch (@@ -15,10 +15,10 @@) does not match train.py: its line "
                          "'EMBEDDING_LR = 0.6         # lr for the token embedding' is not in train.py "
                          "(the closest line is 'EMBEDDING_LR = 0.7         # lr for the token embedding')")
    assert "Copy its unchanged (' ') and removed ('-') lines exactly" in msg and "SEARCH/REPLACE" in msg
    assert "\n" not in msg
    # every line is there, but not together: a context line the model left out
    gap = "@@ -17,3 +17,3 @@\n TOTAL_BATCH_SIZE = 2**12   # tokens per optimizer step\n" \
          "-EMBEDDING_LR = 0.6         # lr for the token embedding\n+EMBEDDING_LR = 0.7\n"
    with pytest.raises(EditError, match="hunk 1 of the patch .* not together in this order"):
        apply_unified_diff(SYNTHETIC_TRAIN, gap)


def test_a_hunk_that_only_adds_lines_needs_its_context_or_an_explicit_zero_count():
    import difflib

    new = SYNTHETIC_TRAIN.replace("LOG_EVERY = 10\n", "LOG_EVERY = 10\nGRAD_CLIP = 1.0\n")
    zero = "".join(difflib.unified_diff(SYNTHETIC_TRAIN.splitlines(True), new.splitlines(True), "a/train.py",
                                        "b/train.py", n=0))                  # diff -U0: "@@ -29,0 +30 @@"
    assert "@@ -29,0 +30 @@" in zero and apply_unified_diff(SYNTHETIC_TRAIN, zero) == new
    for header in ("@@ -29,2 +30,3 @@", "@@ @@"):      # a model's header: the count says nothing about the place
        with pytest.raises(EditError, match=r"hunk 1 of the patch \(.*\) only adds lines and has no unchanged "
                                            r"lines to place it by: include 2-3 unchanged lines"):
            apply_unified_diff(SYNTHETIC_TRAIN, f"{header}\n+GRAD_CLIP = 1.0\n")
    with pytest.raises(EditError, match="creates train.py from nothing"):
        apply_unified_diff(SYNTHETIC_TRAIN, unified_diff("", new).replace("a/train.py", "/dev/null"))


def test_a_git_format_patch_with_its_signature_and_several_hunks_applies():
    new = SYNTHETIC_TRAIN.replace("DEPTH = 4 ", "DEPTH = 5 ").replace("LOG_EVERY = 10", "LOG_EVERY = 20") \
        .replace("x = F.silu(x)", "x = F.silu(x) * 1.0")
    patch = ("From 1f2e Mon Sep 17 00:00:00 2001\nSubject: [PATCH] three\n\n---\n train.py | 6 +++---\n\n"
             "diff --git a/train.py b/train.py\nindex 1111111..2222222 100644\n"
             + unified_diff(SYNTHETIC_TRAIN, new) + "-- \n2.39.2\n\n")
    assert patch.count("\n@@ ") == 3 and apply_unified_diff(SYNTHETIC_TRAIN, patch) == new
