"""Isolation of a candidate's process: bubblewrap on Linux, a loud warning elsewhere.

    from autoresearch_kit import sandbox
    iso = sandbox.isolation()           # Isolation(mechanism="bwrap", reason=...) or mechanism "none"
    argv, env = sandbox.wrap(argv, env, iso, files=workdir / "files", cache=..., device_type="cpu")

Under bubblewrap (`bwrap`, Debian/Ubuntu package `bubblewrap`, the sandbox Flatpak uses;
it needs unprivileged user namespaces, or root) a candidate runs in namespaces of its own:

- **files**: a root made of read-only system directories (/usr, /lib*, /bin, /etc), the
  Python installation (its prefix and site-packages) and the kit's own package at
  /opt/autoresearch with its built-in corpus hidden. Writable: its run directory (at
  /run/candidate, the cwd), a private /tmp (HOME and TMPDIR), and on CUDA a compile
  cache of its own source (/run/cache). Nothing else is in sight: not the lab (ledger,
  git, program.md, other runs), not the prepared data, not the user's home or caches.
- **processes**: a PID namespace, so it sees only its own processes and every process it
  starts dies with it; `--die-with-parent` ties the namespace to the runner.
- **network**: a network namespace with only a loopback of its own: no network.
- **GPU**: /dev/nvidia* are bound in, /sys read-only, so CUDA works inside.

AUTORESEARCH_SANDBOX chooses: `auto` (default: bubblewrap where it works, else a one-time
warning and no isolation), `require` (refuse to run without it), `off`. Every RunResult
says which isolation it ran under (`extra["isolation"]`).

Stdlib only: the runner imports this module.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil
import site
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from autoresearch_kit import config

log = logging.getLogger(__name__)

MODES = ("auto", "require", "off")
CANDIDATE_DIR = "/run/candidate"   # the run directory, as the candidate sees it (its cwd)
CACHE_DIR = "/run/cache"           # its compile cache (CUDA)
KIT_ROOT = "/opt/autoresearch"     # the kit's package is at KIT_ROOT/autoresearch_kit
_SYSTEM_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_warned = False


@dataclass(frozen=True)
class Isolation:
    """How candidates run here: mechanism "bwrap" or "none", and why."""

    mechanism: str
    reason: str

    @property
    def isolated(self) -> bool:
        return self.mechanism != "none"

    def describe(self) -> str:
        return self.mechanism if self.isolated else f"none ({self.reason})"


def mode(value: str | None = None) -> str:
    """auto | require | off, from `value` or AUTORESEARCH_SANDBOX (default auto)."""
    raw = (value if value is not None else config.env("SANDBOX") or "auto").strip().lower()
    aliases = {"1": "require", "true": "require", "yes": "require", "on": "auto", "0": "off",
               "false": "off", "no": "off", "none": "off"}
    raw = aliases.get(raw, raw)
    if raw not in MODES:
        msg = f"AUTORESEARCH_SANDBOX / sandbox= must be one of {', '.join(MODES)}, got {value or raw!r}."
        raise ValueError(msg)
    return raw


@functools.lru_cache(maxsize=1)
def _bwrap() -> tuple[str | None, str]:
    """(path to a working bwrap, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"bubblewrap is Linux-only ({sys.platform})"
    path = shutil.which("bwrap")
    if path is None:
        return None, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        probe = subprocess.run([path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
                                "--proc", "/proc", "--dev", "/dev", "true"],
                               capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"bubblewrap did not start ({e})"
    if probe.returncode != 0:
        err = probe.stderr.decode(errors="replace").strip().splitlines()
        return None, ("bubblewrap cannot create namespaces here (" + (err[-1] if err else f"exit {probe.returncode}")
                      + "; unprivileged user namespaces may be off: sysctl kernel.unprivileged_userns_clone=1)")
    return path, ""


def isolation(mode_value: str | None = None) -> Isolation:
    """The isolation candidates get under `mode_value` (default AUTORESEARCH_SANDBOX).

    Raises
    ------
    RuntimeError
        In `require` mode where no mechanism works, with what to install.
    """
    m = mode(mode_value)
    if m == "off":
        return Isolation("none", "AUTORESEARCH_SANDBOX=off")
    path, why = _bwrap()
    if path is not None:
        return Isolation("bwrap", "bubblewrap: own mount, PID and network namespaces")
    if m == "require":
        msg = f"A sandbox is required (AUTORESEARCH_SANDBOX=require) but none works here: {why}."
        raise RuntimeError(msg)
    global _warned
    if not _warned:
        _warned = True
        text = (f"autoresearch: candidates run WITHOUT a sandbox: {why}. A candidate can read the "
                "validation data and change the lab; set AUTORESEARCH_SANDBOX=require to refuse instead.")
        log.warning(text)
        print(text, file=sys.stderr, flush=True)
    return Isolation("none", why)


def kit_package() -> Path:
    return Path(__file__).resolve().parent


def _python_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        dirs.add(user)
    out = []
    for d in sorted(dirs, key=len):
        p = os.path.realpath(d)
        if os.path.isdir(p) and not any(p == o or p.startswith(o + os.sep) for o in out):
            out.append(p)
    return out


# Tools the candidate's libraries call by a path from the environment: torch.compile's
# Triton builds a helper with $CC (on the H200 box CC=/opt/gcc/bin/gcc: outside /usr, so
# every compiled run died with FileNotFoundError until its folder was bound in).
_TOOL_VARS = ("CC", "CXX", "CUDA_HOME", "CUDA_PATH", "TRITON_PTXAS_PATH", "TRITON_CUOBJDUMP_PATH",
              "TRITON_NVDISASM_PATH")


def _private_roots(hide: list[Path] = ()) -> list[str]:
    """Host paths no folder a variable names may expose: the user's home, the kit's cache (the
    prepared data, other runs' compile caches), and what the caller hides (data, lab)."""
    roots = [os.path.expanduser("~"), str(config.cache_dir()), *(str(h) for h in hide)]
    return [os.path.realpath(r) for r in roots if r and os.path.isabs(r) and os.path.realpath(r) != "/"]


def _exposes(d: str, private: list[str]) -> bool:
    """Whether binding `d` shows any private path: d is one, holds one, or lies inside one."""
    return any(_under(r, [d]) or _under(d, [r]) for r in private)


# Folders of English text on a typical system (licences, manuals, package docs): a candidate
# could pretrain on them before the clock starts. Empty inside the sandbox.
_TEXT_DIRS = ("/usr/share/doc", "/usr/share/common-licenses", "/usr/share/man", "/usr/share/info",
              "/usr/share/dict", "/usr/share/licenses")


def _tool_dirs(env: dict[str, str], hide: list[Path] = ()) -> list[str]:
    """Read-only paths for the compilers and libraries the environment names.

    The toolchain folder of a tool (/opt/gcc for /opt/gcc/bin/gcc), or only the tool itself
    when that folder would show a private path (CC=~/bin/gcc must not bind the home, with the
    prepared data and the lab in it); a library folder that would is left out. The variables
    are the user's, but what they mount is checked on the result, not trusted.
    """
    private = _private_roots(hide)
    out: list[str] = []
    for var in _TOOL_VARS:
        value = env.get(var, "")
        if not os.path.isabs(value) or not os.path.exists(value):
            continue
        p = tool = os.path.realpath(value)
        if os.path.isfile(p):
            p = os.path.dirname(p)
            if os.path.basename(p) == "bin":  # /opt/gcc/bin/gcc: the toolchain is /opt/gcc
                p = os.path.dirname(p)
        if _exposes(p, private) or p in ("/", "/home", "/root", "/tmp", "/work"):
            if os.path.isfile(tool) and not _under(tool, private[1:]):
                p = tool      # just the file (in the home, say), never one in the cache, the data or the lab
            else:
                log.warning("sandbox: %s=%s would show private files (home, data, cache); not bound", var, value)
                continue
        out.append(p)
    for lib in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if os.path.isabs(lib) and os.path.isdir(lib):
            d = os.path.realpath(lib)
            if _exposes(d, private) or d in ("/", "/home", "/root", "/tmp", "/work"):
                log.warning("sandbox: LD_LIBRARY_PATH entry %s would show private files (home, data, cache); "
                            "not bound", lib)
                continue
            out.append(d)
    return out


def compile_cache(source: str) -> Path:
    """The compile cache of one candidate source: reruns of the same train.py share it,
    and no other candidate can read or poison it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return config.cache_dir() / "compile" / digest


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _view(env: dict[str, str], device_type: str, hide: list[Path],
          die_with_parent: bool = True) -> tuple[list[str], list[str]]:
    """bubblewrap's arguments for the read-only view every sandbox shares, and the
    directories it makes readable (as the candidate sees them)."""
    bwrap, _ = _bwrap()
    assert bwrap is not None
    args = [bwrap, "--unshare-all", "--new-session", "--cap-drop", "ALL"]
    if die_with_parent:
        args.insert(2, "--die-with-parent")
    bound: list[str] = []
    for d in _SYSTEM_RO:
        if os.path.exists(d):
            args += ["--ro-bind", d, d]
            bound.append(os.path.realpath(d))
    for d in _python_dirs():
        if not _under(d, bound):
            args += ["--ro-bind", d, d]
            bound.append(d)
    pkg = str(kit_package())
    inner_pkg = f"{KIT_ROOT}/autoresearch_kit"
    args += ["--ro-bind", pkg, inner_pkg]
    if os.path.isdir(os.path.join(pkg, "data", "builtin")):
        # the built-in corpus holds the val text: an empty, read-only folder in its place
        args += ["--tmpfs", f"{inner_pkg}/data/builtin", "--remount-ro", f"{inner_pkg}/data/builtin"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/tmp/home"]
    for d in _tool_dirs(env, hide):  # after /tmp's tmpfs, which would hide one under /tmp
        if not _under(d, bound):
            args += ["--ro-bind", d, d]
            bound.append(d)
    for d in _TEXT_DIRS:   # English text to pretrain on before the clock: not the candidate's
        if os.path.isdir(d) and _under(d, bound):
            args += ["--tmpfs", d, "--remount-ro", d]
    for h in hide:   # last: a mask applies only under the binds made before it
        p = os.path.realpath(str(h))
        if os.path.exists(p) and _under(p, bound) and os.path.isdir(p):
            args += ["--tmpfs", p]
    if os.path.isdir("/sys"):
        args += ["--ro-bind", "/sys", "/sys"]
    if device_type.split(":")[0] == "cuda":
        for dev in sorted(glob.glob("/dev/nvidia*")) + sorted(glob.glob("/dev/dri")):
            args += ["--dev-bind", dev, dev]
    return args, bound + [KIT_ROOT]


def _inner_env(env: dict[str, str]) -> dict[str, str]:
    child = {k: v for k, v in env.items()
             if k not in ("AUTORESEARCH_DATA", "AUTORESEARCH_CACHE", "PYTHONPATH", "PYTHONHOME",
                          "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "OLDPWD", "PWD")}
    child.update(HOME="/tmp/home", TMPDIR="/tmp", PYTHONPATH=KIT_ROOT, XDG_CACHE_HOME="/tmp/home/.cache",
                 AUTORESEARCH_CACHE="/tmp/home/.cache/autoresearch_kit", PWD=CANDIDATE_DIR)
    return child


def wrap(argv: list[str], env: dict[str, str], iso: Isolation, *, files: Path, cache: Path | None,
         device_type: str, hide: list[Path] = ()) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run `argv` (a Python command run in `files`) inside
    the sandbox. `hide` are host paths to mask if a bound directory happens to contain them
    (the data, the lab). Without isolation, returns them unchanged."""
    if not iso.isolated:
        return argv, env
    args, _ = _view(env, device_type, list(hide))
    files.mkdir(parents=True, exist_ok=True)
    args += ["--bind", str(files), CANDIDATE_DIR, "--chdir", CANDIDATE_DIR]
    child = _inner_env(env)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        args += ["--bind", str(cache), CACHE_DIR]
        child.update(TORCHINDUCTOR_CACHE_DIR=f"{CACHE_DIR}/inductor", TRITON_CACHE_DIR=f"{CACHE_DIR}/triton")
    args += ["--remount-ro", "/"]  # the sandbox's own root (mount points, /root, /opt): read-only too
    return args + ["--"] + argv, child


# --------------------------------------------------------------------------- fork server
# On a GPU a fresh `python train.py` pays ~15 s of imports (torch, dynamo, inductor) per
# experiment; the fork server pays them once. Sandboxed, the server itself runs inside one
# bubblewrap sandbox, and each child it forks restricts itself with Landlock (landlock.py)
# to its own run directory before train.py's first line: the other runs of the same server
# are out of its reach. Runs are staged under RUNS_DIR, then moved to runs/<id>/files/.

RUNS_DIR = "/run/runs"             # inside the server's sandbox: <RUNS_DIR>/<run id>/ per run
_LANDLOCK_MIN_ABI = 1
_stage_root: Path | None = None


def forked_isolation() -> bool:
    """Whether sandboxed runs may fork from a sandboxed server here (Landlock available)."""
    from autoresearch_kit import landlock

    return landlock.abi() >= _LANDLOCK_MIN_ABI and _bwrap()[0] is not None


def stage_root() -> Path:
    """This process's folder for the runs of its sandboxed fork server (made once, removed at exit)."""
    global _stage_root
    if _stage_root is None:
        import atexit
        import tempfile

        base = config.cache_dir() / "sandbox"
        base.mkdir(parents=True, exist_ok=True)
        _stage_root = Path(tempfile.mkdtemp(prefix=f"runs-{os.getpid()}-", dir=base))
        atexit.register(shutil.rmtree, _stage_root, True)
    return _stage_root


def server_wrap(device_type: str, hide: list[Path] = ()):
    """The function forkserver uses to start its server inside bubblewrap."""

    def wrap_server(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        # Not --die-with-parent: that is the parent *thread* (PR_SET_PDEATHSIG), and the server
        # outlives the thread that starts it (runner.prestart's); it exits when the runner's
        # end of its control socket closes, and its children with it.
        args, _ = _view(env, device_type, list(hide), die_with_parent=False)
        cache = config.cache_dir() / "compile"
        cache.mkdir(parents=True, exist_ok=True)
        args += ["--bind", str(stage_root()), RUNS_DIR, "--bind", str(cache), CACHE_DIR, "--chdir", RUNS_DIR,
                 "--remount-ro", "/"]
        child = _inner_env(env)
        child["PWD"] = RUNS_DIR
        return args + ["--"] + argv, child

    return wrap_server


@dataclass
class StagedRun:
    """One run of the sandboxed fork server: where it lives on each side, its env and rules."""

    host_dir: Path
    scratch: Path
    inner_dir: str
    env: dict[str, str]
    policy: dict[str, list[str]]

    def unstage(self, files: Path) -> None:
        """Move what the run left into `files` (runs/<id>/files/) and drop its scratch."""
        files.mkdir(parents=True, exist_ok=True)
        for p in list(self.host_dir.iterdir()) if self.host_dir.is_dir() else []:
            # What the candidate left is its own: a FIFO, a socket or a device node is not
            # kept, and nothing it made may stop the runner's clean-up (a move across file
            # systems copies, and copying a FIFO raises).
            try:
                mode = p.lstat().st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                    continue
                target = files / p.name
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                shutil.move(str(p), str(target))
            except (OSError, shutil.Error) as e:
                log.warning("left %s of the run behind: %s", p.name, e)
        shutil.rmtree(self.host_dir, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def stage(run_id: str, source: str, env: dict[str, str], device_type: str) -> StagedRun:
    """Write train.py for a run of the sandboxed fork server; its environment and Landlock rules."""
    root = stage_root()
    host_dir, scratch = root / run_id, root / f"{run_id}.scratch"
    (scratch / "home").mkdir(parents=True)
    (scratch / "tmp").mkdir()
    host_dir.mkdir()
    (host_dir / "train.py").write_text(source)
    inner, inner_scratch = f"{RUNS_DIR}/{run_id}", f"{RUNS_DIR}/{run_id}.scratch"
    child = _inner_env(env)
    child.update(HOME=f"{inner_scratch}/home", TMPDIR=f"{inner_scratch}/tmp", PWD=inner,
                 XDG_CACHE_HOME=f"{inner_scratch}/home/.cache",
                 AUTORESEARCH_CACHE=f"{inner_scratch}/home/.cache/autoresearch_kit")
    write = [inner, inner_scratch, "/dev"]
    if device_type.split(":")[0] == "cuda":
        digest = compile_cache(source).name
        (config.cache_dir() / "compile" / digest).mkdir(parents=True, exist_ok=True)
        child.update(TORCHINDUCTOR_CACHE_DIR=f"{CACHE_DIR}/{digest}/inductor",
                     TRITON_CACHE_DIR=f"{CACHE_DIR}/{digest}/triton")
        write.append(f"{CACHE_DIR}/{digest}")
    _, readable = _view(env, device_type, [])
    read = sorted(set(readable) | {"/proc", "/sys"})
    return StagedRun(host_dir, scratch, inner, child, {"read": read, "write": write})


def isolation_label(record: dict) -> str:
    """A record's isolation in one word, for tables: sandbox, UNSANDBOXED, or - (never ran)."""
    iso = str((record.get("extra") or {}).get("isolation") or "")
    if not iso:
        return "-"
    return "UNSANDBOXED" if iso.startswith("none") else "sandbox"


def returncode(code: int | None, iso: Isolation) -> int | None:
    """bubblewrap exits 128 + N when the candidate died of signal N: report it as -N, like Popen."""
    if code is not None and iso.mechanism == "bwrap" and 128 < code <= 128 + 64:
        return -(code - 128)
    return code
