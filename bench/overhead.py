"""Where the time of one budgeted run goes: the runner's overhead over the training budget.

    python bench/overhead.py                      # 3 runs of the real train.py, 10 s each
    python bench/overhead.py --budget 30s -n 5 --data ~/.cache/autoresearch_kit/data/builtin-bpe4096
    python bench/overhead.py --tiny               # a tiny model (edits train.py's knobs), for a quick look

Runs `train.py` through `run_budgeted` N times and prints, per run, the parent's wall
clock split into phases (the runner's own timestamps of what the child asked for):

    startup   spawn -> the harness's `hello` (interpreter, torch import; in the sandbox)
    setup     `hello` -> the clock starts (model build, FLOP count, compile, warm-up steps)
    train     the runner's clock (the budget)
    finish    the end of the budget -> the score is made (last step, the runner's evaluation)
    exit      score -> process gone (interpreter teardown, the runner's stray check)
    overhead  wall - budget

Needs only torch, numpy and tiktoken beyond the kit. Without prepared data (or with
--synthetic) it writes a small synthetic byte-level dataset to a temporary directory.
The hardware line names the device, CPU/GPU model and torch version: quote it with
every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = {"CPU_DEPTH": 1, "CPU_SEQ_LEN": 64, "CPU_BATCH_SIZE": 8, "ASPECT_RATIO": 32, "HEAD_DIM": 16,
        "GPU_DEPTH": 2, "GPU_SEQ_LEN": 256, "GPU_BATCH_SIZE": 16}


def _hardware(device_type: str) -> str:
    import torch

    gpu = ""
    if device_type == "cuda" and torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)}, "
    from autoresearch_kit.device import cpu_name

    return (f"device {device_type} | {gpu}CPU {cpu_name()} ({os.cpu_count()} cores) | torch {torch.__version__} "
            f"| python {platform.python_version()}")


def _synthetic_data(directory: Path) -> Path:
    """A byte-level dataset of random English-like words (numpy + tiktoken only)."""
    import numpy as np

    from autoresearch_kit.data.shards import bytes_encoding, write_prepared

    words = ("the of and to in that he shall unto for his a i lord they be is him not them it with all thou "
             "thy was which my me said but ye their have will thee from as are when this out were upon man").split()
    rng = np.random.default_rng(0)
    enc = bytes_encoding()
    bos = enc.encode_single_token("<|bos|>")

    def stream(n_docs: int) -> np.ndarray:
        out = []
        for _ in range(n_docs):
            out.append(bos)
            out.extend(enc.encode_ordinary(" ".join(rng.choice(words, size=int(rng.integers(50, 400)))) + "."))
        return np.array(out, dtype=np.uint16)

    return write_prepared(directory / "synthetic-bytes", encoding=enc, train=stream(6000), val=stream(400),
                          source={"dataset": "synthetic", "note": "bench/overhead.py"},
                          tokenizer_info={"kind": "bytes"})


def _candidate(tiny: bool) -> str:
    src = (REPO / "train.py").read_text()
    if tiny:
        for name, value in TINY.items():
            src = re.sub(rf"^{name} = \S+", f"{name} = {value}", src, flags=re.M)
    return src


def _phases(res) -> dict:
    t = res.extra.get("timings", {})
    budget_s = float(res.budget[:-1]) if res.budget.endswith("s") else float("nan")
    out = {"status": res.status, "wall": res.wall_seconds, "overhead": res.wall_seconds - budget_s,
           "training_seconds": res.training_seconds, "eval_seconds": res.eval_seconds,
           "steps": res.steps, "tokens": res.tokens, "val_bpb": res.val_bpb}
    out["isolation"] = res.extra.get("isolation", "")
    marks = [("startup", None, "start"), ("setup", "start", "clock"), ("train", "clock", "stop"),
             ("finish", "stop", "result")]
    for name, a, b in marks:  # a failed run still shows the phases it reached
        if b in t and (a is None or a in t):
            out[name] = t[b] - (t[a] if a else 0.0)
    if "result" in t:
        out["exit"] = res.wall_seconds - t["result"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="runs (default 3)")
    ap.add_argument("--budget", default="10s", help="a seconds budget (default 10s)")
    ap.add_argument("--data", default=None, help="prepared data directory (default: the last prepared one)")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic byte-level dataset")
    ap.add_argument("--tiny", action="store_true", help="shrink the model (edits train.py's UPPER_CASE knobs)")
    ap.add_argument("--device", default=None, help="cuda | mps | cpu (default: detected)")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="validation tokens scored (default: the device's default, AUTORESEARCH_EVAL_TOKENS)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--sandbox", default=None, help="auto | require | off (default: AUTORESEARCH_SANDBOX)")
    args = ap.parse_args(argv)

    from autoresearch_kit import config
    from autoresearch_kit.runner import _detect_device_type, run_budgeted

    budget = config.Budget.parse(args.budget)
    if budget.kind != "seconds":
        ap.error("the overhead is measured against a seconds budget, e.g. --budget 10s")
    device = args.device or _detect_device_type()
    tmp = Path(tempfile.mkdtemp(prefix="autoresearch-bench-"))
    data = Path(args.data).expanduser() if args.data else config.data_dir()
    if args.synthetic or not (data / "manifest.json").is_file():
        if not args.synthetic:
            print(f"no prepared data at {data}: using a synthetic byte-level dataset", flush=True)
        data = _synthetic_data(tmp)

    hw = _hardware(device)
    print(hw)
    print(f"budget {budget} | data {data} | model {'tiny' if args.tiny else 'train.py as is'} | "
          f"eval tokens {args.eval_tokens or config.default_eval_tokens(device)}", flush=True)
    env = {"AUTORESEARCH_EVAL_TOKENS": str(args.eval_tokens)} if args.eval_tokens else None
    src = _candidate(args.tiny)
    rows = []
    for i in range(args.n):
        res = run_budgeted(src, budget, workdir=tmp / f"run{i}", data_dir=data, device=device, env=env,
                           sandbox=args.sandbox)
        if res.status != "ok":
            print(f"run {i}: {res.status}: {res.reason}", flush=True)
        rows.append(_phases(res))
        print(f"run {i}: {res.status} in {res.wall_seconds:.1f} s", flush=True)

    cols = ("wall", "overhead", "startup", "setup", "train", "training_seconds", "finish", "eval_seconds", "exit")
    print()
    print("run  " + " ".join(f"{c[:9]:>9}" for c in cols) + "   steps  val_bpb  isolation")
    for i, r in enumerate(rows):
        cells = " ".join(f"{r[c]:9.2f}" if isinstance(r.get(c), float) else f"{'-':>9}" for c in cols)
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] else r["status"]
        print(f"{i:<4} {cells} {r['steps']:7d}  {bpb}  {r.get('isolation', '')}")
    ok = [r for r in rows if "exit" in r]
    if len(ok) > 1:
        means = " ".join(f"{statistics.mean(r[c] for r in ok):9.2f}" for c in cols)
        print(f"mean {means}")
    print("(seconds; startup/setup/train/finish/exit are the runner's times between the child's requests)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw, "budget": str(budget), "rows": rows}, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
