"""Proposal, ProposalContext and the Proposer protocol: the contract every proposer keeps.

A proposer turns a context (program.md, the parent train.py, the recent history, the
last crash, the human's feedback) into a Proposal: a new train.py, its diff against the
parent, a one-line description, a rationale and metadata. A proposal that does not
apply, compile, or that repeats a past experiment is never returned as valid: proposers
raise ProposalError with a reason a person can act on.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


def source_hash(source: str) -> str:
    """Stable id of a train.py source (sha256 of its text, trailing whitespace ignored)."""
    norm = "\n".join(line.rstrip() for line in source.strip().splitlines()) + "\n"
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


def unified_diff(old: str, new: str, path: str = "train.py") -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=f"a/{path}", tofile=f"b/{path}")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


class ProposalError(RuntimeError):
    """A proposer gave up: `reason` says why, in words the panel and CLI show as is.

    `fatal` is True when asking again cannot help before a person acts: the endpoint is
    unreachable, hung (out of time), answered HTTP 4xx, or failed every retry. A loop
    (the CLI) stops at once on a fatal error instead of asking for the next proposal.
    """

    def __init__(self, reason: str, *, attempts: int = 0, metadata: dict | None = None,
                 fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.attempts, self.metadata = reason, attempts, metadata or {}
        self.fatal = fatal


@dataclass
class HistoryEntry:
    """One past experiment as the proposer sees it."""

    exp_id: str
    description: str
    status: str                  # ok | crash | timeout | diverged | invalid | aborted
    decision: str | None         # keep | discard | None (undecided)
    val_bpb: float | None = None
    reason: str = ""             # the human's reason for the decision, if any
    source_hash: str = ""
    diff: str = ""


@dataclass
class ProposalContext:
    """Everything a researcher would want the agent to see for the next step."""

    program: str                              # program.md, the human's instructions
    parent_source: str                        # train.py the proposal edits
    parent_id: str | None = None              # ledger id of the parent experiment
    parent_val_bpb: float | None = None
    best_val_bpb: float | None = None
    history: list[HistoryEntry] = field(default_factory=list)   # oldest first
    last_crash_log: str = ""                  # log tail of the most recent crash
    feedback: str = ""                        # free text from the human for this step
    seen_hashes: set[str] = field(default_factory=set)          # source hashes already run
    seed: int = 0                             # step-dependent seed for reproducible proposers


@dataclass
class Proposal:
    """A candidate train.py and what it changes."""

    source: str
    diff: str
    description: str
    rationale: str = ""
    proposer: str = "human"       # human | mutate | llm | replay
    parent_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # model, attempts, tokens, seconds

    @property
    def source_hash(self) -> str:
        return source_hash(self.source)

    @property
    def lines_changed(self) -> tuple[int, int]:
        """(+added, -removed) lines of the diff."""
        plus = sum(1 for l in self.diff.splitlines() if l.startswith("+") and not l.startswith("+++"))
        minus = sum(1 for l in self.diff.splitlines() if l.startswith("-") and not l.startswith("---"))
        return plus, minus

    @classmethod
    def from_source(cls, parent: str, source: str, description: str, *, proposer: str = "human",
                    rationale: str = "", parent_id: str | None = None, **metadata) -> "Proposal":
        return cls(source=source, diff=unified_diff(parent, source), description=description,
                   rationale=rationale, proposer=proposer, parent_id=parent_id, metadata=metadata)

    def to_dict(self) -> dict:
        return asdict(self)

    def _repr_html_(self) -> str:
        """In a notebook: description, rationale and the highlighted diff."""
        from autoresearch_kit.ui.render import proposal_html

        return proposal_html(self)


@runtime_checkable
class Proposer(Protocol):
    """Anything with a name and propose(context) -> Proposal (raising ProposalError)."""

    name: str

    def propose(self, context: ProposalContext) -> Proposal: ...
