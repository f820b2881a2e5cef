"""Where the runner's evaluation time goes, without a GPU model.

    python bench/eval.py                                        # 112,399 tokens, vocab 8192, seq 2048, bf16
    python bench/eval.py --data ~/.cache/autoresearch_kit/data/builtin-bpe8192 --seq-len 2048 --threads 16
    python bench/eval.py --tokens 120544 --vocab 4096 --seq-len 256 --dtype float32 --threads 2 -n 3
    python bench/eval.py --forward-ms 40                        # a child that takes 40 ms per batch to answer

Runs the runner's real evaluation: a `serve.RunServer` on one end of a real Unix
socketpair, answering a fake child process on the other, exactly as at `run.finish`:
the runner draws the secret order and the probe rows, sends each batch of validation
inputs, the child writes its logits into the runner's memfd and says so, the runner
copies them out, checks the probes and computes the cross-entropy (metric.py). The
fake child's model is a bigram table (logits[r, t] = table[ids[r, t]], random, of the
given dtype): causal, so the probes pass, and as cheap as a model can be, so what is
measured is the runner's side plus one write of the logits into shared memory (a GPU
child's D2H copy is about that). `--forward-ms` adds a sleep per batch for a model's
forward pass, to see how much of the scoring hides behind it.

Prints the hardware (CPU model, cores, the runner's torch threads), the shape, the bytes
moved, and per repeat: the evaluation's wall time (the runner's eval_seconds) split into
waiting for the child, copying the logits out, probe checks and the cross-entropy, plus
the child's own time writing logits. Quote the hardware line with every figure.

Without --data the validation split is synthetic (random ids, 1-4 bytes a token); with it,
the prepared data's val split and token bytes are used (its vocabulary sets --vocab).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --kit DIR: measure another copy of the kit (e.g. `git archive <commit> autoresearch_kit`), for before/after
if "--kit" in sys.argv[:-1]:
    REPO = Path(sys.argv[sys.argv.index("--kit") + 1]).resolve()
sys.path.insert(0, str(REPO))

# The fake child: the harness's side of `finish`, with a bigram table for a model.
CHILD = r'''
import json, mmap, os, socket, sys, time
import numpy as np
import torch
from autoresearch_kit.wire import Conn
fd, vocab, dtype, forward_ms, threads, seq_len, out = sys.argv[1:8]
torch.set_num_threads(int(threads))
V, dt = int(vocab), getattr(torch, dtype)
ch = Conn(socket.socket(fileno=int(fd)))
table = (torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 2).to(dt)
ch.send("hello", {"device": "cpu", "device_name": "bench", "torch": torch.__version__, "pid": os.getpid()})
ch.recv()
# one training batch, so a runner without a pinned context (before issue 11) evaluates at seq_len
ch.send("step", {"tokens": int(seq_len)}); ch.recv()
ch.send("batch", {"loader": 0, "batch_size": 1, "seq_len": int(seq_len)}); ch.recv()
ch.send("log", {"step": 0, "loss": 1.0})
ch.send("finish", {"params": V * V})
shm, t_write, t_forward, batches = None, 0.0, 0.0, 0
while True:
    kind, h, p = ch.recv()
    if kind == "val":
        rows, L = h["rows"], h["seq_len"]
        t0 = time.perf_counter()
        ids = torch.from_numpy(np.frombuffer(p, dtype=np.uint16).astype(np.int64))
        if float(forward_ms) > 0:
            time.sleep(float(forward_ms) / 1000)
        t1 = time.perf_counter()
        n = rows * L * V * table.element_size()
        if shm is None or len(shm) < n:
            ch.send("need", {"bytes": n})
            _k, h2, _p, fds = ch.recv(with_fds=True)
            if shm is not None:
                shm.close()
            shm = mmap.mmap(fds[0], h2["bytes"])
            os.close(fds[0])
        dst = torch.frombuffer(shm, dtype=dt, count=rows * L * V).view(rows * L, V)
        torch.index_select(table, 0, ids, out=dst)      # the logits, written into the runner's buffer
        del dst
        t_forward += t1 - t0
        t_write += time.perf_counter() - t1
        batches += 1
        ch.send("logits", {"shape": [rows, L, V], "dtype": dtype})
    else:
        break
open(out, "w").write(json.dumps({"end": kind, "reason": h.get("reason"), "write": t_write,
                                 "forward": t_forward, "batches": batches}))
'''


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _data(args):
    """A PreparedData, or a stand-in with a synthetic val split (what RunServer reads of it)."""
    import numpy as np

    if args.data:
        from autoresearch_kit.data.shards import PreparedData

        d = PreparedData.open(args.data)
        args.vocab = d.vocab_size
        return d
    rng = np.random.default_rng(0)
    V = args.vocab
    val = rng.integers(1, V, size=args.tokens + 1).astype(np.uint16)
    val[:: 1000] = 0   # a BOS now and then: 0 bytes, not scored
    token_bytes = rng.integers(1, 5, size=V).astype(np.int32)
    token_bytes[0] = 0
    train = rng.integers(1, V, size=max(1 << 20, 4 * args.seq_len)).astype(np.uint16)
    return types.SimpleNamespace(val=val, train=train, token_bytes=token_bytes, vocab_size=V, bos_id=0,
                                 path=Path(f"synthetic-{args.tokens}-v{V}"), tokenizer_bytes=lambda: b"")


def one(args, data) -> dict:
    import inspect

    import torch

    from autoresearch_kit import config
    from autoresearch_kit.serve import RunServer
    from autoresearch_kit.wire import Conn

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = Path(tempfile.mkstemp(prefix="bench-eval-", suffix=".json")[1])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), str(args.vocab), args.dtype,
                              str(args.forward_ms), str(args.child_threads), str(args.seq_len), str(out)],
                             pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": str(REPO)})
    theirs.close()
    kw = {"budget": config.Budget(tokens=10**9), "seed": 42, "device_type": args.device,
          "eval_tokens": args.tokens if not args.data else (args.tokens or len(data.val) - 1)}
    params = inspect.signature(RunServer.__init__).parameters
    if "eval_seq_len" in params:
        kw["eval_seq_len"] = args.seq_len
    if "score_threads" in params and args.threads:
        kw["score_threads"] = args.threads
    server = RunServer(Conn(ours), data, **kw)
    threads = args.threads or getattr(server, "score_threads", None) or torch.get_num_threads()
    args.used_threads = threads

    def serve() -> None:
        torch.set_num_threads(threads)   # (a kit from before score_threads scores with these)
        server.serve()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    child.wait(timeout=600)
    ours.shutdown(socket.SHUT_RDWR)
    t.join(timeout=10)
    ours.close()
    got = json.loads(out.read_text())
    out.unlink()
    o = server.outcome()
    r = o["result"] or {}
    if not r:
        msg = f"the evaluation did not score: {o['invalid'] or got}"
        raise SystemExit(msg)
    return {"seconds": r["eval_seconds"], "bpb": r["val_bpb"], "bytes_moved": r.get("logits_bytes", 0),
            "tokens": r["eval_tokens"], "probes": r.get("probes"), "timing": r.get("timing") or {},
            "child_write": got["write"], "child_forward": got["forward"], "batches": got["batches"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=None,
                    help="validation targets scored (default: 112,399, the built-in split at vocab 8192; with --data "
                         "the whole split)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=None,
                    help="the runner's scoring threads (default: serve.score_threads_for(--device))")
    ap.add_argument("--child-threads", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=("cuda", "mps", "cpu"),
                    help="the device the runner sizes its batches for (its LOGIT_BUDGET), not where anything runs")
    ap.add_argument("--forward-ms", type=float, default=0.0, help="the fake model's forward time per batch")
    ap.add_argument("--data", default=None, help="a prepared data directory: use its val split")
    ap.add_argument("-n", "--repeat", type=int, default=3)
    ap.add_argument("--kit", default=None, help="a directory holding another autoresearch_kit to measure")
    args = ap.parse_args(argv)
    import torch

    if args.tokens is None and not args.data:
        args.tokens = 112_399
    data = _data(args)
    runs = [one(args, data) for _ in range(args.repeat)]
    print(f"hardware: {_cpu_model()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), runner "
          f"scoring threads {args.used_threads}, child threads {args.child_threads}, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    r0 = runs[0]
    print(f"shape: {r0['tokens']:,} scored tokens, vocab {args.vocab}, seq {args.seq_len}, {args.dtype} logits, "
          f"batches sized for {args.device}: {r0['batches']} batches, {r0['probes']} probe rows, "
          f"{r0['bytes_moved'] / 1e9:.2f} GB of logits; forward {args.forward_ms:g} ms a batch")
    keys = ("wait", "copy", "probes", "ce")
    print(f"{'run':>3} {'eval s':>7} " + " ".join(f"{k:>7}" for k in keys) + f" {'child wr':>8}  val_bpb")
    for i, r in enumerate(runs):
        tm = r["timing"]
        print(f"{i:>3} {r['seconds']:7.3f} " + " ".join(f"{tm.get(k, float('nan')):7.3f}" for k in keys)
              + f" {r['child_write']:8.3f}  {r['bpb']:.12f}")
    med = statistics.median(r["seconds"] for r in runs)
    print(f"median eval {med:.3f} s = {r0['bytes_moved'] / 1e9 / med:.2f} GB/s of logits; the same val_bpb every "
          f"run: {len({r['bpb'] for r in runs}) == 1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
