"""GPU performance of train.py on one card: throughput, MFU, overhead outside the budget, memory.

    python bench/gpu.py                            # the real train.py via run_budgeted: 300 s, then 60 s
    python bench/gpu.py --budgets 60s --cold 10s   # wipe the compile cache, a 10 s cold run, then 60 s warm
    python bench/gpu.py sweep --budget 10s d12:GPU_DEPTH=12 w768:GPU_DEPTH=8,ASPECT_RATIO=96,HEAD_DIM=128
    python bench/gpu.py sweep --budget 15s off:forkserver=0 on:forkserver=1   # the runner's fork server
    python bench/gpu.py micro                      # bf16 matmul ceiling; SDPA backends, fwd+bwd
    python bench/gpu.py profile --budget 3s        # train.py alone under cProfile: where set-up time goes
    python bench/gpu.py startup                    # fixed costs of a fresh process: torch, CUDA, cuBLAS, cuDNN, dynamo

Every run goes through the real runner (`run_budgeted`): a fresh `python train.py` process
with the trusted channel, exactly what an experiment pays. Per run it prints tokens/s, step
time, MFU three ways, peak memory, val_bpb and where the wall time outside the budget went:

    startup   spawn -> the harness's `start` message (interpreter, torch, CUDA init, data)
    setup     model build, FLOP count (one eager fwd+bwd), optimizers   (child clock)
    warmup    the AUTORESEARCH_WARMUP_STEPS steps before the clock, compile included
    over      training_seconds - budget (the last step ends past the budget)
    finish    causality probe + evaluation of the pinned val tokens (eval = the evaluation alone)
    exit      `result` message -> process gone (interpreter teardown), parent clock
    fork      whether the child was forked from the runner's fork server (autoresearch_kit/forkserver.py)
    overhead  wall - budget: everything above

MFU: `mfu` is the harness's (FlopCounterMode on one fwd+bwd: 6 x non-embedding params per
token for the matmuls, plus attention counted as 7 full T x T bmm, i.e. 14*L*T*width per
token: no causal halving, backward recomputes the scores); `mfu_6N` is the usual formula
6*N_ne + 12*L*T*width; `mfu_causal` halves the attention term to 6*L*T*width (the work a
causal kernel does). All over the H100 SXM dense bf16 peak, 989.5e12 (the original
autoresearch's denominator); `ceil` is the harness-counted FLOP/s over the measured
~800 TFLOP/s bf16 matmul ceiling (`micro`). Sweep configs edit train.py's UPPER_CASE
constants (`NAME=value,...`) or take `source=path` for another train.py.

Needs prepared data (`python prepare.py --vocab-size 8192`; AUTORESEARCH_DATA or the latest
prepared), a CUDA GPU, and torch, numpy, tiktoken beyond the kit. Results also go to --out
(JSON, one row per run, written after each run so a timed-out call keeps what finished).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_H100 = 989.5e12      # H100 SXM dense bf16, as the original autoresearch reports MFU
MATMUL_CEILING = 800e12   # an 8192^3 bf16 matmul measured ~798 TFLOP/s on this workplace's H100

COLUMNS = [("label", "{}"), ("budget", "{}"), ("fork", "{}"), ("status", "{}"), ("val_bpb", "{:.4f}"), ("steps", "{}"),
           ("tok_s", "{:,.0f}"), ("step_ms", "{:.1f}"), ("mfu", "{:.1%}"), ("mfu_6N", "{:.1%}"),
           ("mfu_causal", "{:.1%}"), ("ceil", "{:.0%}"), ("peak_gb", "{:.1f}"), ("params_M", "{:.1f}"),
           ("wall", "{:.1f}"), ("overhead", "{:.1f}"), ("ovh_pct", "{:.1%}"), ("startup", "{:.1f}"),
           ("setup", "{:.1f}"), ("warmup", "{:.1f}"), ("over", "{:.2f}"), ("finish", "{:.1f}"),
           ("eval", "{:.1f}"), ("exit", "{:.1f}")]


def _with_constants(source: str, edits: dict[str, str]) -> str:
    for name, value in edits.items():
        source, n = re.subn(rf"^{name} = [^#\n]+", f"{name} = {value}  ", source, count=1, flags=re.M)
        if n != 1:
            msg = f"train.py has no constant {name} to set (sweep config {name}={value})."
            raise ValueError(msg)
    return source


def _summary(log_text: str) -> dict[str, float]:
    """The harness's `outside the budget: startup 2.10s | setup ...` line, as {startup_seconds: 2.1, ...}."""
    m = re.search(r"^outside the budget: (.*)$", log_text, flags=re.M)
    if not m:
        return {}
    return {k + "_seconds": float(v) for k, v in re.findall(r"([a-z]+) ([-0-9.]+)s", m.group(1))}


