"""Why a child of the sandboxed fork server sees no CUDA (error 304) on the H200: a bisect.

Run on the H200 on 2026-12-01 (output: 2026-12-01-h200-forked-sandbox-bisect.log): only a writable "/" made CUDA work, which led to the fix (/proc writable: the driver writes /proc/self/task/<tid>/comm).
Run on the device, bwrap unpacked as before:

    PATH=/tmp/bw/usr/bin:$PATH python3 bench/results/2026-12-01-h200-forked-sandbox-bisect.py

It starts one bubblewrap sandbox with the fork server's view (sandbox._view for "cuda",
RUNS_DIR bound, --remount-ro /, as sandbox.server_wrap), imports torch there without CUDA
(PYTORCH_NVML_BASED_CUDA_CHECK=1, as the server), then forks one child per variant; each
child applies its variant, opens each /dev/nvidia* O_RDWR, then asks cudaGetDeviceCount and
runs one kernel. Variants: no Landlock; Landlock as forkserver._child applies it (the policy
of sandbox.stage: read the view + /proc + /sys, write the run dirs + /dev); the same with
"/" readable, /tmp writable, "/" writable; without the ABI 6 scopes; without the ABI 4 TCP rules; scopes alone.
Prints one line per variant; exit 0 always.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_INNER = r"""
import ctypes, glob, os, sys
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
sys.path.insert(0, "/opt/autoresearch")
from autoresearch_kit import landlock as L
import torch  # no CUDA yet, as in the fork server

READ = sys.argv[1].split(":")
WRITE = sys.argv[2].split(":")


def restrict(read, write, fs=True, net=True, scope=True):
    v = L.abi()
    fs_bits = L._handled_fs(v) if fs else 0
    attr = L._Ruleset(fs_bits, (L.NET_BIND_TCP | L.NET_CONNECT_TCP) if (net and v >= 4) else 0,
                      (L.SCOPE_ABSTRACT_UNIX | L.SCOPE_SIGNAL) if (scope and v >= 6) else 0)
    size = 24 if v >= 6 else 16 if v >= 4 else 8
    libc = L._libc()
    fd = libc.syscall(L._SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "create_ruleset")
    if fs:
        for paths, access in ((read, L._READ), (write, fs_bits)):
            for p in paths:
                try:
                    pfd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                allowed = access if os.path.isdir(p) else access & L._FILE_ONLY
                rule = L._PathBeneath(allowed, pfd)
                if libc.syscall(L._SYS_ADD_RULE, fd, L._RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"add_rule {p}")
                os.close(pfd)
    libc.prctl(38, 1, 0, 0, 0)
    if libc.syscall(L._SYS_RESTRICT, fd, 0) != 0:
        raise OSError(ctypes.get_errno(), "restrict_self")
    os.close(fd)


VARIANTS = {
    "fork, no landlock": None,
    "fork, landlock.restrict (the kit's)": lambda: L.restrict(read=READ, write=WRITE),
    "fork, landlock + '/' readable": lambda: restrict(READ + ["/"], WRITE),
    "fork, landlock + /tmp writable": lambda: restrict(READ, WRITE + ["/tmp"]),
    "fork, landlock + '/' writable": lambda: restrict(READ, WRITE + ["/"]),
    "fork, landlock, no scopes": lambda: restrict(READ, WRITE, scope=False),
    "fork, landlock, no TCP rules": lambda: restrict(READ, WRITE, net=False),
    "fork, landlock fs only (no net, no scopes)": lambda: restrict(READ, WRITE, net=False, scope=False),
    "fork, scopes only (no fs, no net)": lambda: restrict(READ, WRITE, fs=False, net=False),
}
print("landlock abi", L.abi(), "| read", READ, "| write", WRITE, flush=True)
for name, apply in VARIANTS.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = []
        try:
            os.setsid()
            if apply is not None:
                apply()
            for dev in sorted(glob.glob("/dev/nvidia*")):
                if os.path.isdir(dev):
                    continue
                try:
                    os.close(os.open(dev, os.O_RDWR))
                except OSError as e:
                    out.append(f"open {dev}: {e.strerror}")
            try:
                open("/proc/driver/nvidia/version").read()
            except OSError as e:
                out.append(f"read /proc/driver/nvidia/version: {e.strerror}")
            import warnings
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                n = torch.cuda.device_count()
            out.append(f"device_count {n}")
            out += [str(x.message).split(" (Triggered")[0][-160:] for x in ws]
            if n:
                x = torch.ones(1024, device="cuda")
                out.append(f"kernel ok {float((x + 1).sum())}")
        except BaseException as e:
            out.append(f"{type(e).__name__}: {e}"[:300])
        os.write(w, " | ".join(out).encode())
        os._exit(0)
    os.close(w)
    msg = b""
    while chunk := os.read(r, 65536):
        msg += chunk
    os.close(r)
    os.waitpid(pid, 0)
    print(f"{name:45s} {msg.decode(errors='replace')}", flush=True)
"""


def main() -> None:
    sys.path.insert(0, str(REPO))
    from autoresearch_kit import sandbox

    env = dict(os.environ)
    runs = Path(tempfile.mkdtemp(prefix="bisect-runs-"))
    (runs / "inner.py").write_text(_INNER)
    (runs / "run1").mkdir()
    (runs / "run1.scratch").mkdir()
    args, readable = sandbox._view(env, "cuda", [])
    read = sorted(set(readable) | {"/proc", "/sys"})
    write = [f"{sandbox.RUNS_DIR}/run1", f"{sandbox.RUNS_DIR}/run1.scratch", "/dev"]
    args += ["--bind", str(runs), sandbox.RUNS_DIR, "--chdir", sandbox.RUNS_DIR, "--remount-ro", "/", "--",
             sys.executable, f"{sandbox.RUNS_DIR}/inner.py", ":".join(read), ":".join(write)]
    inner_env = sandbox._inner_env(env)
    print("bwrap", shutil.which("bwrap"), "| CC", env.get("CC"), flush=True)
    r = subprocess.run(args, env=inner_env, capture_output=True, text=True, timeout=240)
    print(r.stdout, r.stderr[-3000:], f"rc {r.returncode}", flush=True)
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
