"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests (not a test file).

Speaks enough of the protocol for the real `openai` client: POST /v1/chat/completions
(non-streaming JSON with usage, or server-sent events `data: {...}` ending in
`data: [DONE]`) and GET /v1/models. Each request takes the next scripted `Reply`; the last
one repeats once the script runs out ("500 forever").

    with FakeOpenAI([Reply("DESCRIPTION: ...")]) as server:
        LLMProposer(base_url=server.url, model="fake", api_key="sk-test").propose(ctx)
        server.requests[0]["body"]["messages"]
"""

from __future__ import annotations

import json
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
    usage: tuple[int, int] = (120, 30)   # prompt, completion tokens
    chunk: int = 16                # characters per streamed chunk


class FakeOpenAI:
    """Context manager running the server in a daemon thread on an ephemeral port."""

    def __init__(self, replies: list[Reply], models: tuple[str, ...] = ("fake-model",)) -> None:
        self.replies = list(replies)
        self.models = models
        self.requests: list[dict] = []      # {"path", "headers", "body"} per request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # a short poll interval: shutdown() waits up to one interval
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

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
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in fake.models]})
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
                if reply.status != 200:
                    err = reply.error_body or {"error": {"message": f"scripted HTTP {reply.status}",
                                                         "type": "test", "code": None}}
                    self._json(reply.status, err, reply.headers)
                    return
                model = body.get("model", "fake-model")
                prompt, completion = reply.usage
                usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}
                if not body.get("stream"):
                    self._json(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                                     "model": model, "usage": usage,
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": reply.text}}]})
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
                for i in range(0, len(reply.text), reply.chunk):
                    send({**base, "choices": [{"index": 0, "delta": {"content": reply.text[i:i + reply.chunk]},
                                               "finish_reason": None}]})
                send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    send({**base, "choices": [], "usage": usage})
                send(b"[DONE]")
                self.close_connection = True

        return Handler


def free_port() -> int:
    """A local port with nothing listening on it (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
