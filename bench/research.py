"""Does the loop find gains that hold up? A research session, then a check with fresh seeds.

    AUTORESEARCH_DEVICE=cpu python bench/research.py --budget 5k-tokens --steps 3 --seeds 3   # tiny, a CPU
    python bench/research.py --budget 100k-tokens --steps 20 --seeds 5 --json bench/results/research.json

Creates a lab in a temporary directory (the repository's train.py and program.md, the
prepared data `config.data_dir()` finds, or `--data`), lets it measure its noise as a new
lab does (`--noise-runs`, default the lab's 2), runs `--steps` autopilot steps with the
offline mutate proposer (the rule decides: paired one-seed verdicts, the narrow-win
recheck), then reruns every experiment on the kept line (the baseline, each keep, the
final best) at `--seeds` fresh seeds (1000, 1001, ...) that no run of the session used. It
prints:

- the gain of the final best over the baseline at the fresh seeds: the mean paired
  difference (baseline minus best, val_bpb at the same seed) and its standard error;
- for each keep, the gain the session decided on and its gain over its parent at the
  fresh seeds (mean +- SE): it "held up" when that is above 0, and is "beyond 2 SE" when
  above 2 standard errors;
- the hardware line, the budget, how many runs each phase took and their seconds.

A benchmark, not a test: quote its figures with the hardware line (docs/NOISE.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FRESH = 1000   # the first fresh seed; a session's seeds start at 42 and count up


def _hardware() -> str:
    from autoresearch_kit.device import hardware_fingerprint

    hw = hardware_fingerprint()
    name = f"{hw['device_name']}, " if hw["device"] != "cpu" else ""
    return (f"device {hw['device']} | {name}CPU {hw['cpu']} ({hw['cpu_count']} cores) | torch {hw['torch']} "
            f"| python {hw['python']} | load {os.getloadavg()[0]:.1f}")


def _paired(lab, parent: str, child: str, seeds: list[int]) -> tuple[float, float | None]:
    """(mean, SE) of parent minus child val_bpb at the given seeds both ran with."""
    par, ch = lab._seed_scores(parent), lab._seed_scores(child)
    diffs = [par[s] - ch[s] for s in seeds if s in par and s in ch]
    if not diffs:
        return math.nan, None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) >= 2 else None
    return statistics.fmean(diffs), se


def run(budget: str, steps: int, seeds: int, noise_runs: int | None, seed: int, data: str | None) -> dict:
    from autoresearch_kit.lab import Lab

    with tempfile.TemporaryDirectory() as tmp:
        kw = {"data_dir": data} if data else {}
        lab = Lab(Path(tmp) / "lab", train=REPO / "train.py", program=REPO / "program.md", budget=budget,
                  proposer="mutate", proposer_kwargs={"seed": seed}, noise_runs=noise_runs, verbose=False, **kw)
        try:
            t0 = time.time()
            base = lab.baseline()
            if base["status"] != "ok":
                msg = f"baseline {base['status']}: {base['reason']}"
                raise SystemExit(msg)
            t_noise = time.time() - t0
            n_noise = len(lab.ledger)
            t0 = time.time()
            recs = lab.autopilot(steps=steps)
            t_steps, n_steps = time.time() - t0, len(lab.ledger) - n_noise
            # the kept line, baseline first
            line, at = [], lab.parent_id
            while at is not None:
                line.append(at)
                at = lab.ledger.get(at)["parent_id"]
            line.reverse()
            fresh = list(range(FRESH, FRESH + seeds))
            t0, n0 = time.time(), len(lab.ledger)
            for eid in line:
                lab._rerun(eid, seeds, "rerun", seeds=fresh)
            t_check, n_check = time.time() - t0, len(lab.ledger) - n0
            keeps = []
            for parent, child in zip(line, line[1:]):
                rec = lab.ledger.get(child)
                mean, se = _paired(lab, parent, child, fresh)
                session = lab.ledger.get(parent)["val_bpb"] - rec["val_bpb"]
                keeps.append({"id": child, "description": rec["description"], "session_gain": session,
                              "fresh_gain": mean, "fresh_se": se, "held_up": bool(mean > 0),
                              "beyond_2se": bool(se is not None and mean > 2 * se),
                              "decision_reason": rec["decision_reason"]})
            gain, se = _paired(lab, line[0], line[-1], fresh) if len(line) > 1 else (0.0, None)
            b = lab._seed_scores(line[0])
            return {
                "hardware": _hardware(), "budget": budget, "steps": steps, "fresh_seeds": fresh,
                "noise_runs": lab.noise_runs, "sigma": lab.sigma, "paired_sd": lab.paired_noise()["sd_any"],
                "baseline_id": line[0], "best_id": line[-1],
                "baseline_fresh_mean": statistics.fmean(b[s] for s in fresh if s in b),
                "best_fresh_mean": statistics.fmean(lab._seed_scores(line[-1])[s] for s in fresh),
                "gain": gain, "gain_se": se, "keeps": keeps, "candidates": sum(r["kind"] == "candidate" for r in recs),
                "runs": {"baseline_and_noise": n_noise, "steps": n_steps, "check": n_check},
                "seconds": {"baseline_and_noise": round(t_noise, 1), "steps": round(t_steps, 1),
                            "check": round(t_check, 1)},
                "eval_tokens": os.environ.get("AUTORESEARCH_EVAL_TOKENS"), "platform": platform.platform(),
            }
        finally:
            lab.close()


def report(res: dict) -> str:
    def pm(mean, se):
        return f"{mean:+.5f} +- {se:.5f}" if se is not None else f"{mean:+.5f}"

    held = sum(k["held_up"] for k in res["keeps"])
    beyond = sum(k["beyond_2se"] for k in res["keeps"])
    lines = [
        f"hardware: {res['hardware']}",
        f"budget {res['budget']}, {res['steps']} steps ({res['candidates']} candidates), noise_runs "
        f"{res['noise_runs']}, sigma {res['sigma'] or 0:.5f}, paired SD {res['paired_sd'] or 0:.5f}, "
        f"fresh seeds {res['fresh_seeds'][0]}..{res['fresh_seeds'][-1]}",
        "",
        "| | val_bpb at fresh seeds (mean) |",
        "| --- | --- |",
        f"| baseline {res['baseline_id']} | {res['baseline_fresh_mean']:.5f} |",
        f"| best {res['best_id']} | {res['best_fresh_mean']:.5f} |",
        f"| gain (paired, +- SE) | {pm(res['gain'], res['gain_se'])} |",
        f"| keeps that held up (> 0 / > 2 SE) | {held} / {beyond} of {len(res['keeps'])} |",
        "",
        "| keep | session gain | gain at fresh seeds (+- SE) | held up | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k in res["keeps"]:
        lines.append(f"| {k['id']} | {k['session_gain']:+.5f} | {pm(k['fresh_gain'], k['fresh_se'])} | "
                     f"{'yes' if k['held_up'] else 'no'}{' (> 2 SE)' if k['beyond_2se'] else ''} | "
                     f"{k['description']} |")
    r, s = res["runs"], res["seconds"]
    lines += ["", f"runs (seconds): baseline + noise {r['baseline_and_noise']} ({s['baseline_and_noise']} s), "
                  f"steps {r['steps']} ({s['steps']} s), check {r['check']} ({s['check']} s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="100k-tokens", help="a token budget, e.g. 100k-tokens (default)")
    parser.add_argument("--steps", type=int, default=10, help="autopilot steps (default 10)")
    parser.add_argument("--seeds", type=int, default=3, help="fresh seeds for the check, >= 2 (default 3)")
    parser.add_argument("--noise-runs", type=int, default=None, help="the lab's noise runs (default: the lab's, 2)")
    parser.add_argument("--proposer-seed", type=int, default=0, help="the mutate proposer's seed (default 0)")
    parser.add_argument("--data", default=None, help="prepared data directory (default: config.data_dir())")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a standard error needs two pairs)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    res = run(args.budget, args.steps, args.seeds, args.noise_runs, args.proposer_seed, args.data)
    print(report(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
