"""The LLM proposer's prompts, as data: read them, edit them, or pass your own.

`program.md` is the human's part of the prompt; the text here is the kit's part: what the
task is, the rules the fixed layer enforces anyway, and the reply format that
`edits.parse_reply` reads. `build_messages(context)` assembles the chat messages.

    from autoresearch_kit.propose.prompts import build_messages, SYSTEM_PROMPT
    print(build_messages(context)[1]["content"])

Templates use str.format fields (`{program}`); program.md and train.py are substituted as
values, so braces inside them need no escaping.
"""

from __future__ import annotations

from autoresearch_kit.propose.base import HistoryEntry, ProposalContext

SYSTEM_PROMPT = """\
You are an ML researcher improving a small GPT language model, one experiment at a time.
You edit `train.py`, a single-file PyTorch training script. Every candidate trains under the
same fixed budget (wall-clock seconds, tokens or FLOPs) and is scored by validation bits per
byte (val_bpb, lower is better). A person reviews every step: their instructions are in
program.md, and their reasons for past decisions are in the history. Follow them.

Rules
- Change only train.py. Data, tokenizer, budget, evaluation and metric belong to the kit and
  cannot be changed: train.py must keep calling harness.start(), run.training(...),
  run.log(...) and run.finish(model). The model given to run.finish maps token ids (B, T)
  to logits (B, T, vocab) and must stay causal.
- Make one focused change per experiment (or a few closely related ones), so the result
  teaches something. Never repeat an experiment from the history.
- Use only what train.py already imports (torch, numpy, the standard library).
- Keep the script readable: UPPER_CASE knobs in the constants block, short comments on why.

Reply format, exactly these parts in this order:

DESCRIPTION: <one line under 80 characters, e.g. "MATRIX_LR 0.04 -> 0.05" or "SwiGLU instead of ReLU^2">
RATIONALE: <two to five sentences: why this should lower val_bpb within the budget>

then the edit, as one or more SEARCH/REPLACE blocks against the current train.py:

train.py
<<<<<<< SEARCH
<lines copied exactly from the current train.py, enough of them to be unique>
=======
<the lines that replace them>
>>>>>>> REPLACE

Each SEARCH part must match exactly one place in the current train.py: copy whole lines
with their indentation. Prefer several small blocks to one large one. Only if the change
rewrites most of the file, send instead the complete new train.py in one ```python block
(the whole file, nothing elided)."""

USER_TEMPLATE = """\
# program.md (the human's instructions)

{program}

# Current train.py ({parent})

```python
{parent_source}
```
{sections}
Propose the next experiment."""

HISTORY_HEADER = "\n# History of experiments (oldest first; the last {n} of {total})\n\n"
HISTORY_LINE = "- {exp_id} {outcome:<10} val_bpb {bpb:<8} {description}{reason}"
DIFF_HEADER = "\n# Diffs of the most recent experiments (do not repeat them)\n"
CRASH_HEADER = "\n# The last crash (log tail)\n\n```\n{log}\n```\n"
FEEDBACK_HEADER = "\n# The human's feedback for this step (most important)\n\n{feedback}\n"

RETRY_TEMPLATE = """\
Your previous reply could not be used: {error}

Reply again in the same format: DESCRIPTION, RATIONALE, then SEARCH/REPLACE blocks against
the current train.py shown above (or the complete file in one ```python block)."""

# How much of the ledger a prompt carries: enough to avoid repeats. The kit's train.py alone
# is 4.2k tokens for SmolLM2's tokenizer (12.7k characters), the whole step-1 prompt 5.5k,
# and ~8.6k after 30 experiments with diffs (issue 14): the LLM proposer trims these
# sections until the prompt fits the server's context (llm.py, tokens.py).
MAX_HISTORY = 30
MAX_DIFFS = 3
MAX_DIFF_LINES = 40
MAX_CRASH_CHARS = 3000


def _bpb(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _outcome(e: HistoryEntry) -> str:
    if e.status not in ("ok", "running", ""):
        return e.status                      # crash | timeout | diverged | invalid | rejected
    return e.decision or "undecided"


def format_history(history: list[HistoryEntry], max_entries: int = MAX_HISTORY, max_diffs: int = MAX_DIFFS) -> str:
    """The history section: one line per experiment, then the last few diffs."""
    if not history or max_entries <= 0:
        return ""
    recent = history[-max_entries:]
    lines = [HISTORY_LINE.format(exp_id=e.exp_id, outcome=_outcome(e), bpb=_bpb(e.val_bpb),
                                 description=e.description or "(no description)",
                                 reason=f'  | reason: "{e.reason.strip()}"' if e.reason.strip() else "")
             for e in recent]
    text = HISTORY_HEADER.format(n=len(recent), total=len(history)) + "\n".join(lines) + "\n"
    with_diff = [e for e in recent if e.diff.strip()][-max_diffs:] if max_diffs > 0 else []
    if with_diff:
        text += DIFF_HEADER
        for e in with_diff:
            diff = e.diff.strip().splitlines()
            cut = diff[:MAX_DIFF_LINES] + (["... (diff truncated)"] if len(diff) > MAX_DIFF_LINES else [])
            text += f"\n{e.exp_id} ({_outcome(e)}): {e.description}\n```diff\n" + "\n".join(cut) + "\n```\n"
    return text


def build_messages(context: ProposalContext, *, system_prompt: str | None = None,
                   max_history: int = MAX_HISTORY, max_diffs: int = MAX_DIFFS,
                   max_crash_chars: int = MAX_CRASH_CHARS) -> list[dict]:
    """The chat messages for one proposal: the kit's system prompt and the context.

    Parameters
    ----------
    context
        What the agent sees: program.md, the parent train.py, history, crash, feedback.
    system_prompt
        Replaces `SYSTEM_PROMPT` (the reply format must stay what `parse_reply` reads).
    max_history
        How many recent experiments to list.
    max_diffs, max_crash_chars
        How many of their diffs to show, and how much of the last crash's log tail
        (the LLM proposer lowers all three until the prompt fits the server's context).
    """
    parent = f"experiment {context.parent_id}" if context.parent_id else "the starting point"
    if context.parent_val_bpb is not None:
        parent += f", val_bpb {context.parent_val_bpb:.4f}"
    if context.best_val_bpb is not None:
        parent += f"; best so far {context.best_val_bpb:.4f}"
    sections = format_history(context.history, max_history, max_diffs)
    if context.last_crash_log.strip() and max_crash_chars > 0:
        sections += CRASH_HEADER.format(log=context.last_crash_log.strip()[-max_crash_chars:])
    if context.feedback.strip():
        sections += FEEDBACK_HEADER.format(feedback=context.feedback.strip())
    user = USER_TEMPLATE.format(program=context.program.strip() or "(program.md is empty)",
                                parent=parent, parent_source=context.parent_source.rstrip("\n"),
                                sections=sections)
    return [{"role": "system", "content": system_prompt or SYSTEM_PROMPT},
            {"role": "user", "content": user}]


def retry_message(error: str) -> dict:
    """The user message that feeds a refused reply's error back to the model."""
    return {"role": "user", "content": RETRY_TEMPLATE.format(error=error)}
