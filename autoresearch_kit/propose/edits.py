"""Edits to train.py: parse a proposer's reply, apply it, and validate the result.

Every proposal (LLM, offline mutation, replayed patch, human edit) goes through
`validate` here, so "valid" means the same thing whoever proposed it:

- the new source compiles (`compile()`), and differs from the parent;
- it is not a repeat of an experiment already in the ledger (`source_hash`);
- it passes `autoresearch_kit.integrity.check_source` (the runner checks again before it runs).

The LLM reply format (see prompts.py) is SEARCH/REPLACE blocks against the parent,

    train.py
    <<<<<<< SEARCH
    MATRIX_LR = 0.04
    =======
    MATRIX_LR = 0.05
    >>>>>>> REPLACE

or one ```python block holding the complete file, plus `DESCRIPTION:` and `RATIONALE:`
lines. Blocks are matched exactly first, then ignoring trailing whitespace, then ignoring
indentation (the replacement is re-indented by the same offset), because models drift on
whitespace far more often than on code. Unified diffs (replay patches, a model's ```diff
block) apply here too, as leniently as `patch` / `git apply --recount`: hunk lengths are
counted from the body, and each hunk is placed by its lines, never by line number alone.

    python -m pytest tests/test_propose_edits.py -q
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from autoresearch_kit import integrity
from autoresearch_kit.propose.base import (HistoryEntry, Proposal, ProposalContext, ProposalError,
                                           source_hash, unified_diff)

TARGET = "train.py"
MAX_DESCRIPTION = 120          # results.tsv column; a line a person reads at a glance

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$", re.IGNORECASE)
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
# "train.py", "`train.py`", "**File: src/other.py**", "# file: other.py", "path/x.py:"
_EXT = r"(?:py|pyi|ipynb|md|txt|toml|cfg|ini|json|ya?ml|sh|c|cc|cpp|h|cu|rs|js|ts|patch|diff)"
_PATH_LINE = re.compile(r"^[\s#*`>\-]*(?:file(?:name)?\s*[:=]\s*)?[`*\"']*([\w./\\-]+\." + _EXT + r")[`*\"':]*\s*$",
                        re.IGNORECASE)
# "DESCRIPTION: x", "**Description:** x", "description - x", "## Description" (text on the next line)
_HEADER = re.compile(r"^[\s#*>\-]*(description|rationale|summary|title|reason(?:ing)?)\s*\**\s*"
                     r"(?:[:\-]\s*\**\s*(.*)|)$", re.IGNORECASE)


class EditError(ValueError):
    """An edit that cannot be applied; the message is fed back to the model as is."""


@dataclass
class EditBlock:
    """One SEARCH/REPLACE block from a reply."""

    search: str
    replace: str
    path: str = TARGET


@dataclass
class ParsedReply:
    """What a reply carries: the edit (blocks or a whole file), description and rationale."""

    description: str = ""
    rationale: str = ""
    blocks: list[EditBlock] = field(default_factory=list)
    whole_file: str | None = None
    patch: str | None = None       # a ```diff block (unified diff), when the model sent one


# ----------------------------------------------------------------------------- parsing

def _named_path(line: str) -> str | None:
    """The file a line names ('train.py', '**other.py**'), or None if it names none."""
    m = _PATH_LINE.match(line.strip())
    return m.group(1).replace("\\", "/") if m else None


def _is_target(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == TARGET


def _fence_path(info: str) -> str | None:
    """A path in a fence's info string: ```python train.py / ```python:other.py / ```other.py."""
    for token in re.split(r"[\s:]+", info.strip()):
        token = token.strip("`'\"")
        if re.fullmatch(r"[\w./\\-]+\." + _EXT, token, re.IGNORECASE):
            return token.replace("\\", "/")
    return None


def _previous_nonblank(lines: Sequence[str], i: int) -> str:
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return lines[j] if j >= 0 else ""


_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)


def strip_thinking(text: str) -> str:
    """A reply without its reasoning: everything up to the last `</think>`, and a `<think>...` tail.

    Reasoning models (qwen3, deepseek-r1) think aloud first, and their drafts (a python
    block, a SEARCH/REPLACE block, a JSON object) must not be taken for the answer. The
    opening `<think>` is often in the prompt template, not the reply (R1 distills, Qwen3
    through some servers): then only `</think>` shows, and what precedes it is reasoning
    too. A `<think>` never closed (cut off at max_tokens) leaves only the text before it.
    """
    text = text or ""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    m = _THINK_OPEN.search(text)
    if m:
        text = text[:m.start()]
    return text


