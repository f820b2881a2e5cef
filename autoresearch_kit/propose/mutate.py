"""Offline proposer: a seeded local search over train.py's hyperparameter block.

    from autoresearch_kit.propose.mutate import MutateProposer
    p = MutateProposer(seed=0)
    p.propose(context).description        # e.g. "MATRIX_LR 0.04 -> 0.05"

The default when no LLM endpoint is configured. It reads train.py with `ast`, finds the
module-level UPPER_CASE constants with literal values (numbers, bools, strings, `2**k`,
and literals inside tuples, `a if cond else b`, and preset dicts), and changes one or two
of them the way a researcher would: scale a learning rate, double or halve a power of
two, add or remove a layer, nudge a warmup/warmdown fraction, toggle a flag, switch a
categorical among the values its comment lists. Only the literal's source span is
replaced, so comments and layout survive.

The human's feedback for the step steers it ("try a higher lr" makes an LR increase
likelier). It learns from the ledger: a change whose direction was kept is tried again more often
(DEPTH up was kept -> DEPTH up is likelier), a discarded or crashed direction less, and
an edit already tried (same source hash, or the same constant change) is never
proposed twice. Proposals are reproducible: (constructor seed, context.seed, parent).

    python -m pytest tests/test_mutate.py -q
"""

from __future__ import annotations

import ast
import io
import math
import os
import random
import re
import time
import tokenize
from dataclasses import dataclass, field
from typing import Any

from autoresearch_kit.propose.base import (HistoryEntry, Proposal, ProposalContext, ProposalError, source_hash,
                                           unified_diff)
from autoresearch_kit.propose.edits import clean_description, validate

_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Not research knobs: seeds, logging cadence, paths, the device. Changing them says nothing
# about the model (or breaks the run on another machine).
# torch.compile flags too: on a CPU box a toggle is a crash or a slow warm-up, not a finding.
_SKIP = re.compile(r"(^|_)(SEED|EVERY|LOG|PRINT|VERBOSE|EVAL|DEVICE|PATH|DIR|FILE|NAME|URL|VERSION|COMPILE)(_|$)")

# Categorical values a researcher would cycle through when the comment lists none.
KNOWN_CHOICES = (
    ("relu2", "relu", "gelu", "silu", "swiglu"),
    ("rmsnorm", "layernorm"),
    ("muon", "adamw", "adam", "sgd"),
    ("cosine", "linear", "constant", "wsd"),
    ("bfloat16", "float16", "float32"),
)

# History outcome -> how the weight of that (knob, direction) changes.
_KEEP, _DISCARD, _FAIL = 2.0, 0.6, 0.3


@dataclass
class _Leaf:
    """One literal in the source: its span (character offsets) and parsed value."""

    start: int
    end: int
    text: str
    value: Any
    kind: str            # bool | int | float | str | pow2 (the exponent of 2**k)
    full: str = ""       # for pow2: "2**19" (what the description shows)
    path: tuple = ()     # dict keys / tuple indices from the constant down to this literal


@dataclass
class _Site:
    """A knob: one or more literals changed together (both branches of `a if c else b`)."""

    label: str           # "MATRIX_LR", "ADAM_BETAS[1]", "PRESETS.dropout"
    name: str            # the top-level constant, for history matching
    key: str             # what the rules look at, upper case ("PRESETS_DROPOUT")
    leaves: list[_Leaf] = field(default_factory=list)
    comment: str = ""
    last: Any = None     # last dict key / tuple index in the value (None for a plain literal)
    names: tuple = ()    # every constant the knob spans (CPU_DEPTH and GPU_DEPTH); default (name,)

    def __post_init__(self) -> None:
        self.names = self.names or (self.name,)


