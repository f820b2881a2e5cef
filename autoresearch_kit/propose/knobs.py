"""The knob mode: a small model changes one UPPER_CASE constant of train.py, in JSON.

A 135M-parameter model cannot write SEARCH/REPLACE blocks against a 4k-token train.py
(0 valid edits in 9 replies from SmolLM2-135M, issue 14), but it can pick a knob and a
value when the prompt is short and the reply is constrained to
`{"knob": NAME, "value": NEW, "why": ONE SENTENCE}`. The kit does the rest:

- the prompt is program.md, the knob block (each knob with its comment) and a compact
  table of recent results (`build_messages`): ~1k tokens instead of ~5.5k;
- the reply is constrained by a JSON schema (`response_format`, `schema`) or, for servers
  that only take grammars (llama.cpp), a GBNF grammar (`grammar`, sent through extra_body);
- the value is range-checked here (`check_value`): the knob's type is kept (integers stay
  integers), its sign is kept, and it stays within 10x of the current value (fractions in
  [0, 1], betas in (0, 1)); a string knob takes one of the values its comment lists;
- the new train.py (`apply`) changes only the literal's characters, and the experiment's
  description is written by the kit (`describe`: "MATRIX_LR 0.02 -> 0.03"), never taken
  from the model's text.

    from autoresearch_kit.propose import knobs
    ks = knobs.find_knobs(source)
    change = knobs.parse_reply('{"knob": "MATRIX_LR", "value": 0.03, "why": "faster"}', ks)
    new_source = knobs.apply(source, change)

    python -m pytest tests/test_llm.py -q -k knob
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
from dataclasses import dataclass
from typing import Any

from autoresearch_kit.propose.base import HistoryEntry, ProposalContext, source_hash
from autoresearch_kit.propose.edits import EditError, strip_thinking
# The same "not a research knob" rule and categorical choices as the offline proposer.
from autoresearch_kit.propose.mutate import _SKIP, KNOWN_CHOICES

_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
SCALE = 10.0            # a value may move at most this factor from the current one (an order of magnitude)
ZERO_MAX = 100.0        # a knob at 0 gives no scale: it may become anything in [0, ZERO_MAX]
MAX_RESULTS = 12        # rows of the results table in the prompt
MAX_WHY = 300           # characters of the model's reason kept as the rationale
_FRACTION = re.compile(r"FRAC|RATIO|DROPOUT|PCT|PROB|WARMUP|WARMDOWN|COOLDOWN")
_BETA = re.compile(r"BETA|MOMENTUM")
_ZERO_OFF = re.compile(r"\b0(?:\.0)?\s*(?:turns|switches|disables|=|means|is)\b[^#]*\boff\b|\b0(?:\.0)?\s*disables",
                       re.IGNORECASE)


@dataclass
class Knob:
    """One module-level `NAME = literal` of train.py (a number, bool or short string)."""

    name: str
    value: Any              # bool | int | float | str (a 2**k literal as its int value)
    kind: str               # "bool" | "int" | "float" | "str"
    text: str               # the literal as written ("0.02", "2**12", '"relu2"')
    start: int              # character span of the literal in the source
    end: int
    comment: str = ""       # the line's comment, without the leading '#'
    choices: tuple = ()     # for str knobs: the values the comment (or a known family) lists

    @property
    def line(self) -> str:
        """`NAME = value  # comment`, as the prompt shows it."""
        return f"{self.name} = {self.text}" + (f"  # {self.comment}" if self.comment else "")


@dataclass
class KnobChange:
    """A checked change: the knob, its new value (converted to the knob's type) and the model's reason."""

    knob: Knob
    value: Any
    why: str = ""

    @property
    def new_text(self) -> str:
        return format_value(self.knob, self.value)


# ----------------------------------------------------------------------------- reading train.py

def _comments(source: str) -> dict[int, str]:
    out = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _literal(node: ast.AST) -> tuple[Any, str] | None:
    """(value, kind) of a scalar literal: 3, -0.5, True, "relu2", 2**12; None otherwise."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return v, "bool"
        if isinstance(v, int):
            return v, "int"
        if isinstance(v, float) and math.isfinite(v):
            return v, "float"
        if isinstance(v, str) and 0 < len(v) <= 24 and "/" not in v and "\n" not in v:
            return v, "str"
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _literal(node.operand)
        if inner and inner[1] in ("int", "float"):
            return -inner[0], inner[1]
        return None
    if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and isinstance(node.left, ast.Constant)
            and node.left.value == 2 and isinstance(node.right, ast.Constant) and type(node.right.value) is int
            and 0 <= node.right.value <= 62):
        return 2 ** node.right.value, "int"
    return None


