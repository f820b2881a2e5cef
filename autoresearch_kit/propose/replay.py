"""Replay proposer: proposals from a folder of patch files or a list of edits.

    from autoresearch_kit.propose.replay import ReplayProposer
    p = ReplayProposer("patches/")                 # 0001-lr.patch, 0002-depth.diff, ... in name order
    p = ReplayProposer([("MATRIX_LR 0.04 -> 0.05", "MATRIX_LR = 0.04", "MATRIX_LR = 0.05")])
    p.propose(context)

For the walkthrough notebook and tests: a scripted agent whose steps are known in
advance, run through the same validation as any other proposal. Patches are unified
diffs (`git format-patch`, `git diff` or `diff -u`) applied to the context's parent; the
description comes from a `Subject:` line, else a first `#` comment line, else the file
name. Each call takes the next item; an item identical to an experiment already in the
ledger is skipped (so re-running a notebook resumes where it stopped); an item that does
not apply raises ProposalError and is consumed, so the next call moves on.

    python -m pytest tests/test_replay.py -q
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

from autoresearch_kit.propose.base import Proposal, ProposalContext, ProposalError, source_hash
from autoresearch_kit.propose.edits import EditBlock, EditError, apply_edits, apply_unified_diff, make_proposal

PATCH_SUFFIXES = (".patch", ".diff")


@dataclass
class ReplayItem:
    """One scripted step: a unified diff, or SEARCH/REPLACE edits, with its description."""

    description: str
    patch: str = ""
    edits: tuple[tuple[str, str], ...] = ()
    rationale: str = ""
    origin: str = ""                 # file name or list index, for messages


def read_patch(text: str, name: str = "") -> ReplayItem:
    """A ReplayItem from a patch file's text: description from Subject:, a # line or `name`."""
    head = text.split("\n--- ", 1)[0].split("\ndiff --git", 1)[0]
    description, rationale = "", []
    lines = head.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^Subject:\s*(?:\[PATCH[^\]]*\]\s*)?(.*)$", line)
        if m:
            description = m.group(1).strip()
            body = lines[i + 1:]
            rationale = [l for l in body if not re.match(r"^(From|Date|---|index |diff )", l)]
            break
    if not description:
        for i, line in enumerate(lines):
            if line.startswith("#"):
                description = line.lstrip("#").strip()
                rationale = [l.lstrip("#").strip() for l in lines[i + 1:] if l.startswith("#")]
                break
    if not description:
        stem = Path(name).stem if name else "patch"
        description = re.sub(r"^\d+[-_ ]*", "", stem).replace("_", " ").replace("-", " ").strip() or stem
    return ReplayItem(description=description, patch=text, rationale="\n".join(rationale).strip(), origin=name)


EditSpec = Union[tuple, ReplayItem, str]


class ReplayProposer:
    """Proposals from patch files (a folder, in name order) or `(description, search, replace)` edits.

    Parameters
    ----------
    source
        A folder of `*.patch` / `*.diff` files, a list of patch file paths, or a list of
        edits: `(description, search, replace)` or `(description, [(search, replace), ...])`
        tuples, or ReplayItem objects.
    skip_seen
        Skip items whose result is already in the ledger (`context.seen_hashes`).
    """

    name = "replay"

    def __init__(self, source: str | Path | Sequence[EditSpec], *, skip_seen: bool = True) -> None:
        self.items = self._load(source)
        self.skip_seen = skip_seen
        self.position = 0

    def __repr__(self) -> str:
        return f"ReplayProposer({len(self.items)} items, at {self.position})"

    @property
    def remaining(self) -> int:
        return len(self.items) - self.position

    def reset(self) -> None:
        """Start again from the first item."""
        self.position = 0

    @staticmethod
    def _load(source) -> list[ReplayItem]:
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if not folder.is_dir():
                msg = f"replay: {folder} is not a folder of .patch/.diff files"
                raise FileNotFoundError(msg)
            files = sorted(p for p in folder.iterdir() if p.suffix in PATCH_SUFFIXES)
            if not files:
                msg = f"replay: {folder} holds no *.patch or *.diff files"
                raise FileNotFoundError(msg)
            return [read_patch(p.read_text(), p.name) for p in files]
        items = []
        for i, spec in enumerate(source):
            if isinstance(spec, ReplayItem):
                items.append(spec)
            elif isinstance(spec, Path) or (isinstance(spec, str) and Path(spec).suffix in PATCH_SUFFIXES
                                             and Path(spec).is_file()):
                items.append(read_patch(Path(spec).read_text(), Path(spec).name))
            elif isinstance(spec, tuple) and len(spec) == 3 and all(isinstance(x, str) for x in spec):
                items.append(ReplayItem(description=spec[0], edits=((spec[1], spec[2]),), origin=f"edit {i + 1}"))
            elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Iterable):
                items.append(ReplayItem(description=spec[0], edits=tuple(tuple(e) for e in spec[1]),
                                        origin=f"edit {i + 1}"))
            else:
                msg = (f"replay: item {i + 1} ({spec!r:.60}) is not a patch file, a ReplayItem or a "
                       f"(description, search, replace) tuple")
                raise TypeError(msg)
        return items

    def _source(self, item: ReplayItem, parent: str) -> str:
        if item.patch:
            return apply_unified_diff(parent, item.patch)
        return apply_edits(parent, [EditBlock(search=s, replace=r) for s, r in item.edits])

    def propose(self, context: ProposalContext) -> Proposal:
        """The next item applied to the parent.

        Raises
        ------
        ProposalError
            "replay exhausted: ..." when no items are left, or the item does not apply /
            validate (it is consumed, so the next call moves on).
        """
        t0 = time.perf_counter()
        seen = set(context.seen_hashes)
        skipped = []
        while self.position < len(self.items):
            item = self.items[self.position]
            self.position += 1
            where = item.origin or f"item {self.position}"
            try:
                source = self._source(item, context.parent_source)
            except EditError as e:
                msg = f"replay: {where} ({item.description!r}) does not apply: {e}"
                raise ProposalError(msg, metadata={"item": where}) from None
            if self.skip_seen and source_hash(source) in seen:
                skipped.append(where)
                continue
            meta = {"item": where, "position": self.position, "of": len(self.items), "skipped": skipped,
                    "seconds": round(time.perf_counter() - t0, 4)}
            return make_proposal(context, source, item.description, proposer=self.name,
                                 rationale=item.rationale, metadata=meta)
        msg = (f"replay exhausted: all {len(self.items)} items have been proposed"
               + (f" ({len(skipped)} skipped as already run)" if skipped else "")
               + "; switch to proposer='mutate' or 'llm', or reset() the replay")
        raise ProposalError(msg)
