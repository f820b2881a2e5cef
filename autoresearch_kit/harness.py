"""The harness: the only part of the kit that train.py imports (the child side).

    from autoresearch_kit import harness
    run = harness.start()                        # budget, device, seed: from the runner, or defaults
    loader = run.train_loader(batch_size, seq_len)
    run.watch(model)                             # params and FLOPs/token, as train.py reports them
    while run.training(tokens=batch_size * seq_len):
        ...                                      # schedules read run.progress (0..1)
        run.log(step=step, loss=loss, lr=lr)
    run.finish(model)                            # the model answers validation rows with logits

Under the runner this module is only a client: it runs inside the candidate's process,
which is untrusted, so nothing a score depends on is decided here. Over the run's socket
(wire.py) it asks the runner (serve.py) whether the next step may run and for each
training batch; the runner counts the tokens it serves, keeps the clock, and at
`finish` sends validation inputs whose logits it scores itself. The loss curve, FLOPs
per token and peak memory this side sends are shown as what train.py reported.

`python train.py` on its own (no runner) does everything here instead, with the same
API: it reads the prepared data, keeps its own clock and scores with metric.py. Nothing
is at stake there, so nothing is defended.

Exit codes: 3 when the loss diverged (NaN/inf/exploding), 4 when the run is invalid.

Light imports only (torch, numpy, tiktoken via the tokenizer, stdlib and the kit's
config/wire/device/metric/data modules): every candidate pays its import time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import random
import resource
import sys
import time
from contextlib import nullcontext

# Take the runner's socket out of os.environ before any line of train.py runs. The clock
# for total_seconds starts here too.
from autoresearch_kit.wire import Conn, WireError

_CONN = Conn.from_env()
_T_IMPORT = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autoresearch_kit import config  # noqa: E402
from autoresearch_kit.config import Budget  # noqa: E402
from autoresearch_kit.data.loader import TokenLoader  # noqa: E402
from autoresearch_kit.data.shards import PreparedData, encoding_from_json  # noqa: E402
from autoresearch_kit.device import Device, detect  # noqa: E402
from autoresearch_kit.metric import _logits, causality_probe, evaluate_bpb_detail  # noqa: E402

EXIT_DIVERGED = 3
EXIT_INVALID = 4
_STEP_EVENTS_PER_S = 10.0  # live curves need no more; always the last one too
_PRINT_EVERY_S = 2.0       # a human line every ~2 s (and the first steps)
_EXPLODE_RATIO = 3.0       # loss > 3x the first loss (after warm-up) counts as diverged
_EXPLODE_ABS = 100.0       # or above 100 nats/token: far beyond ln(65536) = 11.1
# A seconds budget needs the device's clock, but a sync every step leaves the GPU idle while
# the host queues the next step (a few ms of launches per step on an H100). The host runs at
# most about a step ahead (log() waits for the step before last), so the harness syncs once
# a second to keep run.progress honest, and at the end to confirm the budget is spent.
_SYNC_EVERY_S = 1.0

_started = False


class _State:
    """Everything mutable about a run. Kept off the Run object so train.py cannot set it
    by accident (Run refuses attribute writes)."""

    __slots__ = (
        "device", "budget", "seed", "data", "eval_tokens", "eval_seq_len", "warmup_steps", "loaders", "seq_len",
        "params", "flops_per_token", "calls", "steps", "t_train", "tokens_at_train", "train_seconds",
        "done", "claimed", "last_step_tokens", "pending", "first_loss", "last_event_t", "last_print_t",
        "last_sent", "last_loss", "failed", "finished", "tokens_at_call", "pending_claim",
        "last_sync", "t_start", "t_first_call", "t_stop",
        "vocab_size", "bos_id", "remote_progress", "remote_tokens", "last_loader", "tokenizer", "shm",
    )

    def __init__(self, device: Device, budget: Budget, seed: int, data: PreparedData | None, eval_tokens: int | None,
                 warmup_steps: int, vocab_size: int, bos_id: int, eval_seq_len: int | None = None) -> None:
        self.device, self.budget, self.seed, self.data = device, budget, seed, data
        self.eval_tokens, self.warmup_steps = eval_tokens, warmup_steps
        self.eval_seq_len = eval_seq_len  # the pinned evaluation context, if any
        self.vocab_size, self.bos_id = int(vocab_size), int(bos_id)
        self.remote_progress = 0.0  # served runs: what the runner's last answer said
        self.remote_tokens = 0
        self.last_loader = None
        self.tokenizer = None
        self.shm: mmap.mmap | None = None
        self.loaders: list[TokenLoader] = []
        self.seq_len: int | None = None
        self.params: int | None = None
        self.flops_per_token: float | None = None
        self.calls = 0             # training() calls so far
        self.steps = 0             # training() calls that returned True
        self.t_train: float | None = None    # clock start, after the warm-up steps
        self.tokens_at_train = 0   # tokens seen before the clock started (for tok/s, MFU)
        self.train_seconds: float | None = None
        self.done = False
        self.claimed = 0           # tokens train.py said it used (only ever raises the count)
        self.last_step_tokens = 0
        self.pending: dict | None = None   # last log() call, loss not yet materialised
        self.first_loss: float | None = None
        self.last_event_t = -1e9
        self.last_print_t = -1e9
        self.last_sent: dict | None = None
        self.last_loss: float | None = None
        self.failed: str | None = None
        self.finished = False
        self.tokens_at_call = 0
        self.pending_claim = 0
        self.last_sync = 0.0       # host time of the last device sync (seconds budgets)
        self.t_start = time.perf_counter()      # the timeline, for the overhead report:
        self.t_first_call: float | None = None  # first training() call (setup done)
        self.t_stop: float | None = None        # clock stopped


def _sync(device: Device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _to_float(value) -> float | None:
    if value is None:
        return None
    if torch.is_tensor(value):
        return float(value.detach().float().item())
    return float(value)


def _to_host(value):
    """Start copying a CUDA scalar to (pinned) host memory without waiting for it.

    `.item()` would queue its copy behind all the work queued so far and wait for it, so
    the GPU would idle while the host queues the next step. A non-blocking copy plus an
    event (see Run.log) waits only for the step that produced the value.
    """
    if torch.is_tensor(value):
        value = value.detach()
        if value.device.type == "cuda" and value.numel() == 1:
            return value.to("cpu", non_blocking=True)
    return value


def _peak_memory_gb(device: Device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


def _flop_count(model: torch.nn.Module, ids: torch.Tensor, device: Device) -> float:
    """FLOPs of one eager forward + backward on `ids`, by FlopCounterMode."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    # The CPU flash-attention kernels have no registered formula (torch 2.13); count them
    # like the CUDA ones, so CPU and GPU FLOP budgets agree.
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    amp = (torch.autocast(device.type, dtype=device.autocast_dtype) if device.autocast_dtype is not None
           else nullcontext())
    with fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        with amp:
            logits = model(ids)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
        logits.float().logsumexp(-1).mean().backward()
    return float(counter.get_total_flops())


