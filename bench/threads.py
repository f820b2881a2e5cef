"""How many CPU threads should a candidate train with? Throughput by thread count and load.

    AUTORESEARCH_DEVICE=cpu python bench/threads.py                        # 40k tokens, threads 1..cores
    AUTORESEARCH_DEVICE=cpu python bench/threads.py --budget 20k-tokens --threads 1 2 --load 0 1 2 -n 2

Runs the repository's train.py through the real runner (`run_budgeted`, the sandbox the
machine gives, the prepared data `config.data_dir()` finds) on a token budget, with the
child's OMP_NUM_THREADS set to each `--threads` value ("auto": what the runner chooses when
the user sets nothing, "torch": unset, torch's own default), while `--load` other
processes spin on the CPU (each a busy Python loop, standing in for other people's jobs
on a shared machine). Prints the hardware line and, per (load, threads): the training
throughput (tokens / training seconds, the median of `-n` repeats), the wall time of a
run, and val_bpb (a token budget trains the same tokens whatever the thread count: the
column shows whether the score moves with it).

A benchmark, not a test: quote its table with the hardware line (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _spin(duty: float = 1.0) -> None:
    """Keep one core busy `duty` of the time (in 10 ms periods)."""
    while True:
        end = time.perf_counter() + 0.01 * duty
        while time.perf_counter() < end:
            pass
        if duty < 1.0:
            time.sleep(0.01 * (1.0 - duty))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="40k-tokens", help="a token budget (default 40k-tokens)")
    ap.add_argument("--threads", nargs="+", default=None,
                    help="OMP_NUM_THREADS values, or auto / torch (default: 1..cores, auto, torch)")
    ap.add_argument("--load", nargs="+", type=int, default=None,
                    help="numbers of busy processes beside the run (default: 0, 1, cores)")
    ap.add_argument("--duty", type=float, default=1.0,
                    help="the share of the time each busy process spins (default 1.0: always)")
    ap.add_argument("-n", type=int, default=2, help="repeats per cell (default 2)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from autoresearch_kit import runner
    from autoresearch_kit.device import cpu_name

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or [str(t) for t in range(1, cores + 1)] + ["auto", "torch"]
    loads = args.load if args.load is not None else sorted({0, 1, cores})
    print(f"CPU {cpu_name()} | {cores} cores | torch {__import__('torch').__version__} | "
          f"budget {args.budget} | busy processes spin {args.duty:.0%} of the time | sandbox {os.environ.get('AUTORESEARCH_SANDBOX', 'auto')} | "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    source = (REPO / "train.py").read_text()
    rows = []
    for load in loads:
        spinners = [multiprocessing.Process(target=_spin, args=(args.duty,), daemon=True) for _ in range(load)]
        for p in spinners:
            p.start()
        try:
            for t in threads:
                env = {}
                saved = os.environ.pop("OMP_NUM_THREADS", None)
                os.environ["AUTORESEARCH_CPU_THREADS"] = "torch" if t == "torch" else "auto"
                if t not in ("torch", "auto"):
                    env["OMP_NUM_THREADS"] = t
                tps, walls, bpbs, chosen = [], [], [], set()
                try:
                    for _ in range(args.n):
                        t0 = time.time()
                        r = runner.run_budgeted(source, args.budget, device="cpu", env=env)
                        if not r.ok:
                            raise SystemExit(f"threads {t}, load {load}: {r.status}: {r.reason}")
                        walls.append(time.time() - t0)
                        tps.append(r.tokens / max(r.training_seconds, 1e-9))
                        bpbs.append(r.val_bpb)
                        chosen.add(str(r.extra.get("cpu_threads") or t))
                finally:
                    os.environ.pop("AUTORESEARCH_CPU_THREADS", None)
                    if saved is not None:
                        os.environ["OMP_NUM_THREADS"] = saved
                row = {"load": load, "threads": t, "threads_used": "/".join(sorted(chosen)),
                       "tok_s": statistics.median(tps), "tok_s_all": tps, "wall_s": statistics.median(walls),
                       "val_bpb": bpbs}
                rows.append(row)
                print(f"load {load:2d} | threads {t:>5} ({row['threads_used']:>3}) | "
                      f"{row['tok_s']:8,.0f} tok/s (runs: {', '.join(f'{x:,.0f}' for x in tps)}) | "
                      f"wall {row['wall_s']:5.1f} s | val_bpb {', '.join(f'{b:.6f}' for b in bpbs)}", flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.join()
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "cores": cores, "budget": args.budget,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