@dataclass
class _Move:
    site: _Site
    op: tuple            # ("mul", f) | ("add", d) | ("pow2", d) | ("set", v) | ("toggle",) | ("beta", f)
    new: list[str]       # new text per leaf
    direction: int       # +1 up, -1 down, 0 (toggle / categorical)

    def describe(self) -> str:
        old = "|".join(l.full or l.text for l in self.site.leaves)
        new = "|".join(_show(l, t) for l, t in zip(self.site.leaves, self.new))
        return f"{self.site.label} {old} -> {new}"


def _show(leaf: _Leaf, text: str) -> str:
    if leaf.kind == "pow2":
        return leaf.full[:len(leaf.full) - len(leaf.text)] + text
    return text


# ------------------------------------------------------------------------ reading

def _offsets(source: str) -> tuple[list[int], list[bytes]]:
    lines = source.splitlines(keepends=True)
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)
    return starts, [l.encode() for l in lines]


def _char(starts, blines, lineno: int, col: int) -> int:
    """ast (line, utf-8 byte column) -> character offset in the source."""
    return starts[lineno - 1] + len(blines[lineno - 1][:col].decode())


def _comments(source: str) -> dict[int, str]:
    out = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _leaves(node: ast.AST, path: tuple, source: str, starts, blines):
    """(path, leaf) for every mutable literal inside a constant's value."""
    def leaf(n: ast.AST, value, kind: str, **kw) -> _Leaf:
        a, b = _char(starts, blines, n.lineno, n.col_offset), _char(starts, blines, n.end_lineno, n.end_col_offset)
        return _Leaf(a, b, source[a:b], value, kind, **kw)

    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            yield path, leaf(node, v, "bool")
        elif isinstance(v, int):
            yield path, leaf(node, v, "int")
        elif isinstance(v, float) and math.isfinite(v):
            yield path, leaf(node, v, "float")
        elif isinstance(v, str) and 0 < len(v) <= 24 and "/" not in v:
            yield path, leaf(node, v, "str")
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        v = node.operand.value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield path, leaf(node, -v, "float" if isinstance(v, float) else "int")
    elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and isinstance(node.left, ast.Constant)
          and node.left.value == 2 and isinstance(node.right, ast.Constant) and type(node.right.value) is int):
        whole = leaf(node, None, "pow2")
        exp = leaf(node.right, node.right.value, "pow2")
        exp.full = source[whole.start:exp.end]
        yield path, exp
    elif isinstance(node, ast.IfExp):       # DEPTH = 4 if cpu else 8: both branches, one knob
        yield from _leaves(node.body, path, source, starts, blines)
        yield from _leaves(node.orelse, path, source, starts, blines)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for i, elt in enumerate(node.elts):
            yield from _leaves(elt, path + (i,), source, starts, blines)
    elif isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, (str, int)):
                yield from _leaves(v, path + (k.value,), source, starts, blines)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for kw in node.keywords:
            if kw.arg:
                yield from _leaves(kw.value, path + (kw.arg,), source, starts, blines)


def _assignments(body: list[ast.stmt]):
    """Module-level `NAME = value` (also inside module-level if/else blocks)."""
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            yield node.target.id, node
        elif isinstance(node, ast.If):
            yield from _assignments(node.body)
            yield from _assignments(node.orelse)