def parse_reply(text: str) -> ParsedReply:
    """Split a proposer's reply into description, rationale and the edit.

    Parameters
    ----------
    text
        The model's reply.

    Returns
    -------
    ParsedReply
        `blocks` when the reply has SEARCH/REPLACE blocks, else `whole_file` when it has a
        ```python block; both empty when it has neither (the caller reports that).

    Raises
    ------
    EditError
        A block is malformed, or a block / fenced file names a file other than train.py.
    """
    text = strip_thinking((text or "").replace("\r\n", "\n"))
    lines = text.split("\n")
    out = ParsedReply()
    prose: list[str] = []          # lines outside blocks and fences
    fences: list[tuple[str | None, str]] = []   # (named path, body)
    open_fence = ""                # ``` around SEARCH/REPLACE blocks: skip its closing line
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if _SEARCH.match(line):
            k = len(out.blocks) + 1
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            prev = lines[j] if j >= 0 else ""
            fm = _FENCE.match(prev)
            if fm:   # train.py\n```python\n<<<<<<< SEARCH: the path is in or above the fence
                path = _fence_path(fm.group(2)) or _named_path(_previous_nonblank(lines, j))
            else:
                path = _named_path(prev)
            if path is not None and not _is_target(path):
                msg = f"edit block {k} is for {path!r}: only {TARGET} may be changed"
                raise EditError(msg)
            j = i + 1
            while j < n and not _DIVIDER.match(lines[j]):
                if _SEARCH.match(lines[j]) or _REPLACE.match(lines[j]):
                    msg = f"edit block {k} has no '=======' line between SEARCH and REPLACE"
                    raise EditError(msg)
                j += 1
            if j >= n:
                msg = f"edit block {k} has no '=======' line after '<<<<<<< SEARCH'"
                raise EditError(msg)
            m = j + 1
            while m < n and not _REPLACE.match(lines[m]) and not _SEARCH.match(lines[m]):
                m += 1
            if m >= n or not _REPLACE.match(lines[m]):
                msg = f"edit block {k} has no '>>>>>>> REPLACE' line"
                raise EditError(msg)
            search, replace = "\n".join(lines[i + 1:j]), "\n".join(lines[j + 1:m])
            out.blocks.append(EditBlock(search=search, replace=replace, path=path or TARGET))
            i = m + 1
            continue
        fm = _FENCE.match(line)
        if fm and open_fence and line.strip() == open_fence:
            open_fence = ""
            i += 1
            continue
        if fm:
            ticks, info = fm.group(1), fm.group(2)
            j = i + 1
            while j < n and lines[j].strip() != ticks and not _SEARCH.match(lines[j]):
                j += 1
            if j < n and _SEARCH.match(lines[j]):
                open_fence = ticks        # a fenced SEARCH/REPLACE block: parsed above
                i += 1
                continue
            body = "\n".join(lines[i + 1:j])
            path = _fence_path(info) or _named_path(_previous_nonblank(lines, i)) or _first_line_path(body)
            lang = info.strip().split()[0].lower() if info.strip() else ""
            if lang in ("diff", "patch") or _HUNK_LINE.search(body):
                out.patch = out.patch or body + "\n"
            elif lang in ("", "python", "py", "python3") or path:
                fences.append((path, body))
            i = j + 1
            continue
        prose.append(line)
        i += 1

    _parse_prose(prose, out)
    if out.blocks:
        return out
    code = [(p, b) for p, b in fences if b.strip()]
    for path, _ in code:
        if path is not None and not _is_target(path):
            msg = f"the reply's code block is for {path!r}: only {TARGET} may be changed"
            raise EditError(msg)
    if code:
        out.whole_file = max((b for _, b in code), key=len).rstrip("\n") + "\n"
    return out


def _first_line_path(body: str) -> str | None:
    """'# file: other.py' or '# other.py' as the first line of a fenced block."""
    first = body.lstrip("\n").split("\n", 1)[0]
    if re.match(r"^\s*#\s*(file(name)?\s*[:=]\s*)?[\w./\\-]+\.py\s*$", first, re.IGNORECASE):
        return _named_path(first)
    return None


