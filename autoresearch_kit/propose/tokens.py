"""Prompt sizes in tokens and the server's context size, so a prompt is never sent that cannot fit.

    from autoresearch_kit.propose.tokens import TokenCounter, context_from_models, context_from_props
    counter = TokenCounter()            # tiktoken's cl100k_base if it is on disk, else an estimate
    counter.count_messages(messages), counter.method

Counting: tiktoken's `cl100k_base` when its file is already cached (never downloaded here:
an offline machine must not wait on a network call to count), else an estimate of one
token per 3 characters. Why 3 and not the usual 4: the kit's train.py is 12.7k characters
and SmolLM2's tokenizer made 4.2k tokens of it (3.0 characters a token, issue 14); code
and small vocabularies tokenize densely, and an estimate that undercounts sends prompts
that overflow. The method is reported with every count ("tiktoken cl100k_base" or
"estimate (3 chars/token)").

The context size: `context_size=` / AUTORESEARCH_CONTEXT when set; else what the server
reports: vLLM's `max_model_len` (and LM Studio's `loaded_context_length`) in /v1/models,
llama.cpp's `n_ctx` in /props; else unknown (no trimming, and an empty reply or a 400 names
the setting).

    python -m pytest tests/test_llm.py -q -k context
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 3.0
PER_MESSAGE = 4                 # role and separators per chat message (OpenAI's cookbook: 3-4)
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_MODEL_KEYS = ("max_model_len", "loaded_context_length", "context_length", "max_context_length", "n_ctx")


def _cached_cl100k() -> bool:
    """True when tiktoken can load cl100k_base from its cache without the network."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache == "":
        return False
    root = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    return (root / hashlib.sha1(_CL100K_URL.encode()).hexdigest()).is_file()


class TokenCounter:
    """Counts prompt tokens, and says how (`method`)."""

    def __init__(self) -> None:
        self._enc = None
        self.method = f"estimate ({CHARS_PER_TOKEN:g} chars/token)"
        if os.environ.get("AUTORESEARCH_TOKEN_ESTIMATE") != "1" and _cached_cl100k():
            try:
                import tiktoken

                self._enc = tiktoken.get_encoding("cl100k_base")
                self.method = "tiktoken cl100k_base"
            except Exception:          # a broken cache file: the estimate is still an answer
                self._enc = None

    @property
    def exact(self) -> bool:
        return self._enc is not None

    def count(self, text: str) -> int:
        """Tokens in `text`."""
        if self._enc is not None:
            return len(self._enc.encode(text, disallowed_special=()))
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def count_messages(self, messages: list[dict]) -> int:
        """Tokens of a chat prompt: the contents plus a few per message for the chat template."""
        return sum(self.count(str(m.get("content") or "")) + PER_MESSAGE for m in messages) + 3


def context_setting(value: Any = None) -> int | None:
    """The context size the user set (`context_size=`, else AUTORESEARCH_CONTEXT), or None.

    Raises
    ------
    ValueError
        When it is not a positive whole number.
    """
    raw = value if value is not None else os.environ.get("AUTORESEARCH_CONTEXT", "").strip() or None
    if raw is None:
        return None
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if n <= 0:
        msg = f"the context size must be a positive number of tokens (e.g. AUTORESEARCH_CONTEXT=8192), got {raw!r}"
        raise ValueError(msg)
    return n


def context_from_models(models: list[Any], model: str | None) -> int | None:
    """`max_model_len` (vLLM) or a similar field of the /v1/models entry for `model`."""
    entries = [m for m in models if getattr(m, "id", None) == model] or list(models[:1])
    for m in entries:
        extra = dict(getattr(m, "model_extra", None) or {})
        if isinstance(m, dict):
            extra = m
        for key in _MODEL_KEYS:
            v = extra.get(key, getattr(m, key, None))
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def context_from_props(props: Any) -> int | None:
    """`n_ctx` from llama.cpp's /props (`default_generation_settings.n_ctx`, or top level)."""
    if not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    for where in (settings if isinstance(settings, dict) else {}, props):
        v = where.get("n_ctx")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def props_url(base_url: str) -> str:
    """llama.cpp serves /props at the root, beside /v1."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    return root + "/props"