def find_knobs(source: str, device: str | None = None) -> list[_Site]:
    """The hyperparameter knobs of a train.py, in source order.

    Parameters
    ----------
    source
        train.py text.
    device
        "cpu", "mps" or "cuda" to change only the CPU_* or GPU_* knobs that device uses;
        None pairs them (CPU_DEPTH and GPU_DEPTH move together), so an experiment
        means the same thing on every machine.
    """
    tree = ast.parse(source)
    starts, blines = _offsets(source)
    comments = _comments(source)
    groups: dict[tuple, _Site] = {}
    for name, node in _assignments(tree.body):
        if not _UPPER.match(name) or _SKIP.search(name):
            continue
        for path, lf in _leaves(node.value, (), source, starts, blines):
            # Grouping by the last key puts the same field of every preset in one knob
            # (PRESETS["cpu"]["depth"], PRESETS["cuda"]["depth"]) and both IfExp branches.
            last = path[-1] if path else None
            if isinstance(last, str) and _SKIP.search(last.upper()):
                continue
            gkey = (name, last, lf.kind)
            if gkey not in groups:
                label = name if last is None else (f"{name}.{last}" if isinstance(last, str) else f"{name}[{last}]")
                key = name if last is None else f"{name}_{last}".upper()
                groups[gkey] = _Site(label=label, name=name, key=key, comment=comments.get(node.end_lineno, ""),
                                     last=last)
            lf.path = path
            groups[gkey].leaves.append(lf)
    sites = []
    for site in groups.values():
        # Mixed bools/strings across presets (compile: False | True) are separate choices.
        if site.leaves[0].kind in ("bool", "str") and len({l.value for l in site.leaves}) > 1:
            for lf in site.leaves:
                label = site.name + "".join(f".{k}" if isinstance(k, str) else f"[{k}]" for k in lf.path)
                sites.append(_Site(label, site.name, site.key, [lf], site.comment, site.last))
        else:
            sites.append(site)
    return sorted(_pair_devices(sites, device), key=lambda s: s.leaves[0].start)


_DEVICE_PREFIX = re.compile(r"^(CPU|GPU|CUDA|MPS)_(.+)$")


def _pair_devices(sites: list[_Site], device: str | None) -> list[_Site]:
    """CPU_X / GPU_X: keep the device's own (device given) or merge them into one knob."""
    own = None if device is None else ("GPU", "CUDA") if device == "cuda" else ("CPU", "MPS")
    out, pairs = [], {}
    for s in sites:
        m = _DEVICE_PREFIX.match(s.name)
        if not m or s.last is not None:
            out.append(s)
        elif own is not None:
            if m.group(1) in own:
                out.append(s)
        else:
            pairs.setdefault((m.group(2), s.leaves[0].kind), []).append(s)
    for group in pairs.values():
        if len(group) == 1 or len({len(s.leaves) for s in group}) > 1:
            out.extend(group)
            continue
        first = group[0]
        out.append(_Site(label="|".join(s.label for s in group), name=first.name, key=first.key,
                         leaves=[l for s in group for l in s.leaves], comment=first.comment,
                         names=tuple(s.name for s in group)))
    return out


# ------------------------------------------------------------------------ moves

def _fmt_float(x: float, like: str) -> str:
    """A scaled value the way a person writes it: 2 significant digits (3 if 2 lose the change)."""
    two = float(f"{x:.2g}")
    x = two if two != _num(like) else float(f"{x:.3g}")
    if x != 0 and ("e" in like.lower() or abs(x) < 1e-4):
        mant, exp = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return repr(x)


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _ops(site: _Site) -> list[tuple]:
    """The changes a researcher would try on this knob (before checking they apply)."""
    leaf, key = site.leaves[0], site.key
    v = leaf.value
    if leaf.kind == "bool":
        return [("toggle",)]
    if leaf.kind == "pow2":
        return [("pow2", 1), ("pow2", -1)]
    if leaf.kind == "str":
        alts = re.findall(r"[\"']([^\"']{1,24})[\"']", site.comment)
        if v not in alts:
            alts = next((list(c) for c in KNOWN_CHOICES if v in c), [])
        if not alts and re.fullmatch(r"[SL]{2,8}", v):      # sliding-window patterns like "SSSL"
            alts = [v[:i] + ("L" if c == "S" else "S") + v[i + 1:] for i, c in enumerate(v)]
        return [("set", a) for a in alts if a != v]
    if leaf.kind == "int":
        if re.search(r"DEPTH|LAYER", key):
            return [("add", 1), ("add", -1), ("add", 2), ("add", -2)]
        if v >= 2 and v & (v - 1) == 0:
            return [("mul", 2), ("mul", 0.5)]
        if v == 0:
            return [("add", 1)]
        if abs(v) <= 16:
            return [("add", 1), ("add", -1), ("add", 2), ("add", -2)]
        return [("mul", 1.25), ("mul", 0.8), ("mul", 1.5), ("mul", 0.67)]
    # floats
    if re.search(r"BETA|MOMENTUM", key) and 0 < v < 1:
        return [("beta", 0.5), ("beta", 2.0)]
    if re.search(r"WARMUP|WARMDOWN|COOLDOWN|RATIO|FRAC|DROPOUT|PCT|PROB", key) and 0 <= v <= 1:
        return [("add", 0.1), ("add", -0.1), ("add", 0.05), ("add", -0.05)]
    if re.search(r"LR|LEARNING_RATE", key):
        return [("mul", f) for f in (1.25, 0.8, 1.5, 0.67, 2.0, 0.5)]
    if "CLIP" in key:
        return [("set", 1.0)] if v == 0 else [("mul", 2.0), ("mul", 0.5), ("set", 0.0)]
    if re.search(r"DECAY|WD\b|_WD", key):
        return [("add", 0.05), ("add", 0.1)] if v == 0 else [("mul", 2.0), ("mul", 0.5), ("set", 0.0)]
    if v == 0:
        return []                     # a zero we know nothing about: leave it
    return [("mul", f) for f in (1.25, 0.8, 2.0, 0.5)]


