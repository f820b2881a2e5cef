"""Experiments per hour: the sequential loop against batches on N Dask workers (issue 12).

    python bench/parallel.py --budget 60s --experiments 4 --workers 2
    python bench/parallel.py --budget 20k-tokens --experiments 2 --workers 2 --device cpu   # a quick CPU look

One lab runs its baseline; it is copied, and then the same number of candidate
experiments (offline mutate proposer, noise reruns and rechecks off: timing only) run
(a) one at a time in this process, as `autoresearch run` does, and (b) in batches of
`--workers` on a local Dask cluster (one worker per GPU; round-robin when there are
fewer GPUs than workers). Before (b) is timed, one untimed batch warms each worker (its
fork server, compile cache), as the baseline warmed (a). Printed: a table naming the
hardware with elapsed seconds, experiments per hour, the speed-up, per-experiment
overhead (wall seconds outside the training budget) and MFU per run and per GPU.
--out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _hardware(device: str) -> str:
    from autoresearch_kit.device import cpu_name

    text = f"{os.cpu_count()} x {cpu_name()}"
    if device == "cuda":
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        text = f"{len(names)} x {names[0] if names else '?'} (torch {torch.__version__}); host {text}"
    return text


def _rows(lab, ids: list[str]) -> list[dict]:
    out = []
    for i in ids:
        r = lab.ledger.get(i)
        e = r["extra"] or {}
        out.append({"id": i, "status": r["status"], "val_bpb": r["val_bpb"], "wall_s": r["wall_seconds"],
                    "training_s": r["training_seconds"], "overhead_s": (r["wall_seconds"] or 0) - (r["training_seconds"] or 0),
                    "mfu": r["mfu"], "tokens": r["tokens"], "worker": e.get("worker", "driver"),
                    "gpu": e.get("cuda_visible_devices")})
    return out


def _candidates(lab, before: set[str]) -> list[str]:
    return [r["id"] for r in lab.ledger.records(curves=False) if r["id"] not in before and r["kind"] == "candidate"]


def _summary(mode: str, rows: list[dict], elapsed: float) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    by_worker: dict[str, list[float]] = {}
    for r in ok:
        if r["mfu"] is not None:
            by_worker.setdefault(r["worker"].split(" ")[0], []).append(r["mfu"])
    return {"mode": mode, "experiments": len(rows), "ok": len(ok), "elapsed_s": elapsed,
            "per_hour": 3600 * len(rows) / elapsed if elapsed else None,
            "overhead_s": statistics.fmean(r["overhead_s"] for r in ok) if ok else None,
            "mfu": statistics.fmean(r["mfu"] for r in ok if r["mfu"] is not None) if any(r["mfu"] for r in ok) else None,
            "mfu_by_worker": {w: statistics.fmean(v) for w, v in by_worker.items()}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="60s")
    ap.add_argument("--experiments", type=int, default=4, help="candidates per mode (default 4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: detected)")
    ap.add_argument("--cluster", default=None, help="a scheduler address instead of local workers")
    ap.add_argument("--sandbox", default=None, help="auto | require | off (default AUTORESEARCH_SANDBOX)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the labs in this directory")
    args = ap.parse_args(argv)

    from autoresearch_kit import device as devmod
    from autoresearch_kit.lab import Lab

    device = args.device or devmod.detect(announce=False).type
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    root.mkdir(parents=True, exist_ok=True)
    common = dict(budget=args.budget, proposer="mutate", noise_runs=0, verbose=True, device=args.device,
                  sandbox=args.sandbox, train=REPO / "train.py", program=REPO / "program.md")
    t = time.monotonic()
    with Lab(root / "seq", **common) as lab:
        lab.recheck_below = 0
        base = lab.baseline()
        if base["status"] != "ok":
            print(f"baseline failed: {base['status']} {base['reason']}\n{base['log_tail']}")
            return 1
    baseline_s = time.monotonic() - t
    shutil.copytree(root / "seq", root / "par", ignore=shutil.ignore_patterns("*.lock", "lab.lock"))

    results = {"hardware": _hardware(device), "budget": args.budget, "workers": args.workers,
               "baseline_s": baseline_s, "date": time.strftime("%Y-%m-%d")}
    with Lab(root / "seq", **common) as lab:
        lab.recheck_below = 0
        before = {r["id"] for r in lab.ledger.records(curves=False)}
        t = time.monotonic()
        lab.autopilot(args.experiments)
        results["sequential"] = _summary("sequential", _rows(lab, _candidates(lab, before)), time.monotonic() - t)

    with Lab(root / "par", cluster=args.cluster, **common) as lab:
        lab.recheck_below = 0
        t = time.monotonic()
        engine = lab._engine_for(args.workers)
        engine.ensure_data(lab._data_path())
        results["cluster_start_s"] = time.monotonic() - t
        t = time.monotonic()
        lab.autopilot(args.workers, parallel=args.workers)            # warms every worker; not timed below
        results["warm_batch_s"] = time.monotonic() - t
        before = {r["id"] for r in lab.ledger.records(curves=False)}
        t = time.monotonic()
        lab.autopilot(args.experiments, parallel=args.workers)
        results["parallel"] = _summary(f"parallel x{args.workers}", _rows(lab, _candidates(lab, before)),
                                       time.monotonic() - t)

    seq, par = results["sequential"], results["parallel"]
    results["speedup"] = par["per_hour"] / seq["per_hour"] if seq["per_hour"] and par["per_hour"] else None
    print()
    print(f"bench/parallel.py  {results['date']}  {results['hardware']}")
    print(f"budget {args.budget}, {args.experiments} candidates per mode, {args.workers} workers; baseline "
          f"{baseline_s:.0f} s, cluster start {results['cluster_start_s']:.1f} s, warm batch {results['warm_batch_s']:.0f} s")
    print(f"{'mode':<14}{'runs':>5}{'ok':>4}{'elapsed s':>11}{'exp/hour':>10}{'overhead s':>12}{'MFU':>8}  MFU by worker")
    for s in (seq, par):
        mfu = f"{s['mfu'] * 100:.1f}%" if s["mfu"] else "-"
        byw = ", ".join(f"{w} {v * 100:.1f}%" for w, v in s["mfu_by_worker"].items()) or "-"
        over = f"{s['overhead_s']:.1f}" if s["overhead_s"] is not None else "-"
        print(f"{s['mode']:<14}{s['experiments']:>5}{s['ok']:>4}{s['elapsed_s']:>11.1f}{s['per_hour']:>10.1f}"
              f"{over:>12}{mfu:>8}  {byw}")
    if results["speedup"]:
        print(f"speed-up: x{results['speedup']:.2f} experiments per hour")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
