"""What measuring the noise by default costs, and what it saves, on this machine.

    python scripts/noise_cost.py --budget 20k-tokens --steps 8         # a fresh lab in a temp dir
    python scripts/noise_cost.py --budget 30s --steps 8 --noise-runs 2 --json out.json

Creates a lab (the repository's train.py, the prepared data `config.data_dir()` finds, the
offline mutate proposer), runs its baseline and times it, lets the Lab measure its noise
(`noise_runs` reruns of the baseline: the new default) and times that, then runs `--steps`
autopilot steps. It prints, per budget: the baseline's seconds, the noise runs' seconds
(the cost, also as a share of the whole session), sigma, and how many candidates the rule
flagged "within noise": gains above 0 that the old default (threshold 0, no noise) would
have kept, each a change later reverted or built on by mistake (what the default saves).
Figures go to docs/PERFORMANCE.md with the machine named beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(budget: str, steps: int, noise_runs: int, seed: int = 0) -> dict:
    from autoresearch_kit.lab import Lab

    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp) / "lab", train=ROOT / "train.py", program=ROOT / "program.md", budget=budget,
                  proposer="mutate", proposer_kwargs={"seed": seed}, noise_runs=0, verbose=False)
        try:
            t0 = time.time()
            base = lab.baseline()
            t_base = time.time() - t0
            if base["status"] != "ok":
                msg = f"baseline {base['status']}: {base['reason']}"
                raise SystemExit(msg)
            t0 = time.time()
            lab.noise_runs, lab._noise_tried = noise_runs, False   # the default path, timed on its own
            lab.baseline()
            t_noise = time.time() - t0
            t0 = time.time()
            recs = lab.autopilot(steps=steps)
            t_steps = time.time() - t0
            verdicts = [lab.verdict(r["id"]) for r in recs]
            within = [v for v in verdicts if v["within_noise"]]
            kept = [r for r in recs if r["decision"] == "keep"]
            scores = [r["val_bpb"] for r in lab.ledger.records(curves=False) if r["kind"] in ("baseline", "noise")]
            return {
                "budget": budget, "steps": steps, "noise_runs": noise_runs,
                "baseline_s": round(t_base, 1), "noise_s": round(t_noise, 1), "steps_s": round(t_steps, 1),
                "noise_share": round(t_noise / (t_base + t_noise + t_steps), 3),
                "baseline_scores": [round(s, 5) for s in scores], "sigma": lab.sigma,
                "kept": len(kept), "within_noise": len(within),
                "within_noise_gains": [round(v["gain"], 5) for v in within],
                "kept_gains": [round(v["gain"], 5) for v in verdicts if v["keep"]],
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            }
        finally:
            lab.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", action="append", default=None, help="budget(s) to measure (repeatable)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--noise-runs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    out = []
    for budget in args.budget or ["20k-tokens"]:
        res = measure(budget, args.steps, args.noise_runs)
        print(json.dumps(res), flush=True)
        out.append(res)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