def _apply_op(leaf: _Leaf, op: tuple, key: str) -> str | None:
    """New source text for one literal, or None if the op makes no sense for it."""
    v, kind = leaf.value, leaf.kind
    if op[0] == "toggle":
        return repr(not v)
    if op[0] == "set":
        new = op[1]
        if kind == "str":
            q = leaf.text[0] if leaf.text[:1] in "\"'" else '"'
            return None if new == v else f"{q}{new}{q}"
        return None if new == v else _fmt_float(float(new), leaf.text)
    if kind == "pow2":
        e = v + op[1]
        return str(e) if e >= 0 else None
    if op[0] == "beta":
        new = 1 - (1 - v) * op[1]
        if not 0 < new < 1:
            return None
        new = round(new, 4)
        return None if new == v else repr(new)
    if kind == "int":
        new = v + op[1] if op[0] == "add" else int(round(v * op[1]))
        if new == v or (v >= 1 and new < 1):
            return None
        return str(new)
    # float
    if op[0] == "add":
        hi = 0.5 if "DROPOUT" in key else 1.0
        new = round(v + op[1], 4)
        if not 0 <= new <= hi:
            return None
        text = repr(new)
    else:
        text = _fmt_float(v * op[1], leaf.text)
    return None if float(text) == v else text


def _moves(site: _Site) -> list[_Move]:
    out = []
    for op in _ops(site):
        new = [_apply_op(l, op, site.key) for l in site.leaves]
        if any(t is None for t in new):
            continue
        leaf = site.leaves[0]
        if op[0] == "toggle" or leaf.kind == "str":
            d = 0
        else:
            d = 1 if float(new[0]) > float(leaf.value) else -1
        out.append(_Move(site, op, new, d))
    return out


def _edit(source: str, moves: list[_Move]) -> str:
    spans = sorted(((l.start, l.end, t) for m in moves for l, t in zip(m.site.leaves, m.new)), reverse=True)
    for a, b, text in spans:
        source = source[:a] + text + source[b:]
    return source


# ------------------------------------------------------------------------ history

