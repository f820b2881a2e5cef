"""run_budgeted(): train one candidate train.py under a fixed budget, safely (parent side).

The runner, not train.py, owns the clock, the kill switch, the metric and the log:

    from autoresearch_kit.runner import run_budgeted
    result = run_budgeted(open("train.py").read(), "60s", on_event=print)
    result.status, result.val_bpb, result.reason

What happens, in order:

1. The candidate is parsed (a SyntaxError is a `crash` without running) and checked by
   `integrity.check_source` (problems give `invalid` without running). The prepared
   data is checked against its manifest's hashes.
2. It is written to `workdir/train.py` and started as `python train.py` in a session
   (process group) of its own, inside the sandbox (sandbox.py: bubblewrap, where it
   works; then its cwd is `workdir/files/`, the only place it can write), with one end
   of a socket (wire.py) as its only link to the runner. On Linux the child is killed
   when the runner's process dies (PR_SET_PDEATHSIG), so a killed kernel or CLI leaves
   no training behind.
3. Two threads work: one drains stdout+stderr into the log file (capped: head and tail
   kept) and an in-memory tail; the other is the run's server (serve.py), which answers
   the child: it serves and counts the training batches, keeps the clock, forwards step
   events to `on_event` (live curves), and at `run.finish` scores the model on logits
   the child computes for validation rows it sends. The caller's thread only waits, so
   a notebook kernel stays responsive.
4. At the hard limit, on `stop`, or on Ctrl-C the whole group is killed (SIGTERM,
   then SIGKILL); after every run stray descendants are hunted down too (same
   process group, same AUTORESEARCH_RUN_ID in /proc/<pid>/environ, or holding one of
   our pipes or the socket); in the sandbox its PID namespace ends with it.
5. The run is classified. `ok` needs a score made by the server with no rule broken
   (no batch or logged step after the budget, `finish` within the grace, a causal
   model); everything else is `crash`, `timeout`, `diverged`, `invalid` or `aborted`
   with a readable reason.

POSIX only (process groups, /proc on Linux). No signal handlers are installed in the
caller: it works from a Jupyter kernel as from a terminal. Run its tests with
`python -m pytest tests/test_runner.py -q`.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from autoresearch_kit import config, forkserver, integrity
from autoresearch_kit import sandbox as _sandbox

log = logging.getLogger(__name__)

STATUSES = ("ok", "crash", "timeout", "diverged", "invalid", "aborted")

# The log file keeps its first and last MiB: a crash's traceback is at the end, the
# configuration print-out at the start, and a candidate printing 10 GB must not fill
# the disk.
LOG_HEAD_BYTES = 1 << 20
LOG_TAIL_BYTES = 1 << 20
TAIL_LINES = 100              # kept in memory while running
FAILURE_TAIL_LINES = 40       # copied to RunResult.log_tail for a failed run
MAX_LINE_CHARS = 2000         # one printed line longer than this is cut in the tail
# Time between SIGTERM and SIGKILL: enough for Python to unwind, too short to matter.
TERM_GRACE_SECONDS = 2.0
# Default grace over a seconds budget: start-up (imports, data), torch.compile, the
# warm-up steps and the final evaluation are not counted in the budget, so the hard
# limit allows for them. Measured (bench/overhead.py): H100, the stock train.py, 30 s:
# 40 s over the budget with a cold compile cache, 20 s warm; a busy 2-core CPU, 20 s:
# 78 s over (36 s FLOP count + 3 warm-up steps, 22 s eval of 65k tokens).
DEFAULT_GRACE_SECONDS = {"cuda": 90.0, "mps": 120.0, "cpu": 120.0}
DEFAULT_GRACE_FRACTION = 0.25
# Token and FLOP budgets have no clock: the hard limit is a plain wall-clock cap.
DEFAULT_HARD_LIMIT_SECONDS = 600.0
EVENT_DRAIN_SECONDS = 2.0     # on_event may lag the child by this much at the end, no more
DIVERGED_EXIT_CODE = 3        # harness: exit code after a NaN/inf loss

# Linux: the training child is SIGKILLed when the runner dies (a notebook kernel killed
# or restarted, `kill -9` of the CLI), instead of training on until its hard limit with
# nobody reading its pipes. PR_SET_PDEATHSIG is set by this bootstrap, which then execs
# `python train.py` in the same process (same pid, same fds): preexec_fn would do it
# without the extra interpreter (~15 ms), but is unsafe in a process with threads (a
# kernel, the panel). The getppid() check covers a runner that died before prctl ran.
_PDEATHSIG_BOOT = """\
import os, sys
try:
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
except (ImportError, OSError, AttributeError):
    pass  # no prctl: the runner's hard limit and stray hunt still apply
if os.getppid() != int(sys.argv[1]):
    os._exit(1)  # the runner is gone already