class Run:
    """One training run, as train.py sees it. Made by `start()`; read-only from outside."""

    __slots__ = ("_s",)

    def __init__(self, state: _State) -> None:
        object.__setattr__(self, "_s", state)

    def __setattr__(self, name, value):
        msg = f"run.{name} is read-only: the harness owns the budget, the clock and the metric."
        raise AttributeError(msg)

    # --- what train.py reads -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._s.device.torch_device

    @property
    def device_type(self) -> str:
        return self._s.device.type

    @property
    def device_name(self) -> str:
        return self._s.device.name

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self._s.device.autocast_dtype

    @property
    def compile(self) -> bool:
        return self._s.device.compile

    @property
    def seed(self) -> int:
        return self._s.seed

    @property
    def budget(self) -> Budget:
        return self._s.budget

    @property
    def vocab_size(self) -> int:
        return self._s.vocab_size

    @property
    def bos_id(self) -> int:
        return self._s.bos_id

    @property
    def eval_seq_len(self) -> int:
        """The context length the model is evaluated at: build the model for at least this.

        The lab's pinned evaluation context (the runner's, or AUTORESEARCH_EVAL_SEQ_LEN on
        its own); without a pin, the seq_len of the last train_loader made so far (0 before
        the first). train.py sizes its RoPE table for max(SEQ_LEN, run.eval_seq_len).
        """
        s = self._s
        return s.eval_seq_len if s.eval_seq_len is not None else (s.seq_len or 0)

    @property
    def tokenizer(self):
        """The data's tiktoken.Encoding (from the runner under it, else the prepared data)."""
        s = self._s
        if s.tokenizer is None:
            if s.data is not None:
                s.tokenizer = s.data.tokenizer
            else:
                _CONN.send("tokenizer")
                _kind, _h, raw = _CONN.recv()
                s.tokenizer = encoding_from_json(bytes(raw))
        return s.tokenizer

    @property
    def warming_up(self) -> bool:
        """Whether the step run.training() just granted is a warm-up step (or none was yet).

        The first AUTORESEARCH_WARMUP_STEPS steps compile and measure; they are not on the
        clock and, under the runner, their batches are random ids. train.py keeps its
        weights and optimizer state out of them (learning rate 0, moments reset after).
        """
        return self._s.calls <= self._s.warmup_steps

    @property
    def step(self) -> int:
        """Training steps granted so far."""
        return self._s.steps

    @property
    def tokens(self) -> int:
        """Training tokens counted so far (by the runner under it, else by the loaders)."""
        return self._s.remote_tokens if _CONN is not None else self._tokens()

    @property
    def flops_per_token(self) -> float | None:
        return self._s.flops_per_token

    @property
    def params(self) -> int | None:
        return self._s.params

    def autocast(self):
        """Context manager: autocast to run.autocast_dtype on this device (or nothing)."""
        s = self._s
        if s.device.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(s.device.type, dtype=s.device.autocast_dtype)

    # --- data ------------------------------------------------------------------------------
    def train_loader(self, batch_size: int, seq_len: int) -> TokenLoader:
        """Random (x, y) training windows on run.device, from the TRAIN split only.

        The evaluation context is `run.eval_seq_len` (the lab's pin); without one, the
        seq_len of the last loader made.
        """
        s = self._s
        if _CONN is not None:
            loader = _ServedLoader(len(s.loaders), batch_size, seq_len, s.device.type, s)
        else:
            loader = TokenLoader(s.data.train, batch_size, seq_len, s.device.type, seed=s.seed + len(s.loaders))
        s.loaders.append(loader)
        s.seq_len = int(seq_len)
        return loader

    # --- measuring -------------------------------------------------------------------------
    def watch(self, model: torch.nn.Module) -> dict:
        """Count parameters and measure FLOPs per token (one eager forward+backward of a
        (1, seq_len) batch under FlopCounterMode). Gradients and RNG state are restored, so
        training is not disturbed. Call after train_loader() (it needs seq_len).

        Returns
        -------
        dict
            params, flops_per_token.
        """
        s = self._s
        if s.seq_len is None:
            msg = "Call run.train_loader(batch_size, seq_len) before run.watch(model): FLOPs/token depend on seq_len."
            raise RuntimeError(msg)
        raw = getattr(model, "_orig_mod", model)  # a torch.compile'd module: count the eager one
        params = list({id(p): p for p in raw.parameters()}.values())
        s.params = int(sum(p.numel() for p in params))
        saved_grads = [p.grad for p in params]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if s.device.type == "cuda" else None
        for p in params:
            p.grad = None
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, s.vocab_size, (1, s.seq_len), generator=gen).to(s.device.torch_device)
        try:
            total = _flop_count(raw, ids, s.device)
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        s.flops_per_token = total / s.seq_len
        if _CONN is not None:
            _CONN.send("watch", {"params": s.params, "flops_per_token": s.flops_per_token})
        print(f"model: {s.params / 1e6:.2f}M params, {s.flops_per_token / 1e6:.1f} MFLOPs/token "
              f"(fwd+bwd, seq_len {s.seq_len})", flush=True)
        return {"params": s.params, "flops_per_token": s.flops_per_token}

    def _tokens(self) -> int:
        s = self._s
        return max(sum(ld.tokens_yielded for ld in s.loaders), s.claimed)

    def _elapsed(self, sync: bool = False) -> float:
        s = self._s
        if s.train_seconds is not None:
            return s.train_seconds
        if s.t_train is None:
            return 0.0
        if sync:
            _sync(s.device)
        return time.perf_counter() - s.t_train

    # --- the budget ------------------------------------------------------------------------
    def training(self, tokens: int | None = None) -> bool:
        """May the next training step run? False once the budget is spent.

        Parameters
        ----------
        tokens : int, optional
            Tokens the next step will use (e.g. batch_size * seq_len). A hint for token and
            FLOP budgets; the count itself comes from the harness loader.
        """
        s = self._s
        if s.done:
            return False
        if _CONN is not None:
            return self._training_served(tokens)
        b = s.budget
        if s.calls == 0 and b.kind == "flops" and s.flops_per_token is None:
            msg = ("A FLOP budget needs the model's FLOPs per token: call run.watch(model) "
                   "before the training loop.")
            raise RuntimeError(msg)
        s.claimed += s.pending_claim  # the previous step ran: its claim counts now
        s.pending_claim = 0
        counted = self._tokens()
        if s.calls > 0:
            s.last_step_tokens = counted - s.tokens_at_call
        s.tokens_at_call = counted
        s.calls += 1
        if s.calls == 1:
            s.t_first_call = time.perf_counter()
        if s.calls == s.warmup_steps + 1:  # the warm-up steps are done: start the clock
            _sync(s.device)
            s.t_train = s.last_sync = time.perf_counter()
            s.tokens_at_train = counted
            if s.warmup_steps:
                # "compile included" only where something compiles (not on CPU, not with compile off)
                what = ", compile included" if s.device.compile else ""
                print(f"clock: started after {s.warmup_steps} warm-up steps "
                      f"({s.t_train - s.t_first_call:.1f}s{what})", flush=True)
        nxt = int(tokens) if tokens is not None else s.last_step_tokens
        stop = False
        if b.kind == "seconds":
            now = time.perf_counter()
            if s.t_train is not None and (now - s.t_train >= b.amount or now - s.last_sync >= _SYNC_EVERY_S):
                _sync(s.device)
                s.last_sync = time.perf_counter()
                stop = s.last_sync - s.t_train >= b.amount
        elif b.kind == "tokens":
            stop = counted + max(nxt, 1) > b.amount
        else:
            stop = (counted + max(nxt, 1)) * s.flops_per_token > b.amount
        if stop:
            self._stop_clock()
            return False
        s.steps += 1
        s.pending_claim = int(tokens) if tokens is not None else 0
        return True

    def _training_served(self, tokens: int | None) -> bool:
        """Ask the runner whether the next step may run; it may send that step's batch along."""
        s = self._s
        if s.calls == 0 and s.budget.kind == "flops" and s.flops_per_token is None:
            msg = ("A FLOP budget needs the model's FLOPs per token: call run.watch(model) "
                   "before the training loop.")
            raise RuntimeError(msg)
        s.calls += 1
        if s.calls == 1:
            s.t_first_call = time.perf_counter()
        if s.calls == s.warmup_steps + 1:
            _sync(s.device)  # the runner starts its clock at this request: the warm-up is done
            s.t_train = time.perf_counter()
        header = {"tokens": int(tokens) if tokens is not None else None}
        ld = s.last_loader
        if ld is not None and ld.ready is None:
            header["prefetch"] = {"loader": ld.index, "batch_size": ld.batch_size, "seq_len": ld.seq_len}
        _CONN.send("step", header)
        kind, h, payload = _CONN.recv()
        s.remote_progress = float(h.get("progress", 0.0))
        s.remote_tokens = int(h.get("tokens", s.remote_tokens))
        if kind != "go" or not h.get("go"):
            _sync(s.device)
            self._stop_clock()
            return False
        if h.get("batch") and ld is not None:
            ld.ready = payload
        s.steps += 1
        return True

    def _stop_clock(self) -> None:
        s = self._s
        if s.done:
            return
        s.done = True
        s.train_seconds = self._elapsed(sync=True) if s.t_train is not None else 0.0
        s.t_stop = time.perf_counter()

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, 0..1, whatever its kind (for LR schedules)."""
        s = self._s
        b = s.budget
        if s.done:
            return 1.0
        if _CONN is not None:
            return s.remote_progress
        if b.kind == "seconds":
            frac = self._elapsed() / b.amount
        elif b.kind == "tokens":
            frac = self._tokens() / b.amount
        else:
            frac = self._tokens() * (s.flops_per_token or 0.0) / b.amount
        return min(max(frac, 0.0), 1.0)

    # --- logging -------------------------------------------------------------------------
    def log(self, step: int | None = None, loss=None, lr=None, lr_mult=None, **extra) -> None:
        """Record one training step: loss (a float or a tensor), lr, and any extra numbers.

        ``lr`` is a learning rate; a schedule that scales several base rates logs its factor
        as ``lr_mult`` instead (printed as ``lr x0.66``, a multiplier, not a rate).

        A tensor loss is copied to the host without blocking and read one call later,
        waiting only for the step that made it: logging never drains the device's queue. Step events go to the runner at most 10
        per second (and always the last); a line is printed every ~2 s. A NaN/inf loss, or
        one exploding after warm-up (> 3x the first loss, or > 100), ends the run with
        status `diverged` (exit code 3).
        """
        s = self._s
        if loss is None:
            msg = "run.log() needs loss=..., e.g. run.log(step=step, loss=loss, lr=lr)."
            raise ValueError(msg)
        previous = s.pending
        s.pending = {
            "step": s.steps - 1 if step is None else int(step),
            "loss": _to_host(loss),
            "lr": _to_host(lr),
            "extra": {k: _to_host(v) for k, v in {**extra, **({"lr_mult": lr_mult} if lr_mult is not None
                                                                else {})}.items()},
            "ready": None,
            "tokens": self.tokens,
            "elapsed": self._elapsed(),
            "progress": self.progress,
            "index": s.steps - 1,  # the harness's own count: train.py's step numbers are its business
            "late": s.done,  # logged after the budget ended (the runner counts that as work after it)
        }
        if s.device.type == "cuda":
            s.pending["ready"] = torch.cuda.Event()
            s.pending["ready"].record()  # the host copies above are done when this fires
        if previous is not None:
            self._emit(previous, last=False)

    def _emit(self, rec: dict, last: bool) -> None:
        s = self._s
        if rec["ready"] is not None:
            rec["ready"].synchronize()  # waits for that step only, not for the steps queued after it
        loss = _to_float(rec["loss"])
        event = {"step": rec["step"], "loss": loss, "lr": _to_float(rec["lr"]), "tokens": rec["tokens"],
                 "elapsed": round(rec["elapsed"], 4), "progress": round(rec["progress"], 5)}
        trained = rec["tokens"] - s.tokens_at_train
        event["tok_per_s"] = trained / rec["elapsed"] if rec["elapsed"] > 0 else None
        for k, v in rec["extra"].items():
            try:
                event[k] = _to_float(v)
            except (TypeError, ValueError):
                continue  # only numbers travel as metrics
        s.last_loss = loss
        self._check_divergence(loss, rec["step"], rec["index"])
        now = time.perf_counter()
        # the first steps always (a live curve starts at once), then at most 10 a second, and the last
        if _CONN is not None and (last or rec["index"] < 3 or now - s.last_event_t >= 1.0 / _STEP_EVENTS_PER_S
                                  or rec.get("late")):
            # `late`: logged after the runner ended the budget (it counts those as work after it)
            _CONN.send("log", {**event, "late": bool(rec.get("late"))})
            s.last_event_t, s.last_sent = now, event
        if last or rec["index"] < 3 or now - s.last_print_t >= _PRINT_EVERY_S:
            s.last_print_t = now
            tps = f"{event['tok_per_s']:,.0f}" if event["tok_per_s"] else "-"
            lr = f" | lr {event['lr']:.3g}" if event["lr"] is not None else ""
            if event.get("lr_mult") is not None:   # the schedule's factor of the base rates
                lr += f" | lr x{event['lr_mult']:.3g}"
            print(f"step {rec['step']:5d} | loss {loss:.4f}{lr} | {100 * rec['progress']:5.1f}% "
                  f"| {rec['tokens'] / 1e6:.2f}M tok | {tps} tok/s | {rec['elapsed']:.1f}s", flush=True)

    def _check_divergence(self, loss: float, step: int, index: int) -> None:
        s = self._s
        reason = None
        if not math.isfinite(loss):
            reason = f"loss is {loss} at step {step}"
        elif s.first_loss is None:
            s.first_loss = loss
        elif index >= s.warmup_steps and (loss > _EXPLODE_ABS or loss > _EXPLODE_RATIO * s.first_loss):
            reason = f"loss exploded to {loss:.3g} at step {step} (first loss {s.first_loss:.3g})"
        if reason is not None:
            self._fail("diverged", reason, EXIT_DIVERGED)

    def _fail(self, status: str, reason: str, code: int, result: dict | None = None) -> None:
        s = self._s
        s.failed = status
        self._stop_clock()
        if _CONN is not None:
            _CONN.send("fail", {"status": status, "reason": reason})
        elif result is not None:
            _write_standalone(result)
        print(f"{status}: {reason}", flush=True)
        sys.stdout.flush()
        sys.exit(code)

    # --- the end ---------------------------------------------------------------------------
    def finish(self, model: torch.nn.Module) -> dict:
        """Score the model and report: causality probe, trusted val_bpb on the pinned
        validation tokens, peak memory, MFU; prints the summary block and sends the result.

        Returns
        -------
        dict
            The result record (as sent to the runner). A non-causal model exits with code 4.
        """
        s = self._s
        if s.failed:
            sys.exit(EXIT_DIVERGED if s.failed == "diverged" else EXIT_INVALID)
        if s.finished:
            msg = "run.finish(model) was already called; a run reports one result."
            raise RuntimeError(msg)
        s.finished = True
        if s.pending is not None:
            self._emit(s.pending, last=True)
            s.pending = None
        self._stop_clock()
        if s.seq_len is None:
            msg = "run.finish(model) needs the seq_len to evaluate at: create a loader with run.train_loader() first."
            raise RuntimeError(msg)
        if s.params is None:
            raw = getattr(model, "_orig_mod", model)
            s.params = int(sum(p.numel() for p in {id(p): p for p in raw.parameters()}.values()))
        if _CONN is not None:
            return self._finish_served(model)
        tokens = self._tokens()
        flops = tokens * s.flops_per_token if s.flops_per_token else 0.0
        dev = s.device
        result = {
            "status": "ok", "reason": "", "val_bpb": None, "steps": s.steps, "tokens": tokens, "flops": flops,
            "params": s.params, "training_seconds": s.train_seconds or 0.0, "total_seconds": 0.0,
            "eval_seconds": 0.0, "eval_tokens": 0, "peak_memory_gb": None, "mfu": None, "causal": None,
            "device": dev.describe(), "torch": torch.__version__, "seed": s.seed, "budget": str(s.budget),
            "seq_len": s.seq_len, "flops_per_token": s.flops_per_token,
        }
        L = self.eval_seq_len
        try:
            probe = causality_probe(model, vocab_size=s.data.vocab_size, seq_len=L, device=dev.torch_device)
        except Exception as e:
            _context_error(e, L, s.seq_len)
            raise
        result["causal"] = probe["causal"]
        if not probe["causal"]:
            reason = (f"the model is not causal: its logits at position {probe['position']} changed by "
                      f"{probe['max_diff']:.3g} when only later tokens changed, so it can see the targets")
            result.update(status="invalid", reason=reason, total_seconds=time.perf_counter() - _T_IMPORT)
            self._fail("invalid", reason, EXIT_INVALID, result)
        try:
            ev = evaluate_bpb_detail(model, s.data, seq_len=L, eval_tokens=s.eval_tokens,
                                     device=dev.torch_device, autocast_dtype=dev.autocast_dtype)
        except Exception as e:
            _context_error(e, L, s.seq_len)
            raise
        timed_tokens = tokens - s.tokens_at_train
        mfu = None
        if dev.peak_flops and s.flops_per_token and s.train_seconds:
            mfu = s.flops_per_token * timed_tokens / (s.train_seconds * dev.peak_flops)
        result.update(val_bpb=ev["bpb"], eval_seconds=ev["seconds"], eval_tokens=ev["tokens"], eval_seq_len=L,
                      peak_memory_gb=_peak_memory_gb(dev), mfu=mfu,
                      total_seconds=time.perf_counter() - _T_IMPORT, **self._timeline())
        # where the wall time outside the budget went, before the original's summary block
        print("outside the budget: " + " | ".join(
            f"{k.removesuffix('_seconds')} {result[k]:.2f}s" for k in
            ("startup_seconds", "setup_seconds", "warmup_seconds", "eval_seconds", "finish_seconds")), flush=True)
        _print_summary(result)
        _write_standalone(result)
        return result

    def _finish_served(self, model: torch.nn.Module) -> dict:
        """Answer the runner's validation rows with logits until it sends the score."""
        s = self._s
        dev = s.device
        _CONN.send("finish", {"params": s.params, "peak_memory_gb": _peak_memory_gb(dev),
                              "flops_per_token": s.flops_per_token})
        was_training = model.training
        model.eval()
        t_eval = time.perf_counter()
        try:
            # no_grad rather than inference_mode: a model that caches tensors lazily (e.g. RoPE
            # tables) would otherwise keep inference tensors that break later use.
            with torch.no_grad():
                while True:
                    kind, h, payload = _CONN.recv()
                    if kind == "val":
                        rows, seq = int(h["rows"]), int(h["seq_len"])
                        ids = torch.from_numpy(np.frombuffer(payload, dtype=np.uint16).astype(np.int64)
                                               .reshape(rows, seq)).to(dev.torch_device)
                        try:
                            with self.autocast():
                                logits = _logits(model, ids, s.vocab_size)
                        except Exception as e:
                            _context_error(e, seq, s.seq_len)
                            raise
                        self._send_logits(logits)
                    elif kind == "score":
                        break
                    elif kind == "invalid":
                        reason = str(h.get("reason", "the runner rejected the run"))
                        print(f"invalid: {reason}", flush=True)
                        sys.stdout.flush()
                        sys.exit(EXIT_INVALID)
                    else:
                        msg = f"the runner sent {kind!r} during the evaluation"
                        raise RuntimeError(msg)
        finally:
            model.train(was_training)
        result = {
            "status": "ok", "val_bpb": float(h["val_bpb"]), "steps": s.steps, "tokens": s.remote_tokens,
            "params": s.params, "training_seconds": s.train_seconds or 0.0,
            "total_seconds": time.perf_counter() - _T_IMPORT, "eval_seconds": time.perf_counter() - t_eval,
            "eval_tokens": int(h.get("eval_tokens", 0)), "peak_memory_gb": _peak_memory_gb(dev), "mfu": None,
            "flops": s.remote_tokens * s.flops_per_token if s.flops_per_token else 0.0,
            "seq_len": s.seq_len, "eval_seq_len": self.eval_seq_len, "device": dev.describe(),
            "budget": str(s.budget), "seed": s.seed, **self._timeline(),
        }
        if dev.peak_flops and s.flops_per_token and s.train_seconds:
            result["mfu"] = s.flops_per_token * (s.remote_tokens - s.tokens_at_train) / (s.train_seconds * dev.peak_flops)
        print("outside the budget: " + " | ".join(
            f"{k.removesuffix('_seconds')} {result[k]:.2f}s" for k in
            ("startup_seconds", "setup_seconds", "warmup_seconds", "eval_seconds", "finish_seconds")), flush=True)
        _print_summary(result)
        return result

    def _send_logits(self, logits: torch.Tensor) -> None:
        """Write logits into the runner's shared buffer (asking for one first) and say so."""
        s = self._s
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            logits = logits.float()
        logits = logits.contiguous()
        nbytes = logits.numel() * logits.element_size()
        if s.shm is None or len(s.shm) < nbytes:
            _CONN.send("need", {"bytes": nbytes})
            kind, h, _p, fds = _CONN.recv(with_fds=True)
            if kind != "buffer" or not fds:
                reason = h.get("reason", kind)
                print(f"invalid: {reason}", flush=True)
                sys.exit(EXIT_INVALID)
            if s.shm is not None:
                _unpin(s.shm)
                s.shm.close()
            s.shm = mmap.mmap(fds[0], int(h["bytes"]))
            for fd in fds:
                os.close(fd)
            if logits.device.type == "cuda":
                _pin(s.shm)
        dst = torch.frombuffer(s.shm, dtype=logits.dtype, count=logits.numel()).view(logits.shape)
        dst.copy_(logits)
        del dst
        _CONN.send("logits", {"shape": list(logits.shape), "dtype": str(logits.dtype).removeprefix("torch.")})


    def _timeline(self) -> dict:
        """Where the time outside the budget went (seconds), for the summary and bench/gpu.py."""
        s = self._s
        first = s.t_first_call if s.t_first_call is not None else s.t_start
        clock = s.t_train if s.t_train is not None else first
        stop = s.t_stop if s.t_stop is not None else clock
        return {"startup_seconds": s.t_start - _T_IMPORT,         # imports, device, data
                "setup_seconds": first - s.t_start,               # model, FLOP count, optimizer
                "warmup_seconds": clock - first,                  # warm-up steps, compile included
                "finish_seconds": time.perf_counter() - stop}     # causality probe + evaluation