def _shape(log_text: str) -> dict[str, int]:
    m = re.search(r"model: depth (\d+), width (\d+), (\d+) heads \| batch (\d+) x (\d+) tokens", log_text)
    if not m:
        return {}
    return dict(zip(("depth", "width", "heads", "batch", "seq_len"), map(int, m.groups())))


def run_one(label: str, source: str, budget: str, data_dir: Path, vocab_size: int, warmup_steps: int,
            device: str = "cuda") -> dict:
    """One budgeted run of `source` through the real runner; the row for the table."""
    from autoresearch_kit.config import Budget
    from autoresearch_kit.runner import run_budgeted

    res = run_budgeted(source, budget, data_dir=data_dir, device=device)
    log_text = Path(res.log_path).read_text(errors="replace")
    summ, shape = _summary(log_text), _shape(log_text)
    seconds = Budget.parse(budget).amount
    row: dict = {"label": label, "budget": budget, "status": res.status, "reason": res.reason[:300],
                 "val_bpb": res.val_bpb, "steps": res.steps, "tokens": res.tokens, "device": res.device,
                 "torch": res.torch_version, "peak_gb": res.peak_memory_gb, "mfu": res.mfu,
                 "params_M": (res.params or 0) / 1e6, "wall": res.wall_seconds,
                 "training_seconds": res.training_seconds, **shape}
    row["overhead"] = res.wall_seconds - seconds
    row["fork"] = "yes" if res.extra.get("forkserver") else "no"
    row["ovh_pct"] = row["overhead"] / seconds
    timings = res.extra.get("timings", {})
    row["startup"] = timings.get("start")
    row["setup"], row["warmup"] = summ.get("setup_seconds"), summ.get("warmup_seconds")
    row["finish"], row["eval"] = summ.get("finish_seconds"), summ.get("eval_seconds")
    row["over"] = res.training_seconds - seconds if res.training_seconds else None
    row["exit"] = res.wall_seconds - timings["result"] if "result" in timings else None
    if res.status == "ok" and shape and res.training_seconds:
        bt = shape["batch"] * shape["seq_len"]
        timed = res.tokens - warmup_steps * bt  # the warm-up steps ran before the clock
        row["tok_s"] = timed / res.training_seconds
        row["step_ms"] = 1e3 * bt / row["tok_s"]
        L, W, T = shape["depth"], shape["width"], shape["seq_len"]
        n_ne = res.params - vocab_size * W  # everything but the token embedding (lm_head included)
        row["flops_per_token_harness"] = res.flops / res.tokens if res.tokens else None
        row["flops_per_token_6N"] = 6 * n_ne + 12 * L * T * W
        row["flops_per_token_causal"] = 6 * n_ne + 6 * L * T * W
        row["mfu_6N"] = row["flops_per_token_6N"] * row["tok_s"] / PEAK_H100
        row["mfu_causal"] = row["flops_per_token_causal"] * row["tok_s"] / PEAK_H100
        if row["flops_per_token_harness"]:
            row["ceil"] = row["flops_per_token_harness"] * row["tok_s"] / MATMUL_CEILING
    if res.status != "ok":
        row["log_tail"] = res.log_tail[-3000:]
    return row


def _fmt(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    try:
        return spec.format(v)
    except (ValueError, TypeError):
        return str(v)


def print_table(rows: list[dict]) -> None:
    cells = [[k for k, _ in COLUMNS]] + [[_fmt(r, k, s) for k, s in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)), flush=True)


def _header() -> str:
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (f"{datetime.date.today().isoformat()} | {card} | torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) | {os.cpu_count()} CPUs")


def _save(rows: list[dict], out: Path | None, header: str) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))


def _data(args) -> tuple[Path, int]:
    from autoresearch_kit import config
    from autoresearch_kit.data.shards import PreparedData

    data_dir = Path(args.data).expanduser() if args.data else config.data_dir()
    try:
        data = PreparedData.open(data_dir)
    except FileNotFoundError:
        msg = f"No prepared data at {data_dir}: run `python prepare.py --vocab-size 8192` first, or pass --data."
        raise SystemExit(msg) from None
    return data.path, data.vocab_size


def _report(label: str, row: dict) -> None:
    print(f"[{label}] {row['status']} val_bpb {_fmt(row, 'val_bpb', '{:.4f}')} | "
          f"{_fmt(row, 'tok_s', '{:,.0f}')} tok/s | mfu {_fmt(row, 'mfu', '{:.1%}')} | "
          f"wall {row['wall']:.1f}s overhead {row['overhead']:.1f}s", flush=True)
    if row["status"] != "ok":
        print(row.get("log_tail", ""), flush=True)


