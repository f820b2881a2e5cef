"""A CPU evaluation of the whole val split through run_budgeted (docs/PERFORMANCE.md, issue 11).

    AUTORESEARCH_CACHE=/tmp/evcache python bench/results/2026-12-01-cpu-eval-whole-split.py DATA_DIR [N]
"""
import sys, json, time
from autoresearch_kit.runner import run_budgeted
data = sys.argv[1]
for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
    res = run_budgeted(open("train.py").read(), "10s", data_dir=data, device="cpu", eval_seq_len=256, sandbox="require", hard_limit=900)
    ev = res.extra.get("eval", {})
    t = res.extra.get("timings", {})
    print(json.dumps({"data": data.split("/")[-1], "status": res.status, "val_bpb": res.val_bpb, "eval_seconds": round(res.eval_seconds, 3),
                      "tokens": res.eval_tokens, "seq_len": ev.get("seq_len"), "timing": ev.get("timing"),
                      "logits_GB": round(ev.get("logits_bytes", 0) / 1e9, 3), "dtype": ev.get("logits_dtype"), "probes": ev.get("probes"),
                      "finish_to_result": round(t.get("result", 0) - t.get("finish", 0), 3), "reason": res.reason[:200]}), flush=True)