def find_knobs(source: str, device: str | None = None) -> list[Knob]:
    """The knobs a model may change: module-level UPPER_CASE constants with a scalar literal value.

    Seeds, logging cadence, paths, devices and compile flags are left out (the offline
    proposer's rule), and so are values that are expressions, tuples or dicts. With
    `device` ("cpu", "mps" or "cuda") the other device's knobs are left out too: on a CPU
    the GPU_* ones change nothing that trains (SmolLM2-135M on llama.cpp picked GPU_DEPTH
    and GPU_BATCH_SIZE for a CPU lab), and the reverse on a GPU.

    Raises
    ------
    SyntaxError
        When train.py does not parse.
    """
    tree = ast.parse(source)
    other = () if device is None else ("CPU_", "MPS_") if device.split(":")[0] == "cuda" else ("GPU_", "CUDA_")
    lines = source.splitlines(keepends=True)
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)

    def offset(lineno: int, col: int) -> int:    # ast columns are utf-8 bytes
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    comments = _comments(source)
    out, seen = [], set()
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if not _UPPER.match(name) or _SKIP.search(name) or name in seen or name.startswith(other):
            continue
        lit = _literal(node.value)
        if lit is None:
            continue
        seen.add(name)
        a, b = offset(node.value.lineno, node.value.col_offset), offset(node.value.end_lineno, node.value.end_col_offset)
        comment = comments.get(node.end_lineno, "")
        value, kind = lit
        choices: tuple = ()
        if kind == "str":
            listed = tuple(dict.fromkeys(re.findall(r"[\"']([^\"']{1,24})[\"']", comment)))
            if value not in listed:
                listed = next((c for c in KNOWN_CHOICES if value in c), ())
            choices = tuple(listed)
        out.append(Knob(name, value, kind, source[a:b], a, b, comment, choices))
    return out


# ----------------------------------------------------------------------------- checking a value

def _range(knob: Knob) -> tuple[float, float, bool]:
    """(low, high, open) a numeric knob may take; open: both ends excluded (betas)."""
    v, name = float(knob.value), knob.name
    if _BETA.search(name) and 0 < v < 1:
        return 0.0, 1.0, True
    if _FRACTION.search(name) and 0 <= v <= 1:
        return 0.0, 1.0, False
    if v == 0:
        return 0.0, (16.0 if knob.kind == "int" else ZERO_MAX), False
    lo, hi = sorted((v / SCALE, v * SCALE), key=abs)
    if knob.kind == "int":
        lo = max(1.0, math.ceil(abs(lo))) * (1 if v > 0 else -1)
    return (lo, hi, False) if v > 0 else (hi, lo, False)


def _fmt(x: float) -> str:
    return f"{x:g}"


