"""run_budgeted(): train one candidate train.py under a fixed budget, safely (parent side).

The runner, not train.py, owns the clock, the kill switch, the metric and the log:

    from autoresearch_kit.runner import run_budgeted
    result = run_budgeted(open("train.py").read(), "60s", on_event=print)
    result.status, result.val_bpb, result.reason

What happens, in order:

1. The candidate is parsed (a SyntaxError is a `crash` without running) and checked by
   `integrity.check_source` (problems give `invalid` without running).
2. It is written to `workdir/train.py` and started as `python train.py` in a session
   (process group) of its own, with the budget, seed, device, data and the pinned
   number of validation tokens in its environment, plus a trusted channel
   (`channel.py`): a pipe and an HMAC key that only the harness holds. On Linux the
   child is killed when the runner's process dies (PR_SET_PDEATHSIG), so a killed
   kernel or CLI leaves no training behind.
3. Two threads read: stdout+stderr go to the log file (capped: head and tail kept)
   and an in-memory tail; signed channel messages go to `on_event` (live curves) and
   the result. The caller's thread only waits, so a notebook kernel stays responsive.
4. At the hard limit, on `stop`, or on Ctrl-C the whole group is killed (SIGTERM,
   then SIGKILL); after every run stray descendants are hunted down too (same
   process group, same AUTORESEARCH_RUN_ID in /proc/<pid>/environ, or holding one of
   our pipes).
5. The run is classified. `ok` needs a verified `result` message with status ok, a
   finite val_bpb, and the budget/eval tokens/seed the runner set; everything else is
   `crash`, `timeout`, `diverged`, `invalid` or `aborted` with a readable reason.

POSIX only (process groups, /proc on Linux). No signal handlers are installed in the
caller: it works from a Jupyter kernel as from a terminal. Run its tests with
`python -m pytest tests/test_runner.py -q`.
"""

from __future__ import annotations

import collections
import queue
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
from autoresearch_kit.channel import ParentChannel

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
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
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


def _check_data(data_dir: Path) -> None:
    from autoresearch_kit.data.shards import MANIFEST

    if not (data_dir / MANIFEST).is_file():
        msg = (f"No prepared data in {data_dir} (no {MANIFEST}). Run `python prepare.py` "
               "(or `autoresearch prepare`) first, or pass data_dir= / set AUTORESEARCH_DATA "
               "to a prepared directory.")
        raise FileNotFoundError(msg)


