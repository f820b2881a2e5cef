"""The trusted side of a run: serve the training data, keep the budget, score the model.

`runner.run_budgeted` starts a candidate train.py in a sandbox and gives it one end of a
socket (wire.py); a `RunServer` on the runner's side answers everything on the other end:

    server = RunServer(conn, data, budget=..., seed=42, device_type="cpu", eval_tokens=None, eval_seq_len=256)
    server.serve()          # on a thread, until the child closes its end
    server.outcome()        # {"status": ..., "reason": ..., "val_bpb": ..., "tokens": ...}

What the candidate cannot do from its side of the socket:

- **Read data.** It never has a path to the shards; training windows arrive as token ids
  in answer to `batch` requests, drawn here with the run's seed (the same windows, in the
  same order, as the loader train.py used to read itself), and counted here. A token
  budget is exact: a batch that would pass it is not served.
- **Stretch the clock.** On a seconds budget the clock is this process's, started at the
  first step after the warm-up steps (whose batches are random ids: nothing to learn off
  the clock), checked on every request; when it ends no more batches are served. The
  candidate must then reach `run.finish` within a grace measured from its own step times
  (about two steps, plus a second for the last sync), and answer the first batch at
  finish within about a forward pass: training after the budget, a batch asked for after
  it, or a step logged after it make the run `invalid`.
- **Score itself.** At `finish` this side sends the scored validation rows (the lab's
  pinned set and context: metric.py's docstring) in an order the child cannot predict, in
  batches of one shape, each with the probe rows of the batch before (a scored row whose
  tokens after a random position are replaced by training text); the child answers with
  logits in shared memory, which are copied out (one pass, the buffer is never read
  again) before use; the cross-entropy against targets the child never receives, in
  float32 with a float64 sum, is computed here (metric.py). A model whose logits at or
  before the cut differ between a row and its probe sees the future or its batch-mates:
  `invalid`. The next batch is sent as soon as a batch is copied out, so the child's
  forward pass overlaps this side's scoring.

The child's own reports (its loss curve, FLOPs per token, parameters, peak memory) are
kept as what train.py reported; the tokens on the curve are this side's count.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import queue
import secrets
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np

from autoresearch_kit import config
from autoresearch_kit.data.loader import draw_windows
from autoresearch_kit.data.shards import PreparedData
from autoresearch_kit.wire import Conn, WireError

log = logging.getLogger(__name__)

# The clock starts at the first step after the warm-up steps (compile time is not
# budgeted), or once this many batches per warm-up step were served without a step.
WARMUP_BATCHES_PER_STEP = 8
# run.finish must follow the end of the budget within this many (median) step times,
# plus a floor for the final sync and a busy machine; and at most this share of a
# seconds budget.
FINISH_GRACE_STEPS = 2.0
FINISH_GRACE_FLOOR_SECONDS = 2.0
FINISH_GRACE_MAX_FRACTION = 0.1
# Elements of logits per evaluation batch: CPU 2**25 (128 MB in float32). On CUDA 2**27
# (8 rows of 2048 x 8192, 256 MB of bf16): the scoring of a batch overlaps the child's next
# one, so more, smaller batches hide more of it (the whole built-in split: 7 batches, not 4),
# while a batch still keeps the GPU busy and the probe share stays 1 row in 8.
LOGIT_BUDGET = {"cuda": 2**27, "mps": 2**26, "cpu": 2**25}
PROBE_SHARE = 8             # one probe row per this many scored rows in a batch (at least one)
# Rows of training text sent before any validation row and again after the last, at the same
# places of a batch of the same shape: a model that changes while it is scored (trains on the
# rows it is sent, remembers them) answers them otherwise.
RECHECK_ROWS = 4
# The first batch at finish (random ids) must be answered within this floor plus this many
# (median) training steps, scaled by its size against a step's: about what a forward pass of
# it takes, so run.finish cannot buy time to train on the batches it was served.
FIRST_ANSWER_FLOOR_SECONDS = 2.0
FIRST_ANSWER_STEPS = 2.0
# Warm-up batches (before the clock) are uniform random ids from this stream: the right shape
# to compile and measure with, nothing to learn from, so the untimed warm-up buys nothing.
WARMUP_STREAM = 0x5EED_0000
MAX_LOADERS = 64
MAX_BATCH_TOKENS = 1 << 26  # one training batch of more ids than this is not a batch
_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def probe_tolerance() -> float | None:
    """The probes' and the recheck's tolerance: 0.0, to the bit (the default: an honest model's
    rows, in batches of one shape, agree to the bit on the CPU and the H200, and any tolerance
    is room a peek fits in: one widened to 0.12 nats scored 2.81 against 2.90); None, the
    rounding tolerance of metric.probe_mismatch, with AUTORESEARCH_PROBE_TOLERANT=1 for
    hardware where an honest baseline does not agree to the bit."""
    return None if config.env("PROBE_TOLERANT") in ("1", "true", "yes") else 0.0


def _rounding_hint(a, b, tol: float | None) -> str:
    """For a strict comparison that rounding would explain (metric.probe_mismatch's own
    tolerance lets it through): what to set on hardware that rounds."""
    from autoresearch_kit.metric import probe_mismatch

    if tol is None or not probe_mismatch(a, b)["causal"]:
        return ""
    return (". A difference this small may be rounding: if the unedited baseline fails this way on "
            "this hardware, set AUTORESEARCH_PROBE_TOLERANT=1 (probes then allow rounding)")


def score_threads_for(device_type: str) -> int:
    """torch threads the runner scores with: AUTORESEARCH_SCORE_THREADS, else 1 on a CPU run,
    else the CPUs this process may use less two (the child's copy and Python), at most 16.

    On a CPU run the child's cores are the runner's: on the busy 2-core dev box one thread
    scored 33.5M bf16 logits in 0.05 s and two in 0.17-0.93 s (a barrier per parallel
    region waits for a thread another process holds; docs/PERFORMANCE.md).
    """
    forced = config.env("SCORE_THREADS")
    if forced:
        return max(1, int(forced))
    if device_type == "cpu":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus - 2))


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


class RunServer:
    """Answers one candidate's requests; owns its budget, data and score.

    Parameters
    ----------
    conn : wire.Conn
        The runner's end of the run's socket.
    data : PreparedData
        The prepared data, checked against its manifest before the run.
    budget : config.Budget
    seed : int
    device_type : str
        Sizes the evaluation batches.
    eval_tokens : int or None
        Score the first this many validation targets (clamped to the split); None: the
        whole val split.
    eval_seq_len : int or None
        The evaluation context (a Lab's pin); None: the seq_len of the last training batch.
    warmup_steps : int
        Steps before the clock starts.
    on_event : callable, optional
        Called (on this thread) with each step event for live curves.
    score_threads : int, optional
        torch threads of the scoring (set on the serving thread only: the notebook's own
        torch threads are not touched). Default: `score_threads(device_type)`.
    """

    def __init__(self, conn: Conn, data: PreparedData, *, budget: config.Budget, seed: int, device_type: str,
                 eval_tokens: int | None = None, eval_seq_len: int | None = None,
                 warmup_steps: int = config.DEFAULT_WARMUP_STEPS,
                 on_event: Callable[[dict], Any] | None = None, t0: float | None = None,
                 score_threads: int | None = None) -> None:
        self.conn, self.data, self.budget, self.seed = conn, data, budget, int(seed)
        self.device_type, self.warmup_steps = device_type, int(warmup_steps)
        self.eval_tokens = None if eval_tokens is None else int(eval_tokens)
        self.eval_seq_len = None if eval_seq_len is None else int(eval_seq_len)
        self.on_event = on_event
        self.score_threads = int(score_threads) if score_threads else score_threads_for(device_type)
        self.t0 = time.monotonic() if t0 is None else t0
        self.lock = threading.RLock()  # _violate and _stop run inside locked sections
        self.hello: dict | None = None
        self.reported: dict = {}          # what train.py reported: params, flops_per_token, ...
        self.child_status: dict | None = None
        self.curve: list[dict] = []
        self.times: dict[str, float] = {}
        self.tokens = 0                   # training tokens served (targets: B*T a batch)
        self.warmup_tokens = 0
        self.batches = 0
        self.steps = 0                    # steps granted
        self.calls = 0                    # step requests
        self.t_clock: float | None = None
        self.t_stop: float | None = None
        self.training_seconds = 0.0
        self.last_step_t: float | None = None
        self.step_intervals: list[float] = []
        self.tokens_at_step = 0
        self.step_tokens: list[int] = []  # tokens served per timed step
        self.seq_len: int | None = None   # of the last batch: the evaluation context
        self.loaders: dict[int, np.random.Generator] = {}
        self.violations: list[str] = []
        self.late_logs = 0
        self.result: dict | None = None   # the score, once made
        self.invalid: str | None = None
        self.finished = False
        self.stop_reason = ""
        self._callback_error: str | None = None
        self._shm: mmap.mmap | None = None
        self._shm_fd = -1
        self._shm_size = 0
        self._private = None              # the runner's own copy of one batch of logits
        self._max_rows = 1                # rows of the largest evaluation batch (set by _evaluate)
        self.logits_bytes = 0             # moved through shared memory at finish
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._dispatcher = None
        if on_event is not None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="autoresearch-events", daemon=True)
            self._dispatcher.start()

    # ------------------------------------------------------------------ the loop
    def serve(self) -> None:
        """Answer requests until the child closes the socket (or sends garbage)."""
        try:
            while True:
                kind, header, payload = self.conn.recv()
                handler = getattr(self, "_on_" + kind, None)
                if handler is None:
                    self._violate(f"sent a message the runner does not know ({kind!r})")
                    continue
                handler(header, payload)
        except WireError:
            return
        except Exception as e:  # a bug here must not hang the run: record it, end the conversation
            self.invalid = self.invalid or f"the runner could not answer the child: {type(e).__name__}: {e}"
            try:
                self.conn.close()   # the child waiting for an answer gets end-of-file now, not at the hard limit
            except Exception:
                pass
        finally:
            self._free_shm()

    def _now(self) -> float:
        return time.monotonic()

    def _violate(self, what: str) -> None:
        with self.lock:
            if what not in self.violations:
                self.violations.append(what)

    # ------------------------------------------------------------------ start
    def _on_hello(self, h: dict, _p) -> None:
        with self.lock:
            if self.hello is None:
                self.hello = {k: h.get(k) for k in ("device", "device_name", "torch", "peak_flops", "pid")}
                for k in ("precision", "cuda"):   # as reported (recorded with a worker's hardware): short text
                    v = h.get(k)
                    self.hello[k] = v[:40] if isinstance(v, str) else None
                self.times["start"] = self._now() - self.t0
        d = self.data
        self.conn.send("config", {"budget": str(self.budget), "seed": self.seed, "vocab_size": d.vocab_size,
                                  "bos_id": d.bos_id, "warmup_steps": self.warmup_steps,
                                  "train_tokens": int(len(d.train)), "data": d.path.name,
                                  "eval_tokens": self._scored_tokens(), "eval_seq_len": self.eval_seq_len})

    def _on_tokenizer(self, _h, _p) -> None:
        self.conn.send("tokenizer", {}, self.data.tokenizer_bytes())

    def _on_watch(self, h: dict, _p) -> None:
        for k in ("params", "flops_per_token"):
            v = _num(h.get(k))
            if v is not None and v >= 0:
                self.reported[k] = v

    def _on_fail(self, h: dict, _p) -> None:
        self.child_status = {"status": str(h.get("status", "")), "reason": str(h.get("reason", ""))[:2000]}

    # ------------------------------------------------------------------ the budget
    def _exhausted(self, now: float, next_tokens: int) -> bool:
        b = self.budget
        if b.kind == "seconds":
            return self.t_clock is not None and now - self.t_clock >= b.amount
        if b.kind == "tokens":
            return self.tokens + max(next_tokens, 1) > b.amount
        fpt = self.reported.get("flops_per_token")
        return fpt is not None and (self.tokens + max(next_tokens, 1)) * fpt > b.amount

    def _start_clock(self, now: float) -> None:
        if self.t_clock is None:
            self.t_clock = now
            self.times["clock"] = now - self.t0
            self.tokens_at_step = self.tokens

    def _stop(self, now: float, why: str) -> None:
        if self.t_stop is None:
            self.t_stop = now
            self.training_seconds = now - self.t_clock if self.t_clock is not None else 0.0
            self.stop_reason = why
            self.times["stop"] = now - self.t0

    def progress(self, now: float | None = None) -> float:
        if self.t_stop is not None:
            return 1.0
        b, now = self.budget, self._now() if now is None else now
        if b.kind == "seconds":
            frac = (now - self.t_clock) / b.amount if self.t_clock is not None else 0.0
        elif b.kind == "tokens":
            frac = self.tokens / b.amount
        else:
            frac = self.tokens * (self.reported.get("flops_per_token") or 0.0) / b.amount
        return min(max(frac, 0.0), 1.0)

    def _on_step(self, h: dict, _p) -> None:
        now = self._now()
        with self.lock:
            self.calls += 1
            if self.calls == 1:
                self.times["first_step"] = now - self.t0
            if self.budget.kind == "flops" and "flops_per_token" not in self.reported:
                self._violate("a FLOP budget needs the model's FLOPs per token: call run.watch(model) "
                              "before the training loop")
                self._stop(now, "no FLOP count")
            if self.t_stop is not None:
                go = False
            else:
                if self.calls == self.warmup_steps + 1:
                    self._start_clock(now)
                timed = self.t_clock is not None and self.calls > self.warmup_steps + 1
                if timed:
                    self.step_intervals.append(now - self.last_step_t)
                    self.step_tokens.append(self.tokens - self.tokens_at_step)
                self.tokens_at_step = self.tokens
                hint = int(_num(h.get("tokens")) or 0)
                last = self.step_tokens[-1] if self.step_tokens else 0
                go = not self._exhausted(now, max(hint, last))
                if not go:
                    self._stop(now, "budget spent")
                else:
                    self.steps += 1
            self.last_step_t = now
            reply = {"go": go, "progress": self.progress(now), "tokens": self.tokens}
        prefetch = h.get("prefetch") if go else None
        if isinstance(prefetch, dict):
            ids = self._batch(prefetch)
            if ids is not None:
                self.conn.send("go", {**reply, "batch": True, "tokens": self.tokens}, ids)
                return
        self.conn.send("go" if go else "stop", reply)

    def _batch(self, h: dict) -> bytes | None:
        """Draw one batch for loader h['loader'] if the budget allows it; else None (a violation).

        Before the clock starts (the warm-up) the batch is uniform random ids, not counted
        against the budget: compile and measure on it, there is nothing in it to learn.
        """
        now = self._now()
        try:
            loader, bsz, seq = int(h["loader"]), int(h["batch_size"]), int(h["seq_len"])
        except (KeyError, TypeError, ValueError):
            self._violate("asked for a batch without a loader, batch_size and seq_len")
            return None
        n = bsz * seq
        with self.lock:
            if not (0 <= loader < MAX_LOADERS and bsz >= 1 and seq >= 1 and n <= MAX_BATCH_TOKENS
                    and seq + 1 <= len(self.data.train)):
                self._violate(f"asked for a batch the runner cannot serve (loader {loader}, {bsz} x {seq})")
                return None
            if self.t_stop is None and self._past_end(now) > self.grace():
                # a loop that never asks run.training() again: the clock is checked here too
                self._stop(now, "budget spent")
            if self.t_stop is not None:
                self._violate(f"asked for a training batch after the budget ended ({self.stop_reason}; "
                              f"{self.steps} steps): train.py must stop when run.training() returns False")
                return None
            if self.t_clock is None and self.batches >= self.warmup_steps * WARMUP_BATCHES_PER_STEP:
                self._start_clock(now)  # batches without steps do not buy untimed training
            if self.t_clock is None:
                self.batches += 1
                self.seq_len = seq
                self.warmup_tokens += n
                rng = self.loaders.get(-1 - loader)
                if rng is None:
                    rng = self.loaders[-1 - loader] = np.random.default_rng([WARMUP_STREAM, self.seed, loader])
                rows = rng.integers(0, self.data.vocab_size, size=(bsz, seq + 1), dtype=np.uint16)
                return rows.tobytes()
            if self._past_end(now) > 0 and self.tokens - self.tokens_at_step + n > self._step_cap(n):
                # the grace is for reaching run.finish, not for data: past the end, only the rest of
                # the step granted last (its batches, with gradient accumulation several) is served
                self._violate(f"asked for more training batches {self._past_end(now):.2f} s after the budget "
                              f"ended than one step uses: train.py must ask run.training() before each step")
                self._stop(now, "budget spent")
                return None
            b = self.budget
            over = (b.kind == "tokens" and self.tokens + n > b.amount) or (
                b.kind == "flops" and (self.tokens + n) * (self.reported.get("flops_per_token") or 0) > b.amount)
            if over:
                self._violate(f"asked for {n:,} more tokens than the {b} budget holds "
                              f"({self.tokens:,} served): pass each step's tokens to run.training(tokens=...)")
                self._stop(now, "budget spent")
                return None
            rng = self.loaders.get(loader)
            if rng is None:
                rng = self.loaders[loader] = np.random.default_rng(self.seed + loader)
            rows = draw_windows(self.data.train, rng, bsz, seq)
            self.batches += 1
            self.seq_len = seq
            self.tokens += n
        return np.ascontiguousarray(rows, dtype=np.uint16).tobytes()

    def _step_cap(self, n: int) -> int:
        """Tokens one training step draws: the median of the timed steps, else the warm-up's per
        step, and at least this batch's `n`."""
        per_warmup = self.warmup_tokens // self.warmup_steps if self.warmup_steps else 0
        median = int(statistics.median(self.step_tokens)) if self.step_tokens else 0
        return max(median, per_warmup, n)

    def _past_end(self, now: float) -> float:
        """Seconds since a seconds budget ran out (on the runner's clock); 0 before, or for
        tokens and FLOPs."""
        if self.budget.kind != "seconds" or self.t_clock is None:
            return 0.0
        return max(0.0, now - self.t_clock - self.budget.amount)

    def _on_batch(self, h: dict, _p) -> None:
        ids = self._batch(h)
        if ids is None:
            self.conn.send("stop", {"reason": self.violations[-1] if self.violations else "budget spent"})
        else:
            self.conn.send("data", {"tokens": self.tokens}, ids)

    # ------------------------------------------------------------------ events
    def _on_log(self, h: dict, _p) -> None:
        now = self._now()
        event = {k: (float(v) if isinstance(v, float) else v) for k, v in h.items()
                 if isinstance(k, str) and len(k) < 64 and k != "late"
                 and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))}
        if "loss" not in event:
            return
        with self.lock:
            if self.t_stop is not None and not self.finished and h.get("late"):
                self.late_logs += 1
            # the runner's numbers, not the child's: tokens served, the runner's clock
            event["tokens"] = self.tokens
            event["elapsed"] = round((now - self.t_clock) if self.t_clock is not None else 0.0, 4)
            event["progress"] = round(self.progress(now), 5)
            event["tok_per_s"] = self.tokens / event["elapsed"] if event["elapsed"] > 0 else None
            self.curve.append(event)
            self.times.setdefault("first_log", now - self.t0)
            self.times["last_log"] = now - self.t0
        if self.on_event is not None:
            self._events.put(dict(event))

    def _dispatch(self) -> None:
        # on_event runs on a thread of its own: a slow live plot must never delay an
        # answer to the child (its training loop waits for the next batch).
        while True:
            event = self._events.get()
            if event is None or self._closed:
                return
            try:
                self.on_event(event)
            except Exception as e:  # the caller's live plot must never end the run
                if self._callback_error is None:
                    self._callback_error = f"{type(e).__name__}: {e}"
                    log.warning("on_event raised %s (further errors ignored); the run goes on.",
                                self._callback_error)

    def close_events(self, timeout: float) -> None:
        """Deliver the queued events (up to `timeout` seconds), then stop the dispatcher."""
        if self._dispatcher is not None and self._dispatcher.is_alive():
            self._events.put(None)
            self._dispatcher.join(timeout=timeout)
        self._closed = True

    # ------------------------------------------------------------------ the end
    def grace(self) -> float:
        """Seconds allowed from the end of the budget to run.finish."""
        forced = config.env("FINISH_GRACE")
        if forced:
            return float(forced)
        steps = statistics.median(self.step_intervals) if self.step_intervals else 0.0
        extra = FINISH_GRACE_STEPS * steps
        if self.budget.kind == "seconds":
            extra = min(extra, FINISH_GRACE_MAX_FRACTION * self.budget.amount)
        return FINISH_GRACE_FLOOR_SECONDS + extra

    def _scored_tokens(self) -> int:
        from autoresearch_kit.metric import scored_count

        return scored_count(len(self.data.val), self.eval_tokens)

    def _on_finish(self, h: dict, _p) -> None:
        now = self._now()
        self._on_watch(h, _p)  # params and FLOPs/token, if run.watch did not send them
        peak = _num(h.get("peak_memory_gb"))
        if peak is not None and peak >= 0:
            self.reported["peak_memory_gb"] = peak
        with self.lock:
            if self.finished:
                self._violate("called run.finish twice")
                self.conn.send("invalid", {"reason": "a run reports one result"})
                return
            self.finished = True
            self.times["finish"] = now - self.t0
            if self.t_stop is None and self._past_end(now) > 0:
                # it never asked run.training() past the end: the budget ended on the clock
                late, grace = self._past_end(now), self.grace()
                self._stop(now, "budget spent")
                if late > grace:
                    self._violate(f"trained {late:.1f} s past the end of the budget without asking "
                                  f"run.training() (allowed {grace:.1f} s): work after the budget is not counted")
            elif self.t_stop is None:
                self._stop(now, "train.py ended before the budget")
            else:
                late, grace = now - self.t_stop, self.grace()
                if late > grace:
                    self._violate(f"reached run.finish {late:.1f} s after the budget ended (allowed {grace:.1f} s, "
                                  f"about {FINISH_GRACE_STEPS:.0f} steps): work after the budget is not counted")
            if self.late_logs:
                self._violate(f"logged {self.late_logs} training step(s) after the budget ended: steps after "
                              "`while run.training(...)` are not counted")
            if self.budget.kind == "seconds" and self.step_tokens:
                # the median timed step, not the largest: one huge step must not raise the cap;
                # one step's slack for a batch prefetched for a loader the first step did not use
                cap = int((self.warmup_steps + 1) * statistics.median(self.step_tokens))
                if self.warmup_tokens > cap:
                    self._violate(f"its {self.warmup_steps} warm-up steps used {self.warmup_tokens:,} tokens, more "
                                  f"than {self.warmup_steps + 1} typical training steps ({cap:,}): warm-up is not "
                                  "budgeted, so it may not train on more than a step's worth each")
            problems = list(self.violations)
        if problems:
            self.invalid = "; ".join(problems)
            self.conn.send("invalid", {"reason": self.invalid})
            return
        if self.seq_len is None and self.eval_seq_len is None:
            self.invalid = "run.finish was called before any training batch: nothing to evaluate at"
            self.conn.send("invalid", {"reason": self.invalid})
            return
        self._evaluate()

    def _plan(self, x_all: np.ndarray, L: int, rng: np.random.Generator):
        """Yield every batch sent at finish, in order; all of one shape (S rows of L ids).

        First a batch of random ids, with `RECHECK_ROWS` rows at the places `at`. Then the
        validation batches: their scored rows (the split in an order train.py cannot
        predict), the probes of the batch before (a row of it whose tokens after a random cut
        are training text: its logits up to the cut must be the ones it got there, whatever
        else its new batch holds) and training text to fill. Last, a batch holding the probes
        of the last validation batch and the recheck rows again, at the same places.
        No batch can be told from another by its shape, and a row's answer may depend on
        nothing but its own tokens up to each position: not on its batch, not on its place.

        Each item: ``sent`` (S, L) ids; ``idx``, ``pos``: the split rows it scores and their
        places in ``sent``; ``checks``: (place, cut) of the probes of the batch before, in the
        order that batch's ``sources`` lists their rows; ``sources``: (place, cut) of the rows
        whose probes come in the next batch; ``at``: the recheck places (first and last only).
        """
        none = np.zeros(0, dtype=np.int64)
        order = rng.permutation(len(x_all))
        per = max(1, min(self._rows_per_batch(L), len(x_all)))
        k = max(1, per // PROBE_SHARE) if L >= 2 else 0
        S = per + k
        at = rng.choice(S, size=min(RECHECK_ROWS, per), replace=False)
        # random ids: a model that trains on the first batch it is sent (within its allowance)
        # learns nothing from it; its recheck rows catch a model that changed by the last batch
        first = rng.integers(0, max(self.data.vocab_size, 1), size=(S, L), dtype=np.uint16)
        yield {"sent": first, "idx": none, "pos": none, "checks": [], "sources": [], "at": at, "end": "first"}
        pending: list[tuple[np.ndarray, int]] = []      # (probe row, cut) for the next batch
        for start in range(0, len(order), per):
            idx = order[start:start + per]
            m = len(idx)
            rows = x_all[idx].astype(np.uint16)
            probe_of = rng.choice(m, size=min(k, max(1, m // PROBE_SHARE)), replace=False) if k else none
            cuts = rng.integers(0, L - 1, size=len(probe_of))
            fresh = []
            for r, t in zip(probe_of, cuts):
                alt = rows[r].copy()
                alt[t + 1:] = self._train_rows(L - t - 1, rng, 1)[0]
                fresh.append((alt, int(t)))
            parts = [rows, *(p[None] for p, _ in pending), self._train_rows(L, rng, S - m - len(pending))]
            batch = np.concatenate(parts)
            perm = rng.permutation(S)                  # sent[where[i]] = batch[i]
            where = np.empty_like(perm)
            where[perm] = np.arange(S)
            yield {"sent": batch[perm], "idx": idx, "pos": where[:m],
                   "checks": [(int(where[m + j]), t) for j, (_, t) in enumerate(pending)],
                   "sources": [(int(where[r]), int(t)) for r, t in zip(probe_of, cuts)], "at": None, "end": ""}
            pending = fresh
        last = self._train_rows(L, rng, S)
        last[at] = first[at]
        free = np.setdiff1d(np.arange(S), at)
        places = rng.choice(free, size=len(pending), replace=False)
        for (p, _), w in zip(pending, places):
            last[w] = p
        yield {"sent": last, "idx": none, "pos": none, "checks": [(int(w), t) for (_, t), w in zip(pending, places)],
               "sources": [], "at": at, "end": "last"}

    def _rows_per_batch(self, L: int) -> int:
        """Scored rows per evaluation batch: LOGIT_BUDGET logits for this device."""
        return max(1, LOGIT_BUDGET.get(self.device_type, 2**25) // (L * max(self.data.vocab_size, 1)))

    def _train_rows(self, L: int, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` windows of training text (never scored), at offsets train.py cannot predict."""
        train = self.data.train
        if n <= 0:
            return np.zeros((0, L), dtype=np.uint16)
        offs = rng.integers(0, max(1, len(train) - L), size=n)
        return np.stack([np.asarray(train[int(o):int(o) + L]) for o in offs]).astype(np.uint16)

    def first_answer_allowance(self, ids: int) -> float:
        """Seconds allowed for the first batch at finish (`ids` token ids): a floor plus
        FIRST_ANSWER_STEPS median training steps, scaled by its size against a step's."""
        forced = config.env("FIRST_ANSWER_SECONDS")
        if forced:
            return float(forced)
        step = statistics.median(self.step_intervals) if self.step_intervals else 0.0
        step_ids = statistics.median(self.step_tokens) if self.step_tokens else 0
        scale = max(1.0, ids / step_ids) if step_ids > 0 else 1.0
        return FIRST_ANSWER_FLOOR_SECONDS + FIRST_ANSWER_STEPS * step * scale

    def _evaluate(self) -> None:
        import torch

        from autoresearch_kit.metric import eval_rows, probe_mismatch, token_ce, total_nats

        t0 = self._now()
        torch.set_num_threads(self.score_threads)   # this thread's OpenMP team only
        d = self.data
        L = int(self.eval_seq_len if self.eval_seq_len is not None else self.seq_len)
        n = self._scored_tokens()
        if n < 1:
            self.invalid = f"the val split of {d.path} is empty; prepare the data again"
            self.conn.send("invalid", {"reason": self.invalid})
            return
        x_all, y_all, m_all = eval_rows(d.val, n, L, d.bos_id)
        ce_all = torch.zeros(x_all.shape, dtype=torch.float32)  # each target's cross-entropy, split order
        rng = np.random.default_rng(secrets.randbits(64))  # an order train.py cannot predict
        probes, rechecked, worst, dtype = 0, 0, 0.0, None
        probe_tol = probe_tolerance()
        timing = {"wait": 0.0, "copy": 0.0, "probes": 0.0, "ce": 0.0}
        pipelined = self.device_type != "cpu"
        plan = self._plan(x_all, L, rng)
        cur = next(plan)
        S = len(cur["sent"])
        self._max_rows = S
        self._send_val(cur["sent"], L)
        t_sent = self._now()
        saved: list = []          # the logits, up to the cut, of the rows whose probes come next
        recheck, first_answer = None, None
        while cur is not None:
            logits = self._recv_logits(S, L, timing)   # a private copy
            if logits is None:
                return
            if cur["end"] == "first":
                # No validation row has been sent yet, and the model is final: this answer is a
                # forward pass, not a chance to train on the batches it was served.
                waited, allowed = self._now() - t_sent, self.first_answer_allowance(S * L)
                first_answer = (round(waited, 4), round(allowed, 4))
                if waited > allowed:
                    self._invalid(f"answered the first evaluation batch {waited:.1f} s after it was sent (allowed "
                                  f"{allowed:.1f} s, a few forward passes): training inside run.finish is work "
                                  "after the budget, and is not counted")
                    return
            # Pipelined on a GPU: the child computes the next batch while this one is scored
            # (the shared buffer was copied out: the child may overwrite it now). Not on a
            # CPU, where both sides would fight for the same cores (2 on the dev box).
            nxt = next(plan, None)
            if nxt is not None and pipelined:
                self._send_val(nxt["sent"], L)
            dtype = logits.dtype
            if logits.shape[-1] < d.vocab_size:
                self._invalid(f"the model's logits have {logits.shape[-1]} classes but the vocabulary has "
                              f"{d.vocab_size} tokens")
                return
            t = self._now()
            for (place, cut), a in zip(cur["checks"], saved):
                b = logits[place, : cut + 1]
                bad = probe_mismatch(a, b, tol=probe_tol)
                probes += 1
                worst = max(worst, bad["max_diff"])
                if not bad["causal"]:
                    self._invalid(f"the model is not causal: a validation row, sent again in the next batch with "
                                  f"only its later tokens changed, got logits that moved by {bad['max_diff']:.3g} "
                                  f"at position {bad['position']}: its answer depends on the targets, on the other "
                                  f"rows of its batch, or it changed while it was scored{_rounding_hint(a, b, probe_tol)}")
                    return
            saved = [logits[place, : cut + 1].clone() for place, cut in cur["sources"]]
            at = None if cur["at"] is None else torch.from_numpy(cur["at"])
            if cur["end"] == "first":
                recheck = logits[at].clone()
            elif cur["end"] == "last":
                for j in range(len(at)):
                    b = logits[int(at[j])]
                    bad = probe_mismatch(recheck[j], b, tol=probe_tol)
                    rechecked += 1
                    worst = max(worst, bad["max_diff"])
                    if not bad["causal"]:
                        self._invalid(f"the model changed while it was scored: a row it answered before any "
                                      f"validation row, sent again after the last, got logits that moved "
                                      f"by {bad['max_diff']:.3g} at position {bad['position']} (a model must not "
                                      f"train on, or remember, the rows it is sent for scoring){_rounding_hint(recheck[j], b, probe_tol)}")
                        return
            t1 = self._now()
            timing["probes"] += t1 - t
            idx, pos = cur["idx"], cur["pos"]
            if len(idx):
                # Score the rows in the order they lie in the buffer, each straight into its
                # place in the split: no gathered copy, no whole float32 copy.
                y_sent = np.zeros((S, L), dtype=np.int64)
                y_sent[pos] = y_all[idx]
                y_sent = torch.from_numpy(y_sent)
                ce_sent = torch.empty(S, L, dtype=torch.float32)
                is_scored = np.zeros(S + 1, dtype=bool)
                is_scored[pos] = True
                edges = np.flatnonzero(np.diff(np.concatenate([[False], is_scored]).astype(np.int8)))
                for a, b in zip(edges[0::2], edges[1::2]):   # runs of scored rows (the rest skipped)
                    token_ce(logits[a:b], y_sent[a:b], out=ce_sent[a:b].view(-1))
                ce_all[torch.from_numpy(idx)] = ce_sent[torch.from_numpy(pos)]
            if nxt is not None and not pipelined:
                self._send_val(nxt["sent"], L)
            timing["ce"] += self._now() - t1
            del logits
            cur = nxt
        nats, nbytes = total_nats(ce_all.numpy(), y_all, m_all, d.token_bytes)
        if nbytes == 0:
            self._invalid("the scored validation tokens carry no bytes (only special tokens?)")
            return
        bpb = nats / (math.log(2) * nbytes)
        self.result = {"val_bpb": bpb, "nats": nats, "bytes": nbytes, "eval_tokens": n, "seq_len": L,
                       "eval_seconds": self._now() - t0, "probes": probes, "rechecked": rechecked,
                       "probe_max_diff": worst, "batch_rows": S, "first_answer": first_answer,
                       "logits_bytes": self.logits_bytes, "logits_dtype": str(dtype).removeprefix("torch."),
                       "timing": {k: round(v, 4) for k, v in timing.items()}}
        if not math.isfinite(bpb):
            self._invalid(f"the model's logits gave a non-finite val_bpb ({bpb})")
            return
        self.times["result"] = self._now() - self.t0
        self.conn.send("score", {"val_bpb": bpb, "eval_tokens": n, "eval_seconds": self.result["eval_seconds"]})

    def _invalid(self, reason: str) -> None:
        self.invalid = reason
        self.result = None
        self.conn.send("invalid", {"reason": reason})

    def _send_val(self, ids: np.ndarray, L: int) -> None:
        self.conn.send("val", {"rows": int(len(ids)), "seq_len": L}, np.ascontiguousarray(ids, dtype=np.uint16).tobytes())

    def _recv_logits(self, rows: int, L: int, timing: dict):
        """Wait for the logits of the batch sent last; return a private copy of them (torch)."""
        import torch

        t = self._now()
        while True:
            kind, h, _p = self.conn.recv()
            if kind == "need":
                size = _num(h.get("bytes")) or 0
                limit = rows * L * self._max_classes() * 4
                if not 0 < size <= limit:
                    self._invalid(f"asked for a logits buffer of {size:.0f} bytes for {rows} rows of {L} "
                                  f"(at most {limit:,}: float32 logits of up to {self._max_classes():,} classes)")
                    return None
                # Every batch at finish has the same shape: one buffer serves them all.
                self._new_shm(int(size))
                self.conn.send("buffer", {"bytes": self._shm_size}, fds=[self._shm_fd])
            elif kind == "logits":
                break
            elif kind == "log":
                continue
            else:
                self._invalid(f"answered the validation batch with {kind!r}, not logits")
                return None
        t1 = self._now()
        timing["wait"] += t1 - t
        shape, dtype = h.get("shape"), str(h.get("dtype"))
        if (not isinstance(shape, list) or len(shape) != 3 or shape[:2] != [rows, L]
                or dtype not in _DTYPES or not all(type(s) is int and s > 0 for s in shape)
                or shape[2] > self._max_classes()):
            self._invalid(f"answered with logits of shape {shape} ({dtype}) for ids of shape ({rows}, {L}): "
                          "the model must map ids (B, T) to logits (B, T, vocab)")
            return None
        count = shape[0] * shape[1] * shape[2]
        if self._shm is None or count * _DTYPES[dtype] > self._shm_size:
            self._invalid("answered with more logits than its buffer holds")
            return None
        # A copy first: the child still maps the buffer and could change it while it is read.
        # Into memory of this process kept from batch to batch: a fresh allocation per batch
        # costs its page faults again (on the 2-core dev box a third of the copy's time).
        nbytes = count * _DTYPES[dtype]
        if self._private is None or self._private.numel() < nbytes:
            self._private = torch.empty(nbytes, dtype=torch.uint8)
        raw = self._private[:nbytes].view(getattr(torch, dtype))
        raw.copy_(torch.frombuffer(self._shm, dtype=getattr(torch, dtype), count=count))
        self.logits_bytes += nbytes
        timing["copy"] += self._now() - t1
        return raw.view(*shape)

    def _max_classes(self) -> int:
        """The most classes a model's logits may have: the vocabulary, padded (up to 2V + 128)."""
        return 2 * max(self.data.vocab_size, 1) + 128

    def _on_need(self, _h, _p) -> None:
        # the child answering a batch sent before the evaluation ended (pipelined): nothing to do
        if not self.finished:
            self._violate("asked for a logits buffer outside the evaluation")

    def _on_logits(self, _h, _p) -> None:
        if not self.finished:
            self._violate("sent logits outside the evaluation")

    def _new_shm(self, size: int) -> None:
        self._free_shm()
        fd = os.memfd_create("autoresearch-logits", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._shm_fd, self._shm_size = fd, size
        self._shm = mmap.mmap(fd, size)

    def _free_shm(self) -> None:
        self._private = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a tensor still views it; the mapping goes with it
                pass
            self._shm = None
        if self._shm_fd >= 0:
            os.close(self._shm_fd)
            self._shm_fd = -1

    # ------------------------------------------------------------------ the record
    def outcome(self) -> dict:
        """What this side knows, for the RunResult: trusted counts, the score or why not."""
        with self.lock:
            fpt = self.reported.get("flops_per_token")
            timed = self.tokens   # warm-up batches are not training data
            peak = _num((self.hello or {}).get("peak_flops"))
            mfu = (fpt * timed / (self.training_seconds * peak)
                   if fpt and peak and self.training_seconds > 0 else None)
            return {
                "started": self.hello is not None, "hello": self.hello, "finished": self.finished,
                "result": dict(self.result) if self.result else None, "invalid": self.invalid,
                "violations": list(self.violations), "child_status": self.child_status,
                "steps": self.steps, "tokens": self.tokens, "warmup_tokens": self.warmup_tokens,
                "training_seconds": self.training_seconds, "stopped": self.t_stop is not None,
                "flops": self.tokens * fpt if fpt else 0.0, "flops_per_token": fpt,
                "params": self.reported.get("params"), "peak_memory_gb": self.reported.get("peak_memory_gb"),
                "mfu": mfu, "curve": list(self.curve), "times": dict(self.times), "seq_len": self.seq_len,
                "callback_error": self._callback_error,
                "epochs": self.tokens / max(len(self.data.train), 1),
            }