def _parse_prose(prose: list[str], out: ParsedReply) -> None:
    """DESCRIPTION and RATIONALE from the text outside blocks, leniently."""
    rationale: list[str] = []
    section = None
    for line in prose:
        m = _HEADER.match(line)
        if m:
            key, rest = m.group(1).lower(), (m.group(2) or "").strip().strip("*").strip()
            if key in ("description", "summary", "title"):
                section = "description"
                if rest and not out.description:
                    out.description = rest
                continue
            section = "rationale"
            if rest:
                rationale.append(rest)
            continue
        if section == "description" and not out.description and line.strip():
            out.description = line.strip()
            continue
        if section == "rationale":
            if _named_path(line) and _is_target(_named_path(line) or ""):
                continue                   # the "train.py" line above a block
            rationale.append(line)
    text = "\n".join(rationale).strip()
    if not text:                           # no RATIONALE header: the prose is the rationale
        text = "\n".join(l for l in prose if not _HEADER.match(l)
                         and not (_named_path(l) and _is_target(_named_path(l) or ""))).strip()
    out.rationale = text[:2000]
    out.description = clean_description(out.description)


def clean_description(text: str) -> str:
    """One line for results.tsv: no tabs or newlines, no markdown emphasis, bounded length."""
    text = (text or "").strip().split("\n", 1)[0]
    text = re.sub(r"\s+", " ", text.replace("\t", " ")).strip().strip("*_` ").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" and text.count(text[0]) == 2:
        text = text[1:-1].strip()          # DESCRIPTION: "MATRIX_LR 0.04 -> 0.05"
    if len(text) > MAX_DESCRIPTION:
        text = text[:MAX_DESCRIPTION - 3].rstrip() + "..."
    return text


# ----------------------------------------------------------------------------- applying