try:  # out of memory, the kernel kills the candidate (and what it starts), not the runner
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
os.execv(sys.argv[2], sys.argv[2:])  # python train.py, or bwrap ... -- python train.py
"""

_OOM_PATTERNS = ("MemoryError", "out of memory", "OutOfMemoryError", "can't allocate memory",
                 "Cannot allocate memory", "std::bad_alloc")


@dataclass
class RunResult:
    """What one budgeted run produced. Only `ok` runs carry a val_bpb."""

    status: str                              # one of STATUSES
    val_bpb: float | None = None
    reason: str = ""                         # readable cause for any non-ok status
    steps: int = 0
    tokens: int = 0                          # training tokens, counted by the harness loader
    flops: float = 0.0                       # training FLOPs, counted by the harness
    peak_memory_gb: float | None = None
    mfu: float | None = None                 # model FLOPs utilisation, where peak FLOPs are known
    params: int | None = None
    training_seconds: float = 0.0            # budgeted training time (warm-up excluded)
    total_seconds: float = 0.0               # child's own start -> result, as it reported
    wall_seconds: float = 0.0                # parent: spawn -> exit, measured by the runner
    eval_seconds: float = 0.0
    eval_tokens: int = 0
    budget: str = ""                         # str(Budget)
    seed: int | None = None
    device: str = ""                         # e.g. "cuda: NVIDIA H100 80GB HBM3"
    torch_version: str = ""
    log_path: str = ""
    log_tail: str = ""                       # last lines of output, for crashes
    curve: list[dict[str, Any]] = field(default_factory=list)  # metric events (step, loss, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    def _repr_html_(self) -> str:
        """In a notebook: status, val_bpb, the numbers that matter and the loss curve."""
        from autoresearch_kit.ui.render import run_result_html

        return run_result_html(self, title=str(self.extra.get("exp_id", "")))

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- inputs


def _candidate_source(candidate: Any) -> str:
    """Source text from a string of code, a path, or a Proposal (its `.source`)."""
    if hasattr(candidate, "source") and isinstance(candidate.source, str):
        return candidate.source
    if isinstance(candidate, os.PathLike):
        return Path(candidate).read_text()
    if isinstance(candidate, str):
        # A one-line string naming an existing file is a path; anything else is code.
        if "\n" not in candidate and len(candidate) < 4096 and candidate.endswith(".py") \
                and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().read_text()
        return candidate
    msg = f"run_budgeted needs train.py source text, a path or a Proposal, got {type(candidate).__name__}."
    raise TypeError(msg)


def _detect_device_type() -> str:
    """cuda | mps | cpu: AUTORESEARCH_DEVICE, else device.detect(), else torch's view."""
    forced = config.env("DEVICE")
    if forced:
        return forced
    try:
        from autoresearch_kit.device import detect
    except ImportError:
        detect = None
    if detect is not None:
        return detect().type
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _hard_limit(budget: config.Budget, hard_limit: float | None, device_type: str = "cpu") -> float:
    if hard_limit is not None:
        if hard_limit <= 0:
            msg = f"hard_limit must be a positive number of seconds, got {hard_limit}."
            raise ValueError(msg)
        return float(hard_limit)
    if budget.kind == "seconds":
        grace = float(config.env("GRACE") or DEFAULT_GRACE_SECONDS.get(device_type, 120.0))
        return budget.amount + grace + DEFAULT_GRACE_FRACTION * budget.amount
    return float(config.env("HARD_LIMIT") or DEFAULT_HARD_LIMIT_SECONDS)


def _open_data(data_dir: Path):
    """The prepared data, checked against its manifest's hashes (raises if it changed)."""
    from autoresearch_kit.data.shards import MANIFEST, PreparedData

    if not (data_dir / MANIFEST).is_file():
        msg = (f"No prepared data in {data_dir} (no {MANIFEST}). Run `python prepare.py` "
               "(or `autoresearch prepare`) first, or pass data_dir= / set AUTORESEARCH_DATA "
               "to a prepared directory.")
        raise FileNotFoundError(msg)
    data = PreparedData.open(data_dir)
    data.check()
    return data


def _prepare_workdir(workdir: str | os.PathLike | None, source: str) -> Path:
    wd = Path(tempfile.mkdtemp(prefix="autoresearch-run-")) if workdir is None else Path(workdir).expanduser()
    try:
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "train.py").write_text(source)
    except OSError as e:
        msg = f"Cannot write the candidate to {wd / 'train.py'} ({e}); pass workdir= a writable directory."
        raise PermissionError(msg) from e
    return wd.resolve()


# --------------------------------------------------------------------------- output


