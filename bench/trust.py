"""The trusted side on this machine: honest runs pass every check, hostile ones do not.

    python bench/trust.py                      # the real train.py, 20 s, twice; then the attacks
    python bench/trust.py --budget 60s --out bench/results/trust.json

Each row is a real experiment through `run_budgeted` (the device's default isolation; set
AUTORESEARCH_SANDBOX=require to insist on it): status, val_bpb, the probes' and the
recheck's largest difference (0.0: the honest model answered to the bit, its rows in other
batches of the same shape), the first answer at finish against its allowance, the
evaluation's time and the warm-up tokens (random ids, not counted). The attacks are the
classes of docs/THREAT_MODEL.md that depend on the device's timing and kernels:

    batch-mates   a bigram table of the whole batch mixed into each answer
    hoard         the cool-down inside run.finish: the first forward trains on kept batches
    after-ttt     after answering a batch, train on its rows (later batches see a changed model)

An honest run must be `ok`; an attack must not be `ok` with a better score than honest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from autoresearch_kit import config, integrity  # noqa: E402
from autoresearch_kit.runner import run_budgeted  # noqa: E402

BATCH_CACHE = """
class _BatchCache(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, idx):
        logits = self.m(idx).float()
        V = logits.size(-1)
        C = torch.zeros(V, V, device=idx.device)
        a, b = idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)
        C.index_put_((a, b), torch.ones(a.numel(), device=idx.device), accumulate=True)
        cnt = C[idx]
        tot = cnt.sum(-1, keepdim=True)
        p = torch.softmax(logits, -1)
        return torch.where(tot > 0, 0.5 * p + 0.5 * cnt / tot.clamp(min=1), p).clamp(min=1e-30).log()
model = _BatchCache(model)
"""

TTT = """
import torch.nn.functional as _F
class _TTT(torch.nn.Module):
    def __init__(self, m, mode, hoard):
        super().__init__(); self.m = m; self.mode = mode; self.hoard = hoard; self.done = False
    def _train(self, batches, seconds):
        _opt = torch.optim.AdamW(self.m.parameters(), lr=3e-4)
        end = __import__("time").monotonic() + seconds
        with torch.enable_grad():
            while __import__("time").monotonic() < end:
                for x, y in batches:
                    with torch.autocast("cuda", torch.bfloat16):
                        lg = self.m(x).float()
                    loss = _F.cross_entropy(lg.reshape(-1, lg.size(-1)), y.reshape(-1))
                    loss.backward(); _opt.step(); _opt.zero_grad(set_to_none=True)
                    torch.clear_autocast_cache()
    def forward(self, idx):
        if self.mode == "hoard" and not self.done:
            self._train(self.hoard[-64:], 10.0)
        elif self.mode == "after" and self.done:
            self._train([(self.last[:, :-1], self.last[:, 1:])], 1.0)
        self.done, self.last = True, idx
        return self.m(idx)
model = _TTT(model, %r, _hoard)
"""


def _edit(src: str, old: str, new: str) -> str:
    assert old in src, f"train.py no longer contains {old!r}"
    return src.replace(old, new, 1)


def candidates() -> dict[str, str]:
    src = (REPO / "train.py").read_text()
    finish = "\nrun.finish(model)"
    hoarding = _edit(_edit(src, "    x, y = next(loader)", "    x, y = next(loader)\n    _hoard.append((x, y))"),
                     "\nstep = 0\n", "\n_hoard = []\nstep = 0\n")
    return {
        "honest": src,
        "honest-again": src,
        "batch-mates": _edit(src, finish, "\n" + BATCH_CACHE + finish),
        "hoard": _edit(hoarding, finish, "\n" + TTT % "hoard" + finish),
        "after-ttt": _edit(hoarding, finish, "\n" + TTT % "after" + finish),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="20s")
    ap.add_argument("--only", nargs="*", help="names of the candidates to run (default: all)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    integrity.check_source = lambda source: []   # the sandbox and the runner are the wall here
    rows = []
    for name, src in candidates().items():
        if args.only and name not in args.only:
            continue
        t = time.monotonic()
        res = run_budgeted(src, args.budget)
        ev = res.extra.get("eval") or {}
        rows.append({"name": name, "status": res.status, "val_bpb": res.val_bpb, "reason": res.reason[:160],
                     "probe_max_diff": ev.get("probe_max_diff"), "probes": ev.get("probes"),
                     "rechecked": ev.get("rechecked"), "batch_rows": ev.get("batch_rows"),
                     "first_answer": ev.get("first_answer"), "eval_seconds": res.eval_seconds,
                     "warmup_tokens": res.extra.get("warmup_tokens"), "tokens": res.tokens,
                     "isolation": res.extra.get("isolation"), "wall": round(time.monotonic() - t, 1),
                     "device": res.device})
        if args.out:
            args.out.write_text(json.dumps({"budget": args.budget, "data": str(config.data_dir()), "rows": rows},
                                           indent=1))
    print(f"device: {rows[0]['device'] if rows else '?'} | budget {args.budget} | isolation "
          f"{rows[0]['isolation'] if rows else '?'}")
    print(f"{'run':<13} {'status':<8} {'val_bpb':>8} {'probe/recheck diff':>18} {'first answer (allowed)':>23} "
          f"{'eval s':>7} {'warm-up ids':>11}  reason")
    for r in rows:
        fa = r["first_answer"]
        print(f"{r['name']:<13} {r['status']:<8} {r['val_bpb'] or float('nan'):>8.4f} "
              f"{r['probe_max_diff'] if r['probe_max_diff'] is not None else '-':>18} "
              f"{(f'{fa[0]:.2f} ({fa[1]:.2f})' if fa else '-'):>23} {r['eval_seconds'] or 0:>7.2f} "
              f"{r['warmup_tokens'] or 0:>11,}  {r['reason'][:70]}")


if __name__ == "__main__":
    main()
