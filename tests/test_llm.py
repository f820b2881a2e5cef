"""The LLM proposer against a real HTTP server on 127.0.0.1, through the real openai client.

Each scripted reply ends in a valid proposal or a clear ProposalError, within a bounded
time (tiny backoff delays), and the API key never appears in anything recorded.

    python -m pytest tests/test_llm.py -q
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from autoresearch_kit.propose.base import ProposalError, source_hash
from autoresearch_kit.propose.edits import validate
from autoresearch_kit.propose.llm import LLMProposer
from fake_openai import FakeOpenAI, Reply, free_port
from propose_samples import SYNTHETIC_TRAIN, context, entry

KEY = "sk-test-SECRET123"
BOUND = 10.0      # seconds any scenario may take, retries included

GOOD = """DESCRIPTION: MATRIX_LR 0.04 -> 0.05
RATIONALE: A higher lr converges faster in a short budget.

train.py
```python
<<<<<<< SEARCH
MATRIX_LR = 0.04           # Muon-style lr for 2D weights
=======
MATRIX_LR = 0.05           # Muon-style lr for 2D weights
>>>>>>> REPLACE
```
"""


def _block(search: str, replace: str, path: str = "train.py", desc: str = "an edit") -> str:
    return f"DESCRIPTION: {desc}\nRATIONALE: because.\n\n{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AUTORESEARCH_MODEL", "OPENAI_MODEL", "AUTORESEARCH_PROPOSER"):
        monkeypatch.delenv(k, raising=False)


def _rich_context():
    """A context with history (reasons), a crash log and feedback, to check the prompt."""
    parent = SYNTHETIC_TRAIN
    deeper = parent.replace("DEPTH = 4 ", "DEPTH = 6 ")
    history = [entry("0002", parent, deeper, "DEPTH 4 -> 6", decision="discard", val_bpb=1.61,
                     reason="REASON-MARKER too slow per step"),
               entry("0003", parent, parent.replace("SEQ_LEN = 128", "SEQ_LEN = 4096"), "SEQ_LEN 128 -> 4096",
                     status="crash", decision=None, val_bpb=None)]
    return context(history=history, seen_hashes={source_hash(parent), source_hash(deeper)},
                   last_crash_log="RuntimeError: CRASH-MARKER out of memory", feedback="FEEDBACK-MARKER try the lr",
                   parent_val_bpb=1.55, best_val_bpb=1.55)


def _run(replies, ctx=None, models=("fake-model",), **kw):
    """Propose against a fresh server: (proposal or ProposalError, server, seconds, streamed text)."""
    kw.setdefault("api_key", KEY)
    kw.setdefault("model", "fake-model")
    kw.setdefault("retry_delay", 0.01)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("edit_mode", "edits")
    streamed: list[str] = []
    with FakeOpenAI(replies, models) as server:
        p = LLMProposer(base_url=server.url, **kw)
        t0 = time.perf_counter()
        try:
            out = p.propose(ctx or context(), on_token=streamed.append)
        except ProposalError as e:
            out = e
        seconds = time.perf_counter() - t0
    assert seconds < BOUND, f"took {seconds:.1f}s"
    for text in (repr(p), repr(out), str(out), json.dumps(getattr(out, "metadata", {}), default=str)):
        assert KEY not in text
    if not isinstance(out, ProposalError):
        assert KEY not in json.dumps(out.to_dict(), default=str)
    return out, server, seconds, "".join(streamed)


@pytest.mark.parametrize("stream", [True, False])
def test_good_edit_becomes_a_valid_proposal(stream, caplog):
    caplog.set_level(logging.DEBUG)      # openai/httpx debug logs must not carry the key either
    ctx = _rich_context()
    p, server, _, streamed = _run([Reply(GOOD)], ctx, stream=stream)
    assert p.proposer == "llm" and p.description == "MATRIX_LR 0.04 -> 0.05"
    assert p.rationale == "A higher lr converges faster in a short budget."
    assert "-MATRIX_LR = 0.04" in p.diff and "+MATRIX_LR = 0.05" in p.diff and p.lines_changed == (1, 1)
    assert validate(ctx.parent_source, p.source, ctx.seen_hashes) == []
    meta = p.metadata
    assert meta["model"] == "fake-model" and meta["attempts"] == 1 and meta["endpoint"].startswith("127.0.0.1:")
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["tokens"]) == (120, 30, 150)
    assert 0 < meta["seconds"] < BOUND
    assert streamed == GOOD                        # the panel saw every token
    req = server.chats[-1]
    assert req["body"]["stream"] is stream if stream else not req["body"].get("stream")
    assert req["headers"]["authorization"] == f"Bearer {KEY}"     # the key was used...
    assert KEY not in caplog.text                                 # ...and never logged
    prompt = "\n".join(m["content"] for m in req["body"]["messages"])
    for marker in ("PROGRAM-MARKER-7731", "FEEDBACK-MARKER", "REASON-MARKER", "CRASH-MARKER", "DEPTH 4 -> 6",
                   "MATRIX_LR = 0.04", "1.5500", "crash"):
        assert marker in prompt, marker


def test_whole_file_reply():
    whole = SYNTHETIC_TRAIN.replace("WARMDOWN_RATIO = 0.5 ", "WARMDOWN_RATIO = 0.3 ")
    p, *_ = _run([Reply(f"DESCRIPTION: shorter warmdown\nRATIONALE: more time at peak lr.\n\n```python\n{whole}```\n")])
    assert p.source == whole and p.description == "shorter warmdown" and p.lines_changed == (1, 1)


def test_prose_without_an_edit_is_retried_with_the_error_then_gives_up():
    err, server, _, streamed = _run([Reply("I would raise the learning rate a little.")])
    assert isinstance(err, ProposalError) and err.attempts == 3
    assert "no usable edit in 3 attempts" in err.reason and "no SEARCH/REPLACE block" in err.reason
    assert len(server.chats) == 3 and len(err.metadata["errors"]) == 3
    retry = server.chats[1]["body"]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "I would raise the learning rate a little."}
    assert "could not be used" in retry[-1]["content"] and "no SEARCH/REPLACE block" in retry[-1]["content"]
    assert "[reply 1 refused" in streamed


def test_a_block_that_does_not_match_is_fed_back_and_the_fix_accepted():
    bad = _block("MATRIX_LR = 0.4", "MATRIX_LR = 0.5")
    p, server, *_ = _run([Reply(bad), Reply(GOOD)])
    assert p.metadata["attempts"] == 2 and p.description == "MATRIX_LR 0.04 -> 0.05"
    fed_back = server.chats[1]["body"]["messages"][-1]["content"]
    assert "was not found" in fed_back and "MATRIX_LR = 0.04" in fed_back      # the closest-line hint
    assert p.metadata["prompt_tokens"] == 240                                  # both calls counted


@pytest.mark.parametrize("reply, reason", [
    (_block("super().__init__()", "pass"), "matches 2 places"),
    (_block("DEPTH = 4", "DEPTH = = 4"), "does not compile"),
    (_block("x = 1", "x = 2", path="prepare.py"), "only train.py may be changed"),
    (_block("DEPTH = 4", "DEPTH = 4"), "changes nothing"),
    (_block("DEPTH = 4 ", "DEPTH = 6 "), "already tried (experiment 0002"),
    (_block("run.finish(model)", "print(model)"), "integrity:"),
])
def test_invalid_replies_end_in_a_clear_reason(reply, reason):
    err, server, *_ = _run([Reply(reply)], _rich_context(), max_attempts=2)
    assert isinstance(err, ProposalError), err
    assert reason in err.reason and err.attempts == 2 and len(server.chats) == 2
    assert reason in server.chats[1]["body"]["messages"][-1]["content"]    # fed back to the model


def test_rate_limit_then_success():
    p, server, _, streamed = _run([Reply(status=429, headers={"Retry-After": "0"}), Reply(GOOD)])
    assert p.description == "MATRIX_LR 0.04 -> 0.05" and p.metadata["network_retries"] == 1
    assert len(server.chats) == 2 and "HTTP 429" in streamed


def test_server_error_forever_names_the_endpoint():
    err, server, *_ = _run([Reply(status=500)], max_retries=2)
    assert isinstance(err, ProposalError)
    assert server.url in err.reason and "HTTP 500" in err.reason and "failed 3 times" in err.reason
    assert 'proposer="mutate"' in err.reason and len(server.chats) == 3


def test_timeout_is_bounded():
    err, server, seconds, _ = _run([Reply(GOOD, delay=1.5)], timeout=0.2, max_retries=1)
    assert isinstance(err, ProposalError) and "timeout" in err.reason and server.url in err.reason
    assert len(server.chats) == 2 and seconds < 2.0


def test_dropped_connection_is_retried():
    p, server, *_ = _run([Reply(drop=True), Reply(GOOD)], stream=False)
    assert p.description == "MATRIX_LR 0.04 -> 0.05" and p.metadata["network_retries"] == 1
    assert len(server.chats) == 2


class _OddServer:
    """An endpoint that answers every chat request with the same raw body (not what fake_openai scripts)."""

    def __init__(self, content_type: str, body: bytes) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.posts = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts += 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "_OddServer":
        import threading

        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content_type, body, stream, reason, tries", [
    ("text/html", b"<html>proxy login</html>", False, "did not answer like an OpenAI-compatible API", 1),
    ("text/event-stream", b"data: {not json\n\n", True, "did not answer like an OpenAI-compatible API", 1),
    ("text/event-stream", b'data: {"error": {"message": "model overloaded"}}\n\n', True,
     "reported an error (model overloaded)", 2),
])
def test_a_reply_that_is_not_openai_shaped_is_a_clear_proposal_error(content_type, body, stream, reason, tries):
    with _OddServer(content_type, body) as server:
        p = LLMProposer(base_url=server.url, api_key=KEY, model="m", stream=stream, retry_delay=0.01,
                        max_retries=1, timeout=2.0)
        with pytest.raises(ProposalError) as info:      # not a JSONDecodeError / AttributeError traceback
            p.propose(context())
    assert reason in info.value.reason and server.url in info.value.reason and KEY not in info.value.reason
    assert server.posts == tries                           # a server-side error event is retried, junk is not


def test_connection_refused_fails_fast_naming_the_offline_proposer():
    url = f"http://127.0.0.1:{free_port()}/v1"
    p = LLMProposer(base_url=url, api_key=KEY, model="m", retry_delay=1.0)
    t0 = time.perf_counter()
    with pytest.raises(ProposalError) as info:
        p.propose(context())
    assert time.perf_counter() - t0 < 2.0               # no backoff: nothing is listening
    reason = info.value.reason
    assert url in reason and "--proposer mutate" in reason and 'proposer="mutate"' in reason and KEY not in reason


def test_a_rejected_key_is_scrubbed_from_the_error():
    body = {"error": {"message": f"Incorrect API key provided: {KEY}.", "type": "invalid_request_error"}}
    err, server, *_ = _run([Reply(status=401, error_body=body)])
    assert isinstance(err, ProposalError) and "refused the API key" in err.reason and "***" in err.reason
    assert len(server.chats) == 1                     # not retried


def test_model_is_discovered_and_local_servers_need_no_key():
    p, server, *_ = _run([Reply(GOOD)], models=("local-7b", "other"), model=None, api_key=None)
    assert p.metadata["model"] == "local-7b"
    assert server.requests[0]["path"] == "/v1/models"
    assert server.chats[0]["body"]["model"] == "local-7b"
    assert server.chats[0]["headers"]["authorization"] == "Bearer not-needed"


def test_stream_usage_option_refused_by_an_old_server_falls_back():
    p, server, *_ = _run([Reply(status=400), Reply(GOOD)])
    assert p.description == "MATRIX_LR 0.04 -> 0.05"
    assert "stream_options" in server.chats[0]["body"] and "stream_options" not in server.chats[1]["body"]


def test_configuration_from_the_environment(monkeypatch):
    from autoresearch_kit.propose import make_proposer
    with FakeOpenAI([Reply(GOOD)]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("AUTORESEARCH_MODEL", "env-model")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        p = make_proposer("auto")
        assert isinstance(p, LLMProposer) and KEY not in repr(p) and server.url in repr(p)
        proposal = p.propose(context())
    assert proposal.metadata["model"] == "env-model"
    assert server.chats[0]["headers"]["authorization"] == f"Bearer {KEY}"


def test_no_endpoint_and_no_key_points_to_the_offline_proposer():
    with pytest.raises(ValueError, match="OPENAI_API_KEY.*OPENAI_BASE_URL.*mutate"):
        LLMProposer()