class _LogSink:
    """Output of the child -> capped log file + in-memory tail. Used by one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.written = 0
        self.dropped = 0
        self.total = 0
        self.tail_chunks: collections.deque[bytes] = collections.deque()
        self.tail_size = 0
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.partial = b""

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._feed_lines(chunk)
        room = LOG_HEAD_BYTES - self.written
        if room > 0:
            head, chunk = chunk[:room], chunk[room:]
            self.file.write(head)
            self.file.flush()  # so a person can `tail -f run.log` while it runs
            self.written += len(head)
        if chunk:
            self.tail_chunks.append(chunk)
            self.tail_size += len(chunk)
            while self.tail_size - len(self.tail_chunks[0]) >= LOG_TAIL_BYTES:
                old = self.tail_chunks.popleft()
                self.tail_size -= len(old)
                self.dropped += len(old)

    def _feed_lines(self, data: bytes) -> None:
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            self.lines.append(_line_text(raw))
        if len(self.partial) > 4 * MAX_LINE_CHARS:  # one endless line: keep its end
            self.partial = self.partial[-4 * MAX_LINE_CHARS:]

    def close(self) -> None:
        """Write the kept tail and close the file. Safe to call again."""
        if not self.file.closed:
            try:
                tail = b"".join(self.tail_chunks)
                if len(tail) > LOG_TAIL_BYTES:
                    self.dropped += len(tail) - LOG_TAIL_BYTES
                    tail = tail[-LOG_TAIL_BYTES:]
                if self.dropped:
                    note = (f"\n[autoresearch runner: {self.dropped} bytes of output dropped here; "
                            f"the log keeps the first {LOG_HEAD_BYTES} and the last {LOG_TAIL_BYTES} bytes]\n")
                    self.file.write(note.encode())
                self.file.write(tail)
            finally:
                self.file.close()
        if self.partial:
            self.lines.append(_line_text(self.partial))
            self.partial = b""

    def tail(self, n: int) -> str:
        return "\n".join(list(self.lines)[-n:])


def _line_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if "\r" in text:  # progress bars redraw with \r: the last state is what a person saw
        text = text.rsplit("\r", 1)[-1]
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + " [...]"


def _pump(fd: int, on_chunk: Callable[[bytes], None] | None, done: threading.Event) -> None:
    """Read fd until EOF, or until `done` is set and nothing more is waiting."""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                if done.is_set():
                    return
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            if on_chunk is not None:
                try:
                    on_chunk(chunk)
                except Exception:  # keep draining: a stalled pipe would block the child
                    log.exception("autoresearch runner: could not process the child's output; "
                                  "the rest of this stream is drained unread")
                    on_chunk = None
    except OSError as e:  # fd closed under us: nothing more to read
        log.debug("reader stopped: %s", e)


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The state letter of a live process (R, S, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else None


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    if os.path.isdir("/proc"):
        state = _proc_state(pid)
        return state is not None and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _strays(run_id: str, pgid: int, pipe_inodes: set[int]) -> list[int]:
    """Live processes (ours) left of a run: in its process group, carrying
    AUTORESEARCH_RUN_ID=run_id in their environment, or holding one of our pipes.

    The last two catch descendants that left the group (setsid) but kept the
    environment or inherited stdout / the channel. Linux only (reads /proc); elsewhere [].
    """
    if not os.path.isdir("/proc"):
        return []
    marker = f"AUTORESEARCH_RUN_ID={run_id}".encode()
    pipes = {f"pipe:[{ino}]" for ino in pipe_inodes} | {f"socket:[{ino}]" for ino in pipe_inodes}
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().decode("ascii", "replace").rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if not fields or fields[0] in ("Z", "X"):
            continue  # gone, or a zombie waiting for its parent: nothing left to kill
        if len(fields) > 2 and fields[2] == str(pgid):
            found.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:  # not ours, or gone
            continue
        if marker in env.split(b"\0"):
            found.append(pid)
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in pipes:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(proc, pgid: int) -> None:
    """SIGTERM the group, give it TERM_GRACE_SECONDS, then SIGKILL; reap the child."""
    _kill_group(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=TERM_GRACE_SECONDS)
    except Exception:  # subprocess.TimeoutExpired, or a second Ctrl-C: kill regardless
        pass
    _kill_group(pgid, signal.SIGKILL)
    proc.wait()


def _cleanup(pgid: int, run_id: str, pipe_inodes: set[int]) -> list[int]:
    """Kill everything left of the run and wait until it is gone (at most ~3 s).

    Returns the pids found alive after the child exited (group members included).
    """
    _kill_group(pgid, signal.SIGKILL)  # children still in the group
    killed: set[int] = set()
    deadline = time.monotonic() + 3.0
    while True:
        strays = _strays(run_id, pgid, pipe_inodes)
        if not strays or time.monotonic() > deadline:
            break
        for pid in strays:  # a stray may fork while we look: the loop looks again
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)  # SIGKILL is delivered asynchronously
    if strays:
        log.warning("could not kill processes %s left by run %s", strays, run_id)
    return sorted(killed)


# --------------------------------------------------------------------------- classify


def _exception_line(lines: list[str]) -> str:
    """The last 'SomeError: message' line of a traceback (or the last non-empty line)."""
    pat = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)|MemoryError|KeyboardInterrupt)\b")
    for line in reversed(lines):
        if pat.match(line.strip()) and not line.startswith(" "):
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return ""


def _syntax_error_reason(e: SyntaxError) -> str:
    where = f"line {e.lineno}" + (f", column {e.offset}" if e.offset else "")
    text = (e.text or "").strip()
    return f"SyntaxError: {e.msg} (train.py {where}{': ' + text if text else ''})"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _device_text(hello: dict | None, device_type: str) -> str:
    if hello and hello.get("device"):
        name = hello.get("device_name")
        return f"{hello['device']}: {name}" if name and name not in str(hello["device"]) else str(hello["device"])
    return device_type


def _fill_from_outcome(res: RunResult, out: dict) -> None:
    """The runner's own counts; what train.py reported goes in as reported."""
    res.steps, res.tokens = int(out["steps"]), int(out["tokens"])
    res.training_seconds = float(out["training_seconds"])
    res.flops = float(out["flops"] or 0.0)
    for name in ("params",):
        if _finite(out.get(name)):
            setattr(res, name, int(out[name]))
    for name in ("peak_memory_gb", "mfu"):
        if _finite(out.get(name)):
            setattr(res, name, float(out[name]))
    r = out.get("result")
    if r:
        res.eval_tokens = int(r["eval_tokens"])
        res.eval_seconds = float(r["eval_seconds"])
        res.extra.setdefault("eval", {}).update({k: r[k] for k in (
            "nats", "bytes", "seq_len", "probes", "rechecked", "probe_max_diff", "batch_rows", "first_answer",
            "logits_bytes", "logits_dtype", "timing") if k in r})
    res.extra["epochs"] = round(float(out.get("epochs") or 0.0), 4)
    res.extra["warmup_tokens"] = int(out.get("warmup_tokens") or 0)
    if out.get("flops_per_token") is not None:
        res.extra["flops_per_token"] = out["flops_per_token"]
        res.extra["flops_source"] = "reported by train.py (run.watch), not verified"