def _begin(args) -> tuple[Path, int, int, str, str]:
    """What run and sweep both start with: data, vocab, warm-up steps, train.py, the printed header."""
    from autoresearch_kit import config

    data_dir, vocab = _data(args)
    warmup = int(config.env("WARMUP_STEPS") or config.DEFAULT_WARMUP_STEPS)
    header = _header()
    print(header, flush=True)
    return data_dir, vocab, warmup, Path(args.train).read_text(), header


def cmd_run(args) -> None:
    from autoresearch_kit import config

    data_dir, vocab, warmup, source, header = _begin(args)
    rows = []
    budgets = list(args.budgets)
    if args.cold:
        cache = config.cache_dir() / "compile"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"compile cache {cache} wiped: the first run compiles cold", flush=True)
        budgets.insert(0, args.cold)
    import time

    from autoresearch_kit import runner

    t0 = time.perf_counter()
    ahead = runner.prestart(args.device)  # as a Lab does: the first run does not wait for the server
    if ahead is not None:
        ahead.join()
        print(f"fork server started ahead (runner.prestart) in {time.perf_counter() - t0:.1f} s", flush=True)
    for i, budget in enumerate(budgets):
        label = "cold" if args.cold and i == 0 else "train.py"
        row = run_one(label, source, budget, data_dir, vocab, warmup, args.device)
        rows.append(row)
        _report(label, row)
        _save(rows, args.out, header)
    print(header)
    print_table(rows)


def cmd_sweep(args) -> None:
    data_dir, vocab, warmup, base, header = _begin(args)
    rows = []
    for spec in args.configs:
        label, _, assigns = spec.partition(":")
        edits = dict(a.split("=", 1) for a in assigns.split(",") if a)
        source = Path(edits.pop("source")).read_text() if "source" in edits else base
        if "forkserver" in edits:  # the runner reads it per run: fork server on (1) or off (0)
            os.environ["AUTORESEARCH_FORKSERVER"] = edits.pop("forkserver")
        row = run_one(label, _with_constants(source, edits), args.budget, data_dir, vocab, warmup, args.device)
        row["config"] = assigns
        rows.append(row)
        _report(label, row)
        _save(rows, args.out, header)
    print(header)
    print_table(rows)


def _time_ms(fn, reps: int = 10) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cmd_micro(args) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(_header(), flush=True)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _time_ms(lambda: a @ b)
    print(f"bf16 matmul {n}^3 (random data): {2 * n**3 / ms / 1e9:.0f} TFLOP/s", flush=True)
    del a, b
    tokens = args.tokens
    print(f"causal SDPA fwd+bwd, bf16, {tokens} tokens of seq {args.seq_len}, width {args.width}; "
          "TFLOP/s count the causal half of 7 T x T bmm (2 fwd, 5 bwd)")
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for head_dim in (64, 128):
        B, H, T = tokens // args.seq_len, args.width // head_dim, args.seq_len
        q, k, v = (torch.randn(B, H, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn(B, H, T, head_dim, device="cuda", dtype=torch.bfloat16)
        flops = 7 * 2 * B * H * T * T * head_dim / 2
        line = []
        for name, be in backends.items():
            def step():
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                y.backward(g)
            try:
                if be is None:
                    ms = _time_ms(step)
                else:
                    with sdpa_kernel(be):
                        ms = _time_ms(step)
                line.append(f"{name} {ms:.2f} ms ({flops / ms / 1e9:.0f} TF/s)")
            except RuntimeError as e:
                line.append(f"{name} n/a ({str(e).splitlines()[0][:60]})")
        print(f"  head_dim {head_dim:3d} ({H} heads): " + " | ".join(line), flush=True)


def cmd_profile(args) -> None:
    """Run train.py once on its own (no runner) under cProfile; print the heaviest calls."""
    import pstats
    import subprocess
    import tempfile
    import time

    data_dir, _ = _data(args)
    prof = Path(tempfile.mkdtemp(prefix="gpu-profile-")) / "train.prof"
    env = {**os.environ, "AUTORESEARCH_BUDGET": args.budget, "AUTORESEARCH_DATA": str(data_dir)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), args.train], env=env,
                         capture_output=True, text=True, cwd=str(prof.parent))
    wall = time.perf_counter() - t0
    lines = out.stdout.splitlines()
    print("\n".join(ln for ln in lines if not ln.startswith("step ")) + out.stderr[-3000:])
    print(f"wall {wall:.1f}s (under cProfile, which slows Python-heavy parts such as compile)", flush=True)
    if prof.exists():
        stats = pstats.Stats(str(prof))
        stats.sort_stats("cumulative").print_callees(rf"{re.escape(Path(args.train).name)}:1\(<module>\)")
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top // 2)