def _values(expr: str) -> list[tuple[tuple, Any]]:
    """(path, value) of the literals in a constant's right-hand side."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return []
    starts, blines = _offsets(expr)
    return [(p, (lf.value, lf.kind)) for p, lf in _leaves(node, (), expr, starts, blines)]


def _diff_changes(diff: str) -> dict[str, tuple[str, str]]:
    """{NAME: (old rhs, new rhs)} for top-level UPPER_CASE assignments a diff changes."""
    old, new = {}, {}
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        m = re.match(r"^([+-])([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.+)$", line)
        if m:
            rhs = re.sub(r"\s+#.*$", "", m.group(3)).strip()
            (old if m.group(1) == "-" else new)[m.group(2)] = rhs
    return {k: (old[k], new[k]) for k in old if k in new and old[k] != new[k]}


def _directions(old: str, new: str) -> list[tuple[tuple, int]]:
    """(path-last-key, direction) for each literal that changed between two right-hand sides."""
    out: list[tuple[Any, int]] = []
    for (p, (a, ka)), (q, (b, kb)) in zip(_values(old), _values(new)):
        if p != q or a == b:
            continue
        last = p[-1] if p else None
        if ka in ("bool", "str") or kb in ("bool", "str"):
            out.append((last, 0))
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out.append((last, 1 if b > a else -1))
    return list(dict.fromkeys(out))      # both branches of `a if c else b` count once


def _outcome_factor(e: HistoryEntry) -> float | None:
    if e.status in ("crash", "timeout", "diverged", "invalid"):
        return _FAIL
    if e.decision == "keep":
        return _KEEP
    if e.decision == "discard" or e.status == "rejected":
        return _DISCARD
    return None                       # undecided / aborted: no evidence either way


def _norm(rhs: str) -> str:
    try:
        return ast.dump(ast.parse(rhs, mode="eval"))
    except SyntaxError:
        return rhs.replace(" ", "")


def _learn(history: list[HistoryEntry]) -> tuple[dict, set]:
    """Direction weights {(name, last_key, direction): w} and the set of changes already tried."""
    weights: dict[tuple, float] = {}
    tried: set[frozenset] = set()
    for e in history:
        changes = _diff_changes(e.diff)
        if changes:
            tried.add(frozenset((k, _norm(a), _norm(b)) for k, (a, b) in changes.items()))
        f = _outcome_factor(e)
        if f is None:
            continue
        for name, (a, b) in changes.items():
            for last, d in _directions(a, b):
                k = (name, last, d)
                weights[k] = weights.get(k, 1.0) * f
    return weights, tried


# ------------------------------------------------------------------------ feedback

# The human's note for this step ("try a higher lr", "deeper?") steers the offline proposer:
# knobs it names become 5x likelier, and the direction it asks for 3x likelier.
_FEEDBACK_SITE, _FEEDBACK_DIR = 5.0, 3.0
_UP = {"up", "higher", "increase", "larger", "more", "bigger", "deeper", "wider", "longer", "raise", "hotter"}
_DOWN = {"down", "lower", "decrease", "smaller", "less", "shallower", "narrower", "shorter", "reduce", "cooler"}
_SYNONYMS = {"lr": "LR", "learning": "LR", "depth": "DEPTH", "layers": "DEPTH", "deeper": "DEPTH",
             "shallower": "DEPTH", "batch": "BATCH", "warmup": "WARMUP", "warmdown": "WARMDOWN",
             "decay": "DECAY", "wd": "DECAY", "width": "ASPECT", "wider": "ASPECT", "context": "SEQ_LEN",
             "seq": "SEQ_LEN", "momentum": "MOMENTUM", "beta": "BETA", "clip": "CLIP", "heads": "HEAD"}


# A clause with one of these ("learning-rate changes are done", "don't touch depth")
# turns its knobs away instead of towards: 5x less likely rather than 5x more.
_NEGATIONS = {"no", "not", "don't", "dont", "never", "stop", "avoid", "done", "enough", "leave", "without",
              "skip", "nothing"}


def _feedback_hint(feedback: str, sites: list[_Site]) -> dict:
    """Knobs (by id) the human's free text asks about or away from, and a direction (+1/-1/0)."""
    hit, avoid, direction = set(), set(), 0
    for clause in re.split(r"[.;,!?\n]|\bbut\b", feedback or ""):
        words = re.findall(r"[A-Za-z][A-Za-z0-9_']*", clause)
        lower = {w.lower() for w in words}
        parts = {w.upper() for w in words if len(w) > 2 and w.isupper() or "_" in w}      # MATRIX_LR
        parts |= {_SYNONYMS[w] for w in lower if w in _SYNONYMS}
        named = {id(site) for site in sites
                 if any(p in " ".join(site.names) + " " + site.key for p in parts)}
        if lower & _NEGATIONS:
            avoid |= named
            continue
        hit |= named
        direction = direction or (1 if lower & _UP else 0) - (1 if lower & _DOWN else 0)
    return {"sites": hit - avoid, "avoid": avoid, "direction": direction}


