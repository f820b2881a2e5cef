"""Configuration: the budget, where things live, and the AUTORESEARCH_* environment.

No IO happens here (beyond reading os.environ): this module is imported by both the
training child (via harness) and the notebook kernel, so it stays tiny and stdlib-only.

    from autoresearch_kit.config import Budget
    Budget.parse("60s"), Budget.parse("50M-tokens"), Budget.parse("1e15-flops")

Environment variables (the runner sets the RUN ones for the child; users may set the rest):

    AUTORESEARCH_CACHE        root of the cache (default ~/.cache/autoresearch_kit)
    AUTORESEARCH_DATA         a prepared data directory (default <cache>/data/builtin-bpe4096)
    AUTORESEARCH_BUDGET       budget for train.py, e.g. "60s", "50M-tokens", "1e15-flops"
    AUTORESEARCH_SEED         training seed (default 42)
    AUTORESEARCH_DEVICE       force a device: cuda | mps | cpu
    AUTORESEARCH_PRECISION    force the autocast dtype: bf16 | fp16 | fp32 (device.py)
    AUTORESEARCH_EVAL_TOKENS  score only the first N validation targets (default: the whole val split)
    AUTORESEARCH_EVAL_SEQ_LEN the evaluation context (a Lab pins it; default: train.py's SEQ_LEN)
    AUTORESEARCH_WARMUP_STEPS first N steps not counted against a seconds budget
    AUTORESEARCH_SCORE_THREADS torch threads of the runner's scoring (serve.score_threads_for)
    AUTORESEARCH_CPU_THREADS  a CPU run's training threads: auto (default: the cores others leave
                              free) | N | torch (torch's own default); OMP_NUM_THREADS, if set, wins
    AUTORESEARCH_CHANNEL_FD   (runner -> child) fd of the socket to the runner (wire.py)
    AUTORESEARCH_RUN_ID       (runner -> child) id used to find stray children
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "AUTORESEARCH_"

# Default budgets: the original's 5 minutes on a GPU; 60 s on CPU/MPS keeps a notebook
# interactive (a 4M-parameter GPT sees ~0.4M tokens/min on a 2-core CPU).
DEFAULT_SECONDS = {"cuda": 300.0, "mps": 60.0, "cpu": 60.0}
DEFAULT_SEED = 42
DEFAULT_WARMUP_STEPS = 3
DEFAULT_DATASET = "builtin"
DEFAULT_VOCAB_SIZE = 4096
# The scored validation set is the whole val split on every device (issue 11: a CPU run
# used to score its first 65,536 tokens and a GPU run all of them, so the same model got
# two numbers). AUTORESEARCH_EVAL_TOKENS=N scores a fixed span instead: the first N targets.
# The evaluation context when neither a Lab pin nor AUTORESEARCH_EVAL_SEQ_LEN says: the
# default train.py's SEQ_LEN on that device.
DEFAULT_EVAL_SEQ_LEN = {"cuda": 2048, "mps": 256, "cpu": 256}

# The most one experiment may spend: about 11.6 days whatever the kind (1e6 s; 1e12 tokens
# at 1M tok/s; 1e21 FLOPs at an H100's ~1e15 FLOP/s). Beyond that a typo, not a budget.
MAX_BUDGET = {"seconds": 1e6, "tokens": 1e12, "flops": 1e21}
MAX_BUDGET_NOTE = {"seconds": "11.6 days", "tokens": "11.6 days at 1M tokens/s",
                   "flops": "11.6 days of an H100 at its bf16 peak"}

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12, "p": 1e15}
_KINDS = ("seconds", "tokens", "flops")


@dataclass(frozen=True)
class Budget:
    """A fixed training budget: wall-clock seconds, training tokens, or FLOPs.

    Exactly one of the three is set. Seconds exclude compile/warm-up steps (as the
    original autoresearch does); tokens and FLOPs are measured by the harness and make
    results comparable across machines.

    Examples
    --------
    >>> Budget(seconds=60).kind
    'seconds'
    >>> str(Budget.parse("50M-tokens"))
    '50M-tokens'
    """

    seconds: float | None = None
    tokens: int | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            msg = (
                "A Budget needs exactly one of seconds=, tokens= or flops= "
                f"(got {given or 'none'}); e.g. Budget(seconds=60) or Budget.parse('50M-tokens')."
            )
            raise ValueError(msg)
        if not self.amount > 0:
            msg = f"A budget must be positive, got {self.amount:g} {self.kind}."
            raise ValueError(msg)
        if self.amount > MAX_BUDGET[self.kind]:
            msg = (f"A budget of {self.amount:g} {self.kind} is beyond what one experiment can spend (at most "
                   f"{MAX_BUDGET[self.kind]:g} {self.kind}, {MAX_BUDGET_NOTE[self.kind]}); every run would hit the "
                   f"hard limit. Use e.g. '300s', '50M-tokens' or '1e15-flops'.")
            raise ValueError(msg)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def amount(self) -> float:
        return float(getattr(self, self.kind))

    @classmethod
    def parse(cls, text: "str | Budget | float | int") -> "Budget":
        """Parse '60s', '5min', '300', '50M-tokens', '2e6 tokens', '1e15-flops', '3P-flops'."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)):
            return cls(seconds=float(text))
        s = str(text).strip().lower().replace("_", "")
        if re.fullmatch(r"-\s*[0-9.].*", s):
            msg = f"A budget must be positive, got {text!r}: use e.g. '60s', '50M-tokens' or '1e15-flops'."
            raise ValueError(msg)
        m = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)\s*-?\s*([a-z]*)\s*-?\s*([a-z]*)", s)
        if not m:
            msg = f"Cannot read budget {text!r}: use e.g. '60s', '5min', '50M-tokens' or '1e15-flops'."
            raise ValueError(msg)
        number, unit, kind = float(m.group(1)), m.group(2), m.group(3)
        if not kind and unit not in _UNITS:  # "5min", "60s", "2e6tokens": no scale letter
            unit, kind = "", unit
        elif unit and unit not in _UNITS and kind:
            msg = f"Unknown scale {unit!r} in {text!r}: use k, M, G, T or P (e.g. '50M-tokens')."
            raise ValueError(msg)
        if kind in ("", "s", "sec", "secs", "second", "seconds"):
            if unit == "m" and kind == "":  # "5m" reads as five minutes, not 5e6 seconds
                return cls(seconds=number * 60)
            return cls(seconds=number * _UNITS[unit])
        if kind in ("min", "mins", "minute", "minutes"):
            return cls(seconds=number * 60 * _UNITS[unit])
        if kind in ("tok", "toks", "token", "tokens"):
            return cls(tokens=int(round(number * _UNITS[unit])))
        if kind in ("flop", "flops"):
            return cls(flops=number * _UNITS[unit])
        msg = f"Unknown budget unit {kind!r} in {text!r}: use s, min, tokens or flops."
        raise ValueError(msg)

    def __str__(self) -> str:
        if self.kind == "seconds":
            return f"{self.amount:g}s"
        if self.kind == "tokens":
            n = self.amount
            for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
                if n >= scale and (n / scale) == int(n / scale):
                    return f"{int(n / scale)}{unit}-tokens"
            return f"{int(n)}-tokens"
        return f"{self.amount:.3g}-flops"


