"""LLM proposer: any OpenAI-compatible chat endpoint edits train.py.

    from autoresearch_kit.propose.llm import LLMProposer
    p = LLMProposer()                                        # OpenAI, OPENAI_API_KEY
    p = LLMProposer(base_url="http://localhost:11434/v1", model="qwen2.5-coder:7b")  # Ollama
    proposal = p.propose(context, on_token=print)           # streams the reply as it comes

Endpoint, model and key come from the arguments or the environment: OPENAI_BASE_URL,
AUTORESEARCH_MODEL (or OPENAI_MODEL), OPENAI_API_KEY. A local server (vLLM, Ollama, LM
Studio, llama.cpp) needs no key: a placeholder is sent when base_url is set and no key
is. The key lives only inside the openai client: it is never put in metadata, reprs,
logs or error messages (exception text is scrubbed of it).

Two edit modes. "edits": each attempt asks for DESCRIPTION / RATIONALE / SEARCH-REPLACE
blocks (prompts.py), applies and validates them (edits.py). "knobs" (knobs.py), for small
models: a short prompt and a JSON reply {knob, value, why}, constrained by a JSON schema or
a GBNF grammar, range-checked by the kit. "auto" picks knobs for a small model on a local
endpoint, and switches to it when free-form edits fail. Either way a refused reply is fed
back with its error, up to `max_attempts`, and kept in the metadata ("refused").

Every prompt is counted before it is sent (tokens.py: tiktoken if cached, else an
estimate) and trimmed to the server's context (reported by vLLM and llama.cpp, or
AUTORESEARCH_CONTEXT); a prompt that cannot fit is never sent. Token counts the server does
not report are recorded as None (unknown), not 0. Network faults (timeouts, dropped connections, HTTP 429/5xx) are
retried `max_retries` times with exponential backoff; an unreachable host fails at once
and names the offline proposer. Endpoint-level failures raise ProposalError(fatal=True), so
a loop stops instead of asking again; `check_endpoint()` finds a dead or misnamed endpoint
in seconds, before anything trains. Retry notes go to `on_progress` ("note" events) when
it is set, else inline to `on_token`. A reasoning model's reasoning_content is never part
of the reply: while it streams, throttled "thinking..." notes say the model is alive, and
that time does not count toward `max_wait` (the timeout is per chunk).

    python -m pytest tests/test_llm.py -q      # a real HTTP server on 127.0.0.1
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from autoresearch_kit.propose import knobs, prompts
from autoresearch_kit.propose.base import Proposal, ProposalContext, ProposalError
from autoresearch_kit.propose.edits import EditError, apply_reply, make_proposal, parse_reply
from autoresearch_kit.propose.tokens import (TokenCounter, context_from_models, context_from_props, context_setting,
                                             props_url)

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"     # used only against api.openai.com with no model set
LOCAL_PLACEHOLDER_KEY = "not-needed"     # local servers ignore the key but the client wants one
OFFLINE_HINT = "use the offline proposer instead: --proposer mutate (CLI) or proposer=\"mutate\" (Lab)"
EDIT_MODES = ("auto", "edits", "knobs")
STRUCTURED = ("auto", "json_schema", "grammar", "none")
KNOB_MAX_TOKENS = 256        # a knob reply is ~40 tokens; the cap stops a small model that rambles
MAX_SAVED_REPLY = 4000       # characters of each refused reply kept in the metadata


DEFAULT_MAX_WAIT = 600.0   # seconds one proposal may take in all (LLMProposer(max_wait=))


class _Thinking:
    """What a streamed reply has reasoned so far, and when to say so (`LLMProposer.reasoning_note_seconds`).

    Reasoning deltas are counted as tokens: llama.cpp, vLLM and LM Studio send one token per delta.
    """

    def __init__(self, t0: float, every: float) -> None:
        self.t0 = self.last = t0           # request start; the last chunk's arrival
        self.every = every
        self.chunks = self.chars = 0       # reasoning deltas (tokens) and characters
        self.noted: float | None = None    # when the last note was given
        self.answered = False              # non-blank content has begun
        self._head = ""                    # the content's start, until it shows whether it opens <think>
        self._open: bool | None = None     # inside an inline <think> (None: not known yet)
        self._tail = ""

    def add(self, thought: str, now: float) -> str:
        """Count a reasoning delta; the note to give now, or ""."""
        self.chunks += 1
        self.chars += len(thought)
        if self.noted is None:
            self.noted = now
            return "[thinking... (the model streams its reasoning before the answer)]"
        if now - self.noted < self.every:
            return ""
        self.noted = now
        return f"[thinking... {self.chunks:,} reasoning tokens, {now - self.t0:.0f} s]"

    def done(self, now: float) -> str:
        return f"[thought for {now - self.t0:.0f} s ({self.chunks:,} reasoning tokens); now the answer]"

    def inline(self, pieces: list[str]) -> bool:
        """Whether these content pieces are inside a `<think>` that opens the content (no reasoning parser)."""
        if not pieces or self._open is False:
            return False
        text = "".join(pieces)
        if self._open is None:
            self._head += text
            head = self._head.lstrip().lower()
            if head.startswith("<think"):
                self._open = True
                text = self._head
            elif len(head) >= 6 or not "<think>".startswith(head):
                self._open = False
                return False
            else:
                return True            # "<thi": not known yet, and nothing shown is an answer
        seen = (self._tail + text).lower()
        if "</think" in seen:
            self._open = False         # the closing chunk is the last one that thinks
        self._tail = seen[-8:]
        return True


class _OutOfTime(Exception):
    """Raised inside a streamed reply when the proposal's total wait is over."""


def _endpoint_label(url: str) -> str:
    """scheme://host[:port]/path of an endpoint, without credentials or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def _host(url: str) -> str:
    parts = urlsplit(url)
    return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


def _unreachable(exc: BaseException) -> bool:
    """True when the host cannot be reached at all (refused, DNS failure): no point retrying."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
            return True
        if type(e).__name__ == "ConnectError" and type(e).__module__.startswith("httpx"):
            return True
        e = e.__cause__ or e.__context__
    return False