def _snippet(text: str, limit: int = 80) -> str:
    first = next((l.strip() for l in text.split("\n") if l.strip()), "")
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _find_lines(hay: list[str], needle: list[str], norm: Callable[[str], str]) -> list[int]:
    want = [norm(l) for l in needle]
    have = [norm(l) for l in hay]
    k = len(want)
    return [i for i in range(len(have) - k + 1) if have[i:i + k] == want]


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _reindent(lines: list[str], delta: int) -> list[str]:
    """Shift every non-blank line by `delta` columns (uniformly, as a person would)."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif delta >= 0:
            out.append(" " * delta + line)
        else:
            cut = min(-delta, len(_indent(line)))
            out.append(line[cut:])
    return out


def apply_block(source: str, block: EditBlock, k: int = 1) -> str:
    """Apply one SEARCH/REPLACE block to `source` (block number `k` for messages).

    Exact match first; then line by line ignoring trailing whitespace; then ignoring
    indentation, re-indenting the replacement by the offset found. The SEARCH text must
    match exactly one place at the first level where it matches at all.
    """
    search, replace = block.search, block.replace
    if not search.strip():
        msg = (f"edit block {k}: the SEARCH part is empty; copy the lines to change from "
               f"the current {TARGET}")
        raise EditError(msg)
    count = source.count(search)
    if count == 1:
        return source.replace(search, replace, 1)
    if count > 1:
        msg = (f"edit block {k}: the SEARCH text matches {count} places in {TARGET} "
               f"(first line: {_snippet(search)!r}); include more surrounding lines so it "
               f"matches exactly one")
        raise EditError(msg)

    trailing_nl = source.endswith("\n")
    hay = source.split("\n")
    needle = search.strip("\n").split("\n")
    repl = replace.strip("\n").split("\n") if replace.strip() else []
    for level, norm in (("trailing whitespace", str.rstrip), ("indentation", str.strip)):
        hits = _find_lines(hay, needle, norm)
        if len(hits) > 1:
            msg = (f"edit block {k}: the SEARCH text matches {len(hits)} places in {TARGET} "
                   f"(ignoring {level}; first line: {_snippet(search)!r}); include more "
                   f"surrounding lines so it matches exactly one")
            raise EditError(msg)
        if len(hits) == 1:
            i = hits[0]
            new = repl
            if level == "indentation":
                first = next(j for j, l in enumerate(needle) if l.strip())
                delta = len(_indent(hay[i + first]).expandtabs(4)) - len(_indent(needle[first]).expandtabs(4))
                new = _reindent([l.expandtabs(4) for l in repl], delta)
            out = hay[:i] + new + hay[i + len(needle):]
            text = "\n".join(out)
            if trailing_nl and not text.endswith("\n"):
                text += "\n"
            return text
    # Compare code without trailing comments: a model quoting "X = 0.4" means "X = 0.04  # why".
    code = {l.split("#", 1)[0].strip(): l.strip() for l in hay if l.split("#", 1)[0].strip()}
    first = next((l for l in needle if l.strip()), "").split("#", 1)[0].strip()
    close = difflib.get_close_matches(first, list(code), n=1, cutoff=0.6)
    hint = f"; the closest line in {TARGET} is {code[close[0]]!r}" if close else ""
    msg = (f"edit block {k}: the SEARCH text was not found in {TARGET} (first line: "
           f"{_snippet(search)!r}){hint}. Copy the lines exactly from the current {TARGET}")
    raise EditError(msg)


def apply_edits(parent: str, blocks: Iterable[EditBlock]) -> str:
    """Apply SEARCH/REPLACE blocks in order; each must match exactly one place."""
    source = parent
    for k, block in enumerate(blocks, 1):
        if not _is_target(block.path):
            msg = f"edit block {k} is for {block.path!r}: only {TARGET} may be changed"
            raise EditError(msg)
        source = apply_block(source, block, k)
    return source


def apply_reply(parent: str, reply: ParsedReply) -> str:
    """The new train.py a parsed reply describes (blocks applied, a ```diff applied, or the whole file)."""
    if reply.blocks:
        return apply_edits(parent, reply.blocks)
    if reply.patch is not None and reply.whole_file is None:
        return apply_unified_diff(parent, reply.patch)
    if reply.whole_file is not None:
        body = reply.whole_file
        parent_lines = max(1, len(parent.strip().splitlines()))
        # A short code block is a fragment the model pasted, not a complete train.py.
        if len(body.strip().splitlines()) < 0.5 * parent_lines:
            msg = (f"the ```python block has {len(body.strip().splitlines())} lines but {TARGET} has "
                   f"{parent_lines}: it looks like a fragment. Use SEARCH/REPLACE blocks, or send the "
                   f"complete file")
            raise EditError(msg)
        elided = _elided(parent, body)
        if elided:
            msg = (f"the ```python block is not the complete {TARGET}: {elided}. Do not shorten the file; "
                   f"reply with SEARCH/REPLACE blocks that change only the lines you mean to change")
            raise EditError(msg)
        return body
    msg = (f"the reply has no SEARCH/REPLACE block and no ```python block with the complete "
           f"{TARGET}; reply with DESCRIPTION, RATIONALE and SEARCH/REPLACE blocks")
    raise EditError(msg)


# "# ... unchanged ...", "# (rest of the file as before)", "# ...", "// ... existing code ..."
_ELISION = re.compile(r"^\s*(?:#|//)\s*(?:\.\.\.|…|\(?\s*(?:the\s+)?(?:rest|remainder)\b"
                      r"|.*\b(?:unchanged|omitted|elided|as before|same as (?:before|above|the original)|"
                      r"existing code|remains the same|no changes?)\b)", re.IGNORECASE)