_PINNED: dict[int, tuple[int, torch.Tensor]] = {}   # id(mmap) -> (address, the view that holds it)


def _pin(buf: mmap.mmap) -> None:
    """Page-lock the runner's logits buffer for CUDA, so the device-to-host copy is one DMA.

    Into pageable memory the driver stages the copy through its own pinned buffers (the
    H200's 2 GB of bf16 logits took a good part of a second that way). Best effort: any
    failure leaves the buffer pageable, which only costs time.
    """
    try:
        view = torch.frombuffer(buf, dtype=torch.uint8)
        ptr = view.data_ptr()
        if int(torch.cuda.cudart().cudaHostRegister(ptr, len(buf), 0)) == 0:
            _PINNED[id(buf)] = (ptr, view)
    except Exception:  # noqa: BLE001 - an old driver, no cudart binding: pageable it is
        pass


def _unpin(buf: mmap.mmap) -> None:
    got = _PINNED.pop(id(buf), None)
    if got is not None:
        try:
            torch.cuda.cudart().cudaHostUnregister(got[0])
        except Exception:  # noqa: BLE001
            pass


def _context_error(e: Exception, L: int, seq_len: int | None) -> None:
    """A model that fails at the evaluation context: say which context, and what to build for."""
    if isinstance(e, (TypeError, ValueError)) and "logits" in str(e):
        return  # the model's output, not its context: _logits' own message says it
    if seq_len is not None and L > seq_len:
        msg = (f"the model failed on validation rows of {L} tokens, the lab's pinned evaluation context "
               f"(run.eval_seq_len = {L}; it trains at seq_len {seq_len}): build the model for "
               f"max(SEQ_LEN, run.eval_seq_len) tokens, e.g. its RoPE table ({type(e).__name__}: {e})")
        raise RuntimeError(msg) from e