# ------------------------------------------------------------------------ proposer


def training_device() -> str:
    """"cuda", "mps" or "cpu": AUTORESEARCH_DEVICE if set, else what torch sees (as device.detect)."""
    forced = os.environ.get("AUTORESEARCH_DEVICE", "").strip().lower()
    if forced:
        return forced.split(":")[0]
    from autoresearch_kit.device import detect

    return detect(announce=False).type


class MutateProposer:
    """Seeded, history-aware local search over train.py's UPPER_CASE constants.

    Parameters
    ----------
    seed
        Combined with `context.seed` and the parent's hash: the same inputs give the
        same proposal from a fresh proposer; asking the same instance again with an
        identical context gives the next draw (a new idea), also reproducibly.
    device
        "cpu", "mps" or "cuda": change only that device's CPU_*/GPU_* knobs (shared knobs
        always). "auto" (the default): the device training runs on (AUTORESEARCH_DEVICE,
        else what torch sees), so a CPU lab never ships untested GPU_* changes; a Lab
        sets its own device here. None moves each CPU_X/GPU_X pair together.
    p_two
        Probability of changing two knobs at once instead of one.
    max_tries
        Random draws before falling back to trying every single change in turn.
    """

    name = "mutate"

    def __init__(self, seed: int = 0, *, device: str | None = "auto", p_two: float = 0.3,
                 max_tries: int = 64) -> None:
        self.seed, self.device, self.p_two, self.max_tries = seed, device, p_two, max_tries
        # Asking again with the same context ("New proposal" in the panel) should give a new
        # idea, not the same one: the n-th call with an identical context uses draw n.
        self._asked: dict[tuple, int] = {}

    def __repr__(self) -> str:
        return f"MutateProposer(seed={self.seed}, device={self.device!r})"

    def _device(self) -> str | None:
        """The device whose knobs change: "auto" resolved once (AUTORESEARCH_DEVICE, else torch)."""
        if self.device == "auto":
            self.device = training_device()
        if self.device is not None and self.device not in ("cpu", "mps", "cuda"):
            self.device = self.device.split(":")[0]
        return self.device

    def propose(self, context: ProposalContext) -> Proposal:
        """One valid, untried edit of the hyperparameter block.

        Raises
        ------
        ProposalError
            train.py has no knob this proposer understands, or every change is tried.
        """
        t0 = time.perf_counter()
        parent = context.parent_source
        try:
            sites = find_knobs(parent, self._device())
        except SyntaxError as e:
            msg = f"mutate: the parent train.py does not parse ({e.msg}, line {e.lineno}); fix it first"
            raise ProposalError(msg) from None
        moves = {id(s): _moves(s) for s in sites}
        sites = [s for s in sites if moves[id(s)]]
        if not sites:
            msg = ("mutate: train.py has no UPPER_CASE constants with literal values to change; put the "
                   "hyperparameters in a constants block (e.g. MATRIX_LR = 0.04) or use the llm proposer")
            raise ProposalError(msg)
        weights, tried = _learn(context.history)
        seen = set(context.seen_hashes) | {e.source_hash for e in context.history if e.source_hash}
        key = (context.seed, source_hash(parent), frozenset(seen))
        draw = self._asked.get(key, 0)
        self._asked[key] = draw + 1
        rng = random.Random(f"mutate:{self.seed}:{context.seed}:{source_hash(parent)}"
                            + (f":{draw}" if draw else ""))

        hint = _feedback_hint(context.feedback, sites)

        def move_weight(m: _Move) -> float:
            ws = [weights[k] for k in ((n, m.site.last, m.direction) for n in m.site.names) if k in weights]
            w = sum(ws) / len(ws) if ws else 1.0
            if id(m.site) in hint["sites"]:
                w *= _FEEDBACK_SITE * (_FEEDBACK_DIR if hint["direction"] and m.direction == hint["direction"] else 1.0)
            elif id(m.site) in hint["avoid"]:
                w /= _FEEDBACK_SITE
            return w

        def site_weight(s: _Site) -> float:
            return max(move_weight(m) for m in moves[id(s)])

        def candidate(chosen: list[_Move]) -> tuple[str, str] | None:
            source = _edit(parent, chosen)
            if source_hash(source) in seen:
                return None
            changes = _diff_changes(_line_diff(parent, source))
            if frozenset((k, _norm(a), _norm(b)) for k, (a, b) in changes.items()) in tried:
                return None
            if validate(parent, source, seen):   # compile + integrity, once per candidate
                return None
            return source, ", ".join(m.describe() for m in chosen)

        found, tries = None, 0
        for tries in range(1, self.max_tries + 1):
            k = 2 if len(sites) > 1 and rng.random() < self.p_two else 1
            pool, chosen = list(sites), []
            for _ in range(k):
                s = rng.choices(pool, weights=[site_weight(x) for x in pool])[0]
                pool.remove(s)
                ms = moves[id(s)]
                chosen.append(rng.choices(ms, weights=[move_weight(m) for m in ms])[0])
            chosen.sort(key=lambda m: m.site.leaves[0].start)
            found = candidate(chosen)
            if found:
                break
        if not found:                  # exhaustive pass over single changes, in seeded order
            singles = [m for s in sites for m in moves[id(s)]]
            rng.shuffle(singles)
            for m in singles:
                tries += 1
                found = candidate([m])
                if found:
                    chosen = [m]
                    break
        if not found:
            msg = (f"mutate: every single change of the {len(sites)} knobs in train.py has been tried; "
                   f"edit train.py by hand, widen the constants block, or use the llm proposer")
            raise ProposalError(msg)
        source, description = found
        notes = []
        for m in chosen:
            w = move_weight(m)
            way = {1: "up", -1: "down", 0: "to a new value"}[m.direction]
            if id(m.site) in hint["sites"]:
                notes.append(f"{m.site.label} is what the feedback asked about")
            elif w > 1:
                notes.append(f"moving {m.site.label} {way} helped before (kept), so it is tried again")
            elif w < 1:
                notes.append(f"moving {m.site.label} {way} did not help before; tried again with low probability")
        rationale = ("Offline local search over the hyperparameter block (seed "
                     f"{self.seed}/{context.seed}): {description}." + (" " + "; ".join(notes) + "." if notes else ""))
        meta = {"seed": self.seed, "context_seed": context.seed, "draw": draw, "tries": tries, "device": self.device,
                "changes": [{"name": m.site.label, "old": "|".join(l.full or l.text for l in m.site.leaves),
                             "new": "|".join(_show(l, t) for l, t in zip(m.site.leaves, m.new)),
                             "direction": m.direction} for m in chosen],
                "seconds": round(time.perf_counter() - t0, 4)}
        # validated above: wrap without paying for the integrity check a second time
        return Proposal(source=source, diff=_line_diff(parent, source), description=clean_description(description),
                        rationale=rationale, proposer=self.name, parent_id=context.parent_id,
                        metadata={"proposer": self.name, **meta})


def _line_diff(a: str, b: str) -> str:
    return unified_diff(a, b)