def _classify(res: RunResult, *, returncode: int | None, timed_out: bool, aborted: str | None,
              out: dict, sink: _LogSink, limit: float) -> None:
    """Set status and reason on `res` from everything observed. Never raises."""
    lines = list(sink.lines)
    _fill_from_outcome(res, out)
    if aborted is not None:
        res.status, res.reason = "aborted", aborted
        return
    result, invalid, child = out.get("result"), out.get("invalid"), out.get("child_status")
    if result is not None and not invalid and not out["violations"]:
        bpb = result.get("val_bpb")
        if not _finite(bpb) or bpb <= 0:
            res.status, res.reason = "invalid", f"the model's logits gave a non-finite val_bpb ({bpb!r})"
        else:
            res.status, res.val_bpb = "ok", float(bpb)
            if timed_out:
                res.extra["killed_after_result"] = True
        return
    if invalid or out["violations"]:
        res.status = "invalid"
        res.reason = invalid or "; ".join(out["violations"])
        return
    if timed_out:
        res.status = "timeout"
        where = f"after step {out['curve'][-1].get('step')}" if out["curve"] else "before the first step"
        res.reason = f"killed at the hard limit of {limit:.0f} s ({where}); budget {res.budget}"
        return
    if child is not None and child.get("status") == "diverged":
        res.status, res.reason = "diverged", str(child.get("reason") or "loss became NaN/inf")
        return
    if child is not None and child.get("status") == "invalid":
        res.status, res.reason = "invalid", str(child.get("reason") or "the harness rejected the run")
        return
    if returncode == DIVERGED_EXIT_CODE and any("diverge" in ln.lower() or "nan" in ln.lower() for ln in lines[-20:]):
        res.status, res.reason = "diverged", _exception_line(lines) or "exit code 3 (diverged)"
        return
    if returncode not in (0, None):
        res.status = "crash"
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            reason = f"killed by {name}"
            if -returncode == signal.SIGKILL:
                reason += " (out of memory? the kernel's OOM killer sends SIGKILL)"
            last = _exception_line(lines)
            res.reason = reason + (f"; last output: {last}" if last else "")
        else:
            res.reason = _exception_line(lines) or f"exit code {returncode} with no output"
        if any(p in ln for ln in lines[-FAILURE_TAIL_LINES:] for p in _OOM_PATTERNS):
            res.reason = f"out of memory: {res.reason}"
        return
    # Exit 0 without a score: the candidate did not let the runner evaluate it.
    res.status = "invalid"
    hints = []
    if any(re.match(r"^\s*val_bpb\s*[:=]", ln) for ln in lines):
        hints.append("its printed 'val_bpb' summary is not trusted")
    if not out["started"]:
        hints.append("it never called harness.start()")
    elif not out["curve"]:
        hints.append("it never logged a training step")
    elif not out["finished"]:
        hints.append("it never called run.finish(model)")
    res.reason = ("exited (code 0) without being scored by the runner at run.finish(model)"
                  + (": " + "; ".join(hints) if hints else ""))


# --------------------------------------------------------------------------- public


def prestart(device: str | None = None, env: dict[str, Any] | None = None,
             sandbox: str | None = None) -> threading.Thread | None:
    """Start the fork server now, in the background, so the first run does not wait for it.

    On a CUDA machine every run forks from a server that has imported torch, dynamo and
    inductor (autoresearch_kit/forkserver.py); starting it takes ~11 s on the H100 box, paid
    by the first run of a session unless something starts it ahead. A Lab does at its first
    propose() or panel(), so the server imports while a proposal is written or read.

    Parameters
    ----------
    device
        As for run_budgeted: "cuda", "cpu", ... or None to detect (in the background).
    env
        As for run_budgeted's ``env`` (the server restarts for runs with other variables).

    Returns
    -------
    threading.Thread or None
        The background thread (join it to wait), or None where the fork server is off
        (CPU and MPS unless AUTORESEARCH_FORKSERVER=1; AUTORESEARCH_FORKSERVER=0).
    """
    extra_env = {str(k): str(v) for k, v in (env or {}).items()}
    device = device or config.env("DEVICE") or None
    if not forkserver.enabled(device or "cuda"):  # off for this device, or (no device yet) for all
        return None
    try:
        isolated = _sandbox.isolation(sandbox).isolated
    except RuntimeError:  # sandbox required but missing: the run itself will say so
        return None
    if isolated and not _sandbox.forked_isolation():  # sandboxed runs start fresh under bubblewrap
        return None

    def start() -> None:
        if device is None:
            from autoresearch_kit.device import detect

            device_type = detect(announce=False).type
        else:
            device_type = device
        env = _child_env(extra_env, _FIXED_CHILD_ENV)
        server_wrap = None
        if isolated:  # the same server a sandboxed run asks for (sandbox.stage's environment)
            env, server_wrap = _sandbox._inner_env(env), _sandbox.server_wrap(device_type, [config.cache_dir()])
        inner = forkserver.prestart(env, device_type, server_wrap)
        if inner is not None:
            inner.join()

    thread = threading.Thread(target=start, name="autoresearch-prestart", daemon=True)
    thread.start()
    return thread


def eval_settings(source: str | None, device_type: str) -> dict:
    """The scored set a new lab pins: {tokens, seq_len, seq_len_from} (docs/CONTRACTS.md).

    tokens: AUTORESEARCH_EVAL_TOKENS, else None (the whole val split). seq_len:
    AUTORESEARCH_EVAL_SEQ_LEN, else the baseline train.py's literal `GPU_SEQ_LEN` (CUDA) or
    `CPU_SEQ_LEN` (CPU/MPS), else its `SEQ_LEN`, else config.DEFAULT_EVAL_SEQ_LEN for the
    device: the context the original evaluates at, fixed before the agent edits anything.
    """
    import ast

    tokens = config.default_eval_tokens()
    setting = config.eval_seq_len_setting()
    if setting is not None:
        return {"tokens": tokens, "seq_len": setting, "seq_len_from": "AUTORESEARCH_EVAL_SEQ_LEN"}
    names = ("GPU_SEQ_LEN" if device_type == "cuda" else "CPU_SEQ_LEN", "SEQ_LEN")
    found: dict[str, int] = {}
    try:
        tree = ast.parse(source or "")
    except (SyntaxError, ValueError):
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and type(node.value.value) is int and node.value.value > 0):
            found.setdefault(node.targets[0].id, node.value.value)
    for name in names:
        if name in found:
            return {"tokens": tokens, "seq_len": found[name],
                    "seq_len_from": f"{name} of the baseline train.py ({device_type})"}
    return {"tokens": tokens, "seq_len": config.DEFAULT_EVAL_SEQ_LEN.get(device_type, 256),
            "seq_len_from": f"the default for {device_type}"}