_THREADS_PROBE = r"""
import os, sys, traceback
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as the fork server imports
import numpy, torch
if "--pin" in sys.argv:  # as the fork server does: torch.cuda answers from a forked child
    from autoresearch_kit.forkserver import _pin_cuda_facts
    _pin_cuda_facts()
    print("torch.cuda.is_available/device_count pinned", flush=True)
def threads():
    return len(os.listdir("/proc/self/task"))
base = threads()
def probe(frame, event, arg):
    global base
    if event in ("return", "c_return") and threads() > base:
        base = threads()
        what = getattr(arg, "__qualname__", repr(arg)) if event == "c_return" else frame.f_code.co_name
        print(f"a thread appeared ({base} now) after {event} {what}; stack:", flush=True)
        traceback.print_stack(frame, limit=12)
for name in (a for a in sys.argv[1:] if not a.startswith("--")):
    print(f"import {name}: {threads()} threads before", flush=True)
    sys.setprofile(probe)
    __import__(name)
    sys.setprofile(None)
    print(f"import {name}: {threads()} threads after", flush=True)
"""

_STARTUP_PROBE = r"""
import time
t0 = time.perf_counter()
def mark(what):
    global t0
    t = time.perf_counter(); print(f"{what:<44}{t - t0:6.2f} s", flush=True); t0 = t
import os, sys
import torch; mark("import torch")
import torch.nn.functional as F
torch.cuda.init(); torch.cuda.get_device_name(0); mark("CUDA init + device query")
torch.zeros(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA context (first allocation)")
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); (a @ a).sum().item(); mark("first bf16 matmul (cuBLAS)")
from torch.nn.attention import SDPBackend, sdpa_kernel
for i in range(2):
    q, k, v = (torch.randn(1, 12, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize(); mark("cuDNN attention fwd+bwd, " + ("first call" if i == 0 else "second call"))
from torch.utils.flop_counter import FlopCounterMode; mark("import FlopCounterMode")
import torch._dynamo; mark("import torch._dynamo")
import torch._inductor.compile_fx; mark("import torch._inductor.compile_fx")
f = torch.compile(lambda x: torch.relu(x) * 2); f(a); torch.cuda.synchronize(); mark("first tiny torch.compile call")
"""


def cmd_startup(args) -> None:
    """Fixed costs every experiment pays in a fresh process, one line each."""
    import subprocess

    print(_header(), flush=True)
    if args.threads:
        subprocess.run([sys.executable, "-c", _THREADS_PROBE, *args.threads, *(["--pin"] if args.pin else [])],
                       check=False)
        return
    for i in range(2):  # the first process may read the libraries from disk, the second from the page cache
        print(f"-- fresh process {i + 1}", flush=True)
        subprocess.run([sys.executable, "-c", _STARTUP_PROBE], check=False)


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", help="prepared data directory (default: AUTORESEARCH_DATA or the latest prepared)")
    common.add_argument("--train", default=str(REPO / "train.py"), help="the train.py to run (default: the repo's)")
    common.add_argument("--out", type=Path, help="write the rows as JSON here")
    common.add_argument("--device", default="cuda", help="cuda (the point); cpu only to check the script")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", parents=[common], help="the real train.py at full budgets (the default command)")
    r.add_argument("--budgets", nargs="+", default=["300s", "60s"])
    r.add_argument("--cold", metavar="BUDGET", help="wipe the compile cache and do a run of BUDGET first")
    s = sub.add_parser("sweep", parents=[common], help="short runs of edited train.py configs")
    s.add_argument("--budget", default="10s")
    s.add_argument("configs", nargs="+", help="label:NAME=value,NAME=value (or label:source=path)")
    m = sub.add_parser("micro", parents=[common], help="matmul ceiling and attention backends")
    m.add_argument("--tokens", type=int, default=65536)
    m.add_argument("--seq-len", type=int, default=2048)
    m.add_argument("--width", type=int, default=768)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("run", "sweep", "micro", "profile", "startup", "-h", "--help") for a in argv):
        argv.insert(0, "run")
    f = sub.add_parser("profile", parents=[common], help="train.py alone under cProfile")
    f.add_argument("--budget", default="3s")
    f.add_argument("--top", type=int, default=50)
    st = sub.add_parser("startup", parents=[common], help="fixed start-up costs of a fresh process")
    st.add_argument("--threads", nargs="+", metavar="MODULE",
                    help="instead: import these and show the call after which a new thread exists")
    st.add_argument("--pin", action="store_true", help="with --threads: pin torch.cuda's answers as the fork server does")
    args = p.parse_args(argv)
    import logging  # the runner's fork server says when it is ready, or why not

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    {"run": cmd_run, "sweep": cmd_sweep, "micro": cmd_micro, "profile": cmd_profile,
     "startup": cmd_startup}[args.cmd](args)


if __name__ == "__main__":
    main()
