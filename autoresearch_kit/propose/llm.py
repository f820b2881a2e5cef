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

Each attempt asks for DESCRIPTION / RATIONALE / SEARCH-REPLACE blocks (prompts.py),
applies and validates them (edits.py), and on failure asks again with the error fed back,
up to `max_attempts`. Network faults (timeouts, dropped connections, HTTP 429/5xx) are
retried `max_retries` times with exponential backoff; an unreachable host fails at once
and names the offline proposer.

    python -m pytest tests/test_llm.py -q      # a real HTTP server on 127.0.0.1
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from autoresearch_kit.propose import prompts
from autoresearch_kit.propose.base import Proposal, ProposalContext, ProposalError
from autoresearch_kit.propose.edits import EditError, apply_reply, make_proposal, parse_reply

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"     # used only against api.openai.com with no model set
LOCAL_PLACEHOLDER_KEY = "not-needed"     # local servers ignore the key but the client wants one
OFFLINE_HINT = "use the offline proposer instead: --proposer mutate (CLI) or proposer=\"mutate\" (Lab)"


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
        Seconds to wait for the server (per read while streaming).
    max_retries
        Extra tries per request after a timeout, dropped connection, HTTP 429 or 5xx.
    retry_delay, max_retry_delay
        Backoff: retry_delay * 2**i seconds, capped (Retry-After is honoured up to the cap).
    temperature, max_tokens
        Sent only when given (some models refuse a temperature).
    system_prompt
        Replaces prompts.SYSTEM_PROMPT.
    extra_body
        Extra JSON fields for the request (server-specific options).
    """

    name = "llm"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 max_attempts: int = 3, stream: bool = True, on_token: Callable[[str], Any] | None = None,
                 timeout: float = 120.0, max_retries: int = 3, retry_delay: float = 1.0,
                 max_retry_delay: float = 20.0, temperature: float | None = None,
                 max_tokens: int | None = None, system_prompt: str | None = None,
                 max_history: int = prompts.MAX_HISTORY, extra_body: dict | None = None) -> None:
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
        self.retry_delay, self.max_retry_delay = retry_delay, max_retry_delay
        self.temperature, self.max_tokens = temperature, max_tokens
        self.system_prompt, self.max_history, self.extra_body = system_prompt, max_history, extra_body
        self._client = None
        self._network_retries = 0      # per propose(), reported in the metadata
        self._stream_usage = True      # ask for usage in the stream until a server refuses

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

    def _fail(self, reason: str, **meta) -> ProposalError:
        return ProposalError(self._scrub(reason), metadata={k: self._scrub(v) if isinstance(v, str) else v
                                                            for k, v in meta.items()})

    def _with_retries(self, what: str, call: Callable[[], Any], on_token: Callable[[str], Any] | None):
        """Run `call`, retrying timeouts, dropped connections, 429 and 5xx with backoff."""
        import openai

        last = ""
        for i in range(self.max_retries + 1):
            delay = min(self.max_retry_delay, self.retry_delay * 2**i)
            try:
                return call()
            except openai.APITimeoutError:
                last = f"no answer within {self.timeout:g}s (timeout)"
            except openai.APIConnectionError as e:
                if _unreachable(e):
                    cause = e.__cause__ or e
                    raise self._fail(f"cannot reach the LLM endpoint {self.endpoint} ({cause}); is the server "
                                     f"running and the network up? Or {OFFLINE_HINT}") from None
                last = f"connection lost ({e.__cause__ or e})"
            except openai.RateLimitError as e:
                last = f"HTTP 429 rate limited ({self._scrub(str(e.message))})"
                delay = self._retry_after(e, delay)
            except openai.InternalServerError as e:
                last = f"HTTP {e.status_code} server error ({self._scrub(str(e.message))})"
                delay = self._retry_after(e, delay)
            except openai.AuthenticationError as e:
                raise self._fail(f"the LLM endpoint {self.endpoint} refused the API key (HTTP {e.status_code}: "
                                 f"{e.message}); set OPENAI_API_KEY, or {OFFLINE_HINT}") from None
            except openai.NotFoundError as e:
                raise self._fail(f"{what}: HTTP 404 from {self.endpoint} ({e.message}); check the model name "
                                 f"(AUTORESEARCH_MODEL, now {self.model!r}) and that base_url ends in /v1") from None
            except openai.APIStatusError as e:
                if e.status_code in (408, 409):
                    last = f"HTTP {e.status_code} ({self._scrub(str(e.message))})"
                else:
                    raise self._fail(f"{what}: HTTP {e.status_code} from {self.endpoint}: {e.message}") from None
            except openai.APIError as e:  # an error event in the middle of a stream ("model overloaded")
                last = f"the endpoint reported an error ({self._scrub(str(e.message))})"
            except ValueError as e:  # JSON that does not parse, an HTML page: not an OpenAI-compatible server
                raise self._fail(f"{what}: {self.endpoint} did not answer like an OpenAI-compatible API ({e}); "
                                 f"check that base_url is the server's /v1 endpoint, or {OFFLINE_HINT}") from None
            self._network_retries += i < self.max_retries
            if i < self.max_retries:
                if on_token is not None:
                    on_token(f"\n[{last}; retrying in {delay:.2g}s]\n")
                time.sleep(delay)
        raise self._fail(f"the LLM endpoint {self.endpoint} failed {self.max_retries + 1} times ({what}); "
                         f"last error: {last}. Try again later, or {OFFLINE_HINT}")

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
        models = self._with_retries("listing models", lambda: list(self._client_().models.list()), on_token)
        if not models:
            msg = (f"the LLM endpoint {self.endpoint} lists no models: load one in the server, or set "
                   f"AUTORESEARCH_MODEL / model=")
            raise self._fail(msg)
        self.model = models[0].id
        return self.model

    def _complete(self, messages: list[dict], on_token) -> tuple[str, dict]:
        """One chat completion: (reply text, usage counts)."""
        import openai

        client = self._client_()
        kw: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        if self.extra_body:
            kw["extra_body"] = self.extra_body

        if not self.stream:
            def call():
                resp = client.chat.completions.create(**kw)
                if not hasattr(resp, "choices"):  # the client hands back a body it could not read as is
                    msg = f"the reply is not a chat completion: {str(resp)[:80]!r}"
                    raise ValueError(msg)
                text = resp.choices[0].message.content or "" if resp.choices else ""
                if on_token is not None and text:
                    on_token(text)
                return text, _usage(resp.usage)
            return self._with_retries("chat completion", call, on_token)

        def call_stream():
            extra = {"stream_options": {"include_usage": True}} if self._stream_usage else {}
            try:
                stream = client.chat.completions.create(stream=True, **kw, **extra)
            except openai.BadRequestError:
                if not extra:
                    raise
                self._stream_usage = False   # older servers reject stream_options: ask without it
                stream = client.chat.completions.create(stream=True, **kw)
            parts, usage = [], {}
            for chunk in stream:
                if getattr(chunk, "usage", None):
                    usage = _usage(chunk.usage)
                for choice in chunk.choices or ():
                    piece = getattr(choice.delta, "content", None) if choice.delta else None
                    if piece:
                        parts.append(piece)
                        if on_token is not None:
                            on_token(piece)
            return "".join(parts), usage
        return self._with_retries("chat completion", call_stream, on_token)

    # ------------------------------------------------------------------ the proposer

    def propose(self, context: ProposalContext, *, on_token: Callable[[str], Any] | None = None) -> Proposal:
        """Ask the model for an edit; return the first valid one.

        Raises
        ------
        ProposalError
            After `max_attempts` refused replies (the reason has the last error), or when
            the endpoint fails (the reason names its URL, never the key).
        """
        on_token = on_token or self.on_token
        t0 = time.perf_counter()
        self._network_retries = 0
        model = self._resolve_model(on_token)
        messages = prompts.build_messages(context, system_prompt=self.system_prompt, max_history=self.max_history)
        meta: dict[str, Any] = {"proposer": self.name, "model": model, "endpoint": _host(self.endpoint),
                                "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": []}
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            meta["attempts"] = attempt
            if attempt > 1 and on_token is not None:
                on_token(f"\n\n[reply {attempt - 1} refused: {error}; asking again ({attempt}/{self.max_attempts})]\n\n")
            try:
                text, usage = self._complete(messages, on_token)
            except ProposalError as e:
                meta["seconds"] = round(time.perf_counter() - t0, 3)
                meta["network_retries"] = self._network_retries
                e.attempts, e.metadata = attempt, {**meta, **e.metadata}
                raise
            for k in ("prompt_tokens", "completion_tokens"):
                meta[k] += usage.get(k, 0)
            meta["network_retries"] = self._network_retries
            try:
                reply = parse_reply(text)
                source = apply_reply(context.parent_source, reply)
                meta["seconds"] = round(time.perf_counter() - t0, 3)
                meta["tokens"] = meta["prompt_tokens"] + meta["completion_tokens"]
                return make_proposal(context, source, reply.description, proposer=self.name,
                                     rationale=reply.rationale, metadata=dict(meta))
            except (EditError, ProposalError) as e:
                error = self._scrub(str(e))
                meta["errors"].append(error)
            messages = messages + [{"role": "assistant", "content": text}, prompts.retry_message(error)]
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        meta["tokens"] = meta["prompt_tokens"] + meta["completion_tokens"]
        raise ProposalError(f"the model ({model} at {_host(self.endpoint)}) gave no usable edit in "
                            f"{self.max_attempts} attempts; last problem: {error}",
                            attempts=self.max_attempts, metadata=meta)


def _usage(usage) -> dict:
    if usage is None:
        return {}
    return {k: int(getattr(usage, k, 0) or 0) for k in ("prompt_tokens", "completion_tokens")}