def _print_summary(r: dict) -> None:
    # The original autoresearch block, so existing `grep "^val_bpb:"` habits keep working.
    print("---")
    print(f"val_bpb:          {r['val_bpb']:.6f}")
    print(f"training_seconds: {r['training_seconds']:.1f}")
    print(f"total_seconds:    {r['total_seconds']:.1f}")
    print(f"peak_memory_gb:   {r['peak_memory_gb']:.2f}")
    # MFU needs the device's peak FLOP/s, known for GPUs in device.py's table, not for CPUs
    print(f"mfu_percent:      {100 * r['mfu']:.2f}" if r["mfu"] is not None else "mfu_percent:      n/a")
    print(f"total_tokens_M:   {r['tokens'] / 1e6:.2f}")
    print(f"num_steps:        {r['steps']}")
    print(f"num_params_M:     {r['params'] / 1e6:.1f}", flush=True)


def _write_standalone(result: dict) -> None:
    """Without a runner, keep the result where a person (or a notebook) can find it."""
    if _CONN is not None:
        return
    path = config.cache_dir() / "runs" / "last_result.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache must not lose the printed result
        print(f"note: could not write {path}: {e}", flush=True)


def start() -> Run:
    """Begin the run: take the budget, seed and data from the runner (or the defaults), seed, announce.

    Under the runner everything comes over its socket. On its own (`python train.py`) it
    reads AUTORESEARCH_BUDGET, _SEED, _DEVICE, _DATA, _EVAL_TOKENS, _EVAL_SEQ_LEN and _WARMUP_STEPS
    (docs/CONTRACTS.md); without them: 60 s on CPU/MPS or 300 s on CUDA, seed 42, the
    device autodetected, the last prepared dataset.

    Returns
    -------
    Run
    """
    global _started
    if _started:
        msg = "harness.start() was already called in this process; one run per process."
        raise RuntimeError(msg)
    device = detect()
    if _CONN is not None:
        state = _start_served(device)
    else:
        state = _start_local(device)
    if device.type == "cuda":
        # the compile cache lives under the kit's cache, so reruns of a candidate reuse it
        # (under the runner it is the sandbox's per-candidate cache)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(config.cache_dir() / "compile"))
    random.seed(state.seed)
    np.random.seed(state.seed)
    torch.manual_seed(state.seed)
    _started = True
    return Run(state)