class LLMProposer:
    """Proposes edits to train.py with a chat model behind an OpenAI-compatible endpoint.

    Parameters
    ----------
    model
        Model name; default AUTORESEARCH_MODEL, OPENAI_MODEL, the server's first model
        (local servers, via /models), or DEFAULT_OPENAI_MODEL on api.openai.com.
    base_url
        Endpoint, e.g. "http://localhost:8000/v1"; default OPENAI_BASE_URL, else OpenAI.
    api_key
        Default OPENAI_API_KEY; a placeholder when base_url is set and no key is.
    max_attempts
        Replies to try before giving up; each refused reply's error is fed back.
    stream
        Stream the reply token by token to `on_token` (the panel shows the agent typing).
    on_token
        Called with each piece of text as it arrives (also given per call to `propose`).
        Between attempts it also gets a bracketed note saying why the reply was refused.
    timeout
        Seconds to wait for the server: per chunk while streaming (a model that keeps sending
        reasoning is never cut off by it), for the whole reply without streaming.
    max_retries
        Extra tries per request after a timeout, dropped connection, HTTP 429 or 5xx.
    max_wait
        Seconds one proposal may take in all (requests, retries, backoff, a reply that
        trickles in; default AUTORESEARCH_LLM_MAX_WAIT, else 600): past it the proposer
        gives up with a message that names the endpoint and this setting, so a hung
        server never holds the loop for longer. Time a streamed reply spends reasoning
        (reasoning_content deltas, or content inside an opening <think>) does not count:
        a thinking model is working, not hung; max_tokens bounds it.
    retry_delay, max_retry_delay
        Backoff: retry_delay * 2**i seconds, capped (Retry-After is honoured up to the cap).
    temperature, max_tokens
        Sent only when given (some models refuse a temperature).
    system_prompt
        Replaces prompts.SYSTEM_PROMPT.
    extra_body
        Extra JSON fields for the request (server-specific options).
    edit_mode
        "edits" (SEARCH/REPLACE blocks or a whole file: for capable models), "knobs" (one
        UPPER_CASE constant per experiment as JSON, range-checked: for small models), or
        "auto" (default; AUTORESEARCH_EDIT_MODE overrides): knobs for a small model on a
        local endpoint (`small_local_model`), else edits, switching to knobs for good
        when a free-form proposal fails or its prompt cannot fit.
    context_size
        The server's context in tokens; default AUTORESEARCH_CONTEXT, else what the server
        reports (vLLM /v1/models, llama.cpp /props), else unknown. Prompts are trimmed to
        fit it (history, diffs, crash log), and one that cannot fit is never sent.
    structured
        How a knob reply is constrained: "json_schema" (response_format), "grammar" (GBNF
        through extra_body, for llama.cpp), "none" (the prompt alone), or "auto"
        (default): json_schema, stepping down when the server refuses or ignores it.
    on_progress
        Called with a dict per event, for a person watching: {"event": "ask", "model",
        "endpoint", "prompt_tokens", "method", "context", ...}, "reply", "refused"
        (with the reply text), "accepted", "structured" (a fallback), "switch" (to knobs),
        "note" (a retry, a fallback; while reasoning streams, "[thinking... N reasoning tokens,
        S s]" with "reasoning_tokens" and "seconds", at most every `reasoning_note_seconds`).
    device
        The knob mode offers the shared knobs and only this device's CPU_*/GPU_* ones:
        "cpu", "mps", "cuda", "auto" (default: the device training runs on, as the offline
        proposer resolves it; a Lab sets its own) or None (all of them).
    """

    name = "llm"
    reasoning_note_seconds = 15.0   # at most one "thinking..." note this often (a long think stays a few lines)

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 max_attempts: int = 3, stream: bool = True, on_token: Callable[[str], Any] | None = None,
                 timeout: float = 120.0, max_retries: int = 3, retry_delay: float = 1.0,
                 max_retry_delay: float = 20.0, temperature: float | None = None,
                 max_tokens: int | None = None, system_prompt: str | None = None,
                 max_history: int = prompts.MAX_HISTORY, extra_body: dict | None = None,
                 edit_mode: str | None = None, context_size: int | None = None, structured: str = "auto",
                 on_progress: Callable[[dict], Any] | None = None, max_wait: float | None = None,
                 device: str | None = "auto") -> None:
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if key is None and self.base_url is None:
            msg = ("The LLM proposer has no endpoint: set OPENAI_API_KEY for OpenAI, or OPENAI_BASE_URL "
                   "(e.g. http://localhost:11434/v1 for Ollama) for a local server; or " + OFFLINE_HINT)
            raise ValueError(msg)
        self.__key = key or LOCAL_PLACEHOLDER_KEY
        self.model = model or os.environ.get("AUTORESEARCH_MODEL") or os.environ.get("OPENAI_MODEL") or None
        if max_attempts < 1:
            msg = f"max_attempts must be at least 1, got {max_attempts}"
            raise ValueError(msg)
        self.max_attempts, self.stream, self.on_token = max_attempts, stream, on_token
        self.timeout, self.max_retries = timeout, max_retries
        wait = max_wait if max_wait is not None else os.environ.get("AUTORESEARCH_LLM_MAX_WAIT") or DEFAULT_MAX_WAIT
        try:
            self.max_wait = float(wait)
        except ValueError:
            self.max_wait = -1.0
        if not self.max_wait > 0:
            msg = f"max_wait must be a number of seconds > 0 (AUTORESEARCH_LLM_MAX_WAIT / --max-wait), got {wait!r}"
            raise ValueError(msg)
        self._deadline: float | None = None   # time.monotonic() by which the proposal in progress must end
        self.retry_delay, self.max_retry_delay = retry_delay, max_retry_delay
        self.temperature, self.max_tokens = temperature, max_tokens
        self.system_prompt, self.max_history, self.extra_body = system_prompt, max_history, extra_body
        edit_mode = (edit_mode or os.environ.get("AUTORESEARCH_EDIT_MODE") or "auto").strip().lower()
        if edit_mode not in EDIT_MODES:
            msg = f"edit_mode must be one of {', '.join(EDIT_MODES)}, got {edit_mode!r}"
            raise ValueError(msg)
        if structured not in STRUCTURED:
            msg = f"structured must be one of {', '.join(STRUCTURED)}, got {structured!r}"
            raise ValueError(msg)
        if extra_body is not None and not isinstance(extra_body, dict):
            msg = f"extra_body must be a dict of JSON fields, got {type(extra_body).__name__}"
            raise ValueError(msg)
        self.edit_mode, self.structured, self.on_progress = edit_mode, structured, on_progress
        self.device = device
        self._menu: tuple[str | None, set] = (None, set())   # (parent source, hashes run) for the grammar
        self._structured = "json_schema" if structured == "auto" else structured   # the level in use now
        self._switched = False         # auto mode moved to knobs after free-form edits failed
        self._context_arg = context_setting(context_size)
        self._context: int | None = None
        self._context_source = ""      # "" = not asked yet
        self._counter: TokenCounter | None = None
        self._models: list | None = None
        self._usage_missing = False
        self._client = None
        self._network_retries = 0      # per propose(), reported in the metadata
        self._stream_usage = True      # ask for usage in the stream until a server refuses
        self._stream_ignored = False   # the server answered a stream with one JSON body: ask unstreamed
        self._max_tokens_field: str | None = "max_tokens"   # max_completion_tokens, or None, once refused
        self._reply: dict = {}         # of the last reply: finish_reason, reasoning chars, the cap sent

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"LLMProposer(model={self.model!r}, endpoint={self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        """The endpoint URL as shown in messages (no credentials)."""
        return _endpoint_label(self.base_url or "https://api.openai.com/v1")

    def _scrub(self, text: str) -> str:
        key = self.__key
        if key and key != LOCAL_PLACEHOLDER_KEY:
            text = text.replace(key, "***")
        return text

    def _client_(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:  # pragma: no cover - openai is a dependency
                msg = "The LLM proposer needs the openai package: pip install openai"
                raise ImportError(msg) from e
            # The client's own retries are off: _request retries with our own, testable backoff.
            self._client = openai.OpenAI(api_key=self.__key, base_url=self.base_url, timeout=self.timeout,
                                         max_retries=0)
        return self._client

    def _fail(self, reason: str, *, fatal: bool = False, **meta) -> ProposalError:
        """A ProposalError with the key scrubbed; `fatal` for an endpoint-level failure (asking again won't help)."""
        return ProposalError(self._scrub(reason), metadata={k: self._scrub(v) if isinstance(v, str) else v
                                                            for k, v in meta.items()}, fatal=fatal)

    def _error_text(self, e) -> str:
        """An openai error's message, with the body when the message is only "Error code: N".

        FastAPI servers answer {"detail": [...]}, Ollama a plain-text "404 page not found":
        the client keeps only `error.message`, so without this the reason is lost.
        """
        message = str(getattr(e, "message", None) or e)
        if re.fullmatch(r"\s*Error code: \d+\s*", message):
            body = getattr(e, "body", None)
            if isinstance(body, dict) and len(body) == 1 and isinstance(next(iter(body.values())), str):
                body = next(iter(body.values()))          # {"error": "404 page not found"}
            if body not in (None, "", {}, []):
                import json

                text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, default=str)
                text = " ".join(text.split())
                message += " - " + (text if len(text) <= 300 else text[:297] + "...")
        return self._scrub(message)

    def _left(self) -> float:
        """Seconds left of `max_wait` for the proposal in progress (inf outside one)."""
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _out_of_time(self, what: str, last: str) -> ProposalError:
        return self._fail(f"no usable reply from {self.model or 'the model'} at {self.endpoint} within "
                          f"{self.max_wait:g} s ({what}{': ' + last if last else ''}). The server may be hung or "
                          f"too slow for this prompt: check it, raise the cap (--max-wait S, "
                          f"AUTORESEARCH_LLM_MAX_WAIT), use a faster model, or {OFFLINE_HINT}", fatal=True)

    def _with_retries(self, what: str, call: Callable[[], Any], on_token: Callable[[str], Any] | None,
                      slow: str = ""):
        """Run `call`, retrying timeouts, dropped connections, 429 and 5xx with backoff, within max_wait.

        `slow` is said after the last error when every try timed out (what to do about a slow reply).
        """
        import openai

        last = ""
        for i in range(self.max_retries + 1):
            delay = min(self.max_retry_delay, self.retry_delay * 2**i)
            if self._left() <= 0:
                raise self._out_of_time(what, last)
            try:
                return call()
            except _OutOfTime:
                raise self._out_of_time(what, "the reply was still coming") from None
            except openai.APITimeoutError:
                if self._left() <= 0.05:
                    raise self._out_of_time(what, last or "no answer yet") from None
                last = f"no answer within {self.timeout:g}s (timeout)"
            except openai.APIConnectionError as e:
                if _unreachable(e):
                    cause = e.__cause__ or e
                    raise self._fail(f"cannot reach the LLM endpoint {self.endpoint} ({cause}); is the server "
                                     f"running and the network up? Or {OFFLINE_HINT}", fatal=True) from None
                last = f"connection lost ({e.__cause__ or e})"
            except openai.RateLimitError as e:
                last = f"HTTP 429 rate limited ({self._error_text(e)})"
                delay = self._retry_after(e, delay)
            except openai.InternalServerError as e:
                last = f"HTTP {e.status_code} server error ({self._error_text(e)})"
                delay = self._retry_after(e, delay)
            except openai.AuthenticationError as e:
                raise self._fail(f"the LLM endpoint {self.endpoint} refused the API key (HTTP {e.status_code}: "
                                 f"{self._error_text(e)}); set OPENAI_API_KEY, or {OFFLINE_HINT}", fatal=True) from None
            except openai.NotFoundError as e:
                raise self._fail(f"{what}: HTTP 404 from {self.endpoint} ({self._error_text(e)}); check the model "
                                 f"name (--model, AUTORESEARCH_MODEL; now {self.model!r}) and that the base URL "
                                 f"ends in /v1", fatal=True) from None
            except openai.APIStatusError as e:
                if e.status_code in (408, 409):
                    last = f"HTTP {e.status_code} ({self._error_text(e)})"
                else:
                    raise self._fail(f"{what}: HTTP {e.status_code} from {self.endpoint}: {self._error_text(e)}",
                                     fatal=True) from None
            except openai.APIError as e:  # an error event in the middle of a stream ("model overloaded")
                last = f"the endpoint reported an error ({self._error_text(e)})"
            except ValueError as e:  # JSON that does not parse, an HTML page: not an OpenAI-compatible server
                raise self._fail(f"{what}: {self.endpoint} did not answer like an OpenAI-compatible API ({e}); "
                                 f"check that base_url is the server's /v1 endpoint, or {OFFLINE_HINT}",
                                 fatal=True) from None
            self._network_retries += i < self.max_retries
            if i < self.max_retries:
                delay = max(0.0, min(delay, self._left()))
                self._note(on_token, f"\n[{last}; retrying in {delay:.2g}s]\n")
                time.sleep(delay)
        advice = slow if slow and last.startswith("no answer within") else "Try again later"
        raise self._fail(f"the LLM endpoint {self.endpoint} failed {self.max_retries + 1} times ({what}); "
                         f"last error: {last}. {advice}, or {OFFLINE_HINT}", fatal=True)

    def _retry_after(self, e, default: float) -> float:
        try:
            value = float(e.response.headers.get("retry-after", ""))
        except (AttributeError, TypeError, ValueError):
            return default
        return max(default, min(value, self.max_retry_delay))

    def _resolve_model(self, on_token) -> str:
        if self.model:
            return self.model
        if self.base_url is None:
            self.model = DEFAULT_OPENAI_MODEL
            return self.model
        if self._models is None:
            models = self._with_retries("listing models", lambda: list(self._client_().models.list()), on_token)
            self._models = models      # read again for max_model_len (context_window)
        names = _model_names(self._models)
        chat = [m for m in names if not _EMBEDDING.search(m)]   # an embedding model cannot chat
        if not chat:
            msg = (f"the LLM endpoint {self.endpoint} lists no chat model"
                   + (f" (only {', '.join(names[:5])})" if names else "")
                   + ": load one in the server (Ollama: ollama pull qwen2.5-coder:7b), or name it with --model "
                     "(AUTORESEARCH_MODEL, model=)")
            raise self._fail(msg, fatal=True)
        self.model = chat[0]
        if len(chat) > 1:
            others = ", ".join(chat[1:6]) + (f" and {len(chat) - 6} more" if len(chat) > 6 else "")
            self._note(on_token, f"\n[using {self.model}, the first model {self.endpoint} lists; --model "
                                 f"(AUTORESEARCH_MODEL, model=) picks another: {others}]\n")
        return self.model

    def check_endpoint(self, timeout: float = 10.0) -> str:
        """Check, in seconds, that the endpoint answers and serves the model; return the model name.

        Meant for before anything trains (the CLI calls it before the baseline; a notebook
        can call `lab.proposer.check_endpoint()`). Lists the server's models (GET /models),
        resolves the model when none is set, and checks a set model is one of those
        listed. Raises a fatal ProposalError whose one line names the address and what to
        do: start the server, fix the base URL (missing /v1?), pick a listed model, or use
        the offline proposer. A server that does not list models passes when a model is set.
        """
        import openai

        where = self.endpoint
        timeout = max(0.1, min(self.timeout, timeout))
        client = self._client_().with_options(timeout=timeout, max_retries=0)
        v1 = "" if urlsplit(where).path.rstrip("/").endswith("/v1") else " (missing /v1 at the end?)"
        try:
            models = list(client.models.list())
            names = _model_names(models)
        except openai.APITimeoutError:
            raise self._fail(f"the LLM endpoint {where} did not answer GET /models within {timeout:g} s: is the "
                             f"server up and not stuck? Check it, or {OFFLINE_HINT}", fatal=True) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            first = ("start the LLM server (e.g. `ollama serve`, `llama-server -m MODEL.gguf`, `vllm serve "
                     "MODEL`)") if _unreachable(e) else "check that the server is up and the network works"
            raise self._fail(f"cannot reach the LLM endpoint {where} ({cause}): {first}, or fix --base-url "
                             f"(OPENAI_BASE_URL){v1}; or {OFFLINE_HINT}", fatal=True) from None
        except openai.AuthenticationError as e:
            raise self._fail(f"the LLM endpoint {where} refused the API key (HTTP {e.status_code}: "
                             f"{self._error_text(e)}); set OPENAI_API_KEY, or {OFFLINE_HINT}", fatal=True) from None
        except openai.APIStatusError as e:
            if e.status_code in (404, 405, 501) and self.model and not v1:
                return self.model      # a /v1 server without a model list: the first request tells
            raise self._fail(f"the LLM endpoint {where} answered GET /models with HTTP {e.status_code} "
                             f"({self._error_text(e)}): is --base-url (OPENAI_BASE_URL) the server's "
                             f"OpenAI-compatible address{v1}? e.g. http://localhost:11434/v1 (Ollama), "
                             f"http://localhost:8080/v1 (llama.cpp); or {OFFLINE_HINT}", fatal=True) from None
        except Exception as e:   # an HTML page, JSON of another shape: not an OpenAI-compatible API
            raise self._fail(f"the LLM endpoint {where} did not answer GET /models like an OpenAI-compatible API "
                             f"({type(e).__name__}: {str(e)[:120]}): is --base-url the server's /v1 address{v1}? "
                             f"Or {OFFLINE_HINT}", fatal=True) from None
        self._models = models
        if not self.model:
            return self._resolve_model(self.on_token)
        if not names or _listed(self.model, names) or _accepts_any_model(models):
            return self.model
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise self._fail(f"the LLM endpoint {where} does not serve the model {self.model!r}; it lists: {shown}. "
                         f"Pick one with --model (AUTORESEARCH_MODEL, model=), or load it in the server "
                         f"(Ollama: ollama pull {self.model})", fatal=True)

    def _complete(self, messages: list[dict], on_token, *, extra: dict | None = None,
                  stream: bool | None = None) -> tuple[str, dict]:
        """One chat completion: (reply text, usage counts; {} when the server reports none).

        `extra` adds request fields (response_format, max_tokens, extra_body entries).
        Raises _ContextOverflow for a 400 that says the prompt is too long, and
        _ConstraintRefused for another 400 to a request with a response_format or grammar
        (and for a 422 or 500 whose message names one of them: llama-cpp-python's answer).
        """
        import openai

        client = self._client_()
        extra = dict(extra or {})
        kw: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        max_tokens = extra.pop("max_tokens", None) or self.max_tokens
        self._reply = {"finish": None, "reasoning": 0, "max_tokens": max_tokens}
        body = {**(self.extra_body or {}), **extra.pop("extra_body", {})}
        if body:
            kw["extra_body"] = body
        kw.update(extra)
        constrained = "response_format" in kw or "grammar" in body
        stream = self.stream if stream is None else stream

        def create(**more):
            left = self._left()   # a request never outlives the proposal's total wait
            if left != float("inf"):
                more.setdefault("timeout", max(0.05, min(self.timeout, left)))
            cap = {self._max_tokens_field: max_tokens} if max_tokens is not None and self._max_tokens_field else {}
            try:
                return client.chat.completions.create(**kw, **cap, **more)
            except openai.APIStatusError as e:
                message = self._error_text(e)
                field = self._max_tokens_field
                if cap and e.status_code in (400, 422) and re.search(rf"\b{field}\b", message):
                    # OpenAI's o-series / gpt-5 want max_completion_tokens; some servers take neither
                    nxt = {"max_tokens": "max_completion_tokens", "max_completion_tokens": None}[field]
                    self._max_tokens_field = nxt
                    self._note(on_token, f"\n[the server refused {field} ({message}): "
                                         f"{'sending max_completion_tokens' if nxt else 'sending no reply cap'} "
                                         f"instead from now on]\n")
                    self._progress(event="max_tokens", was=field, now=nxt, why=message)
                    return create(**more)
                if e.status_code == 400 and _context_error(message):
                    raise _ContextOverflow(message, _context_in(message)) from None
                # A refused constraint, not a broken server: step down, do not retry. Servers name
                # the field (llama-cpp-python answers json_schema with a 500, FastAPI ones with
                # 422); a bare 400 naming no other field of the request counts too.
                if constrained and e.status_code in (400, 422, 500) and (
                        _names_constraint(message)
                        or (e.status_code == 400 and not more.get("stream_options")
                            and not _names_field(message, {**kw, **cap, **body}))):
                    raise _ConstraintRefused(message) from None
                raise

        if not stream:
            def call():
                resp = create()
                if not hasattr(resp, "choices"):  # the client hands back a body it could not read as is
                    msg = f"the reply is not a chat completion: {str(resp)[:80]!r}"
                    raise ValueError(msg)
                text = resp.choices[0].message.content or "" if resp.choices else ""
                if resp.choices:
                    msg = resp.choices[0].message
                    self._reply["finish"] = resp.choices[0].finish_reason
                    self._reply["reasoning"] = len(_reasoning(msg))
                if on_token is not None and text:
                    on_token(text)
                return text, _usage(resp.usage)
            # Unstreamed, the timeout is for the whole reply: a model that reasons for minutes exceeds it.
            return self._with_retries("chat completion", call, on_token, slow=(
                "Without streaming the timeout covers the whole reply, and a reasoning model can think for "
                "longer: raise it (--timeout, timeout=), or stream (stream=True), where it is per chunk"))

        def call_stream():
            more = {"stream_options": {"include_usage": True}} if self._stream_usage else {}
            try:
                chunks = create(stream=True, **more)
            except openai.APIStatusError as e:
                # older servers reject stream_options (vLLM: 400; FastAPI ones: 422 naming it): ask without it
                if not more or not (e.status_code == 400 or (e.status_code == 422
                                                             and "stream_options" in self._error_text(e))):
                    raise
                self._stream_usage = False
                chunks = create(stream=True)
            parts, usage = [], {}
            thinking = _Thinking(time.monotonic(), self.reasoning_note_seconds)
            for chunk in chunks:
                now = time.monotonic()
                usage = _usage(chunk.usage) if getattr(chunk, "usage", None) else usage
                pieces, thought = [], ""
                for choice in chunk.choices or ():
                    if getattr(choice, "finish_reason", None):
                        self._reply["finish"] = choice.finish_reason
                    if choice.delta:
                        thought += _reasoning(choice.delta)
                        if getattr(choice.delta, "content", None):
                            pieces.append(choice.delta.content)
                # A model still thinking is working, not hung: the wait for each reasoning chunk (and for
                # inline <think> text) does not count toward max_wait; the per-read timeout still applies.
                inline = thinking.inline(pieces)
                if (inline or (thought and not thinking.answered)) and self._deadline is not None:
                    self._deadline += now - thinking.last
                thinking.last = now
                if self._left() <= 0:   # a reply that trickles in forever (each read within the timeout)
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
                    raise _OutOfTime
                if thought:
                    note = thinking.add(thought, now)
                    if note:
                        self._thinking_note(on_token, note, thinking)
                for piece in pieces:
                    if piece.strip() and not inline and not thinking.answered:
                        thinking.answered = True
                        if thinking.chunks:
                            self._thinking_note(on_token, thinking.done(now), thinking)
                    parts.append(piece)
                    if on_token is not None:
                        on_token(piece)
            self._reply["reasoning"] = thinking.chars
            return "".join(parts), usage
        return self._with_retries("chat completion", call_stream, on_token)

    # ------------------------------------------------------------------ sizes and modes

    @property
    def counter(self) -> TokenCounter:
        """How prompts are counted (`.method` says how)."""
        if self._counter is None:
            self._counter = TokenCounter()
        return self._counter

    def context_window(self) -> tuple[int | None, str]:
        """(the server's context size in tokens or None, where it came from), asked once.

        `context_size=` / AUTORESEARCH_CONTEXT first; then /v1/models (vLLM's
        max_model_len) and /props (llama.cpp's n_ctx); else (None, "unknown").
        """
        if self._context is not None or self._context_source:
            return self._context, self._context_source
        if self._context_arg is not None:
            self._context, self._context_source = self._context_arg, "setting"
            return self._context, self._context_source
        self._context_source = "unknown"
        if self.base_url is None:      # api.openai.com: contexts of 128k and more; nothing to ask
            return None, self._context_source
        try:
            models = self._models if self._models is not None else list(self._client_().models.list())
            n = context_from_models(models, self.model)
            if n:
                self._context, self._context_source = n, "server /v1/models"
                return self._context, self._context_source
        except Exception:              # a server without /models: fine, try /props
            pass
        try:
            import httpx

            r = httpx.get(props_url(self.base_url), timeout=min(5.0, self.timeout),
                          headers={"Authorization": f"Bearer {self.__key}"})
            n = context_from_props(r.json()) if r.status_code == 200 else None
            if n:
                self._context, self._context_source = n, "server /props"
        except Exception:
            pass
        return self._context, self._context_source

    def _reply_room(self, mode: str, context: int | None) -> int:
        """Tokens kept free for the reply: max_tokens, else a share of the context."""
        if self.max_tokens is not None:
            return self.max_tokens
        if mode == "knobs":
            return KNOB_MAX_TOKENS
        return max(256, min(2048, (context or 8192) // 4))

    def _limit(self, mode: str) -> int | None:
        ctx, _ = self.context_window()
        return None if ctx is None else ctx - self._reply_room(mode, ctx)

    def _too_long(self, n: int, mode: str, what: str) -> ProposalError:
        ctx, source = self.context_window()
        room = self._reply_room(mode, ctx)
        return self._fail(
            f"the prompt does not fit: {what} needs {n} tokens ({self.counter.method}) and the server's context "
            f"is {ctx} tokens ({source}), {room} of them kept for the reply. Start the server with a larger "
            f"context (llama.cpp: -c 8192; Ollama: OLLAMA_CONTEXT_LENGTH=8192), or set AUTORESEARCH_CONTEXT / "
            f"context_size= if the server has more than the kit was told"
            + ("" if mode == "knobs" else ", or use the knob mode (--edit-mode knobs, edit_mode=\"knobs\")"),
            prompt_tokens_counted=n, context_size=ctx)

    def _fit_edits(self, context: ProposalContext) -> tuple[list[dict], int, str]:
        """The free-form prompt, trimmed until it fits: (messages, tokens, what was cut)."""
        limit = self._limit("edits")
        plans = [(self.max_history, prompts.MAX_DIFFS, prompts.MAX_CRASH_CHARS, ""),
                 (self.max_history, 1, prompts.MAX_CRASH_CHARS, "older diffs"),
                 (self.max_history, 0, 1000, "diffs, most of the crash log"),
                 (10, 0, 500, "diffs, history beyond 10, most of the crash log"),
                 (3, 0, 300, "diffs, history beyond 3, most of the crash log"),
                 (0, 0, 0, "history, diffs and crash log")]
        n = 0
        for hist, diffs, crash, cut in plans:
            messages = prompts.build_messages(context, system_prompt=self.system_prompt, max_history=min(hist, self.max_history),
                                              max_diffs=diffs, max_crash_chars=crash)
            n = self.counter.count_messages(messages)
            if limit is None or n <= limit:
                return messages, n, cut
        raise _NoFit(n, "the free-form prompt (program.md and the whole train.py)")

    def _fit_knobs(self, context: ProposalContext, ks: list) -> tuple[list[dict], int, str]:
        limit = self._limit("knobs")
        n = 0
        for rows, cut in ((knobs.MAX_RESULTS, ""), (4, "results beyond the last 4"), (0, "the results table")):
            messages = knobs.build_messages(context, ks, max_rows=rows)
            n = self.counter.count_messages(messages)
            if limit is None or n <= limit:
                return messages, n, cut
        raise _NoFit(n, "the knob prompt (program.md and the knob list)")

    def _fit_turn(self, base: list[dict], turn: list[dict], mode: str) -> list[dict]:
        """base + the refused reply and its error, or less of them when that would not fit."""
        limit = self._limit(mode)
        for messages in (base + turn, base + turn[-1:]):
            if limit is None or self.counter.count_messages(messages) <= limit:
                return messages
        return base

    def _mode(self, model: str) -> str:
        if self.edit_mode != "auto":
            return self.edit_mode
        if self._switched:
            return "knobs"
        return "knobs" if small_local_model(model, self.base_url) else "edits"

    # ------------------------------------------------------------------ the proposer

    def _note(self, on_token, text: str, *, covered: bool = False) -> None:
        """A bracketed note for a person (a retry, a fallback), not part of the reply.

        With `on_progress` set it goes there as {"event": "note", "text": ...} (skipped when
        `covered`: an event of its own already says it), so a reply counter never counts it;
        without, it goes inline through `on_token` (the panel shows it in the stream).
        """
        if self.on_progress is not None:
            if not covered:
                self._progress(event="note", text=text.strip())
        elif on_token is not None:
            on_token(text)

    def _thinking_note(self, on_token, text: str, thinking: "_Thinking") -> None:
        """A liveness note while reasoning streams: an "event": "note" with the counts, else inline."""
        if self.on_progress is not None:
            self._progress(event="note", text=text, reasoning_tokens=thinking.chunks,
                           seconds=round(thinking.last - thinking.t0, 1))
        elif on_token is not None:
            on_token(f"\n{text}\n")

    def _progress(self, **event) -> None:
        if self.on_progress is not None:
            self.on_progress(event)

    def propose(self, context: ProposalContext, *, on_token: Callable[[str], Any] | None = None) -> Proposal:
        """Ask the model for an edit (or, in the knob mode, a knob change); return the first valid one.

        Raises
        ------
        ProposalError
            After `max_attempts` refused replies (the reason has the last error), when the
            prompt cannot fit the server's context, or when the endpoint fails (the reason
            names its URL, never the key). Its metadata keeps each refused reply.
        """
        self._deadline = time.monotonic() + self.max_wait
        try:
            return self._propose(context, on_token or self.on_token)
        finally:
            self._deadline = None

    def _propose(self, context: ProposalContext, on_token) -> Proposal:
        t0 = time.perf_counter()
        self._network_retries = 0
        model = self._resolve_model(on_token)
        mode = self._mode(model)
        meta: dict[str, Any] = {"proposer": self.name, "model": model, "endpoint": _host(self.endpoint),
                                "edit_mode": mode, "attempts": 0, "prompt_tokens": None,
                                "completion_tokens": None, "errors": [], "refused": []}
        self._usage_missing = False
        ks = None
        if mode == "knobs":
            try:
                ks = knobs.find_knobs(context.parent_source, self._device())
            except SyntaxError as e:
                raise self._fail(f"the parent train.py does not parse ({e.msg}, line {e.lineno}); fix it first",
                                 **meta) from None
            if not ks:
                if self.edit_mode == "knobs":
                    raise self._fail("the knob mode found no UPPER_CASE constant with a literal value in train.py "
                                     "(e.g. MATRIX_LR = 0.02); use edit_mode=\"edits\" (--edit-mode edits)", **meta)
                mode = meta["edit_mode"] = "edits"
        try:
            if mode == "edits":
                try:
                    return self._run(context, on_token, meta, t0, "edits")
                except _GaveUp as e:
                    if self.edit_mode != "auto" or not self._knobs_possible(context):
                        raise e.error from None
                    why = e.error.reason
                except _NoFit as e:
                    if self.edit_mode != "auto" or not self._knobs_possible(context):
                        raise self._too_long(e.tokens, "edits", e.what) from None
                    why = f"the free-form prompt ({e.tokens} tokens) does not fit the context"
                self._switched = True
                meta["edit_mode"], meta["switched_from"] = "knobs", {"mode": "edits", "why": why}
                self._note(on_token, "\n\n[free-form edits did not work with this model: switching to the knob mode "
                                     "(one UPPER_CASE constant per experiment, as JSON)]\n\n", covered=True)
                self._progress(event="switch", to="knobs", why=why)
                ks = knobs.find_knobs(context.parent_source, self._device())
            try:
                return self._run(context, on_token, meta, t0, "knobs", ks)
            except _GaveUp as e:
                if "switched_from" not in meta:
                    raise e.error from None
                reason = f"{e.error.reason} (free-form edits failed before: {meta['switched_from']['why']})"
                raise ProposalError(reason, attempts=e.error.attempts, metadata=e.error.metadata) from None
            except _NoFit as e:
                raise self._too_long(e.tokens, "knobs", e.what) from None
        except ProposalError as e:
            e.attempts = e.attempts or meta["attempts"]
            e.metadata = {**self._finish(meta, t0), **e.metadata}
            raise

    def _device(self) -> str | None:
        """The device whose CPU_*/GPU_* knobs the knob mode offers ("auto" resolved once)."""
        if self.device == "auto":
            from autoresearch_kit.propose.mutate import training_device

            self.device = training_device()
        return self.device

    def _knobs_possible(self, context: ProposalContext) -> bool:
        try:
            return bool(knobs.find_knobs(context.parent_source, self._device()))
        except SyntaxError:
            return False

    def _finish(self, meta: dict, t0: float) -> dict:
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        meta["network_retries"] = self._network_retries
        if self._usage_missing:     # some reply came without counts: the totals are unknown, not 0
            meta["prompt_tokens"] = meta["completion_tokens"] = None
            meta["usage"] = "not reported by the server"
        known = [meta[k] for k in ("prompt_tokens", "completion_tokens")]
        meta["tokens"] = None if None in known else sum(known)
        return meta

    def _structured_extra(self, ks: list) -> dict:
        """The request fields that constrain a knob reply, for the current fallback level."""
        extra: dict[str, Any] = {"max_tokens": self.max_tokens or KNOB_MAX_TOKENS}
        if self._structured == "json_schema":
            extra["response_format"] = knobs.response_format(ks)
        elif self._structured == "grammar":
            source, seen = self._menu   # values whose train.py already ran are left out of the menu
            extra["extra_body"] = {"grammar": knobs.grammar(ks, source, seen)}
        return extra

    def _downgrade(self, on_token, why: str) -> bool:
        """json_schema -> grammar -> prompt only (when structured="auto"); False if no step is left."""
        if self.structured != "auto" or self._structured == "none":
            return False
        nxt = {"json_schema": "grammar", "grammar": "none"}[self._structured]
        self._note(on_token, f"\n[{why}: asking with {'a GBNF grammar' if nxt == 'grammar' else 'the prompt alone'} "
                             f"instead]\n", covered=True)
        self._progress(event="structured", was=self._structured, now=nxt, why=why)
        self._structured = nxt
        return True

    def _run(self, context: ProposalContext, on_token, meta: dict, t0: float, mode: str,
             ks: list | None = None) -> Proposal:
        """The attempt loop of one mode: ask, parse, feed the error back, up to max_attempts."""
        if mode == "knobs":
            self._menu = (context.parent_source, context.seen_hashes)
            def fit():
                return self._fit_knobs(context, ks)
            retry = knobs.retry_message
        else:
            def fit():
                return self._fit_edits(context)
            retry = prompts.retry_message
        base, n, cut = fit()
        if cut:
            meta["trimmed"] = cut
        messages, error = base, ""
        for attempt in range(1, self.max_attempts + 1):
            meta["attempts"] += 1
            if attempt > 1:
                self._note(on_token, f"\n\n[reply {attempt - 1} refused: {error}; asking again "
                                     f"({attempt}/{self.max_attempts})]\n\n", covered=True)
            while True:
                try:
                    text, usage, n = self._ask(messages, on_token, meta, mode, ks, attempt)
                    break
                except _Refit:               # the server named a smaller context: trim to it
                    base, n, cut = fit()
                    messages = base
                    if cut:
                        meta["trimmed"] = cut
            for k in ("prompt_tokens", "completion_tokens"):
                if k in usage:
                    meta[k] = (meta[k] or 0) + usage[k]
                else:
                    self._usage_missing = True
            meta["network_retries"] = self._network_retries
            info = dict(self._reply)
            try:
                if not text.strip() and (info.get("reasoning") or usage.get("completion_tokens")):
                    what = (f"{info['reasoning']} characters of reasoning_content" if info.get("reasoning")
                            else f"{usage['completion_tokens']} tokens generated")
                    cut = (f", cut off at max_tokens={info['max_tokens']}" if info.get("finish") == "length"
                           and info.get("max_tokens") else "")
                    raise EditError(
                        f"the model only reasoned and gave no answer ({what}{cut}): raise --max-tokens "
                        f"(max_tokens=), or turn its thinking off (Qwen3: /no_think in program.md; Ollama: "
                        f"--extra-body '{{\"think\": false}}'; llama.cpp: --reasoning-budget 0)")
                if not text.strip():
                    ctx, source = self.context_window()
                    raise EditError(
                        f"the model sent an empty reply; the likely cause is a prompt ({n} tokens, "
                        f"{self.counter.method}) that does not fit the server's context ({ctx or 'size unknown'}"
                        f"{'' if ctx is None else ', ' + source}): start the server with a larger context "
                        f"(llama.cpp: -c 8192; Ollama: OLLAMA_CONTEXT_LENGTH=8192) or set AUTORESEARCH_CONTEXT "
                        f"(context_size=) to the server's size so the kit trims the prompt to fit")
                if mode == "knobs":
                    change = knobs.parse_reply(text, ks)
                    source = knobs.apply(context.parent_source, change)
                    description, rationale = knobs.describe(change), knobs.rationale(change)
                    meta["change"] = {"knob": change.knob.name, "old": change.knob.text, "new": change.new_text}
                    meta["structured"] = self._structured
                else:
                    reply = parse_reply(text)
                    source = apply_reply(context.parent_source, reply)
                    description, rationale = reply.description, reply.rationale
                proposal = make_proposal(context, source, description, proposer=self.name, rationale=rationale,
                                         metadata=self._finish(dict(meta), t0))
                self._progress(event="accepted", attempt=attempt, description=proposal.description)
                return proposal
            except (EditError, ProposalError) as e:
                error = self._scrub(str(e))
                if info.get("finish") == "length" and text.strip() and isinstance(e, EditError):
                    cap = info.get("max_tokens")
                    at = f"max_tokens={cap}" if cap else "the server's reply limit"
                    error = (f"the reply was cut off at {at} "
                             f"(finish_reason=length) before the edit was complete: raise --max-tokens "
                             f"(max_tokens=){', or reply with shorter SEARCH/REPLACE blocks' if mode == 'edits' else ''}"
                             f" [{error}]")
                meta["errors"].append(error)
                meta["refused"].append({"attempt": meta["attempts"], "mode": mode, "error": error,
                                        "reply": self._scrub(text[:MAX_SAVED_REPLY])})
                self._progress(event="refused", attempt=attempt, error=error, reply=text)
                if mode == "knobs" and self._structured == "json_schema" and text.strip() \
                        and isinstance(e, EditError) and "not JSON" in error:
                    self._downgrade(on_token, "the server ignored the JSON schema")
            messages = self._fit_turn(base, [{"role": "assistant", "content": text}, retry(error)], mode)
        what = "knob change" if mode == "knobs" else "edit"
        hint = ("try a bigger model, or the offline proposer (--proposer mutate, proposer=\"mutate\")"
                if mode == "knobs" else
                "try a bigger model, the knob mode (--edit-mode knobs, edit_mode=\"knobs\"), or the offline "
                "proposer (--proposer mutate, proposer=\"mutate\")")
        raise _GaveUp(ProposalError(
            f"the model ({meta['model']} at {_host(self.endpoint)}) gave no usable {what} in "
            f"{self.max_attempts} attempts; last problem: {error}. {hint[0].upper() + hint[1:]}",
            attempts=meta["attempts"], metadata=meta))

    def _ask(self, messages: list[dict], on_token, meta: dict, mode: str, ks, attempt: int
             ) -> tuple[str, dict, int]:
        """One reply, through the fallbacks that do not count as attempts: (text, usage, prompt tokens).

        A refused constraint (400) steps down json_schema -> grammar -> prompt; a 400 that
        names the context size trims the prompt to that size and asks again; an empty
        streamed reply is asked once more without streaming (servers report an overflow
        only there).
        """
        stream, shrunk, unstreamed_retry = (False if self._stream_ignored else None), False, False
        while True:
            n = self.counter.count_messages(messages)
            limit = self._limit(mode)
            if limit is not None and n > limit:
                raise _NoFit(n, "the prompt with the previous reply")
            ctx, source = self.context_window()
            meta["prompt_tokens_counted"], meta["token_count"] = n, self.counter.method
            meta["context_size"], meta["context_source"] = ctx, source
            self._progress(event="ask", model=self.model, endpoint=self.endpoint, prompt_tokens=n,
                           method=self.counter.method, context=ctx, context_source=source, mode=mode,
                           attempt=attempt, structured=self._structured if mode == "knobs" else None)
            extra = self._structured_extra(ks) if mode == "knobs" else None
            try:
                text, usage = self._complete(messages, on_token, extra=extra, stream=stream)
            except _ConstraintRefused as e:
                if self._downgrade(on_token, f"the server refused the {self._structured} constraint ({e})"):
                    continue
                raise self._fail(f"chat completion: HTTP 400 from {self.endpoint}: {e}", fatal=True) from None
            except _ContextOverflow as e:
                known, _ = self.context_window()
                if e.context and not shrunk and (known is None or e.context < known):
                    shrunk = True            # the server said how big it is: fit to that and ask again
                    self._context, self._context_source = e.context, "server error"
                    raise _Refit(e.context) from None
                raise self._too_long(n, mode, "the prompt") if known else self._fail(
                    f"the server refused the prompt as too long ({e}); the prompt is {n} tokens "
                    f"({self.counter.method}). Start the server with a larger context (llama.cpp: -c 8192; Ollama: "
                    f"OLLAMA_CONTEXT_LENGTH=8192), or set AUTORESEARCH_CONTEXT to its size so the kit trims "
                    f"the prompt", prompt_tokens_counted=n) from None
            if not text.strip() and (self.stream if stream is None else stream) and not self._reply.get("reasoning") \
                    and not usage.get("completion_tokens"):
                stream = False               # ask again unstreamed: a 400 shows there, not in a stream
                unstreamed_retry = True
                self._note(on_token, "\n[empty streamed reply: asking once more without streaming]\n")
                continue
            if unstreamed_retry and text.strip() and not self._stream_ignored:
                # an empty stream, then a full answer unstreamed: this server does not stream (it
                # answers stream=True with one JSON body); asking it to would generate every reply twice
                self._stream_ignored = True
                self._note(on_token, "\n[the server does not stream: asking without streaming from now on]\n")
            self._progress(event="reply", attempt=attempt, chars=len(text), usage=usage)
            return text, usage, n


def _usage(usage) -> dict:
    """Counts the server reported; a missing count is left out (unknown), never 0."""
    if usage is None:
        return {}
    out = {}
    for k in ("prompt_tokens", "completion_tokens"):
        v = getattr(usage, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
    return out


_CONTEXT_WORDS = re.compile(r"context length|context size|context window|n_ctx|too many tokens|prompt is too long|"
                            r"exceeds? the (?:available )?context|maximum context", re.IGNORECASE)
_CONTEXT_NUMBER = (re.compile(r"maximum context length is (\d+)", re.IGNORECASE),
                   re.compile(r"n_ctx\W{0,4}(\d+)", re.IGNORECASE),
                   re.compile(r"context (?:size|length|window)\D{0,20}(\d{3,7})", re.IGNORECASE))


def _context_error(message: str) -> bool:
    return bool(_CONTEXT_WORDS.search(message or ""))


def _context_in(message: str) -> int | None:
    for pattern in _CONTEXT_NUMBER:
        m = pattern.search(message or "")
        if m:
            return int(m.group(1))
    return None


def _names_field(message: str, fields: dict) -> bool:
    """Whether a server error names one of the request's other fields (max_tokens, temperature, ...)."""
    names = [k for k in fields if k not in ("model", "messages", "response_format", "grammar", "stream")]
    return any(re.search(rf"\b{re.escape(k)}\b", message or "") for k in names)


def _reasoning(obj) -> str:
    """The reasoning text of a message or delta (llama.cpp, vLLM: reasoning_content; others: reasoning)."""
    for name in ("reasoning_content", "reasoning"):
        value = getattr(obj, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


_EMBEDDING = re.compile(r"embed", re.IGNORECASE)


def _model_names(models) -> list[str]:
    return [str(m.id) for m in models or () if getattr(m, "id", None)]


def _listed(model: str, names: list[str]) -> bool:
    """`model` is served: listed as is, or as Ollama's "NAME:latest" for a bare NAME."""
    return model in names or (":" not in model and f"{model}:latest" in names)


def _accepts_any_model(models) -> bool:
    """llama.cpp's server serves its one model under any name."""
    return len(models or ()) == 1 and getattr(models[0], "owned_by", "") == "llamacpp"


def _names_constraint(message: str) -> bool:
    """Whether a server error is about the request's response_format or grammar field."""
    return bool(re.search(r"response_format|grammar", message or "", re.IGNORECASE))


class _ContextOverflow(Exception):
    """The server refused the prompt as longer than its context (HTTP 400)."""

    def __init__(self, message: str, context: int | None) -> None:
        super().__init__(message)
        self.context = context


class _ConstraintRefused(Exception):
    """HTTP 400 (or a 422/500 naming the field) to a request carrying a response_format or grammar."""


class _NoFit(Exception):
    """The prompt, trimmed as far as it goes, is still larger than the context allows."""

    def __init__(self, tokens: int, what: str) -> None:
        super().__init__(what)
        self.tokens, self.what = tokens, what


class _Refit(Exception):
    """The server told its context size: build the prompt again for it."""


class _GaveUp(Exception):
    """Every attempt of a mode was refused; `.error` is the ProposalError to raise."""

    def __init__(self, error: ProposalError) -> None:
        super().__init__(error.reason)
        self.error = error


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
SMALL_MODEL_BILLIONS = 4.0       # up to this size a model gets the knob mode when served locally
_SIZE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z0-9])", re.IGNORECASE)
_SMALL_WORDS = re.compile(r"smol|tiny|nano|micro", re.IGNORECASE)


def small_local_model(model: str | None, base_url: str | None) -> bool:
    """True for a small model (name says <= 4B parameters, or smol/tiny) on a local endpoint.

    "SmolLM2-135M-Instruct", "qwen2.5:0.5b" and "phi-3-mini-3.8b" at 127.0.0.1 are small;
    "qwen2.5-coder:7b" is not, and neither is any model behind a remote endpoint.
    """
    host = (urlsplit(base_url).hostname or "") if base_url else ""
    if host not in _LOCAL_HOSTS or not model:
        return False
    name = model.replace("_", "-").rsplit("/", 1)[-1]
    sizes = [float(n) / (1000 if unit.lower() == "m" else 1) for n, unit in _SIZE.findall(name)]
    if sizes:
        return max(sizes) <= SMALL_MODEL_BILLIONS
    return bool(_SMALL_WORDS.search(name))