def env(name: str, default: str | None = None) -> str | None:
    """Read AUTORESEARCH_<name> (empty counts as unset)."""
    value = os.environ.get(ENV_PREFIX + name, "")
    return value if value != "" else default


def cache_dir() -> Path:
    """Root of everything the kit caches (data, tokenizers, compile cache)."""
    return Path(env("CACHE") or Path.home() / ".cache" / "autoresearch_kit").expanduser()


def data_name(dataset: str = DEFAULT_DATASET, tokenizer: str | int = DEFAULT_VOCAB_SIZE) -> str:
    """Folder name of a prepared dataset: '<dataset>-bpe<V>' or '<dataset>-bytes'."""
    tok = "bytes" if str(tokenizer) == "bytes" else f"bpe{int(tokenizer)}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "data"
    return f"{safe}-{tok}"


LATEST_FILE = "LATEST"  # <cache>/data/LATEST names the most recently prepared directory


def data_dir(dataset: str | None = None, tokenizer: str | int | None = None) -> Path:
    """The prepared data directory.

    With no arguments: AUTORESEARCH_DATA if set, else the directory `prepare` wrote
    last (so `python prepare.py --vocab-size 8192 && python train.py` just works), else
    the built-in corpus with the default tokenizer.
    """
    if dataset is None and tokenizer is None:
        if env("DATA"):
            return Path(env("DATA")).expanduser()
        latest = cache_dir() / "data" / LATEST_FILE
        if latest.is_file() and latest.read_text().strip():
            return cache_dir() / "data" / latest.read_text().strip()
    return cache_dir() / "data" / data_name(dataset or DEFAULT_DATASET, tokenizer or DEFAULT_VOCAB_SIZE)


def default_budget(device_type: str) -> Budget:
    """AUTORESEARCH_BUDGET if set, else 300 s on CUDA and 60 s on CPU/MPS."""
    text = env("BUDGET")
    return Budget.parse(text) if text else Budget(seconds=DEFAULT_SECONDS.get(device_type, 60.0))


def default_eval_tokens(device_type: str | None = None) -> int | None:
    """Validation targets to score: AUTORESEARCH_EVAL_TOKENS, else None (the whole val split).

    The same on every device (`device_type` is accepted for callers of old). "all" or 0
    in the variable also means the whole split.
    """
    text = (env("EVAL_TOKENS") or "").strip().lower()
    return parse_eval_tokens(text)


def parse_eval_tokens(value) -> int | None:
    """None, "all", 0 -> None (the whole split); a positive count -> int; else ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        msg = f"eval tokens must be a positive count or 'all', got {value!r}."
        raise ValueError(msg) from None
    if n < 0:
        msg = f"eval tokens must be a positive count or 'all', got {value!r}."
        raise ValueError(msg)
    return n or None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_threads_setting() -> int | str:
    """AUTORESEARCH_CPU_THREADS: "auto" (unset), "torch", or a positive int."""
    text = (env("CPU_THREADS") or "auto").strip().lower()
    if text in ("auto", "torch"):
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        msg = (f"AUTORESEARCH_CPU_THREADS must be auto, torch or a positive number of threads, got {text!r}; "
               "unset it for auto (the cores other processes leave free).")
        raise ValueError(msg)
    return n


def eval_seq_len_setting() -> int | None:
    """AUTORESEARCH_EVAL_SEQ_LEN as a positive int, or None when unset."""
    text = (env("EVAL_SEQ_LEN") or "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        msg = f"AUTORESEARCH_EVAL_SEQ_LEN must be a positive number of tokens, got {text!r}."
        raise ValueError(msg)
    return n