def _start_served(device: Device) -> _State:
    _CONN.send("hello", {"device": device.type, "device_name": device.name, "torch": torch.__version__,
                         "cuda": torch.version.cuda, "peak_flops": device.peak_flops, "pid": os.getpid(),
                         "precision": (str(device.autocast_dtype).removeprefix("torch.")
                                       if device.autocast_dtype else "float32")})
    kind, cfg, _p = _CONN.recv()
    if kind != "config":
        msg = f"the runner answered {kind!r} instead of the run's settings"
        raise RuntimeError(msg)
    budget = Budget.parse(cfg["budget"])
    pinned = cfg.get("eval_seq_len")
    state = _State(device, budget, int(cfg["seed"]), None, int(cfg["eval_tokens"]), int(cfg["warmup_steps"]),
                   int(cfg["vocab_size"]), int(cfg["bos_id"]), int(pinned) if pinned else None)
    context = f"context {state.eval_seq_len}" if state.eval_seq_len else "context: the last loader's seq_len"
    print(f"run: budget {budget} | seed {state.seed} | data {cfg.get('data')} (vocab {state.vocab_size}, "
          f"{int(cfg.get('train_tokens', 0)) / 1e6:.2f}M train tokens, served by the runner) | "
          f"eval {state.eval_tokens:,} val tokens, {context}, scored by the runner", flush=True)
    return state


