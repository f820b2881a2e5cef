"""Driver for the 2026-12-01 H200 measurement of the sandboxed fork server (bench/gpu.py, unchanged).

(Replaces the first call's driver, 2026-12-01-h200-sandbox-driver.py, removed), plus: RunResult.extra["eval"] in each row and the
[extra] line, `landlock` (the kernel's Landlock ABI and sandbox.forked_isolation()), and
STOP_ON_FAIL=1 (exit 3 after the first run that is not ok).

    python3 bench/results/2026-12-01-h200-forked-sandbox-driver.py probe
    EXTRA_OUT=x.json python3 bench/results/2026-12-01-h200-forked-sandbox-driver.py run --budgets 60s --out y.json

`run ...` is bench/gpu.py's `main` with run_budgeted wrapped, so that each run's
RunResult.extra (isolation, forkserver, timings, exit code), the runner's eval seconds and
the run.log tail also land in EXTRA_OUT (bench/gpu.py's rows do not carry them).
`probe` starts one CUDA child through sandbox.wrap (the runner's own bwrap arguments)
and reports what works inside: torch.cuda, a matmul, NVML (nvidia-smi), timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

_PROBE_CHILD = r"""
import os, sys, time, shutil, subprocess
t0 = time.time()
print("inside: uid", os.getuid(), "pid", os.getpid(), "cwd", os.getcwd(), flush=True)
print("inside: /dev/nvidia*", sorted(p for p in os.listdir("/dev") if p.startswith("nvidia")), flush=True)
print("inside: /proc/driver/nvidia", os.path.isdir("/proc/driver/nvidia"), flush=True)
import torch
print(f"inside: import torch {time.time() - t0:.1f}s", flush=True)
ok = torch.cuda.is_available()
print("inside: cuda available", ok, flush=True)
if ok:
    print("inside:", torch.cuda.get_device_name(0), "free/total", torch.cuda.mem_get_info(), flush=True)
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    print("inside: matmul", float((x @ x).float().abs().mean()), f"{time.time() - t0:.1f}s", flush=True)
smi = shutil.which("nvidia-smi")
print("inside: nvidia-smi at", smi, flush=True)
if smi:
    r = subprocess.run([smi, "-L"], capture_output=True, text=True)
    print("inside: nvidia-smi -L rc", r.returncode, (r.stdout + r.stderr).strip()[:500], flush=True)
try:
    import pynvml
    pynvml.nvmlInit()
    print("inside: pynvml", pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)), flush=True)
except Exception as e:
    print("inside: pynvml failed", type(e).__name__, e, flush=True)
print(f"inside: done {time.time() - t0:.1f}s", flush=True)
"""


def probe() -> None:
    from autoresearch_kit import sandbox

    print("LD_LIBRARY_PATH", os.environ.get("LD_LIBRARY_PATH"), "| python", sys.executable,
          os.path.realpath(sys.executable), "| prefix", sys.prefix, sys.base_prefix, flush=True)
    print("python dirs bound:", sandbox._python_dirs(), flush=True)
    print("top-level dirs not bound by the sandbox:",
          sorted(d for d in os.listdir("/") if os.path.isdir("/" + d) and "/" + d not in sandbox._SYSTEM_RO
                 and not any(p.startswith("/" + d + "/") or p == "/" + d for p in sandbox._python_dirs())), flush=True)
    for d in ("/usr/local/nvidia", "/usr/local/cuda", "/opt"):
        if os.path.exists(d):
            print(d, "->", os.path.realpath(d), sorted(os.listdir(d))[:20], flush=True)
    iso = sandbox.isolation("require")
    print("isolation:", iso, flush=True)
    files = Path(tempfile.mkdtemp(prefix="probe-")) / "files"
    argv, env = sandbox.wrap([sys.executable, "-c", _PROBE_CHILD], dict(os.environ), iso, files=files,
                             cache=None, device_type="cuda")
    print("bwrap argv:", " ".join(argv[:-4]), "-- python -c <probe>", flush=True)
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    print(f"probe child rc {r.returncode} in {time.perf_counter() - t:.1f}s", flush=True)
    print(r.stdout + r.stderr[-4000:], flush=True)


def run(argv: list[str]) -> None:
    from autoresearch_kit import runner

    out = Path(os.environ["EXTRA_OUT"]) if os.environ.get("EXTRA_OUT") else None
    rows: list[dict] = []
    real = runner.run_budgeted

    def wrapped(*a, **kw):
        res = real(*a, **kw)
        try:
            log_text = Path(res.log_path).read_text(errors="replace")
        except OSError:
            log_text = ""
        steps = [ln for ln in log_text.splitlines() if ln.startswith("step ")]
        row = {"budget": str(res.budget), "status": res.status, "reason": res.reason, "val_bpb": res.val_bpb,
               "isolation": res.extra.get("isolation"), "forkserver": res.extra.get("forkserver"),
               "exit_code": res.extra.get("exit_code"), "eval": res.extra.get("eval"), "timings": res.extra.get("timings"),
               "wall_seconds": res.wall_seconds, "training_seconds": res.training_seconds,
               "total_seconds": res.total_seconds, "eval_seconds": res.eval_seconds, "eval_tokens": res.eval_tokens,
               "peak_memory_gb": res.peak_memory_gb, "mfu": res.mfu, "steps": res.steps, "tokens": res.tokens,
               "device": res.device, "torch": res.torch_version, "sandbox_env": os.environ.get("AUTORESEARCH_SANDBOX"),
               "log_head": "\n".join(log_text.splitlines()[:12]), "log_steps_last": steps[-3:],
               "log_tail": "\n".join(log_text.splitlines()[-40:]) if res.status == "ok" else log_text[-6000:]}
        rows.append(row)
        print(f"[extra] {row['status']} isolation={row['isolation']} forkserver={row['forkserver']} "
              f"eval_seconds={row['eval_seconds']} eval={row['eval']} timings={row['timings']}", flush=True)
        if out is not None:
            out.write_text(json.dumps(rows, indent=1, default=str))
        if res.status != "ok" and os.environ.get("STOP_ON_FAIL") == "1":
            print("[extra] STOP_ON_FAIL: log tail follows\n" + row["log_tail"], flush=True)
            raise SystemExit(3)
        return res

    runner.run_budgeted = wrapped
    import gpu

    gpu.main(argv)


def landlock_info() -> None:
    from autoresearch_kit import landlock, sandbox

    try:
        lsm = Path("/sys/kernel/security/lsm").read_text().strip()
    except OSError as e:
        lsm = f"unreadable ({e})"
    print("lsm:", lsm, "| landlock abi:", landlock.abi(), "| bwrap:", sandbox._bwrap(),
          "| forked_isolation:", sandbox.forked_isolation(), "| CC", os.environ.get("CC"),
          "CXX", os.environ.get("CXX"), "| tool dirs:", sandbox._tool_dirs(dict(os.environ)), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["landlock"]:
        landlock_info()
    elif sys.argv[1:2] == ["probe"]:
        probe()
    else:
        run(sys.argv[1:])