def run_budgeted(candidate: Any, budget: "config.Budget | str | float | None" = None, *,
                 workdir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                 seed: int | None = None, device: str | None = None,
                 on_event: Callable[[dict], Any] | None = None, log_path: str | os.PathLike | None = None,
                 hard_limit: float | None = None, stop: threading.Event | None = None,
                 env: dict[str, str] | None = None, sandbox: str | None = None,
                 eval_tokens: "int | str | None" = None, eval_seq_len: int | None = None) -> RunResult:
    """Train a candidate train.py under a fixed budget in a supervised subprocess.

    Parameters
    ----------
    candidate
        train.py source text, a path to one, or a Proposal (its `.source`).
    budget
        A Budget or text such as "60s", "50M-tokens", "1e15-flops". Default:
        AUTORESEARCH_BUDGET, else 300 s on CUDA and 60 s on CPU/MPS.
    workdir
        Where train.py and run.log are written (default: a fresh temporary directory).
    data_dir
        Prepared data directory (default `config.data_dir()`).
    seed
        Training seed (default AUTORESEARCH_SEED, else 42).
    device
        "cuda", "mps" or "cpu" (default: AUTORESEARCH_DEVICE, else detected).
    on_event
        Called with each `step` event dict (step, loss, lr, tokens, ...) as it arrives,
        on a background thread of its own (a slow callback never slows the child).
        Exceptions it raises are logged once and ignored; events still queued 2 s
        after the child exits are dropped (they are all in `RunResult.curve`).
    log_path
        Log file (default `workdir/run.log`); capped at 2 MiB (head and tail kept).
    hard_limit
        Wall-clock seconds after which the process group is killed (`timeout`).
        Default: a seconds budget plus AUTORESEARCH_GRACE (90 s on CUDA, 120 s on
        CPU/MPS) plus 25 % of it; for token/FLOP budgets AUTORESEARCH_HARD_LIMIT (600 s).
    stop
        A threading.Event; setting it kills the run, which ends as `aborted`.
    env
        Extra environment variables for the child. AUTORESEARCH_EVAL_TOKENS,
        AUTORESEARCH_EVAL_SEQ_LEN and AUTORESEARCH_WARMUP_STEPS given here set those for
        the runner's side; the socket, run id and device are always the runner's.
    sandbox
        "auto" (default: AUTORESEARCH_SANDBOX, else bubblewrap where it works), "require"
        (raise RuntimeError where no sandbox works) or "off". The isolation a run got is
        in ``extra["isolation"]``.
    eval_tokens
        The scored validation text: the first N targets of the val split, or None / "all"
        for the whole split (default: AUTORESEARCH_EVAL_TOKENS, else the whole split).
    eval_seq_len
        The evaluation context (a Lab passes its pinned one; the child sees it as
        `run.eval_seq_len`). Default: AUTORESEARCH_EVAL_SEQ_LEN, else the seq_len of the
        last training batch the child asked for. Both are in ``extra["eval"]``.

    Returns
    -------
    RunResult
        status ok | crash | timeout | diverged | invalid | aborted, with a readable
        `reason`, the trusted numbers, the curve, and the log tail for failures.
        A KeyboardInterrupt while waiting kills the run and *returns* an `aborted`
        result instead of raising, so the caller (a Lab) can record it.

    Raises
    ------
    FileNotFoundError
        No prepared data (run `python prepare.py`).
    ValueError
        The prepared data no longer matches its manifest's hashes.
    PermissionError
        The workdir cannot be written.
    RuntimeError
        A sandbox is required and none works here.
    """
    source = _candidate_source(candidate)
    budget = config.Budget.parse(budget) if budget is not None else None
    device_type = device or _detect_device_type()
    if budget is None:
        budget = config.default_budget(device_type)
    data_path = Path(data_dir).expanduser() if data_dir is not None else config.data_dir()
    data = _open_data(data_path)
    iso = _sandbox.isolation(sandbox)
    seed = int(seed) if seed is not None else int(config.env("SEED") or config.DEFAULT_SEED)
    extra_env = {str(k): str(v) for k, v in (env or {}).items()}
    if eval_tokens is None:
        eval_tokens = extra_env.get(config.ENV_PREFIX + "EVAL_TOKENS") or config.env("EVAL_TOKENS")
    eval_tokens = config.parse_eval_tokens(eval_tokens)
    if eval_seq_len is None:
        text = extra_env.get(config.ENV_PREFIX + "EVAL_SEQ_LEN")
        eval_seq_len = int(text) if text else config.eval_seq_len_setting()
    if eval_seq_len is not None and int(eval_seq_len) < 1:
        msg = f"eval_seq_len must be a positive number of tokens, got {eval_seq_len}."
        raise ValueError(msg)
    eval_seq_len = None if eval_seq_len is None else int(eval_seq_len)
    warmup = int(extra_env.get(config.ENV_PREFIX + "WARMUP_STEPS") or config.env("WARMUP_STEPS")
                 or config.DEFAULT_WARMUP_STEPS)
    limit = _hard_limit(budget, hard_limit, device_type)
    wd = _prepare_workdir(workdir, source)
    logfile = Path(log_path).expanduser() if log_path is not None else wd / "run.log"
    try:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"Cannot create the log directory {logfile.parent} ({e}); pass log_path= a writable location."
        raise PermissionError(msg) from e

    res = RunResult(status="crash", budget=str(budget), seed=seed, device=device_type, log_path=str(logfile))
    res.extra.update(workdir=str(wd), hard_limit=limit, isolation=iso.describe(), data=str(data.path),
                     device_type=device_type)

    try:
        compile(source, "train.py", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes in the source
        res.reason = _syntax_error_reason(e) if isinstance(e, SyntaxError) else f"train.py does not compile: {e}"
        res.log_tail = res.reason
        logfile.write_text(res.reason + "\n")
        return res
    problems = integrity.check_source(source)
    if problems:
        res.status = "invalid"
        res.reason = "integrity check failed (not run): " + "; ".join(problems)
        res.extra["integrity"] = problems
        logfile.write_text("Not run: the integrity check found problems.\n" + "\n".join(problems) + "\n")
        return res
    return _supervise(res, wd=wd, logfile=logfile, budget=budget, data=data, seed=seed,
                      device_type=device_type, warmup=warmup, iso=iso, source=source,
                      eval_tokens=eval_tokens, eval_seq_len=eval_seq_len, limit=limit, extra_env=extra_env,
                      on_event=on_event, stop=stop)


def _cpu_stat(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of the given CPUs from /proc/stat, or None where it is unreadable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        vals = [int(v) for v in rest.split()[:8]]      # user nice system idle iowait irq softirq steal
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        busy, total = busy + sum(vals) - idle, total + sum(vals)
    return (busy, total) if total else None


def busy_cores(seconds: float = 0.25) -> tuple[int, float] | None:
    """(cores this process may use, how many of them other processes keep busy), sampled now.

    Samples /proc/stat over `seconds` for the CPUs in this process's affinity mask and
    subtracts this process's own CPU time; None where /proc/stat is not there (macOS).
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    first = _cpu_stat(cpus)
    if first is None:
        return None
    own0 = sum(os.times()[:2])
    time.sleep(seconds)
    second = _cpu_stat(cpus)
    if second is None or second[1] <= first[1]:
        return None
    own = (sum(os.times()[:2]) - own0) / seconds            # cores this process itself used meanwhile
    share = (second[0] - first[0]) / (second[1] - first[1])  # busy fraction of our CPUs
    return len(cpus), max(0.0, share * len(cpus) - own)


def physical_cores(cpus: set[int] | None = None, sysfs: str = "/sys") -> int:
    """The physical cores among `cpus` (default: this process's affinity), SMT siblings counted
    once, as torch counts them for its default thread count; len(cpus) where sysfs is not there."""
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(sysfs, f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def cpu_quota(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup may use (cgroup v2 cpu.max, v1 cfs quota), None if unlimited."""
    root = Path(cgroup_root)
    try:
        lines = Path(proc, "self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.strip("/")
        if controllers == "":          # v2
            for where in dict.fromkeys([root / path, root]):
                try:
                    quota, period = (where / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                if quota != "max" and float(period) > 0:
                    return float(quota) / float(period)
        elif "cpu" in controllers.split(","):
            for where in dict.fromkeys([root / controllers / path, root / controllers]):
                try:
                    quota = float((where / "cpu.cfs_quota_us").read_text())
                    period = float((where / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    return quota / period
    return None


def _in_dask_worker() -> bool:
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def cpu_threads(extra_env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """The training threads a CPU run gets (OMP_NUM_THREADS for the child), and why.

    OMP_NUM_THREADS set by the user (or in `env=`) is kept. Otherwise
    AUTORESEARCH_CPU_THREADS: a number (a local Dask worker gets its share of the cores so);
    "torch" leaves torch's default (every physical core); "auto" (the default) gives the
    physical cores that other processes leave free, at least one, and no more than the
    cgroup's CPU quota: on the 2-core development machine (bench/threads.py,
    docs/PERFORMANCE.md) 2 threads trained at 15.2k tok/s idle against 9.1k for 1, but at
    1.4k against 9.0k while one other process kept a core busy, and the crossover was a
    core about half busy. The count does not change what a token budget trains (val_bpb
    was the same to the bit for 1 and 2). Returns (None, why) when the child should keep
    torch's default.
    """
    given = (extra_env or {}).get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if given:
        if not (extra_env or {}).get("OMP_NUM_THREADS") and _in_dask_worker():
            return None, (f"OMP_NUM_THREADS={given} (this Dask worker's environment: a nanny sets 1 unless the "
                          f"worker was started with OMP_NUM_THREADS=N)")
        return None, f"OMP_NUM_THREADS={given} (set by you)"
    setting = config.cpu_threads_setting()
    if setting == "torch":
        return None, "torch's default (AUTORESEARCH_CPU_THREADS=torch)"
    if isinstance(setting, int):
        share = " (this local worker's share of the cores)" if config.env("WORKER_INDEX") is not None else ""
        return setting, f"AUTORESEARCH_CPU_THREADS={setting}{share}"
    sample = busy_cores()
    if sample is None:
        return None, "torch's default (no /proc/stat here to see what else runs)"
    logical, busy = sample
    cores = min(physical_cores(), logical)
    quota = cpu_quota()
    free = cores - busy * cores / logical          # a busy logical CPU takes its share of a core
    cap = min(cores, max(1, math.floor(quota + 0.5))) if quota else cores
    n = max(1, min(cap, math.floor(free + 0.5)))
    what = f"{logical} cores" if cores == logical else f"{cores} cores ({logical} logical)"
    limit = f", cgroup quota {quota:g} CPUs" if quota and cap < cores else ""
    return n, f"{what}, {busy:.1f} kept busy by other processes{limit}"


_FIXED_CHILD_ENV = {"PYTHONUNBUFFERED": "1"}  # what every run sets beyond AUTORESEARCH_* (see prestart)


# What of the runner's own environment reaches a candidate: the system's, Python's, the
# kit's and the numeric libraries' settings, by name; nothing else (API keys, tokens,
# credentials stay out of its process and so of its log). `env=` passes anything on.
_ENV_PASS = frozenset((
    "PATH", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME", "SHELL", "HOME", "TMPDIR",
    "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH", "CC", "CXX",
    "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "SYSTEMROOT", "COMSPEC", "PATHEXT",
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "PYTHONWARNINGS", "PYTHONNOUSERSITE", "PYTHONFAULTHANDLER", "PYTHONIOENCODING", "PYTHONUTF8",
))
_ENV_PASS_PREFIXES = ("LC_", "AUTORESEARCH_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "BLIS_",
                      "CUDA_", "CUDNN_", "CUBLAS", "NVIDIA_", "NCCL_", "TORCH", "PYTORCH_", "TRITON_",
                      "HIP_", "ROCM_", "HSA_", "MIOPEN_")


def _passes(key: str) -> bool:
    """Whether the runner's variable `key` reaches the candidate (see _ENV_PASS)."""
    if key.startswith("AUTORESEARCH_CHANNEL"):
        return False  # never pass on a channel we were given ourselves
    return key in _ENV_PASS or key.startswith(_ENV_PASS_PREFIXES)


def _child_env(extra_env: dict[str, str], runner_env: dict[str, str]) -> dict[str, str]:
    child = {k: v for k, v in os.environ.items() if _passes(k)}
    child.update(extra_env)
    child.update(runner_env)
    # The child imports the same autoresearch_kit as this process (a dev checkout or
    # the installed one), so both sides speak the same protocol.
    kit_root = str(Path(__file__).resolve().parent.parent)
    child["PYTHONPATH"] = os.pathsep.join([kit_root] + [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p])
    return child


def _close_fds(fds: list[int]) -> None:
    """Close and forget each fd (popped first: closing a number twice could close a reused one)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def _unstoppable(*steps: Callable[[bool], Any]) -> bool:
    """Run each step to the end, repeating one that a KeyboardInterrupt cut short.

    Each step gets ``hurry`` (True once the user has pressed Ctrl-C here) and must be
    safe to run again. Returns whether any KeyboardInterrupt arrived.
    """
    interrupted = False
    for step in steps:
        while True:
            try:
                step(interrupted)
                break
            except KeyboardInterrupt:
                interrupted = True
            except Exception as e:  # one step's failure must not skip the clean-up after it
                log.warning("clean-up step %s failed (%s: %s); the rest goes on",
                            getattr(step, "__name__", step), type(e).__name__, e)
                break
    return interrupted


def _child_command(inner: list[str] | None = None) -> list[str]:
    """`python train.py` (or `inner`, the sandboxed form), behind the parent-death bootstrap on Linux."""
    inner = inner or [sys.executable, "train.py"]
    if sys.platform.startswith("linux"):
        return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_BOOT, str(os.getpid())] + inner
    return inner


def _supervise(res: RunResult, *, wd: Path, logfile: Path, budget: config.Budget, data, seed: int,
               device_type: str, warmup: int, iso, source: str, eval_tokens: int | None,
               eval_seq_len: int | None, limit: float,
               extra_env: dict[str, str], on_event, stop: threading.Event | None) -> RunResult:
    import socket

    from autoresearch_kit.serve import RunServer
    from autoresearch_kit.wire import FD_VAR, Conn

    run_id = uuid.uuid4().hex
    staged = None  # a run of the sandboxed fork server (sandbox.stage), moved into workdir/files at the end
    from autoresearch_kit.metric import scored_count

    res.eval_tokens = scored_count(len(data.val), eval_tokens)
    # the scored set, recorded with every run (scored or not): issue 11's one scored set
    res.extra["eval"] = {"scored": "all" if eval_tokens is None else eval_tokens, "tokens": res.eval_tokens,
                         "seq_len": eval_seq_len,
                         "seq_len_from": "pinned" if eval_seq_len is not None else "train.py's last loader"}
    res.extra["run_id"] = run_id

    try:
        sink = _LogSink(logfile)
    except OSError as e:
        msg = f"Cannot write the log {logfile} ({e}); pass log_path= a writable file."
        raise PermissionError(msg) from e
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []  # ours to close, whatever happens
    try:
        theirs.set_inheritable(True)
        runner_env = {
            "AUTORESEARCH_DEVICE": device_type,  # pinned: the runner sized the evaluation for it
            "AUTORESEARCH_RUN_ID": run_id,
            **_FIXED_CHILD_ENV,
            FD_VAR: str(theirs.fileno()),
        }
        out_r, out_w = os.pipe()
        fds.append(out_r)
        pipe_inodes = {os.fstat(out_r).st_ino, os.fstat(ours.fileno()).st_ino, os.fstat(theirs.fileno()).st_ino}
        # sampled before the clock starts: the 0.25 s look at the load is not the run's time
        threads, why = cpu_threads(extra_env) if device_type == "cpu" else (None, "")
        t0 = time.monotonic()
        try:
            child_env = _child_env(extra_env, runner_env)
            if device_type == "cpu":
                if threads is not None:
                    child_env["OMP_NUM_THREADS"] = str(threads)
                omp = child_env.get("OMP_NUM_THREADS", "")
                res.extra["cpu_threads"] = int(omp) if omp.isdigit() else None
                res.extra["cpu_threads_why"] = why
            proc = None
            hide = [data.path, config.cache_dir(), wd.parent]
            if iso.isolated and forkserver.enabled(device_type) and _sandbox.forked_isolation():
                # Forked from a fork server that runs inside bubblewrap; the child locks itself
                # into its own run with Landlock (sandbox.stage).
                staged = _sandbox.stage(run_id, source, child_env, device_type)
                proc = forkserver.spawn(staged.inner_dir, {**staged.env, "AUTORESEARCH_RUN_ID": run_id},
                                        out_w, theirs.fileno(), device_type,
                                        wrap=_sandbox.server_wrap(device_type, hide), policy=staged.policy)
                if proc is None:
                    staged.unstage(wd / "files")
                    staged = None
                else:
                    res.extra["isolation"] = "bwrap+landlock (fork server)"
            if iso.isolated and proc is None:
                files = wd / "files"  # the candidate's cwd, its only writable directory
                files.mkdir(parents=True, exist_ok=True)
                (files / "train.py").write_text(source)
                cache = _sandbox.compile_cache(source) if device_type.split(":")[0] == "cuda" else None
                inner, child_env = _sandbox.wrap([sys.executable, "train.py"], child_env, iso, files=files,
                                                 cache=cache, device_type=device_type, hide=hide)
                proc = subprocess.Popen(
                    _child_command(inner), cwd=str(files), env=child_env, stdin=subprocess.DEVNULL, stdout=out_w,
                    stderr=out_w, start_new_session=True, pass_fds=(theirs.fileno(),))
            elif proc is None:
                # A child forked from the pre-imported fork server (forkserver.py), else a fresh process.
                proc = forkserver.spawn(wd, child_env, out_w, theirs.fileno(), device_type) or subprocess.Popen(
                    _child_command(), cwd=str(wd), env=child_env, stdin=subprocess.DEVNULL, stdout=out_w,
                    stderr=out_w, start_new_session=True, pass_fds=(theirs.fileno(),))
            res.extra["forkserver"] = isinstance(proc, forkserver.ForkedChild)
        finally:  # the child holds its own copies now (or never started)
            os.close(out_w)
            theirs.close()
    except BaseException as e:
        _close_fds(fds)
        ours.close()
        sink.close()
        if isinstance(e, OSError):
            msg = f"Cannot start {sys.executable} train.py in {wd}: {e}"
            raise RuntimeError(msg) from e
        if isinstance(e, KeyboardInterrupt):
            # Ctrl-C while the child was being started (a fork server can take seconds to
            # come up): whatever did start carries our run id; end it, and the run is aborted.
            _unstoppable(lambda _again: [_kill_pid(pid) for pid in _strays(run_id, -1, set())])
            res.status, res.reason = "aborted", "interrupted (KeyboardInterrupt) while the run was starting"
            return res
        raise
    pgid = proc.pid  # start_new_session: the child leads its own session and group

    timed_out, aborted = False, None
    server: RunServer | None = None
    done = threading.Event()
    readers: list[threading.Thread] = []
    try:
        server = RunServer(Conn(ours), data, budget=budget, seed=seed, device_type=device_type,
                           eval_tokens=eval_tokens, eval_seq_len=eval_seq_len, warmup_steps=warmup,
                           on_event=on_event, t0=t0)
        readers += [threading.Thread(target=_pump, args=(out_r, sink.feed, done), name="autoresearch-log",
                                     daemon=True),
                    threading.Thread(target=server.serve, name="autoresearch-serve", daemon=True)]
        for t in readers:
            t.start()
        deadline = t0 + limit
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop is not None and stop.is_set():
                aborted = "stopped by the user (stop event)"
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
    except KeyboardInterrupt:
        aborted = "interrupted (KeyboardInterrupt)"
    finally:
        # Every step runs, even when Ctrl-C is pressed again (and again) meanwhile: each is
        # safe to repeat, and an interrupted step is repeated, so no process, thread or fd
        # is left behind. The run then ends as aborted, as for the first Ctrl-C.
        killed: list[int] = []

        def end_child(hurry: bool) -> None:
            if proc.returncode is None:
                if hurry:  # Ctrl-C during the SIGTERM grace: no more waiting
                    _kill_group(pgid, signal.SIGKILL)
                    proc.wait()
                else:
                    _terminate(proc, pgid)
            res.wall_seconds = time.monotonic() - t0

        def stop_readers(hurry: bool) -> None:
            done.set()
            try:
                ours.shutdown(socket.SHUT_RDWR)  # the server's recv returns: the child is gone
            except OSError:
                pass
            for t in readers:
                if t.is_alive():  # (one not started yet when Ctrl-C came cannot be joined)
                    t.join(timeout=5.0)
            if server is not None:
                server.close_events(timeout=0 if hurry else EVENT_DRAIN_SECONDS)

        def end_staged(hurry: bool) -> None:
            if staged is not None:
                killed.extend(forkserver.kill_sandbox_strays())
                staged.unstage(wd / "files")

        if _unstoppable(end_child, lambda hurry: killed.extend(_cleanup(pgid, run_id, pipe_inodes)), end_staged,
                        stop_readers, lambda hurry: _close_fds(fds), lambda hurry: ours.close(),
                        lambda hurry: sink.close()):
            aborted = aborted or "interrupted (KeyboardInterrupt)"
    if server is None:  # Ctrl-C before the server existed: nothing was received
        server = RunServer(Conn(ours), data, budget=budget, seed=seed, device_type=device_type,
                           eval_tokens=eval_tokens, eval_seq_len=eval_seq_len, warmup_steps=warmup, t0=t0)
    out = server.outcome()
    returncode = _sandbox.returncode(proc.returncode, iso)
    if killed:
        res.extra["killed_strays"] = sorted(set(killed))  # (a hunt cut short by Ctrl-C ran twice)
    res.extra.update(exit_code=returncode, pid=proc.pid, output_bytes=sink.total, log_dropped_bytes=sink.dropped,
                     timings={k: round(v, 3) for k, v in out["times"].items()})
    if out["callback_error"]:
        res.extra["on_event_error"] = out["callback_error"]
    if out["hello"] is not None:
        res.extra["start"] = out["hello"]
    res.curve = out["curve"]
    res.device = _device_text(out["hello"], device_type)
    res.torch_version = str((out["hello"] or {}).get("torch") or "")
    _classify(res, returncode=returncode, timed_out=timed_out, aborted=aborted, out=out, sink=sink, limit=limit)
    if res.tokens:
        try:
            from autoresearch_kit.data.prepare import training_epochs

            _epochs, warning = training_epochs(data.path, res.tokens)
        except (ImportError, ValueError, OSError):
            warning = None
        if warning:  # the loop would reward training less: say so with the result
            res.extra["epochs_warning"] = warning
    if res.status != "ok":
        res.log_tail = sink.tail(FAILURE_TAIL_LINES)
    return res