def _start_local(device: Device) -> _State:
    budget = config.default_budget(device.type)
    seed = int(config.env("SEED") or config.DEFAULT_SEED)
    warmup = int(config.env("WARMUP_STEPS") or config.DEFAULT_WARMUP_STEPS)
    if warmup < 0:
        msg = f"AUTORESEARCH_WARMUP_STEPS must be >= 0, got {warmup}."
        raise ValueError(msg)
    eval_tokens = config.default_eval_tokens()
    eval_seq_len = config.eval_seq_len_setting()
    data_dir = config.data_dir()
    try:
        data = PreparedData.open(data_dir)
    except FileNotFoundError as e:
        msg = (f"No prepared data at {data_dir}: run `python prepare.py` first (or set AUTORESEARCH_DATA "
               f"to a prepared directory).")
        script = sys._getframe(2).f_globals.get("__name__") == "__main__" and "IPython" not in sys.modules
        if script:  # `python train.py` in a terminal: one line, not a traceback
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise FileNotFoundError(msg) from e
    from autoresearch_kit.metric import scored_count

    scored = scored_count(len(data.val), eval_tokens)
    context = f", context {eval_seq_len}" if eval_seq_len else ""
    print(f"run: budget {budget} | seed {seed} | data {data.path} (vocab {data.vocab_size}, "
          f"{len(data.train) / 1e6:.2f}M train tokens) | eval {scored:,} val tokens{context}", flush=True)
    return _State(device, budget, seed, data, eval_tokens, warmup, data.vocab_size, data.bos_id, eval_seq_len)


class _ServedLoader(TokenLoader):
    """Training batches from the runner: the same windows TokenLoader would draw, served and counted there."""

    def __init__(self, index: int, batch_size: int, seq_len: int, device, state: _State) -> None:
        self._setup(batch_size, seq_len, device)
        self.index, self._state = index, state
        self.ready: bytearray | None = None  # a batch the runner sent with the last step's answer
        state.last_loader = self

    def _gather(self) -> np.ndarray:
        s = self._state
        s.last_loader = self
        payload, self.ready = self.ready, None
        if payload is None:
            _CONN.send("batch", {"loader": self.index, "batch_size": self.batch_size, "seq_len": self.seq_len})
            kind, h, payload = _CONN.recv()
            if kind != "data":
                msg = f"the runner served no training batch: {h.get('reason', 'the budget is spent')}"
                raise RuntimeError(msg)
            s.remote_tokens = int(h.get("tokens", s.remote_tokens))
        return np.frombuffer(payload, dtype=np.uint16).reshape(self.batch_size, self.seq_len + 1)


__all__ = ["EXIT_DIVERGED", "EXIT_INVALID", "Run", "start"]