def suggest(knob: Knob) -> list[str]:
    """Two new values a researcher would try first (for the error a small model reads next).

    SmolLM2-135M, told "MUON_MOMENTUM is already 0.95", sent 0.95 three times; given
    values to pick from it has something to copy.
    """
    v = knob.value
    if knob.kind == "bool":
        return [repr(not v)]
    if knob.kind == "str":
        return [repr(c) for c in knob.choices if c != v][:2]
    lo, hi, open_ = _range(knob)
    if _BETA.search(knob.name) and 0 < v < 1:
        cands = [1 - (1 - v) * 2, 1 - (1 - v) / 2]
    elif knob.kind == "int":
        cands = [v * 2, v // 2] if v >= 8 else [v + 1, v - 1]
    elif v == 0:
        cands = [0.1, 1.0] if hi > 1 else [0.1, 0.2]
    elif _FRACTION.search(knob.name) and 0 <= v <= 1:
        cands = [v + 0.1, v - 0.1]
    else:
        cands = [v * 1.5, v / 1.5]
    out = []
    for c in cands:
        c = int(c) if knob.kind == "int" else float(f"{c:.3g}")
        if c != v and (lo < c < hi if open_ else lo <= c <= hi):
            out.append(format_value(knob, c))
    return out


def _with_suggestion(msg: str, knob: Knob) -> str:
    ideas = suggest(knob)
    return msg + (f" (for example {' or '.join(ideas)})" if ideas else "")


def check_value(knob: Knob, value: Any) -> Any:
    """`value` converted to the knob's type, if it is a sane new value for it.

    Raises
    ------
    EditError
        Wrong type (a float for an integer knob, text for a number), a changed sign, a
        value more than 10x away from the current one, a string outside the listed
        choices, or no change at all. The message says what would be accepted.
    """
    name, cur = knob.name, knob.value
    if knob.kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            msg = f"{name} is a boolean (now {cur}): its value must be true or false, not {value!r}"
            raise EditError(msg)
        new: Any = value
    elif knob.kind == "str":
        if not isinstance(value, str) or not value.strip():
            msg = f"{name} is a string (now {cur!r}): its value must be text, not {value!r}"
            raise EditError(msg)
        new = value.strip()
        if knob.choices and new not in knob.choices:
            msg = f"{name} must be one of {', '.join(repr(c) for c in knob.choices)}, not {new!r}"
            raise EditError(msg)
        if not knob.choices and not re.fullmatch(r"[\w.+-]{1,24}", new):
            msg = f"{name} takes a short name (letters, digits, _ . + -), not {new!r}"
            raise EditError(msg)
    else:
        if isinstance(value, str):          # small models quote numbers: "0.03"
            try:
                value = float(value.strip())
            except ValueError:
                msg = f"{name} is a number (now {knob.text}): its value must be a number, not {value!r}"
                raise EditError(msg) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            msg = f"{name} is a number (now {knob.text}): its value must be a finite number, not {value!r}"
            raise EditError(msg)
        if knob.kind == "int":
            if float(value) != int(value):
                msg = f"{name} is an integer (now {cur}): its value must be a whole number, not {value!r}"
                raise EditError(msg)
            new = int(value)
        else:
            new = float(value)
        lo, hi, open_ = _range(knob)
        inside = lo < new < hi if open_ else lo <= new <= hi
        zero_off = new == 0 and bool(_ZERO_OFF.search(knob.comment))
        if not inside and not zero_off:
            if cur != 0 and new != 0 and (new > 0) != (cur > 0):
                why = f"the sign must stay {'positive' if cur > 0 else 'negative'}"
            else:
                why = (f"keep it strictly between {_fmt(lo)} and {_fmt(hi)}" if open_ else
                       f"keep it within [{_fmt(lo)}, {_fmt(hi)}]")
            msg = _with_suggestion(f"{name} = {_fmt(new)} is out of range (now {knob.text}): {why}", knob)
            raise EditError(msg)
    if new == cur:
        msg = _with_suggestion(f"{name} is already {knob.text}: choose a different value or another knob", knob)
        raise EditError(msg)
    return new


def format_value(knob: Knob, value: Any) -> str:
    """The Python literal for a new value, in the style of the old one."""
    if knob.kind == "bool":
        return repr(bool(value))
    if knob.kind == "str":
        q = knob.text[0] if knob.text[:1] in "\"'" else '"'
        return f"{q}{value}{q}"
    if knob.kind == "int":
        v = int(value)
        if knob.text.replace(" ", "").startswith("2**") and v > 0 and v & (v - 1) == 0:
            return f"2**{v.bit_length() - 1}"
        return str(v)
    v = float(value)
    text = repr(v)
    if "e" in knob.text.lower() and v != 0 and abs(v) < 1e-2:   # 4e-3 stays in e-notation
        mant, exp = f"{v:.6e}".split("e")
        text = f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return text


def apply(source: str, change: KnobChange) -> str:
    """train.py with only the knob's literal replaced (comments and layout kept)."""
    k = change.knob
    return source[:k.start] + change.new_text + source[k.end:]


def describe(change: KnobChange) -> str:
    """The experiment's description, written by the kit: "MATRIX_LR 0.02 -> 0.03"."""
    return f"{change.knob.name} {change.knob.text} -> {change.new_text}"


# ----------------------------------------------------------------------------- the reply

_KNOB_KEYS, _VALUE_KEYS, _WHY_KEYS = ("knob", "name", "parameter", "param"), ("value", "new_value", "new"), \
    ("why", "reason", "rationale", "because")


def _json_objects(text: str):
    """Candidate JSON objects in a reply: the whole text, ```json fences, then each {...} span."""
    yield text
    for m in re.finditer(r"```(?:json)?\s*\n?(.*?)```", text, re.DOTALL):
        yield m.group(1)
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                yield text[start:i + 1]


_CUT_OFF = re.compile(r'\{\s*"knob"\s*:\s*"([A-Za-z0-9_]+)"\s*,\s*"value"\s*:\s*'
                      r'(-?[0-9][0-9.eE+-]*|true|false|"[^"\n]{0,40}")\s*,\s*"why"\s*:\s*"([^"]*)$', re.DOTALL)


def _cut_off(text: str) -> dict | None:
    """The object of a reply cut off inside "why" (the model rambled until max_tokens).

    Under a grammar, SmolLM2-135M on llama.cpp wrote a 1,100-character "why" that never
    closed: the knob and the value were complete, so the change is read and the reason cut.
    """
    m = _CUT_OFF.match(text)
    if m is None:
        return None
    try:
        value = json.loads(m.group(2))
    except ValueError:
        return None
    return {"knob": m.group(1), "value": value, "why": m.group(3)}


def parse_reply(text: str, knobs: list[Knob]) -> KnobChange:
    """Read `{"knob": ..., "value": ..., "why": ...}` from a reply and check it.

    JSON inside prose or a ```json fence is found too (a server that ignored the schema);
    `name`/`parameter` and `reason` are accepted for `knob` and `why`; a reply cut off
    inside `why` (max_tokens reached) still gives its complete knob and value.

    Raises
    ------
    EditError
        Not JSON, no knob or value, an unknown knob, or a value `check_value` refuses.
    """
    text = strip_thinking(text or "").strip()
    example = '{"knob": "' + (knobs[0].name if knobs else "NAME") + '", "value": ..., "why": "one sentence"}'
    obj = None
    for chunk in _json_objects(text):
        try:
            cand = json.loads(chunk.strip())
        except ValueError:
            continue
        if isinstance(cand, dict):
            obj = cand
            break
    if obj is None:
        obj = _cut_off(text)
    if obj is None:
        shown = (text[:60] + "...") if len(text) > 60 else text
        msg = f"the reply is not JSON ({shown!r}): reply with one JSON object only, like {example}"
        raise EditError(msg)
    lower = {str(k).lower(): v for k, v in obj.items()}
    name = next((lower[k] for k in _KNOB_KEYS if k in lower), None)
    if name is None or not any(k in lower for k in _VALUE_KEYS):
        msg = f"the JSON reply needs \"knob\" and \"value\" fields (got {sorted(obj)}); reply like {example}"
        raise EditError(msg)
    value = next(lower[k] for k in _VALUE_KEYS if k in lower)
    why = next((lower[k] for k in _WHY_KEYS if k in lower), "")
    by_name = {k.name: k for k in knobs}
    knob = by_name.get(str(name).strip()) or by_name.get(str(name).strip().upper())
    if knob is None:
        msg = f"{str(name)[:40]!r} is not a knob of train.py: choose one of {', '.join(by_name)}"
        raise EditError(msg)
    why = " ".join(str(why).split())
    return KnobChange(knob, check_value(knob, value), why[:MAX_WHY])


# ----------------------------------------------------------------------------- constraints

def _value_types(knobs: list[Knob]) -> list[str]:
    kinds = {k.kind for k in knobs}
    out = []
    if kinds & {"int", "float"}:
        out.append("number")
    if "bool" in kinds:
        out.append("boolean")
    if "str" in kinds:
        out.append("string")
    return out or ["number"]


def schema(knobs: list[Knob]) -> dict:
    """The JSON schema of a reply: the knob is one of the names, the value a number/bool/string."""
    types = _value_types(knobs)
    value = {"type": types[0]} if len(types) == 1 else {"anyOf": [{"type": t} for t in types]}
    return {"type": "object", "additionalProperties": False, "required": ["knob", "value", "why"],
            "properties": {"knob": {"type": "string", "enum": [k.name for k in knobs]}, "value": value,
                           "why": {"type": "string"}}}


def response_format(knobs: list[Knob]) -> dict:
    """`response_format` for the chat request (OpenAI, vLLM, Ollama, llama.cpp's server)."""
    return {"type": "json_schema", "json_schema": {"name": "knob_change", "strict": True, "schema": schema(knobs)}}


def candidates(knob: Knob) -> list:
    """New values a grammar offers for `knob`: steps around the current value, each one accepted.

    The kit's own menu (its suggestions, then a few more steps of the same kind), every
    value passed through `check_value`: of the right type, in range, and not the current
    value. SmolLM2-135M under a grammar that only said "a number" had 23 of 26 replies
    refused on llama.cpp, mostly the current value again or a value out of range.
    """
    v = knob.value
    if knob.kind == "bool":
        raw: list = [not v]
    elif knob.kind == "str":
        raw = [c for c in knob.choices if c != v]
    else:
        lo, hi, _ = _range(knob)
        if _BETA.search(knob.name) and 0 < v < 1:
            raw = [1 - (1 - v) * f for f in (2, 0.5, 1.5, 0.75, 3)]
        elif knob.kind == "int":   # sizes stay even: a head dimension of 43 would break the rotary halves
            raw = ([v * 2, v // 2] + ([v * 3 // 2] if v % 2 == 0 else []) + ([v * 3 // 4] if v % 4 == 0 else [])
                   if v >= 8 else [v + 1, v - 1, v + 2, v - 2, v * 2])
        elif _FRACTION.search(knob.name) and 0 <= v <= 1:
            raw = [v + 0.1, v - 0.1, v + 0.2, v - 0.2, v + 0.05, v - 0.05]
        elif v == 0:
            raw = [x for x in (0.1, 1.0, 0.01, 0.05, 0.2, 0.5) if x <= hi]
        else:
            raw = [v * f for f in (1.5, 1 / 1.5, 2, 0.5, 1.25, 0.8)]
        raw = [int(c) if knob.kind == "int" else float(f"{c:.3g}") for c in raw]
    out: list = []
    for c in raw:
        try:
            new = check_value(knob, c)
        except EditError:
            continue
        if new not in out:
            out.append(new)
    return out


def grammar(knobs: list[Knob], source: str | None = None, seen: set[str] | frozenset = frozenset()) -> str:
    """The reply as a GBNF grammar (llama.cpp's `grammar` field): a knob and one of its `candidates`.

    Each knob has its own rule, so the value is always of its type, in range and new.
    Given the parent `source` and the hashes of the train.py files already run (`seen`),
    values that would repeat one of them are left out (a knob with none left, too).
    Whitespace is at most one space between tokens and `why` is one line: a small model
    constrained by a looser grammar was seen to pad with newlines until max_tokens.
    """
    rules, alts = [], []
    for i, k in enumerate(knobs):
        values = candidates(k)
        if source is not None and seen:
            values = [v for v in values if source_hash(apply(source, KnobChange(k, v))) not in seen]
        if not values:
            continue
        alts.append(f"k{i}")
        lits = " | ".join(json.dumps(json.dumps(x)) for x in values)
        rules.append(f'k{i} ::= "\\"{k.name}\\"" ws "," ws "\\"value\\"" ws ":" ws ({lits})')
    return "\n".join([
        'root ::= "{" ws "\\"knob\\"" ws ":" ws knob ws "," ws "\\"why\\"" ws ":" ws string ws "}"',
        f"knob ::= {' | '.join(alts)}",
        *rules,
        'string ::= "\\"" ([^"\\\\\\x00-\\x1F] | "\\\\" ["\\\\/nt])* "\\""',
        'ws ::= " "?',
    ]) + "\n"


# ----------------------------------------------------------------------------- the prompt

SYSTEM_PROMPT = """\
You tune the hyperparameters of a small GPT training script, one experiment at a time.
Every experiment trains under the same fixed budget and is scored by val_bpb (validation
bits per byte, lower is better). Change ONE knob per experiment, to a value near its current
one, and never repeat a change from the results table. Follow the human's instructions.
Reply with one JSON object and nothing else:
{"knob": "<NAME from the list>", "value": <new value>, "why": "<one short sentence>"}"""

USER_TEMPLATE = """\
# Instructions from the human (program.md)

{program}

# Knobs of train.py (current values, with their comments)

{knobs}
{sections}
Choose one knob and its new value. Reply with JSON only."""

RETRY_TEMPLATE = """\
That reply could not be used: {error}
Reply with one JSON object only: {{"knob": "<NAME>", "value": <new value>, "why": "<one sentence>"}}"""


def _bpb(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def results_table(history: list[HistoryEntry], max_rows: int = MAX_RESULTS) -> tuple[str, str]:
    """Recent experiments as a compact table (id, val_bpb, outcome, change, the reason) and a
    "(the last N of M)" note; ("", "") without history."""
    if not history:
        return "", ""
    rows = history[-max_rows:]
    lines = ["id    val_bpb  outcome    change"]
    for e in rows:
        outcome = e.status if e.status not in ("ok", "running", "") else (e.decision or "undecided")
        note = f"  ({' '.join(e.reason.split())[:80]})" if e.reason.strip() else ""
        lines.append(f"{e.exp_id:<5} {_bpb(e.val_bpb):<8} {outcome:<10} {e.description or '-'}{note}")
    more = f" (the last {len(rows)} of {len(history)})" if len(history) > len(rows) else ""
    return "\n".join(lines) + "\n", more


def build_messages(context: ProposalContext, knobs: list[Knob], *, max_rows: int = MAX_RESULTS) -> list[dict]:
    """The short chat prompt of the knob mode (no train.py source, no diffs)."""
    head = "parent " + (f"{context.parent_id} " if context.parent_id else "") + f"val_bpb {_bpb(context.parent_val_bpb)}"
    if context.best_val_bpb is not None:
        head += f", best {_bpb(context.best_val_bpb)}"
    sections = ""
    body, more = results_table(context.history, max_rows)
    if body:
        sections += f"\n# Results so far{more}; {head}; lower is better\n\n{body}"
    elif context.parent_val_bpb is not None:
        sections += f"\n# Results so far: {head}\n"
    if context.last_crash_log.strip():
        last = [l for l in context.last_crash_log.strip().splitlines() if l.strip()][-1]
        sections += f"\n# The last crash ended with\n\n{last.strip()[:200]}\n"
    if context.feedback.strip():
        sections += f"\n# The human's feedback for this step (most important)\n\n{context.feedback.strip()}\n"
    user = USER_TEMPLATE.format(program=context.program.strip() or "(program.md is empty)",
                                knobs="\n".join(k.line for k in knobs), sections=sections)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def retry_message(error: str) -> dict:
    """The user message that feeds a refused JSON reply's error back."""
    return {"role": "user", "content": RETRY_TEMPLATE.format(error=error)}


def rationale(change: KnobChange) -> str:
    """The proposal's rationale: the model's reason, marked as the model's."""
    return f"The model's reason: {change.why}" if change.why else "The model gave no reason."
