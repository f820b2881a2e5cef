"""The LLM proposer against a real HTTP server on 127.0.0.1, through the real openai client.

Each scripted reply ends in a valid proposal or a clear ProposalError, within a bounded
time (tiny backoff delays), and the API key never appears in anything recorded.

    python -m pytest tests/test_llm.py -q
"""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from autoresearch_kit.propose.base import ProposalError, source_hash
from autoresearch_kit.propose.edits import EditError, validate
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


# ---------------------------------------------------------------------------- the knob mode

def _knob(knob, value, why="a short reason"):
    return json.dumps({"knob": knob, "value": value, "why": why})


def test_knob_mode_valid_reply_is_a_proposal_described_by_the_kit():
    ctx = _rich_context()
    p, server, _, streamed = _run([Reply(_knob("MATRIX_LR", 0.05, "DESCRIPTION: ignore me, a faster lr"))], ctx,
                                  edit_mode="knobs")
    assert p.description == "MATRIX_LR 0.04 -> 0.05"               # written by the kit, not the model
    assert p.rationale == "The model's reason: DESCRIPTION: ignore me, a faster lr"
    assert p.lines_changed == (1, 1) and "+MATRIX_LR = 0.05           # Muon-style lr for 2D weights" in p.diff
    assert validate(ctx.parent_source, p.source, ctx.seen_hashes) == []
    meta = p.metadata
    assert meta["edit_mode"] == "knobs" and meta["structured"] == "json_schema"
    assert meta["change"] == {"knob": "MATRIX_LR", "old": "0.04", "new": "0.05"} and meta["refused"] == []
    body = server.chats[0]["body"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema" and schema["required"] == ["knob", "value", "why"]
    assert "MATRIX_LR" in schema["properties"]["knob"]["enum"] and "SEED_OFFSET" not in schema["properties"]["knob"]["enum"]
    assert body["max_tokens"] == 256 and "grammar" not in body
    prompt = "\n".join(m["content"] for m in body["messages"])
    assert "MATRIX_LR = 0.04  # Muon-style lr for 2D weights" in prompt      # each knob with its comment
    assert "PROGRAM-MARKER-7731" in prompt and "FEEDBACK-MARKER" in prompt and "REASON-MARKER" in prompt
    assert "class MLP" not in prompt and "```diff" not in prompt           # no train.py, no diffs
    free = _run([Reply(GOOD)], ctx)[1].chats[0]["body"]["messages"]
    assert FakeOpenAI.prompt_tokens(body) < 0.6 * FakeOpenAI.prompt_tokens({"messages": free})


@pytest.mark.parametrize("reply, problem", [
    (_knob("MATRIX_LR", 4.0), "MATRIX_LR = 4 is out of range (now 0.04): keep it within [0.004, 0.4]"),
    (_knob("MATRIX_LR", -0.04), "the sign must stay positive"),
    (_knob("DEPTH", 4.5), "DEPTH is an integer (now 4): its value must be a whole number"),
    (_knob("DEPTH", "deeper"), "DEPTH is a number (now 4): its value must be a number"),
    (_knob("TIE_EMBEDDINGS", 1), "TIE_EMBEDDINGS is a boolean"),
    (_knob("ACTIVATION", "swish"), "ACTIVATION must be one of 'relu2', 'gelu', 'silu'"),
    (_knob("ADAM_BETAS", 0.9), "'ADAM_BETAS' is not a knob of train.py"),
    (_knob("SEED_OFFSET", 3), "'SEED_OFFSET' is not a knob"),
    (_knob("DEPTH", 4), "DEPTH is already 4: choose a different value or another knob (for example 5 or 3)"),
    (_knob("MATRIX_LR", 40), "keep it within [0.004, 0.4] (for example 0.06 or 0.0267)"),
    (_knob("DEPTH", 6), "already tried (experiment 0002"),
    ("I think a larger learning rate would help.", "the reply is not JSON"),
    ('{"value": 0.05}', 'needs "knob" and "value" fields'),
])
def test_knob_mode_refuses_bad_values_and_feeds_the_error_back(reply, problem):
    good = _knob("WARMDOWN_RATIO", 0.4)
    p, server, _, streamed = _run([Reply(reply), Reply(good)], _rich_context(), edit_mode="knobs", structured="json_schema")
    assert p.description == "WARMDOWN_RATIO 0.5 -> 0.4" and p.metadata["attempts"] == 2
    fed_back = server.chats[1]["body"]["messages"][-1]["content"]
    assert problem in fed_back and "JSON" in fed_back
    assert server.chats[1]["body"]["messages"][-2] == {"role": "assistant", "content": reply}
    refused = p.metadata["refused"]                       # what the model said is kept with the experiment
    assert len(refused) == 1 and refused[0]["reply"] == reply and problem in refused[0]["error"]
    assert "[reply 1 refused" in streamed


def test_knob_values_keep_their_type_and_style():
    from autoresearch_kit.propose import knobs

    ks = {k.name: k for k in knobs.find_knobs(SYNTHETIC_TRAIN)}
    assert ks["DEPTH"].kind == "int" and ks["MATRIX_LR"].kind == "float" and ks["TIE_EMBEDDINGS"].kind == "bool"
    assert ks["TOTAL_BATCH_SIZE"].value == 4096 and ks["ACTIVATION"].choices == ("relu2", "gelu", "silu")
    assert "ADAM_BETAS" not in ks and "SEED_OFFSET" not in ks and "LOG_EVERY" not in ks
    cases = [("DEPTH", 6.0, "6"), ("MATRIX_LR", 0.1, "0.1"), ("MATRIX_LR", "0.03", "0.03"),
             ("UNEMBEDDING_LR", 0.002, "2e-3"), ("TOTAL_BATCH_SIZE", 8192, "2**13"),
             ("TOTAL_BATCH_SIZE", 5000, "5000"), ("TIE_EMBEDDINGS", True, "True"), ("ACTIVATION", "gelu", '"gelu"'),
             ("WARMUP_RATIO", 0.1, "0.1"), ("WEIGHT_DECAY", 0.5, "0.5")]
    for name, value, text in cases:
        change = knobs.KnobChange(ks[name], knobs.check_value(ks[name], value))
        assert change.new_text == text, (name, value)
        new = knobs.apply(SYNTHETIC_TRAIN, change)
        assert validate(SYNTHETIC_TRAIN, new) == [] and f"{name} = {text} " in new
    for name, value in [("DEPTH", 41), ("DEPTH", 0), ("WARMUP_RATIO", 1.5), ("MATRIX_LR", float("nan")),
                        ("MATRIX_LR", True), ("WEIGHT_DECAY", 0.001)]:
        with pytest.raises(ValueError):
            knobs.check_value(ks[name], value)


def test_knob_reply_inside_prose_or_a_fence_is_read():
    p, *_ = _run([Reply('Sure! Here is my choice:\n```json\n{"knob": "DEPTH", "value": 5, "why": "more capacity"}\n```')],
                 edit_mode="knobs")
    assert p.description == "DEPTH 4 -> 5" and p.rationale == "The model's reason: more capacity"


def test_a_server_that_ignores_the_schema_gets_a_grammar_next():
    prose = "The learning rate should go up a bit."
    p, server, _, streamed = _run([Reply(prose), Reply(_knob("MATRIX_LR", 0.05))], edit_mode="knobs")
    first, second = (c["body"] for c in server.chats)
    assert "response_format" in first and "grammar" not in first
    assert "response_format" not in second and '"\\"DEPTH\\"" ws "," ws' in second["grammar"]
    assert p.metadata["structured"] == "grammar" and p.metadata["attempts"] == 2
    assert p.metadata["refused"][0]["reply"] == prose and "ignored the JSON schema" in streamed


def test_a_server_that_refuses_response_format_is_asked_with_a_grammar_then_the_prompt_alone():
    with FakeOpenAI([Reply(_knob("MATRIX_LR", 0.05))], constraints=("grammar",)) as server:
        p = LLMProposer(base_url=server.url, model="m", edit_mode="knobs", retry_delay=0.01)
        out = p.propose(context())
    assert out.description == "MATRIX_LR 0.04 -> 0.05" and out.metadata["attempts"] == 1   # a fallback, not an attempt
    assert [("response_format" in c["body"], "grammar" in c["body"]) for c in server.chats][-1] == (False, True)
    assert out.metadata["structured"] == "grammar"
    with FakeOpenAI([Reply(_knob("DEPTH", 5))], constraints=()) as server:
        out = LLMProposer(base_url=server.url, model="m", edit_mode="knobs", retry_delay=0.01).propose(context())
    last = server.chats[-1]["body"]
    assert out.description == "DEPTH 4 -> 5" and "response_format" not in last and "grammar" not in last
    assert out.metadata["structured"] == "none"


def test_a_refused_response_format_as_llama_cpp_python_answers_it_gets_a_grammar():
    # llama-cpp-python 0.3.36 answers response_format json_schema with HTTP 500 (a pydantic
    # validation error naming the field): a refused constraint, not a broken server to retry
    with FakeOpenAI([Reply(_knob("MATRIX_LR", 0.05))], constraints=("grammar",), refuse_status=500) as server:
        out = LLMProposer(base_url=server.url, model="m", edit_mode="knobs", retry_delay=0.01).propose(context())
    assert [("response_format" in c["body"], "grammar" in c["body"]) for c in server.chats] == [(True, False),
                                                                                              (False, True)]
    assert out.description == "MATRIX_LR 0.04 -> 0.05" and out.metadata["structured"] == "grammar"
    assert out.metadata["network_retries"] == 0


def test_knob_mode_offers_only_the_training_devices_knobs():
    from pathlib import Path

    from autoresearch_kit.propose import knobs

    train = (Path(__file__).resolve().parents[1] / "train.py").read_text()
    every = {k.name for k in knobs.find_knobs(train)}
    cpu, gpu = ({k.name for k in knobs.find_knobs(train, d)} for d in ("cpu", "cuda"))
    assert {"CPU_DEPTH", "GPU_DEPTH", "MATRIX_LR"} <= every
    assert "CPU_DEPTH" in cpu and "MATRIX_LR" in cpu and not any(n.startswith("GPU_") for n in cpu)
    assert "GPU_DEPTH" in gpu and "MATRIX_LR" in gpu and not any(n.startswith("CPU_") for n in gpu)
    with FakeOpenAI([Reply(_knob("MATRIX_LR", 0.03))]) as server:
        LLMProposer(base_url=server.url, model="m", edit_mode="knobs", device="cpu").propose(context(train))
    body = server.chats[0]["body"]
    enum = set(body["response_format"]["json_schema"]["schema"]["properties"]["knob"]["enum"])
    assert enum == cpu and "GPU_BATCH_SIZE" not in body["messages"][-1]["content"]


def test_grammar_mode_sends_a_gbnf_that_names_every_knob():
    from autoresearch_kit.propose import knobs

    p, server, *_ = _run([Reply(_knob("DEPTH", 5))], edit_mode="knobs", structured="grammar")
    g = server.chats[0]["body"]["grammar"]
    assert g == knobs.grammar(knobs.find_knobs(SYNTHETIC_TRAIN)) and g.startswith("root ::= ")
    for k in knobs.find_knobs(SYNTHETIC_TRAIN):
        assert f'"\\"{k.name}\\""' in g
    assert 'ws ("5" | "3" | "6" | "2" | "8")' in g   # DEPTH = 4: whole numbers near it, never 4 itself


def test_a_knob_reply_cut_off_inside_why_is_read():
    from autoresearch_kit.propose import knobs

    ks = knobs.find_knobs(SYNTHETIC_TRAIN)
    # what SmolLM2-135M wrote on llama.cpp under the grammar: "why" ran until max_tokens
    cut = '{"knob": "MATRIX_LR", "value": 0.05, "why": "}; # The best possible output from a given input of a model'
    change = knobs.parse_reply(cut, ks)
    assert knobs.describe(change) == "MATRIX_LR 0.04 -> 0.05" and change.why.startswith("}; # The best")
    with pytest.raises(EditError, match="is not JSON"):
        knobs.parse_reply('{"knob": "MATRIX_LR", "value": 0.0', ks)            # the value itself is cut: refused


def test_grammar_values_are_new_in_range_and_of_the_knobs_type():
    from pathlib import Path

    from autoresearch_kit.propose import knobs

    train = (Path(__file__).resolve().parents[1] / "train.py").read_text()
    ks = knobs.find_knobs(train, "cpu")
    g = knobs.grammar(ks)
    for k in ks:
        values = knobs.candidates(k)
        assert len(values) >= 2, k.name
        for v in values:
            assert knobs.check_value(k, v) == v and v != k.value   # accepted as is: a grammar reply is valid
            assert type(v) is type(k.value) or (k.kind == "float" and isinstance(v, float))
            if k.kind == "int" and k.value >= 8:
                assert v % 2 == 0, (k.name, v)                     # HEAD_DIM 43 would break the rotary halves
        assert f'"\\"{k.name}\\"" ws "," ws "\\"value\\"" ws ":" ws (' in g
    change = knobs.parse_reply('{"knob": "MATRIX_LR", "value": 0.03, "why": "a bit faster"}', ks)
    assert knobs.describe(change) == "MATRIX_LR 0.02 -> 0.03"
    # a value whose train.py already ran is left out of the menu sent to the server
    tried = source_hash(knobs.apply(train, change))
    with FakeOpenAI([Reply(_knob("MATRIX_LR", 0.04))]) as server:
        LLMProposer(base_url=server.url, model="m", edit_mode="knobs", structured="grammar",
                    device="cpu").propose(context(train, seen_hashes={source_hash(train), tried}))
    sent = server.chats[0]["body"]["grammar"]
    rule = next(line for line in sent.splitlines() if '"\\"MATRIX_LR\\""' in line)
    assert '"0.03"' not in rule and '"0.04"' in rule and '"0.03"' in g


@pytest.mark.parametrize("model, url, small", [
    ("SmolLM2-135M-Instruct", "http://127.0.0.1:8080/v1", True),
    ("/models/smollm2-360m-instruct-q8_0.gguf", "http://localhost:8080/v1", True),
    ("qwen2.5:0.5b", "http://localhost:11434/v1", True),
    ("qwen2.5-coder:7b", "http://localhost:11434/v1", False),
    ("SmolLM2-135M-Instruct", "https://gateway.example.com/v1", False),
    ("fake-model", "http://127.0.0.1:8080/v1", False),
])
def test_auto_mode_picks_knobs_for_a_small_local_model(model, url, small):
    from autoresearch_kit.propose.llm import small_local_model

    assert small_local_model(model, url) is small


def test_auto_mode_uses_knobs_for_a_small_local_model_end_to_end():
    p, server, *_ = _run([Reply(_knob("DEPTH", 5))], model="SmolLM2-135M-Instruct", edit_mode="auto")
    assert p.metadata["edit_mode"] == "knobs" and p.description == "DEPTH 4 -> 5"
    assert "response_format" in server.chats[0]["body"]


def test_auto_mode_switches_to_knobs_after_free_form_edits_fail():
    prose = Reply("I would raise the learning rate a little.")
    p, server, _, streamed = _run([prose, prose, prose, Reply(_knob("MATRIX_LR", 0.05))], edit_mode="auto",
                                  model="big-model")
    assert p.metadata["edit_mode"] == "knobs" and p.metadata["switched_from"]["mode"] == "edits"
    assert p.metadata["attempts"] == 4 and len(p.metadata["refused"]) == 3
    assert [("response_format" in c["body"]) for c in server.chats] == [False, False, False, True]
    assert "switching to the knob mode" in streamed and p.description == "MATRIX_LR 0.04 -> 0.05"


def test_knob_mode_gives_up_naming_the_offline_proposer_and_keeping_the_replies():
    err, server, *_ = _run([Reply("no idea"), Reply('{"knob": "DEPTH", "value": 99}')], edit_mode="knobs",
                           structured="json_schema", max_attempts=2)
    assert isinstance(err, ProposalError) and "no usable knob change in 2 attempts" in err.reason
    assert "--proposer mutate" in err.reason and "bigger model" in err.reason and "out of range" in err.reason
    assert [r["reply"] for r in err.metadata["refused"]] == ["no idea", '{"knob": "DEPTH", "value": 99}']


# ---------------------------------------------------------------------------- prompt size and context

def _long_context():
    """A context whose history (20 experiments with diffs) makes the free-form prompt long."""
    parent = SYNTHETIC_TRAIN
    history, seen = [], {source_hash(parent)}
    for i in range(20):
        new = parent.replace("MATRIX_LR = 0.04 ", f"MATRIX_LR = 0.{41 + i} ").replace(
            "WEIGHT_DECAY = 0.1 ", f"WEIGHT_DECAY = 0.{11 + i} ")
        history.append(entry(f"{i + 2:04d}", parent, new, f"MATRIX_LR 0.04 -> 0.{41 + i} with more weight decay",
                             reason="HISTORY-MARKER not better"))
        seen.add(source_hash(new))
    return context(history=history, seen_hashes=seen, parent_val_bpb=1.55, best_val_bpb=1.55,
                   last_crash_log="Traceback\n" + "x = 1\n" * 400 + "RuntimeError: CRASH-MARKER")


def _free_form_tokens(ctx, **kw):
    from autoresearch_kit.propose import prompts
    return FakeOpenAI.prompt_tokens({"messages": prompts.build_messages(ctx, **kw)})


def test_the_prompt_is_trimmed_to_the_context_the_server_reports():
    ctx = _long_context()
    full = _free_form_tokens(ctx)
    n_ctx = full + 300 - 50                      # the whole prompt would not fit; without its diffs it does
    with FakeOpenAI([Reply(GOOD)], n_ctx=n_ctx) as server:
        p = LLMProposer(base_url=server.url, model="m", edit_mode="edits", max_tokens=300, retry_delay=0.01)
        out = p.propose(ctx)
    assert out.description == "MATRIX_LR 0.04 -> 0.05" and "/props" in [r["path"] for r in server.requests]
    sent = server.chats[0]["body"]
    assert len(server.chats) == 1 and FakeOpenAI.prompt_tokens(sent) + 300 <= n_ctx
    prompt = sent["messages"][1]["content"]
    assert "HISTORY-MARKER" in prompt and prompt.count("```diff") < 3       # diffs went first, history stayed
    meta = out.metadata
    assert meta["context_size"] == n_ctx and meta["context_source"] == "server /props" and meta["trimmed"]
    assert meta["prompt_tokens_counted"] >= FakeOpenAI.prompt_tokens(sent)
    assert meta["token_count"] in ("tiktoken cl100k_base", "estimate (3 chars/token)")


def test_vllm_max_model_len_is_read_from_the_models_list():
    ctx = _long_context()
    n_ctx = _free_form_tokens(ctx) + 300 - 50
    with FakeOpenAI([Reply(GOOD)], max_model_len=n_ctx, props=False) as server:
        out = LLMProposer(base_url=server.url, model="fake-model", edit_mode="edits", max_tokens=300).propose(ctx)
    assert out.metadata["context_source"] == "server /v1/models" and out.metadata["context_size"] == n_ctx
    assert FakeOpenAI.prompt_tokens(server.chats[0]["body"]) + 300 <= n_ctx


def test_a_prompt_that_cannot_fit_is_never_sent(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CONTEXT", "1000")
    with FakeOpenAI([Reply(GOOD)]) as server:
        p = LLMProposer(base_url=server.url, model="m", edit_mode="edits", max_tokens=300)
        with pytest.raises(ProposalError) as info:
            p.propose(context())
    reason = info.value.reason
    assert server.chats == [] and "/props" not in [r["path"] for r in server.requests]    # the setting wins
    assert "does not fit" in reason and "context is 1000 tokens (setting)" in reason
    assert "-c 8192" in reason and "OLLAMA_CONTEXT_LENGTH" in reason and "--edit-mode knobs" in reason


def test_auto_mode_takes_the_knob_mode_when_the_free_form_prompt_cannot_fit():
    with FakeOpenAI([Reply(_knob("DEPTH", 5))], n_ctx=1200) as server:
        out = LLMProposer(base_url=server.url, model="big-model", retry_delay=0.01).propose(_rich_context())
    assert out.metadata["edit_mode"] == "knobs" and "does not fit" in out.metadata["switched_from"]["why"]
    assert len(server.chats) == 1 and "response_format" in server.chats[0]["body"]
    assert FakeOpenAI.prompt_tokens(server.chats[0]["body"]) + 256 <= 1200


@pytest.mark.parametrize("stream", [True, False])
def test_an_overflow_the_server_reports_is_trimmed_and_asked_again(stream):
    ctx = _long_context()
    n_ctx = _free_form_tokens(ctx) + 300 - 50
    with FakeOpenAI([Reply(GOOD)], n_ctx=n_ctx, props=False) as server:    # it does not say its size up front
        p = LLMProposer(base_url=server.url, model="m", edit_mode="edits", max_tokens=300, stream=stream,
                        retry_delay=0.01)
        streamed: list[str] = []
        out = p.propose(ctx, on_token=streamed.append)
    bodies = [c["body"] for c in server.chats]
    # streamed: the empty stream, the same prompt unstreamed (which gets the 400 with the size), the trimmed one
    assert [b.get("stream", False) for b in bodies] == ([True, False, True] if stream else [False, False])
    assert FakeOpenAI.prompt_tokens(bodies[-1]) + 300 <= n_ctx < FakeOpenAI.prompt_tokens(bodies[0]) + 300
    assert out.description == "MATRIX_LR 0.04 -> 0.05" and out.metadata["attempts"] == 1
    assert out.metadata["context_size"] == n_ctx and out.metadata["context_source"] == "server error"
    assert ("empty streamed reply" in "".join(streamed)) is stream


def test_an_empty_reply_names_the_context_size_and_the_setting():
    err, server, _, streamed = _run([Reply("", usage=(120, 0))], max_attempts=2)   # nothing generated
    assert isinstance(err, ProposalError) and "empty reply" in err.reason
    assert "context" in err.reason and "AUTORESEARCH_CONTEXT" in err.reason and "-c 8192" in err.reason
    assert [c["body"].get("stream", False) for c in server.chats] == [True, False, True, False]


def test_usage_the_server_does_not_report_is_unknown_not_zero():
    for stream in (True, False):
        p, *_ = _run([Reply(GOOD, usage=None)], stream=stream)
        meta = p.metadata
        assert meta["prompt_tokens"] is None and meta["completion_tokens"] is None and meta["tokens"] is None
        assert meta["usage"] == "not reported by the server" and meta["prompt_tokens_counted"] > 100


def test_a_bad_context_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CONTEXT", "8k")
    with pytest.raises(ValueError, match="AUTORESEARCH_CONTEXT=8192"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ValueError, match="edit_mode must be one of auto, edits, knobs"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m", edit_mode="json")


def test_progress_events_let_a_person_watch():
    events: list[dict] = []
    p, *_ = _run([Reply("prose"), Reply(GOOD)], on_progress=events.append)
    kinds = [e["event"] for e in events]
    assert kinds == ["ask", "reply", "refused", "ask", "reply", "accepted"]
    ask = events[0]
    assert ask["model"] == "fake-model" and ask["endpoint"].startswith("http://127.0.0.1:")
    assert ask["prompt_tokens"] > 100 and ask["method"] and ask["attempt"] == 1
    assert events[2]["reply"] == "prose" and "no SEARCH/REPLACE block" in events[2]["error"]


# ---------------------------------------------------------------------------- the CLI's LLM flags and output

def _run_args(*flags):
    from autoresearch_kit.cli import build_parser
    return build_parser().parse_args(["run", *flags])


def test_cli_flags_reach_the_request():
    from autoresearch_kit.cli import _proposer_kwargs
    from autoresearch_kit.propose import make_proposer

    with FakeOpenAI([Reply(_knob("DEPTH", 5))]) as server:
        args = _run_args("--proposer", "llm", "--model", "m", "--base-url", server.url, "--extra-body",
                         '{"top_k": 20, "repeat_penalty": 1.1}', "--max-tokens", "120", "--timeout", "7.5",
                         "--edit-mode", "knobs", "--context", "4096")
        kw = _proposer_kwargs(args)
        assert kw == {"model": "m", "base_url": server.url, "extra_body": {"top_k": 20, "repeat_penalty": 1.1},
                      "max_tokens": 120, "timeout": 7.5, "edit_mode": "knobs", "context_size": 4096}
        p = make_proposer("llm", **kw)
        out = p.propose(context())
    body = server.chats[0]["body"]
    assert body["top_k"] == 20 and body["repeat_penalty"] == 1.1 and body["max_tokens"] == 120
    assert out.metadata["context_size"] == 4096 and out.metadata["context_source"] == "setting"
    assert p.timeout == 7.5 and out.description == "DEPTH 4 -> 5"


@pytest.mark.parametrize("flags, message", [
    (["--extra-body", "{top_k: 20}"], "argument --extra-body: not JSON"),
    (["--extra-body", "[1, 2]"], "argument --extra-body: must be a JSON object"),
    (["--max-tokens", "0"], "argument --max-tokens: must be a positive number"),
    (["--edit-mode", "json"], "argument --edit-mode: invalid choice"),
])
def test_cli_bad_llm_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        _run_args(*flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_llm_flags_without_the_llm_proposer_say_so():
    from autoresearch_kit.cli import UserError, _proposer_kwargs

    with pytest.raises(UserError, match="--max-tokens, --edit-mode only apply to the LLM proposer"):
        _proposer_kwargs(_run_args("--proposer", "mutate", "--max-tokens", "50", "--edit-mode", "knobs"))
    with pytest.raises(UserError, match="--timeout only apply"):
        _proposer_kwargs(_run_args("--timeout", "5"))          # auto, and no endpoint: the offline proposer


def test_cli_watch_shows_the_request_at_once_and_what_a_refused_reply_said():
    import io

    from autoresearch_kit.cli import _LLMWatch

    out, err = io.StringIO(), io.StringIO()
    w = _LLMWatch(out=out, err=err)
    p, server, *_ = _run([Reply("I would raise the learning rate a little.", usage=None), Reply(GOOD)],
                         on_progress=w.on_progress)
    text = out.getvalue()
    n = p.metadata["prompt_tokens_counted"]
    assert text.startswith(f"asking fake-model at {server.url} (") and "prompt tokens, " in text
    assert f"attempt 2)..." in text and f"({n} prompt tokens" in text
    assert "reply 1 refused: the reply has no SEARCH/REPLACE block" in text
    assert "  the model said:\n    | I would raise the learning rate a little." in text
    assert "tokens not reported" in text and "(30 tokens)" in text


def test_cli_keeps_a_give_ups_replies_in_the_lab(tmp_path):
    from autoresearch_kit.cli import _save_refused

    err, *_ = _run([Reply("PROSE-MARKER only")], max_attempts=2)
    path = _save_refused(tmp_path, err)
    rec = json.loads(path.read_text().splitlines()[-1])
    assert path == tmp_path / "runs" / "refused.jsonl" and rec["reason"] == err.reason
    assert [r["reply"] for r in rec["refused"]] == ["PROSE-MARKER only"] * 2 and KEY not in path.read_text()


@pytest.mark.parametrize("reply, stream", [
    (Reply(GOOD, delay=30), False),                          # a server that never answers
    (Reply(GOOD, delay=30), True),
    (Reply(GOOD, chunk=1, chunk_delay=0.3), True),          # one that trickles a character at a time
])
def test_a_hung_endpoint_is_given_up_on_within_max_wait_with_what_to_do(reply, stream):
    t0 = time.monotonic()
    out, server, secs, _ = _run([reply], stream=stream, timeout=1.0, max_retries=10, max_wait=2.5)
    assert isinstance(out, ProposalError), out
    assert secs < 6 and time.monotonic() - t0 < 8
    assert "within 2.5 s" in out.reason and "--max-wait" in out.reason and server.url.split("/v1")[0] in out.reason
    assert "mutate" in out.reason                             # the offline alternative


def test_max_wait_must_be_positive():
    with pytest.raises(ValueError, match="max_wait"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m", max_wait=0)


# ---------------------------------------------------------------------------- the endpoint check, before training

def test_check_endpoint_passes_a_served_model_and_resolves_one_skipping_embeddings():
    with FakeOpenAI([Reply(GOOD)], models=("m",)) as server:
        assert LLMProposer(base_url=server.url, model="m").check_endpoint() == "m"
    notes: list[dict] = []
    with FakeOpenAI([Reply(GOOD)], models=("nomic-embed-text", "qwen3:8b", "llama3:8b")) as server:
        p = LLMProposer(base_url=server.url, on_progress=notes.append)
        assert p.check_endpoint() == "qwen3:8b"             # not the embedding model listed first
        assert p.propose(context()).metadata["model"] == "qwen3:8b"
        assert len([r for r in server.requests if r["path"] == "/v1/models"]) == 1   # asked once
    said = [e["text"] for e in notes if e["event"] == "note"]
    assert said and "using qwen3:8b" in said[0] and "--model" in said[0] and "llama3:8b" in said[0]
    with FakeOpenAI([Reply(GOOD)], models=("qwen2.5-coder:latest",)) as server:   # Ollama's bare name
        assert LLMProposer(base_url=server.url, model="qwen2.5-coder").check_endpoint() == "qwen2.5-coder"
    with FakeOpenAI([Reply(GOOD)], models=("/models/x.gguf",), owned_by="llamacpp") as server:
        assert LLMProposer(base_url=server.url, model="any").check_endpoint() == "any"   # llama.cpp takes any name


@pytest.mark.parametrize("case", ["down", "no_v1", "unlisted", "only_embeddings"])
def test_check_endpoint_fails_in_seconds_with_one_line_naming_the_address_and_the_fix(case):
    models = ("nomic-embed-text",) if case == "only_embeddings" else ("qwen3:8b", "llama3:8b")
    with FakeOpenAI([Reply(GOOD)], models=models) as server:
        url = {"down": f"http://127.0.0.1:{free_port()}/v1", "no_v1": server.url[:-3]}.get(case, server.url)
        p = LLMProposer(base_url=url, model=None if case == "only_embeddings" else "qwen3:4b")
        t0 = time.monotonic()
        with pytest.raises(ProposalError) as info:
            p.check_endpoint()
        assert time.monotonic() - t0 < 5 and not server.chats
    e = info.value
    assert e.fatal and url in e.reason and "\n" not in e.reason
    assert {"down": "start the LLM server", "no_v1": "missing /v1", "unlisted": "it lists: qwen3:8b, llama3:8b",
            "only_embeddings": "no chat model (only nomic-embed-text)"}[case] in e.reason
    assert ("mutate" in e.reason) if case in ("down", "no_v1") else ("--model" in e.reason)


# ---------------------------------------------------------------------------- endpoint failures are fatal

def test_endpoint_failures_are_fatal_and_refused_replies_are_not():
    hung, *_ = _run([Reply(GOOD, delay=30)], timeout=0.5, max_retries=5, max_wait=1.0)
    assert isinstance(hung, ProposalError) and hung.fatal
    for reply in (Reply(status=500), Reply(status=403), Reply(status=404)):
        err, *_ = _run([reply])
        assert isinstance(err, ProposalError) and err.fatal, reply
    with pytest.raises(ProposalError) as info:
        LLMProposer(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m").propose(context())
    assert info.value.fatal and "cannot reach" in info.value.reason
    prose, *_ = _run([Reply("I would raise the learning rate.")])
    assert isinstance(prose, ProposalError) and not prose.fatal


# ---------------------------------------------------------------------------- notes are not reply text

def test_retry_notes_are_progress_events_not_reply_text_and_the_watch_prints_them():
    import io

    from autoresearch_kit.cli import _LLMWatch

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Tty()
    w = _LLMWatch(out=out, err=err)
    tokens: list[str] = []

    def on_token(piece):
        tokens.append(piece)
        w.on_token(piece)

    events: list[dict] = []

    def on_progress(event):
        events.append(event)
        w.on_progress(event)

    with FakeOpenAI([Reply(GOOD, delay=2), Reply(GOOD, chunk=400)]) as server:
        p = LLMProposer(base_url=server.url, model="fake-model", timeout=0.5, retry_delay=0.01, edit_mode="edits",
                        on_progress=on_progress)
        p.propose(context(), on_token=on_token)
    assert "".join(tokens) == GOOD                       # the reply, and nothing else
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert len(notes) == 1 and notes[0].startswith("[no answer within 0.5s (timeout); retrying in")
    assert f"\n  {notes[0]}\n" in out.getvalue()          # a line of its own, on a terminal too
    assert w._chars == len(GOOD)
    # without on_progress the notes stay inline in the stream (the notebook panel shows them)
    _, _, _, streamed = _run([Reply(GOOD, delay=2), Reply(GOOD)], timeout=0.5)
    assert "[no answer within 0.5s (timeout); retrying in" in streamed


# ---------------------------------------------------------------------------- max_tokens, error bodies, finish_reason

def test_a_400_naming_max_tokens_is_retried_with_max_completion_tokens_for_the_session():
    script = [Reply(_knob("MATRIX_LR", 0.05))] * 2 + [Reply(_knob("DEPTH", 5))]   # the refused request takes one
    with FakeOpenAI(script, reject_fields=("max_tokens",)) as server:
        p = LLMProposer(base_url=server.url, model="o4-mini", edit_mode="knobs", retry_delay=0.01)
        first = p.propose(context())
        second = p.propose(context())
    bodies = [c["body"] for c in server.chats]
    assert first.description == "MATRIX_LR 0.04 -> 0.05" and second.description == "DEPTH 4 -> 5"
    assert first.metadata["structured"] == "json_schema"       # the constraint was not blamed
    assert ["max_tokens" in b for b in bodies] == [True, False, False]
    assert [b.get("max_completion_tokens") for b in bodies] == [None, 256, 256]
    assert all("response_format" in b for b in bodies) and first.metadata["attempts"] == 1


def test_a_fastapi_422_detail_body_is_read_and_steps_the_constraint_down():
    detail = {"detail": [{"type": "literal_error", "loc": ["body", "response_format", "type"],
                          "msg": "Input should be 'text' or 'json_object'", "input": "json_schema"}]}
    with FakeOpenAI([Reply(_knob("MATRIX_LR", 0.05))], constraints=("grammar",), refuse_status=422,
                    refuse_body=detail) as server:
        events: list[dict] = []
        out = LLMProposer(base_url=server.url, model="m", edit_mode="knobs", retry_delay=0.01,
                          on_progress=events.append).propose(context())
    assert out.metadata["structured"] == "grammar" and out.description == "MATRIX_LR 0.04 -> 0.05"
    why = next(e["why"] for e in events if e["event"] == "structured")
    assert "Error code: 422" in why and "Input should be 'text' or 'json_object'" in why


def test_an_error_body_without_a_message_is_shown():
    err, *_ = _run([Reply(status=404, raw_body="404 page not found")])     # Ollama's plain text
    assert isinstance(err, ProposalError) and "Error code: 404 - 404 page not found" in err.reason
    err, *_ = _run([Reply(status=422, error_body={"detail": [{"loc": ["body", "seed"], "msg": "Extra inputs are "
                                                                                            "not permitted"}]})])
    assert "Error code: 422" in err.reason and "Extra inputs are not permitted" in err.reason


@pytest.mark.parametrize("stream", [True, False])
def test_a_reply_cut_off_at_max_tokens_says_so(stream):
    cut = GOOD[:GOOD.index("=======") + 12]
    err, *_ = _run([Reply(cut, finish="length")], stream=stream, max_tokens=100, max_attempts=1)
    assert isinstance(err, ProposalError)
    assert "the reply was cut off at max_tokens=100" in err.reason and "--max-tokens" in err.reason


@pytest.mark.parametrize("stream", [True, False])
def test_a_model_that_only_reasoned_is_told_apart_from_a_context_overflow(stream):
    err, server, _, _ = _run([Reply("", reasoning="Let me think about the learning rate... " * 5, usage=None)],
                             stream=stream, max_attempts=1)
    assert isinstance(err, ProposalError) and "only reasoned" in err.reason and "--max-tokens" in err.reason
    assert "context" not in err.reason.split("last problem:")[1].split("Try")[0]
    assert len(server.chats) == 1                       # the prompt fit: no unstreamed second ask
    err, *_ = _run([Reply("", usage=(120, 64))], stream=stream, max_attempts=1)   # tokens generated, none shown
    assert "only reasoned" in err.reason and "64 tokens generated" in err.reason


# ---------------------------------------------------------------------------- reasoning models: alive, never cut off

# A draft edit in the reasoning: it must never be taken for the answer (reasoning is not code).
DRAFT = ("Maybe deeper?\n<<<<<<< SEARCH\nDEPTH = 4                  # transformer layers\n=======\nDEPTH = 8\n"
         ">>>>>>> REPLACE\n")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])   # llama.cpp / vLLM; Ollama, newer vLLM
def test_a_model_reasoning_longer_than_max_wait_is_not_cut_off_and_notes_say_it_is_alive(field):
    import io

    from autoresearch_kit.cli import _LLMWatch

    out = io.StringIO()
    watch = _LLMWatch(out=out, err=io.StringIO())
    events: list[dict] = []

    def on_progress(event):
        events.append(event)
        watch.on_progress(event)

    reasoning = DRAFT + "Let me weigh the learning rate against the budget. " * 8    # 32 chunks, 0.06 s apart
    tokens: list[str] = []
    with FakeOpenAI([Reply(GOOD, reasoning=reasoning, reasoning_field=field, reasoning_delay=0.06)]) as server:
        p = LLMProposer(base_url=server.url, model="qwen3:8b", edit_mode="edits", timeout=1.0, max_wait=1.0,
                        on_progress=on_progress)
        p.reasoning_note_seconds = 0.4
        p.context_window(), p.counter.count("warm up")   # asked once per session: not part of this wait
        t0 = time.monotonic()
        proposal = p.propose(context(), on_token=tokens.append)
        secs = time.monotonic() - t0
    chunks = -(-len(reasoning) // 16)
    assert secs > 1.5                                    # longer than max_wait, all of it reasoning
    assert proposal.description == "MATRIX_LR 0.04 -> 0.05" and "DEPTH = 4 " in proposal.source
    assert "".join(tokens) == GOOD                       # the reply shown is the answer, not the reasoning
    notes = [e for e in events if e["event"] == "note"]
    assert notes[0]["text"] == "[thinking... (the model streams its reasoning before the answer)]"
    ticks = notes[1:-1]
    assert ticks and all(re.fullmatch(r"\[thinking\.\.\. \d+ reasoning tokens, \d+ s\]", e["text"]) for e in ticks)
    counts = [e["reasoning_tokens"] for e in notes]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)   # growing, never the same note twice
    assert len(notes) <= 2 + secs / 0.4 + 1 < chunks      # throttled: far fewer notes than reasoning chunks
    assert re.fullmatch(rf"\[thought for \d+ s \({chunks} reasoning tokens\); now the answer\]", notes[-1]["text"])
    for e in notes:
        assert f"\n  {e['text']}\n" in out.getvalue()    # the CLI prints each on a line of its own


def test_reasoning_notes_without_on_progress_go_inline_and_a_silent_server_still_times_out():
    reasoning = "Hmm, the learning rate. " * 6
    p, _, _, streamed = _run([Reply(GOOD, reasoning=reasoning, reasoning_delay=0.02)])
    assert p.description == "MATRIX_LR 0.04 -> 0.05"
    assert streamed.startswith("\n[thinking... (the model streams its reasoning before the answer)]\n")
    assert streamed.endswith("reasoning tokens); now the answer]\n" + GOOD)
    # a server that stops sending mid-reasoning: the per-chunk timeout still applies
    err, server, _, _ = _run([Reply(GOOD, reasoning=reasoning, reasoning_delay=1.5)], timeout=0.5, max_retries=1)
    assert isinstance(err, ProposalError) and err.fatal and len(server.chats) == 2
    assert "failed 2 times" in err.reason and "no answer within 0.5s (timeout)" in err.reason


def test_inline_think_text_does_not_count_toward_max_wait_and_is_not_the_answer():
    think = "<think>\n" + DRAFT + "The lr is the knob to try here. " * 36 + "</think>\n"   # 16 chunks, 0.1 s apart
    p, *_ = _run([Reply(think + GOOD, chunk=80, chunk_delay=0.1)], max_wait=1.0)   # the answer: 4 more chunks
    assert not isinstance(p, ProposalError), p.reason
    assert p.description == "MATRIX_LR 0.04 -> 0.05" and "DEPTH = 4 " in p.source and p.metadata["seconds"] > 1.5


def test_non_streaming_servers_still_work_and_a_slow_unstreamed_reply_says_to_stream():
    p, server, _, streamed = _run([Reply(GOOD, reasoning=DRAFT)], stream=False)
    assert p.description == "MATRIX_LR 0.04 -> 0.05" and "DEPTH = 4 " in p.source and streamed == GOOD
    # a server that answers stream=True with one JSON body: asked again without streaming
    p, server, _, _ = _run([Reply(GOOD, ignore_stream=True)])
    assert p.description == "MATRIX_LR 0.04 -> 0.05" and [c["body"].get("stream") for c in server.chats] == [True, None]
    # ... and only once: the next proposals are asked unstreamed (each reply would be generated twice)
    with FakeOpenAI([Reply(GOOD, ignore_stream=True)], ("fake-model",)) as server:
        p = LLMProposer(base_url=server.url, api_key=KEY, model="fake-model", retry_delay=0.01, timeout=2.0,
                        edit_mode="edits")
        notes: list[str] = []
        for _ in range(2):
            assert p.propose(context(), on_token=notes.append).description == "MATRIX_LR 0.04 -> 0.05"
    assert [c["body"].get("stream") for c in server.chats] == [True, None, None]
    assert "the server does not stream" in "".join(notes)
    err, *_ = _run([Reply(GOOD, reasoning=DRAFT, delay=1.0)], stream=False, timeout=0.3, max_retries=1)
    assert isinstance(err, ProposalError) and "no answer within 0.3s (timeout)" in err.reason
    assert "Without streaming the timeout covers the whole reply" in err.reason and "--timeout" in err.reason
    assert "stream=True" in err.reason and "Try again later" not in err.reason


# ---------------------------------------------------------------------------- a local model's unified diff

def test_a_diff_reply_with_a_wrong_hunk_header_is_applied_and_one_that_does_not_match_is_fed_back():
    from autoresearch_kit.propose.base import unified_diff

    new = SYNTHETIC_TRAIN.replace("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ").replace("WEIGHT_DECAY = 0.1 ",
                                                                                    "WEIGHT_DECAY = 0.2 ")
    body = unified_diff(SYNTHETIC_TRAIN, new).split("\n", 3)[3]
    good = (f"DESCRIPTION: two lrs\nRATIONALE: both.\n\n```diff\n--- a/train.py\n+++ b/train.py\n"
            f"@@ -10,7 +10,8 @@\n{body}```\n")
    stale = good.replace(" EMBEDDING_LR = 0.6 ", " EMBEDDING_LR = 0.5 ")     # a context line the model misremembered
    events: list[dict] = []
    p, server, _, _ = _run([Reply(stale), Reply(good)], on_progress=events.append)
    assert p.source == new and p.description == "two lrs" and p.metadata["attempts"] == 2
    refusal = next(e["error"] for e in events if e["event"] == "refused")
    assert refusal.startswith("hunk 1 of the patch (@@ -10,7 +10,8 @@) does not match train.py: its line "
                              "'EMBEDDING_LR = 0.5         # lr for the token embedding' is not in train.py")
    assert refusal in server.chats[1]["body"]["messages"][-1]["content"]        # the model is told what to fix
