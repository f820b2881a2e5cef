"""How many seeds a stable noise estimate needs: sigma and the paired-difference SD
as functions of the number of seeds, on this machine.

    AUTORESEARCH_DEVICE=cpu python scripts/paired_noise.py --budget 10k-tokens --seeds 8
    python scripts/paired_noise.py --budget 10k-tokens --seeds 8 --edit "MATRIX_LR=0.03" --json out.json

Creates a lab (the repository's train.py, the prepared data `config.data_dir()` finds,
noise runs off), runs its baseline and one candidate (`--edit KNOB=VALUE`, a real change of
the kind the offline proposer makes) at seeds 42..42+S-1 each, then prints, for every
m = 2..S: sigma (stdev of the baseline's m scores), the paired SD (stdev of the m
differences parent - candidate at the same seeds), the paired standard error SD/sqrt(m),
and how much each estimate moves between the C(S, m) subsets of m seeds (relative
spread: stdev over subsets / the S-seed value). Figures go to docs/NOISE.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the kit of this checkout, installed or not


def _edit(source: str, edit: str) -> str:
    knob, value = (s.strip() for s in edit.split("=", 1))
    lines = source.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(f"{knob} =")]
    if not hits:
        msg = f"--edit {edit!r}: train.py has no line '{knob} = ...'; name one of its knobs."
        raise SystemExit(msg)
    lines[hits[0]] = f"{knob} = {value}"
    return "\n".join(lines) + "\n"


def _spread(values: list[float], m: int, stat) -> tuple[float, float]:
    """(stat over the first m values, relative stdev of stat over every m-subset)."""
    subsets = [stat(list(c)) for c in itertools.combinations(values, m)]
    full = stat(values)
    spread = statistics.stdev(subsets) / full if full and len(subsets) >= 2 else 0.0   # m = S: one subset
    return stat(values[:m]), spread


def measure(budget: str, seeds: int, edit: str) -> dict:
    from autoresearch_kit.lab import Lab
    from autoresearch_kit.propose.base import Proposal

    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp) / "lab", train=ROOT / "train.py", program=ROOT / "program.md", budget=budget,
                  proposer="mutate", noise_runs=0, verbose=False)
        try:
            t0 = time.time()
            base = lab.baseline()
            if base["status"] != "ok":
                msg = f"baseline {base['status']}: {base['reason']}"
                raise SystemExit(msg)
            src = lab.workspace.source(base["id"])
            cand = lab.run_budgeted(Proposal.from_source(src, _edit(src, edit), edit, parent_id=base["id"]))
            cid = cand.extra["exp_id"]
            if not cand.ok:
                msg = f"candidate {cand.status}: {cand.reason}"
                raise SystemExit(msg)
            lab.confirm(cid, k=seeds - 1)      # the candidate and its parent at seeds 43..42+S-1
            per_run = (time.time() - t0) / (2 * seeds)
            par, can = lab._seed_scores(base["id"]), lab._seed_scores(cid)
            common = sorted(set(par) & set(can))
            p = [par[s] for s in common]
            d = [par[s] - can[s] for s in common]
            rows = []
            for m in range(2, len(common) + 1):
                sig, sig_spread = _spread(p, m, statistics.stdev)
                sd, sd_spread = _spread(d, m, statistics.stdev)
                rows.append({"m": m, "sigma": sig, "sigma_rel_spread": sig_spread, "paired_sd": sd,
                             "paired_sd_rel_spread": sd_spread, "paired_se": sd / m ** 0.5,
                             "gain": statistics.fmean(d[:m])})
            return {"budget": budget, "edit": edit, "seeds": common, "parent": p, "candidate": [can[s] for s in common],
                    "rows": rows, "seconds_per_run": round(per_run, 1),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"}
        finally:
            lab.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10k-tokens")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per side (>= 3)")
    parser.add_argument("--edit", default="MATRIX_LR = 0.03", help="the candidate: KNOB=VALUE in train.py")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.seeds < 3:
        parser.error("--seeds must be at least 3")
    res = measure(args.budget, args.seeds, args.edit)
    print(f"{res['budget']}, candidate {res['edit']!r}, {len(res['seeds'])} seeds, {res['seconds_per_run']} s a run, "
          f"{res['machine']}")
    print("| m | sigma | rel. spread | paired SD | rel. spread | paired SE | gain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        print(f"| {r['m']} | {r['sigma']:.5f} | {r['sigma_rel_spread']:.0%} | {r['paired_sd']:.5f} | "
              f"{r['paired_sd_rel_spread']:.0%} | {r['paired_se']:.5f} | {r['gain']:+.5f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