def _val_tokens(data_dir: Path) -> int | None:
    import json

    from autoresearch_kit.data.shards import MANIFEST

    try:
        return int(json.loads((data_dir / MANIFEST).read_text())["splits"]["val"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


class _Messages:
    """Verified channel messages, split by kind. Fed by the channel thread."""

    def __init__(self, channel: ParentChannel, on_event: Callable[[dict], Any] | None, t0: float) -> None:
        self.channel, self.on_event, self.t0 = channel, on_event, t0
        self.start: dict | None = None
        self.status: dict | None = None
        self.result: dict | None = None
        self.curve: list[dict] = []
        self.times: dict[str, float] = {}
        self.callback_error: str | None = None
        self.extra_results = 0
        self.closed = False
        self.lock = threading.Lock()
        # on_event runs on a thread of its own: a slow live plot must not stop the
        # channel being read (a full pipe would block the child's training loop).
        self.events: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self.dispatcher = threading.Thread(target=self._dispatch, name="autoresearch-events", daemon=True)
        if on_event is not None:
            self.dispatcher.start()

    def feed(self, chunk: bytes) -> None:
        for msg in self.channel.feed(chunk):
            self._handle(msg)

    def _handle(self, msg: dict) -> None:
        kind, data = msg.get("kind"), msg.get("data")
        if not isinstance(data, dict):
            return
        now = time.monotonic() - self.t0
        with self.lock:
            if kind == "start" and self.start is None:
                self.start, self.times["start"] = data, now
            elif kind == "step":
                self.times.setdefault("first_step", now)
                self.times["last_step"] = now
                self.curve.append(data)
            elif kind == "status":
                self.status, self.times["status"] = data, now
            elif kind == "result":
                if self.result is None:
                    self.result, self.times["result"] = data, now
                else:  # the harness sends one; a second means someone else holds the channel
                    self.extra_results += 1
        if kind == "step" and self.on_event is not None:
            self.events.put(dict(data))

    def _dispatch(self) -> None:
        while True:
            event = self.events.get()
            if event is None or self.closed:
                return
            try:
                self.on_event(event)
            except Exception as e:  # the caller's live plot must never end the run
                if self.callback_error is None:
                    self.callback_error = f"{type(e).__name__}: {e}"
                    log.warning("on_event raised %s (further errors ignored); the run goes on.",
                                self.callback_error)

    def close(self, timeout: float) -> None:
        """Deliver the queued events (up to `timeout` seconds), then stop the dispatcher."""
        if self.dispatcher.is_alive():
            self.events.put(None)
            self.dispatcher.join(timeout=timeout)
            self.closed = True  # a callback still busy: drop the rest, no calls after we return


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
    pipes = {f"pipe:[{ino}]" for ino in pipe_inodes}
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


def _tampering(start: dict | None, result: dict, expected: dict) -> list[str]:
    """Differences between what the runner set and what the trusted messages report."""
    problems = []
    if start is None:
        problems.append("the harness never sent its start message")
        return problems
    checks = (("budget", start.get("budget"), expected["budget"]),
              ("eval_tokens", start.get("eval_tokens"), expected["eval_tokens"]),
              ("scored eval_tokens", result.get("eval_tokens"), expected["scored_tokens"]),
              ("seed", start.get("seed"), expected["seed"]))
    for name, got, want in checks:
        if got is None:
            continue  # the harness did not report it: nothing to compare
        if name == "budget":
            try:
                same = config.Budget.parse(got) == config.Budget.parse(want)
            except ValueError:
                same = False
        else:
            try:
                same = int(got) == int(want)
            except (TypeError, ValueError):
                same = False
        if not same:
            problems.append(f"{name} was {got!r}, but the runner set {want!r}")
    return problems


def _fill_from_result(res: RunResult, data: dict) -> None:
    for name in ("steps", "tokens", "params", "eval_tokens"):
        if _finite(data.get(name)):
            setattr(res, name, int(data[name]))
    for name in ("flops", "training_seconds", "total_seconds", "eval_seconds"):
        if _finite(data.get(name)):
            setattr(res, name, float(data[name]))
    for name in ("peak_memory_gb", "mfu"):
        if _finite(data.get(name)):
            setattr(res, name, float(data[name]))


def _device_text(start: dict | None, result: dict | None, device_type: str) -> str:
    for data in (result, start):
        if data and data.get("device"):
            name = data.get("device_name")
            return f"{data['device']}: {name}" if name and name not in str(data["device"]) else str(data["device"])
    return device_type


def _classify(res: RunResult, *, returncode: int | None, timed_out: bool, aborted: str | None,
              msgs: _Messages, sink: _LogSink, expected: dict, limit: float) -> None:
    """Set status and reason on `res` from everything observed. Never raises."""
    lines = list(sink.lines)
    result, status_msg = msgs.result, msgs.status
    if result is not None:
        _fill_from_result(res, result)
    if msgs.curve and not res.steps:
        last = msgs.curve[-1]
        res.steps = int(last["step"]) + 1 if _finite(last.get("step")) else len(msgs.curve)
        if _finite(last.get("tokens")):
            res.tokens = int(last["tokens"])

    if aborted is not None:
        res.status, res.reason = "aborted", aborted
        return
    if result is not None and result.get("status") == "ok":
        problems = _tampering(msgs.start, result, expected)
        if msgs.extra_results:
            problems.append(f"{1 + msgs.extra_results} results were sent on the channel (the harness sends one)")
        bpb = result.get("val_bpb")
        if problems:
            res.status = "invalid"
            res.reason = "train.py changed what the runner fixed: " + "; ".join(problems)
        elif not _finite(bpb) or bpb <= 0:
            res.status, res.reason = "invalid", f"the harness reported a non-finite val_bpb ({bpb!r})"
        else:
            res.status, res.val_bpb = "ok", float(bpb)
            if timed_out:
                res.extra["killed_after_result"] = True
        return
    if timed_out:
        res.status = "timeout"
        where = f"after step {msgs.curve[-1].get('step')}" if msgs.curve else "before the first step"
        res.reason = f"killed at the hard limit of {limit:.0f} s ({where}); budget {expected['budget']}"
        return
    if status_msg is not None and status_msg.get("status") == "diverged":
        res.status, res.reason = "diverged", str(status_msg.get("reason") or "loss became NaN/inf")
        return
    if status_msg is not None and status_msg.get("status") == "invalid":
        res.status, res.reason = "invalid", str(status_msg.get("reason") or "the harness rejected the run")
        return
    if result is not None:  # a trusted result with status invalid (e.g. non-causal model)
        res.status = "invalid"
        res.reason = str(result.get("reason") or f"the harness reported status {result.get('status')!r}")
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
    # Exit 0 without a trusted result: the candidate did not let the harness finish.
    res.status = "invalid"
    hints = []
    if any(re.match(r"^\s*val_bpb\s*[:=]", ln) for ln in lines):
        hints.append("its printed 'val_bpb' summary is not trusted")
    if not msgs.start:
        hints.append("it never called harness.start()")
    elif not msgs.curve:
        hints.append("it never logged a training step")
    res.reason = ("exited (code 0) without a trusted result from run.finish(model)"
                  + (": " + "; ".join(hints) if hints else ""))


# --------------------------------------------------------------------------- public


def prestart(device: str | None = None, env: dict[str, Any] | None = None) -> threading.Thread | None:
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

    def start() -> None:
        if device is None:
            from autoresearch_kit.device import detect

            device_type = detect(announce=False).type
        else:
            device_type = device
        inner = forkserver.prestart(_child_env(extra_env, _FIXED_CHILD_ENV), device_type)
        if inner is not None:
            inner.join()

    thread = threading.Thread(target=start, name="autoresearch-prestart", daemon=True)
    thread.start()
    return thread


def run_budgeted(candidate: Any, budget: "config.Budget | str | float | None" = None, *,
                 workdir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                 seed: int | None = None, device: str | None = None,
                 on_event: Callable[[dict], Any] | None = None, log_path: str | os.PathLike | None = None,
                 hard_limit: float | None = None, stop: threading.Event | None = None,
                 env: dict[str, str] | None = None) -> RunResult:
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
        Extra environment variables for the child. AUTORESEARCH_EVAL_TOKENS given here
        pins the evaluation tokens; the channel, run id, budget, seed, device and data
        are always the runner's.

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
    PermissionError
        The workdir cannot be written.
    """
    source = _candidate_source(candidate)
    budget = config.Budget.parse(budget) if budget is not None else None
    device_type = device or _detect_device_type()
    if budget is None:
        budget = config.default_budget(device_type)
    data = Path(data_dir).expanduser() if data_dir is not None else config.data_dir()
    _check_data(data)
    seed = int(seed) if seed is not None else int(config.env("SEED") or config.DEFAULT_SEED)
    extra_env = {str(k): str(v) for k, v in (env or {}).items()}
    eval_tokens = int(extra_env.get(config.ENV_PREFIX + "EVAL_TOKENS") or config.default_eval_tokens(device_type))
    limit = _hard_limit(budget, hard_limit, device_type)
    wd = _prepare_workdir(workdir, source)
    logfile = Path(log_path).expanduser() if log_path is not None else wd / "run.log"
    try:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"Cannot create the log directory {logfile.parent} ({e}); pass log_path= a writable location."
        raise PermissionError(msg) from e

    res = RunResult(status="crash", budget=str(budget), seed=seed, device=device_type, log_path=str(logfile))
    res.extra.update(workdir=str(wd), hard_limit=limit)

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
                      device_type=device_type,
                      eval_tokens=eval_tokens, limit=limit, extra_env=extra_env, on_event=on_event, stop=stop)


_FIXED_CHILD_ENV = {"PYTHONUNBUFFERED": "1"}  # what every run sets beyond AUTORESEARCH_* (see prestart)


def _child_env(extra_env: dict[str, str], runner_env: dict[str, str]) -> dict[str, str]:
    child = dict(os.environ)
    for key in ("AUTORESEARCH_CHANNEL_FD", "AUTORESEARCH_CHANNEL_KEY"):
        child.pop(key, None)  # never pass on a channel we were given ourselves
    child.update(extra_env)
    child.update(runner_env)
    # The child imports the same autoresearch_kit as this process (a dev checkout or
    # the installed one), so both sides speak the same channel protocol.
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
    return interrupted


def _child_command() -> list[str]:
    """`python train.py`, behind the parent-death bootstrap on Linux."""
    if sys.platform.startswith("linux"):
        return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_BOOT, str(os.getpid()), "train.py"]
    return [sys.executable, "train.py"]


def _supervise(res: RunResult, *, wd: Path, logfile: Path, budget: config.Budget, data: Path, seed: int,
               device_type: str, eval_tokens: int, limit: float,
               extra_env: dict[str, str], on_event, stop: threading.Event | None) -> RunResult:
    run_id = uuid.uuid4().hex
    # The metric scores min(eval_tokens, val tokens - 1): a small val split is scored whole.
    val_tokens = _val_tokens(data)
    scored = min(eval_tokens, val_tokens - 1) if val_tokens else eval_tokens
    expected = {"budget": str(budget), "eval_tokens": eval_tokens, "seed": seed, "scored_tokens": scored}
    res.eval_tokens = eval_tokens
    res.extra["run_id"] = run_id

    try:
        sink = _LogSink(logfile)
    except OSError as e:
        msg = f"Cannot write the log {logfile} ({e}); pass log_path= a writable file."
        raise PermissionError(msg) from e
    channel = ParentChannel()
    fds: list[int] = []  # ours to close, whatever happens
    try:
        runner_env = {
            "AUTORESEARCH_BUDGET": str(budget),
            "AUTORESEARCH_SEED": str(seed),
            "AUTORESEARCH_DATA": str(data),
            "AUTORESEARCH_EVAL_TOKENS": str(eval_tokens),
            "AUTORESEARCH_DEVICE": device_type,  # pinned, so the eval tokens match the device
            "AUTORESEARCH_RUN_ID": run_id,
            **_FIXED_CHILD_ENV,
            **channel.open(),
        }
        fds.append(channel.read_fd)
        out_r, out_w = os.pipe()
        fds.append(out_r)
        pipe_inodes = {os.fstat(out_r).st_ino, os.fstat(channel.read_fd).st_ino}
        t0 = time.monotonic()
        try:
            child_env = _child_env(extra_env, runner_env)
            # A child forked from the pre-imported fork server (forkserver.py), else a fresh process.
            proc = forkserver.spawn(wd, child_env, out_w, channel.write_fd, device_type) or subprocess.Popen(
                _child_command(), cwd=str(wd), env=child_env, stdin=subprocess.DEVNULL, stdout=out_w,
                stderr=out_w, start_new_session=True, pass_fds=(channel.write_fd,))
            res.extra["forkserver"] = isinstance(proc, forkserver.ForkedChild)
        finally:  # the child holds its own copies now (or never started)
            os.close(out_w)
            channel.close_child_end()
    except BaseException as e:
        _close_fds(fds)
        channel.read_fd = -1
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
    msgs: _Messages | None = None
    done = threading.Event()
    readers: list[threading.Thread] = []
    try:
        msgs = _Messages(channel, on_event, t0)
        readers += [threading.Thread(target=_pump, args=(out_r, sink.feed, done), name="autoresearch-log",
                                     daemon=True),
                    threading.Thread(target=_pump, args=(channel.read_fd, msgs.feed, done),
                                     name="autoresearch-channel", daemon=True)]
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
            for t in readers:
                if t.is_alive():  # (one not started yet when Ctrl-C came cannot be joined)
                    t.join(timeout=5.0)
            if msgs is not None:
                msgs.close(timeout=0 if hurry else EVENT_DRAIN_SECONDS)

        if _unstoppable(end_child, lambda hurry: killed.extend(_cleanup(pgid, run_id, pipe_inodes)), stop_readers,
                        lambda hurry: _close_fds(fds), lambda hurry: sink.close()):
            aborted = aborted or "interrupted (KeyboardInterrupt)"
        channel.read_fd = -1
    if msgs is None:  # Ctrl-C before the readers existed: nothing was received
        msgs = _Messages(channel, None, t0)

    if killed:
        res.extra["killed_strays"] = sorted(set(killed))  # (a hunt cut short by Ctrl-C ran twice)
    res.extra.update(exit_code=proc.returncode, channel_rejected=channel.rejected,
                     output_bytes=sink.total, log_dropped_bytes=sink.dropped,
                     timings={k: round(v, 3) for k, v in msgs.times.items()})
    if msgs.callback_error:
        res.extra["on_event_error"] = msgs.callback_error
    if msgs.start is not None:
        res.extra["start"] = msgs.start
    res.curve = list(msgs.curve)
    res.device = _device_text(msgs.start, msgs.result, device_type)
    res.torch_version = str((msgs.result or {}).get("torch") or (msgs.start or {}).get("torch") or "")
    _classify(res, returncode=proc.returncode, timed_out=timed_out, aborted=aborted, msgs=msgs, sink=sink,
              expected=expected, limit=limit)
    if channel.rejected and res.status != "ok":
        res.reason += f" ({channel.rejected} forged or corrupt channel line(s) rejected)"
    if res.status != "ok":
        res.log_tail = sink.tail(FAILURE_TAIL_LINES)
    return res