def _top_level_names(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _elided(parent: str, body: str) -> str:
    """Why a whole-file reply left code out ("" when it looks complete).

    Models shorten a long file with a placeholder comment ("# ... unchanged ..."), or drop
    a function the rest still calls; such a file compiles and crashes only when it runs.
    """
    parent_lines = {line.strip() for line in parent.split("\n")}
    for line in body.split("\n"):
        if _ELISION.match(line) and line.strip() not in parent_lines:
            return f"it has the placeholder line {line.strip()[:80]!r} where code was left out"
    try:
        old, new = ast.parse(parent), ast.parse(body)
    except SyntaxError:
        return ""                          # validate() reports a file that does not compile
    missing = _top_level_names(old) - _top_level_names(new)
    used = {n.id for n in ast.walk(new) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assigned = {n.id for n in ast.walk(new) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assigned |= {(a.asname or a.name).split(".")[0] for n in ast.walk(new) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
    gone = sorted(name for name in missing & used if name not in assigned)
    if gone:
        return f"{', '.join(gone[:5])} {'is' if len(gone) == 1 else 'are'} still used but no longer defined"
    return ""


# --------------------------------------------------------------------- unified diffs

# "@@ -10,7 +10,8 @@ def f():" as diff writes it; models also write "@@ -10 +10,2", "@@ -10,7 +10,8" and "@@ ... @@"
_HUNK = re.compile(r"^@@\s*-(\d+)(?:,(\d+))?\s+\+(\d+)(?:,(\d+))?")
_HUNK_LINE = re.compile(r"^@@(?=[\s\-]|$)", re.MULTILINE)


@dataclass
class _Hunk:
    """One hunk as its body says, whatever its header claims."""

    k: int
    header: str
    start: int | None              # the stated first line in the old file (1-based); None: no numbers
    old_count: int | None          # the stated count of old lines (only "-N,0" is trusted: a bare insertion)
    body: list[tuple[str, str]]    # (" " | "-" | "+", text)

    @property
    def old(self) -> list[str]:
        return [t for tag, t in self.body if tag != "+"]

    def where(self) -> str:
        head = self.header.strip()
        return f"hunk {self.k} of the patch ({head if len(head) <= 40 else head[:37] + '...'})"


def _file_header(lines: Sequence[str], i: int) -> bool:
    return lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")


def _ends_hunk(lines: Sequence[str], i: int) -> bool:
    line = lines[i]
    if line.startswith(("@@", "diff ", "Index: ")) or _file_header(lines, i):
        return True
    # git format-patch's signature: "-- " then the git version (not a removed line "- ")
    return line == "-- " and (i + 1 == len(lines) or bool(re.match(r"\d+\.\d+", lines[i + 1])))


def _hunk_body(lines: Sequence[str]) -> list[tuple[str, str]]:
    """The body's lines, counted from the body itself (`git apply --recount`), not from the header.

    It ends at its last ' '/'-'/'+' line: blank lines and prose after it are not part of it.
    An unmarked line before that is a context line whose leading space was lost (a blank line
    most often); it is matched against train.py like any other, so a stray line refuses the
    hunk rather than moving it.
    """
    marked = [j for j, line in enumerate(lines) if line[:1] in (" ", "-", "+")]
    body = []
    for line in lines[:marked[-1] + 1] if marked else ():
        if line.startswith("\\"):                  # "\ No newline at end of file"
            continue
        tag = line[:1]
        body.append((tag, line[1:]) if tag in (" ", "-", "+") else (" ", line))
    return body


def _parse_hunks(patch: str) -> tuple[list[_Hunk], bool]:
    """The patch's hunks for train.py, and whether it creates the file (--- /dev/null)."""
    lines = patch.replace("\r\n", "\n").split("\n")
    hunks: list[_Hunk] = []
    creates = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(("--- ", "+++ ")):
            path = line[4:].split("\t")[0].strip()
            if path == "/dev/null":
                creates = creates or line.startswith("---")
            else:
                path = re.sub(r"^[ab]/", "", path)
                if not _is_target(path):
                    msg = f"the patch changes {path!r}: only {TARGET} may be changed"
                    raise EditError(msg)
            i += 1
            continue
        if not line.startswith("@@"):
            i += 1
            continue
        m = _HUNK.match(line)
        j = i + 1
        while j < len(lines) and not _ends_hunk(lines, j):
            j += 1
        body = _hunk_body(lines[i + 1:j])
        if body:
            start = int(m.group(1)) if m else None
            count = (int(m.group(2)) if m.group(2) is not None else 1) if m else None
            hunks.append(_Hunk(len(hunks) + 1, line, start, count, body))
        i = j
    return hunks, creates


def _overlaps(a: int, b: int, spans: Iterable[tuple[int, int]]) -> bool:
    """Whether [a, b) crosses a span already taken (an insertion may touch one's edges)."""
    for c, d in spans:
        if (a < d and c < b) if a < b and c < d else (c < a < d if a == b else a < c < b):
            return True
    return False


def _not_found(hunk: _Hunk, hay: list[str]) -> str:
    """Why a hunk's context/removed lines are not in train.py, and what to do."""
    have = {line.rstrip() for line in hay}
    missing = next((t for t in hunk.old if t.strip() and t.rstrip() not in have), None)
    if missing is not None:
        code = {l.split("#", 1)[0].strip(): l.strip() for l in hay if l.split("#", 1)[0].strip()}
        close = difflib.get_close_matches(missing.split("#", 1)[0].strip(), list(code), n=1, cutoff=0.6)
        why = (f"its line {_snippet(missing)!r} is not in {TARGET}"
               + (f" (the closest line is {code[close[0]]!r})" if close else ""))
    else:
        why = f"its lines are in {TARGET} but not together in this order (a line left out or added?)"
    return (f"{hunk.where()} does not match {TARGET}: {why}. Copy its unchanged (' ') and removed ('-') lines "
            f"exactly from the current {TARGET}, or send SEARCH/REPLACE blocks instead")


def _locate(hunk: _Hunk, hay: list[str], want: int | None, taken: list[tuple[int, int]]) -> int:
    """Where a hunk's old lines are: exactly, else ignoring trailing whitespace; nearest `want` if several."""
    old = hunk.old
    for level, norm in (("", None), (" (ignoring trailing whitespace)", str.rstrip)):
        hits = [h for h in _find_lines(hay, old, norm or (lambda s: s))
                if not _overlaps(h, h + len(old), taken)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            continue
        lines = ", ".join(str(h + 1) for h in hits[:5]) + (" ..." if len(hits) > 5 else "")
        if want is None:
            msg = (f"{hunk.where()} matches {len(hits)} places in {TARGET}{level} (lines {lines}) and its header "
                   f"has no line number to choose by: add unchanged lines around the change until it matches "
                   f"one place, or send SEARCH/REPLACE blocks instead")
            raise EditError(msg)
        near = sorted(hits, key=lambda h: abs(h - want))
        if abs(near[0] - want) == abs(near[1] - want):
            msg = (f"{hunk.where()} matches {len(hits)} places in {TARGET}{level} (lines {lines}), two of them "
                   f"equally near its stated line {want + 1}: add unchanged lines around the change until it "
                   f"matches one place, or send SEARCH/REPLACE blocks instead")
            raise EditError(msg)
        return near[0]
    raise EditError(_not_found(hunk, hay))


def apply_unified_diff(parent: str, patch: str) -> str:
    """Apply a unified diff (git, diff -u, or a model's) for train.py to `parent`.

    Lenient the way `patch` and `git apply --recount` are, because models rarely get hunk
    headers right: each hunk's length is counted from its body (the header's counts are
    ignored, and may be missing), and each hunk is placed by its context and removed lines,
    exactly first, then ignoring trailing whitespace; when they match several places, the
    one nearest the stated line number (shifted by how far the previous hunk moved) wins.
    Context lines keep train.py's own text. Nothing is ever placed by line number alone:
    a hunk that only adds lines needs an explicit "-N,0" header (diff -U0), and one whose
    lines match nowhere, or match several places with no way to choose, refuses the patch.

    Raises
    ------
    EditError
        The diff names another file, has no hunk, or a hunk does not match (which one,
        its first line not found, and what to do).
    """
    hunks, creates = _parse_hunks(patch)
    if not hunks:
        msg = "the patch has no hunk ('@@ -a,b +c,d @@' lines): is it a unified diff?"
        raise EditError(msg)
    trailing_nl = parent.endswith("\n")
    hay = parent.split("\n")
    if trailing_nl:
        hay = hay[:-1]
    if creates and parent.strip():
        msg = (f"the patch creates {TARGET} from nothing (--- /dev/null), but {TARGET} exists: send a diff "
               f"against the current {TARGET}, or SEARCH/REPLACE blocks")
        raise EditError(msg)
    placed: list[tuple[int, _Hunk]] = []
    taken: list[tuple[int, int]] = []
    drift = 0                              # how far the last hunk was from its stated line
    for hunk in hunks:
        old = hunk.old
        if not old:                        # only '+' lines: nothing to check a place against
            pos = None if hunk.start is None or hunk.old_count != 0 else hunk.start + drift
            if pos is None or not 0 <= pos <= len(hay) or _overlaps(pos, pos, taken):
                msg = (f"{hunk.where()} only adds lines and has no unchanged lines to place it by: include 2-3 "
                       f"unchanged lines before and after the change (each starting with a space), or send "
                       f"SEARCH/REPLACE blocks instead")
                raise EditError(msg)
        else:
            want = None if hunk.start is None else max(0, hunk.start - 1 + drift)
            pos = _locate(hunk, hay, want, taken)
            if hunk.start is not None:
                drift = pos - (hunk.start - 1)
        placed.append((pos, hunk))
        taken.append((pos, pos + len(old)))
    # Bottom up, so each place found in the parent still holds. At one place the hunk that replaces
    # lines goes first, then the insertions there, last one first: they end up in the patch's order.
    for pos, hunk in sorted(placed, key=lambda p: (p[0], bool(p[1].old), p[1].k), reverse=True):
        out, j = [], pos
        for tag, text in hunk.body:
            if tag == "+":
                out.append(text)
            else:
                if tag == " ":
                    out.append(hay[j])     # train.py's own line (its trailing whitespace too)
                j += 1
        hay[pos:j] = out
    return "\n".join(hay) + ("\n" if trailing_nl else "")


# --------------------------------------------------------------------- validation

def validate(parent: str, source: str, seen_hashes: Iterable[str] = (), *,
             history: Sequence[HistoryEntry] = ()) -> list[str]:
    """Problems with a candidate train.py; an empty list means it is valid.

    Parameters
    ----------
    parent
        The train.py the candidate edits.
    source
        The candidate train.py.
    seen_hashes
        `source_hash` of every train.py already in the ledger (a repeat is refused).
    history
        Optional, to name the experiment a repeat duplicates.

    Returns
    -------
    list of str
        Each problem in words a model or a person can act on.
    """
    if not isinstance(source, str) or not source.strip():
        return [f"the new {TARGET} is empty"]
    problems: list[str] = []
    h = source_hash(source)
    if h == source_hash(parent):
        return [f"the edit changes nothing: the new {TARGET} is the same as the parent"]
    try:
        compile(source, TARGET, "exec")
    except SyntaxError as e:
        where = f"line {e.lineno}" + (f": {e.text.strip()!r}" if e.text and e.text.strip() else "")
        problems.append(f"the new {TARGET} does not compile: {e.msg} ({where})")
    except ValueError as e:        # e.g. null bytes in the source
        problems.append(f"the new {TARGET} does not compile: {e}")
    if h in set(seen_hashes):
        past = next((e for e in history if e.source_hash == h), None)
        what = (f" (experiment {past.exp_id}: {past.description!r}, {past.decision or past.status})"
                if past else "")
        problems.append(f"this {TARGET} was already tried{what}; propose a different change")
    if not problems:
        problems.extend(f"integrity: {p}" for p in integrity.check_source(source))
    return problems


def describe_change(parent: str, source: str) -> str:
    """A one-line description of an edit: changed UPPER_CASE constants, else the lines.

    The fallback when a reply or patch gives no description, e.g. "DEPTH 4 -> 5".
    """
    try:
        old, new = _constants(parent), _constants(source)
    except SyntaxError:
        old, new = {}, {}
    changed = [f"{k} {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
    changed += [f"add {k} = {new[k]}" for k in new if k not in old]
    changed += [f"remove {k}" for k in old if k not in new]
    if changed:
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        return clean_description(", ".join(changed[:3]) + more)
    plus = minus = 0
    for line in unified_diff(parent, source).splitlines():
        plus += line.startswith("+") and not line.startswith("+++")
        minus += line.startswith("-") and not line.startswith("---")
    return f"edit {TARGET} (+{plus} -{minus} lines)"


def _constants(source: str) -> dict[str, str]:
    """Module-level UPPER_CASE assignments -> their value's source text."""
    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and re.fullmatch(r"[A-Z][A-Z0-9_]*", t.id):
                    out[t.id] = ast.get_source_segment(source, node.value) or ast.unparse(node.value)
    return out


def make_proposal(context: ProposalContext, source: str, description: str, *, proposer: str,
                  rationale: str = "", metadata: dict | None = None, check_seen: bool = True) -> Proposal:
    """Validate `source` against the context and wrap it as a Proposal.

    Raises
    ------
    ProposalError
        When `validate` finds a problem (the reason lists them all).
    """
    seen = context.seen_hashes if check_seen else ()
    problems = validate(context.parent_source, source, seen, history=context.history)
    if problems:
        raise ProposalError("; ".join(problems), metadata=dict(metadata or {}))
    description = clean_description(description) or describe_change(context.parent_source, source)
    meta = {"proposer": proposer, **(metadata or {})}
    return Proposal(source=source, diff=unified_diff(context.parent_source, source),
                    description=description, rationale=(rationale or "").strip(), proposer=proposer,
                    parent_id=context.parent_id, metadata=meta)
