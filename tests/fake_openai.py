"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests (not a test file).

Speaks enough of the protocol for the real `openai` client: POST /v1/chat/completions
(non-streaming JSON with usage, or server-sent events `data: {...}` ending in
`data: [DONE]`) and GET /v1/models. Each chat request takes the next scripted `Reply`; the
last one repeats once the script runs out ("500 forever").

Like real local servers it can also report its context size (`n_ctx=`: llama.cpp's
GET /props; `max_model_len=`: vLLM's field in /v1/models) and refuse what does not fit:
with `n_ctx` set, a prompt longer than n_ctx minus max_tokens gets llama-cpp-python's 400
("This model's maximum context length is 2048 tokens. However, you requested 5460
tokens ...") without streaming and an empty stream with it (what issue 14 saw). The fake's
tokenizer is one token per 3 characters of message content. `constraints=` lists the
constraint fields it accepts ("response_format", "grammar"); a request with another one
gets a 400, as servers that do not take JSON schemas answer.

    with FakeOpenAI([Reply("DESCRIPTION: ...")]) as server:
        LLMProposer(base_url=server.url, model="fake", api_key="sk-test").propose(ctx)
        server.chats[0]["body"]["messages"]      # server.requests: every request, GETs too
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted answer: reply text, or an HTTP error, a delay, or a dropped connection."""

    text: str = ""
    status: int = 200
    delay: float = 0.0             # seconds to sleep before answering (timeouts)
    drop: bool = False             # close the connection without a response
    error_body: dict | None = None
    headers: dict = field(default_factory=dict)
    usage: tuple[int, int] | None = (120, 30)   # prompt, completion tokens; None: the server reports none
    chunk: int = 16                # characters per streamed chunk
    chunk_delay: float = 0.0       # seconds between streamed chunks (a reply that trickles in)
    finish: str = "stop"           # finish_reason ("length": cut off at max_tokens)
    reasoning: str = ""            # reasoning_content (llama.cpp --reasoning-format, vLLM reasoning parsers)
    reasoning_delay: float = 0.0   # seconds between streamed reasoning chunks (a model thinking for long)
    reasoning_field: str = "reasoning_content"   # "reasoning": the field's name on Ollama and newer vLLM
    ignore_stream: bool = False    # answer stream=True with one JSON body, as servers without streaming do
    raw_body: str | None = None    # an error body sent as text/plain (Ollama: "404 page not found")


class FakeOpenAI:
    """Context manager running the server in a daemon thread on an ephemeral port."""

    def __init__(self, replies: list[Reply], models: tuple[str, ...] = ("fake-model",), *, n_ctx: int | None = None,
                 max_model_len: int | None = None, props: bool = True,
                 constraints: tuple[str, ...] = ("response_format", "grammar"), refuse_status: int = 400,
                 refuse_body: dict | None = None, reject_fields: tuple[str, ...] = (),
                 owned_by: str = "test") -> None:
        self.replies = list(replies)
        self.models = models
        self.n_ctx, self.max_model_len, self.props, self.constraints = n_ctx, max_model_len, props, constraints
        self.refuse_status = refuse_status  # 500: a refused constraint as llama-cpp-python answers it
        self.refuse_body = refuse_body      # the body of that refusal (FastAPI: {"detail": [...]})
        self.reject_fields = reject_fields  # request fields answered with OpenAI's 400 "Unsupported parameter"
        self.owned_by = owned_by            # "llamacpp": llama.cpp's server
        self.requests: list[dict] = []      # {"path", "headers", "body"} per request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # a short poll interval: shutdown() waits up to one interval
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def chats(self) -> list[dict]:
        """The chat completion requests (not the GETs for /models or /props)."""
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    @staticmethod
    def prompt_tokens(body: dict) -> int:
        """The fake's token count of a request's messages: 3 characters a token."""
        return sum(math.ceil(len(str(m.get("content") or "")) / 3) for m in body.get("messages", []))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self) -> Reply:
        with self._lock:
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:   # keep pytest output clean
                pass

            def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": None})
                if self.path.rstrip("/") == "/v1/models":
                    extra = {"max_model_len": fake.max_model_len} if fake.max_model_len else {}
                    self._json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": fake.owned_by, **extra}
                        for m in fake.models]})
                elif self.path.rstrip("/") == "/props" and fake.props and fake.n_ctx:
                    self._json(200, {"default_generation_settings": {"n_ctx": fake.n_ctx}, "total_slots": 1})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                reply = fake._next()
                try:
                    self._answer(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass                      # the client gave up (timeout): nothing to do

            def _answer(self, reply: Reply, body: dict) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.status != 200 and reply.raw_body is not None:
                    data = reply.raw_body.encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if reply.status != 200:
                    err = reply.error_body or {"error": {"message": f"scripted HTTP {reply.status}",
                                                         "type": "test", "code": None}}
                    self._json(reply.status, err, reply.headers)
                    return
                for field in fake.reject_fields:      # OpenAI's words for max_tokens to an o-series model
                    if field in body:
                        self._json(400, {"error": {
                            "message": f"Unsupported parameter: '{field}' is not supported with this model. Use "
                                       f"'max_completion_tokens' instead.", "type": "invalid_request_error",
                            "param": field, "code": "unsupported_parameter"}})
                        return
                for field, present in (("response_format", "response_format" in body), ("grammar", "grammar" in body)):
                    if present and field not in fake.constraints and fake.refuse_status == 400:
                        self._json(400, {"error": {"message": f"{field} is not supported by this server",
                                                   "type": "invalid_request_error", "code": None}})
                        return
                    if present and field not in fake.constraints and fake.refuse_body is not None:
                        self._json(fake.refuse_status, fake.refuse_body)
                        return
                    if present and field not in fake.constraints:  # llama-cpp-python 0.3's words for json_schema
                        self._json(fake.refuse_status, {"message": (
                            f"1 validation error:\n  {{'type': 'literal_error', 'loc': ('body', '{field}', 'type'), "
                            "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}")})
                        return
                need = fake.prompt_tokens(body) + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
                if fake.n_ctx and need > fake.n_ctx:
                    if body.get("stream"):         # llama-cpp-python: the stream just ends, empty
                        self.send_response(200)
                        self.send_header("Content-Type", "text/event-stream")
                        self.end_headers()
                        self.wfile.write(b"data: [DONE]\n\n")
                        self.close_connection = True
                        return
                    self._json(400, {"error": {"message": f"This model's maximum context length is {fake.n_ctx} "
                                                          f"tokens. However, you requested {need} tokens. Please "
                                                          f"reduce the length of the messages.",
                                               "type": "invalid_request_error", "code": "context_length_exceeded"}})
                    return
                model = body.get("model", "fake-model")
                usage = None
                if reply.usage is not None:
                    prompt, completion = reply.usage
                    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
                if not body.get("stream") or reply.ignore_stream:
                    message = {"role": "assistant", "content": reply.text,
                               **({reply.reasoning_field: reply.reasoning} if reply.reasoning else {})}
                    self._json(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                     "model": model, **({"usage": usage} if usage else {}),
                                     "choices": [{"index": 0, "finish_reason": reply.finish, "message": message}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()

                def send(obj) -> None:
                    self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
                                     + b"\n\n")
                    self.wfile.flush()

                base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": model}
                send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
                for i in range(0, len(reply.reasoning), reply.chunk):
                    if reply.reasoning_delay:
                        time.sleep(reply.reasoning_delay)
                    piece = reply.reasoning[i:i + reply.chunk]
                    send({**base, "choices": [{"index": 0, "delta": {reply.reasoning_field: piece},
                                               "finish_reason": None}]})
                for i in range(0, len(reply.text), reply.chunk):
                    if reply.chunk_delay:
                        time.sleep(reply.chunk_delay)
                    send({**base, "choices": [{"index": 0, "delta": {"content": reply.text[i:i + reply.chunk]},
                                               "finish_reason": None}]})
                send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish}]})
                if usage and (body.get("stream_options") or {}).get("include_usage"):
                    send({**base, "choices": [], "usage": usage})
                send(b"[DONE]")
                self.close_connection = True

        return Handler


def free_port() -> int:
    """A local port with nothing listening on it (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
