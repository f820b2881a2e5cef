"""The `autoresearch` command: the research loop headless, from a terminal.

    autoresearch prepare                          # data + tokenizer (once)
    autoresearch init mylab                       # a new lab: program.md + train.py
    autoresearch run --lab mylab --steps 3 --budget 20s --yes      # autopilot
    autoresearch run --lab mylab                  # asks y/n/e/q for each proposal
    autoresearch status --lab mylab               # the ledger as a table
    autoresearch report --lab mylab               # writes mylab/progress.png
    autoresearch decide --lab mylab [ID] [--keep | --discard | --rule]   # an undecided experiment
    autoresearch recover --lab mylab              # rebuild a lost ledger.sqlite from results.tsv + git
    python -m autoresearch_kit ...                # the same

`--lab` defaults to the current directory if it is a lab, else `./lab` (created on the
first `run`, from ./program.md and ./train.py if present, else the templates).
`--proposer` defaults to auto: the LLM when --model/--base-url, AUTORESEARCH_MODEL or
OPENAI_BASE_URL is set, else the offline mutate proposer. Expected problems (no prepared
data, a lab open elsewhere, a bad flag or budget, an unreachable endpoint, a lost ledger or
.git, a full disk, a hand edit that cannot run) print one line and exit with status 2;
Ctrl-C records the interrupted run as aborted, names it, and exits 130. `run` first asks
about experiments that ran and were never decided.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from autoresearch_kit.progress import run_phase

EXIT_USER = 2
EXIT_INTERRUPT = 130


class UserError(Exception):
    """An expected problem: printed as one line, exit status 2."""


# ---- helpers -----------------------------------------------------------------------------------

def _lab_dir(arg: str | None) -> Path:
    from autoresearch_kit.lab import is_lab

    if arg:
        return Path(arg).expanduser()
    here = Path.cwd()
    return here if is_lab(here) else here / "lab"


def _not_a_file(path: Path, flag: str = "--lab") -> None:
    """A lab is a directory: a file at that path would otherwise end in a mkdir traceback."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a lab directory: pass a directory ({flag} DIR).")


def _require_lab(path: Path, given: str | None = None) -> None:
    from autoresearch_kit.lab import is_lab

    _not_a_file(path)
    if is_lab(path):
        return
    if given is None:  # no --lab: the current directory and ./lab were both tried
        raise UserError(f"no lab here: neither {Path.cwd()} nor ./lab is a lab. cd into one, pass --lab DIR, "
                        f"or create one with `autoresearch init DIR`.")
    raise UserError(f"{path} is not a lab (no ledger.sqlite): create one with `autoresearch init {path}`, "
                    f"or pass the --lab of an existing one.")


def _color(text: str, code: str, enabled: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if enabled else text


def _print_diff(diff: str, out=None) -> None:
    out = out or sys.stdout  # looked up at call time: tests and notebooks swap sys.stdout
    tty = out.isatty()
    for line in diff.splitlines():
        if line.startswith("+++") or line.startswith("---"):
            out.write(_color(line, "1", tty) + "\n")
        elif line.startswith("+"):
            out.write(_color(line, "32", tty) + "\n")
        elif line.startswith("-"):
            out.write(_color(line, "31", tty) + "\n")
        elif line.startswith("@@"):
            out.write(_color(line, "36", tty) + "\n")
        else:
            out.write(line + "\n")
    out.flush()


_QUIET_S = 3.0   # a phase without steps (starting, evaluating) is logged once it lasted this long


class ProgressBar:
    """A one-line progress bar for a run, driven by the runner's step events and a clock.

    It says the phase as well as the budget's share: ``starting`` (no step yet: the
    process, imports, data), ``warm-up`` (steps before the clock starts: compile), ``training``
    (with the time so far and an estimate of what is left) and ``evaluating`` (the budget is
    spent, scoring runs: no steps come then). On a terminal it redraws in place (stderr),
    once a second between steps too; otherwise it prints a line at each quarter of the
    budget and one when a phase without steps begins, so logs stay short.
    """

    def __init__(self, label: str, stream=None, width: int = 28, clock=time.monotonic,
                 eval_s: float | None = None) -> None:
        self.label, self.width = label, width
        self.eval_s = eval_s   # how long the last scoring took (the parent's): the estimate includes it
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self._last_quarter = -1
        self._last_draw = 0.0
        self._mu = threading.Lock()
        self._drawn = False
        self._t0: float | None = None
        self._events: list[tuple[float, dict]] = []   # (arrival, event): the last two are enough
        self._said: str | None = None
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        """The run begins now (after the proposal was approved): start the clock and the ticker."""
        with self._mu:
            if self._t0 is not None:
                return
            self._t0 = self.clock()
        self.tick()
        self._ticker = threading.Thread(target=self._tick_loop, name="autoresearch-progress", daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._closed.wait(1.0):
            self.tick()

    def phase(self) -> tuple[str, str]:
        """(phase, detail): starting / warm-up / training / evaluating, with times (see progress.run_phase)."""
        now = self.clock()
        return run_phase(self._t0 if self._t0 is not None else now, self._events, now, eval_s=self.eval_s)

    def tick(self) -> None:
        """Redraw from the clock (no event needed): the phases without steps show their time."""
        with self._mu:
            if self._t0 is None or self._closed.is_set():
                return
            name, detail = self.phase()
            if self.tty:
                self._draw_line(f"{name} {detail}")
            elif name in ("starting", "evaluating") and self._said != name and self._quiet_for() >= _QUIET_S:
                # a log gets one line per phase without steps, once it has lasted a few seconds
                self._said = name
                self.stream.write(f"{self.label} {name} ({detail})...\n")
                self.stream.flush()

    def _quiet_for(self) -> float:
        """Seconds since the last step event (or the start)."""
        last = self._events[-1][0] if self._events else self._t0
        return self.clock() - last if last is not None else 0.0

    def _draw_line(self, info: str) -> None:
        p = min(max(float((self._events[-1][1] if self._events else {}).get("progress") or 0.0), 0.0), 1.0)
        filled = int(round(p * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {p * 100:3.0f}%  {info}\033[K")
        self.stream.flush()
        self._drawn = True

    def __call__(self, event: dict) -> None:
        if self._t0 is None:   # nobody called start(): the clock starts with the first step
            self._t0 = self.clock()
        p = min(max(float(event.get("progress") or 0.0), 0.0), 1.0)
        loss = event.get("loss")
        tps = event.get("tok_per_s")
        info = f"step {event.get('step', '?')}"
        if isinstance(loss, (int, float)):
            info += f"  loss {loss:.4f}"
        if isinstance(tps, (int, float)) and tps:
            info += f"  {tps / 1000:.1f}k tok/s"
        with self._mu:
            self._events = [*self._events[-1:], (self.clock(), dict(event))]
            if self.tty:
                now = time.monotonic()
                if now - self._last_draw < 0.1 and p < 1.0:  # ~10 redraws/s is plenty
                    return
                self._last_draw = now
                name, detail = self.phase()
                self._draw_line(f"{info}  {name} {detail}")
            else:
                quarter = int(p * 4)
                if quarter <= self._last_quarter:
                    return
                self._last_quarter = quarter
                self._said = "training"
                self.stream.write(f"{self.label} {p * 100:3.0f}%  {info}\n")
            self.stream.flush()

    def close(self) -> None:
        self._closed.set()
        with self._mu:
            if self.tty and self._drawn:
                self.stream.write("\n")
                self.stream.flush()
            self._drawn = False

    def note(self, text: str, *, next_run: str | None = None) -> None:
        """Print a line of what the lab does between runs (above the bar on a terminal);
        with ``next_run``, the bar starts over for that run (a rerun's steps start at 0)."""
        with self._mu:
            if self.tty and self._drawn:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._drawn = False
            print(text, flush=True)
            if next_run is not None:
                self.label, self._events, self._last_quarter, self._said = next_run, [], -1, None
                if self._t0 is not None:
                    self._t0 = self.clock()


def _edit_source(source: str) -> str:
    """Open the source in $VISUAL / $EDITOR (default vi) and return the edited text."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.py"
        path.write_text(source, encoding="utf-8")
        cmd = shlex.split(editor) + [str(path)]
        if shutil.which(cmd[0]) is None:
            raise UserError(f"editor {cmd[0]!r} not found: set $EDITOR (e.g. EDITOR=nano).")
        rc = subprocess.call(cmd)
        if rc != 0:
            raise UserError(f"the editor exited with status {rc}; the edit was not used.")
        return path.read_text(encoding="utf-8")


def _ask(prompt: str) -> str:
    """input() that treats end of input as 'quit' (a closed stdin must not loop forever)."""
    try:
        return input(prompt)
    except EOFError:
        print()
        return "q"


class _Quit(Exception):
    """The user answered q at a prompt."""


def _announce(proposal) -> bool:
    """The approval callback of --yes: say what is about to train (a Ctrl-C then knows what it stops)."""
    print(f"proposal ({proposal.proposer}): {proposal.description}")
    return True


def _interactive_approve(lab) -> Any:
    """The y/n/e/q approval callback: shows the diff, asks, returns what Lab.step expects."""

    def approve(proposal):
        print()
        print(f"proposal ({proposal.proposer}): {proposal.description}")
        if proposal.rationale:
            print(f"why: {proposal.rationale}")
        _print_diff(proposal.diff)
        while True:
            answer = _ask("run it? [y]es / [n]o / [e]dit / [q]uit: ").strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                reason = _ask("reason (shown to the proposer next step; enter to skip): ").strip()
                return reason if reason not in ("", "q") else False
            if answer in ("e", "edit"):
                try:
                    edited = _edit_source(proposal.source)
                except UserError as e:   # an editor that failed (or :cq in vim): ask again, the session goes on
                    print(f"error: {e}")
                    continue
                if edited == proposal.source:
                    print("no change made; running the proposal as is")
                    return True
                description = _ask(f"description [{proposal.description} (edited)]: ").strip()
                if description in ("", "q"):
                    description = f"{proposal.description} (edited)"
                try:
                    human = lab.submit(edited, description, original=proposal)
                except ValueError as e:
                    print(f"error: {e}")
                    continue
                print(f"your edit ({description}), against the parent:")
                _print_diff(human.diff)
                return human
            if answer in ("q", "quit"):
                raise _Quit
            print("answer y, n, e or q")

    return approve


def _throughput_note(lab, rec: dict) -> str:
    """Lab.verdict's throughput note (lab.throughput_note), indented as a CLI note line."""
    from autoresearch_kit.lab import throughput_note

    if not rec.get("parent_id"):
        return ""
    note = throughput_note(rec, lab.ledger.get(rec["parent_id"]), lab.budget)
    return f"      note: {note}" if note else ""


def _timeout_note(lab, rec: dict) -> str:
    """For a timed-out run: whether the hard limit struck outside the training window (the machine's)."""
    from autoresearch_kit.lab import timeout_phase

    if rec.get("status") != "timeout":
        return ""
    full = lab.ledger.get(rec["id"])   # with its curve
    phase = timeout_phase(full)
    limit = (full.get("extra") or {}).get("hard_limit")
    lim = f" of {float(limit):.0f} s" if limit else ""
    if phase == "evaluation":
        return (f"the run spent its budget, then its evaluation did not finish before the hard limit{lim}: this "
                f"machine is busy or slow, train.py is not at fault. Run again (the next limit is sized from what "
                f"this lab measured), or set AUTORESEARCH_HARD_LIMIT=SECONDS / a smaller AUTORESEARCH_EVAL_TOKENS.")
    if phase == "setup":
        return (f"the run was killed at the hard limit{lim} before its first training step (start-up, compile, "
                f"warm-up): this machine is busy or slow (unless train.py does slow work before training). Run "
                f"again, or set AUTORESEARCH_HARD_LIMIT=SECONDS.")
    return ""


def _last_eval_seconds(lab) -> float | None:
    """How long the kept line's last scoring took (the next run's estimate includes it), or None."""
    try:
        rec = lab.ledger.get(lab.parent_id) if lab.parent_id else None
    except Exception:
        return None
    return (rec or {}).get("eval_seconds") or None


def _starting(approve, bar: "ProgressBar"):
    """The approval callback, starting the progress clock when the answer is to run something."""

    def wrapped(proposal):
        answer = approve(proposal)
        if answer is True or hasattr(answer, "source"):
            bar.start()
        return answer

    return wrapped


def _interactive_decide(lab, exp_id: str) -> dict:
    """After a run: show the rule's verdict, let the person keep or discard (enter = the rule)."""
    v = lab.verdict(exp_id)
    rec = lab.ledger.get(exp_id)
    if rec["status"] != "ok":
        return lab.decide(exp_id, keep=None)
    default = "keep" if v["keep"] else "discard"
    if v.get("throughput_note"):
        print(f"note: {v['throughput_note']}")
    print(f"rule: {default}: {v['reason']}")
    while True:
        answer = _ask(f"decision? [k]eep / [d]iscard (enter = {default}): ").strip().lower()
        if answer == "":
            return lab.decide(exp_id, keep=None)
        if answer in ("k", "keep", "d", "discard"):
            keep = answer.startswith("k")
            reason = "" if keep == v["keep"] else _ask("reason (enter to skip): ").strip()
            return lab.decide(exp_id, keep=keep, reason=reason if reason != "q" else "", decided_by="human")
        if answer in ("q", "quit"):
            raise _Quit
        print("answer k, d or enter")


# ---- commands ----------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    from autoresearch_kit.lab import Lab, is_lab, template_path

    path = Path(args.dir).expanduser()
    _not_a_file(path, flag="autoresearch init")
    if is_lab(path):
        raise UserError(f"{path} is already a lab: run `autoresearch run --lab {path}` to continue it.")
    program = args.program or template_path("program.md")
    train = args.train or template_path("train.py")
    for given in (program, train):
        if not Path(given).is_file():
            raise UserError(f"{given} not found: pass an existing file (or leave the option out for the template).")
    with Lab(path, program=program, train=train, verbose=False):
        pass
    print(f"new lab in {path}: edit {path / 'program.md'} (your instructions to the agent), then run\n"
          f"  autoresearch run --lab {path} --steps 3")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from autoresearch_kit.data.prepare import USER_ERRORS, run_prepare

    try:
        path = run_prepare(args)
    except USER_ERRORS as e:
        if os.environ.get("AUTORESEARCH_DEBUG"):
            raise
        raise UserError(str(e)) from None
    print(f"prepared data in {path}: next, `autoresearch run` (or `autoresearch init DIR` first)")
    return 0


_LLM_FLAGS = (("extra_body", "--extra-body"), ("max_tokens", "--max-tokens"), ("timeout", "--timeout"),
              ("edit_mode", "--edit-mode"), ("context_size", "--context"), ("max_wait", "--max-wait"))


class _LLMWatch:
    """What a person sees while the LLM proposer works: the request at once, a live count, refusals.

    `on_progress` gets the proposer's events, `on_token` the streamed text. On a terminal
    the count of the reply redraws in place (stderr); elsewhere one line per reply.
    """

    MAX_SHOWN = 12          # lines of a refused reply printed (all of it is kept in the metadata)

    def __init__(self, out=None, err=None) -> None:
        self._out, self._err = out, err
        self._chars, self._t0, self._last = 0, time.monotonic(), 0.0
        self._drawn = False

    @property
    def out(self):
        return self._out or sys.stdout      # looked up at call time: tests swap sys.stdout

    @property
    def err(self):
        return self._err or sys.stderr

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\033[K")
            self.err.flush()
            self._drawn = False

    def clear(self) -> None:
        """Take the live count off the terminal, before a line of its own (a give-up, an error)."""
        self._clear()

    def on_token(self, piece: str) -> None:
        self._chars += len(piece)
        if not self.err.isatty():
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.err.write(f"\r  receiving: {self._chars} chars (~{self._chars // 3} tokens), "
                       f"{now - self._t0:.0f} s\033[K")
        self.err.flush()
        self._drawn = True

    def on_progress(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ask":
            self._clear()
            self._chars, self._t0 = 0, time.monotonic()
            ctx = event.get("context")
            where = f"; context {ctx} ({event.get('context_source')})" if ctx else ""
            mode = f", {event['mode']} mode" + (f" via {event['structured']}" if event.get("structured") else "")
            try_ = f", attempt {event['attempt']}" if event.get("attempt", 1) > 1 else ""
            print(f"asking {event.get('model')} at {event.get('endpoint')} ({event.get('prompt_tokens')} prompt "
                  f"tokens, {event.get('method')}{where}{mode}{try_})...", file=self.out, flush=True)
        elif kind == "reply":
            self._clear()
            usage = event.get("usage") or {}
            n = usage.get("completion_tokens")
            tokens = f"{n} tokens" if n is not None else "tokens not reported"
            print(f"  reply: {event.get('chars')} chars ({tokens}) in {time.monotonic() - self._t0:.1f} s",
                  file=self.out, flush=True)
        elif kind == "refused":
            self._clear()
            print(f"  reply {event.get('attempt')} refused: {event.get('error')}", file=self.out)
            lines = (event.get("reply") or "").strip().splitlines() or ["(empty)"]
            shown = lines[:self.MAX_SHOWN] + ([f"... ({len(lines) - self.MAX_SHOWN} more lines)"]
                                              if len(lines) > self.MAX_SHOWN else [])
            print("  the model said:\n" + "\n".join("    | " + line[:160] for line in shown), file=self.out, flush=True)
        elif kind == "note":        # a retry or a fallback: its own line, never counted as reply text
            self._clear()
            print(f"  {event.get('text')}", file=self.out, flush=True)
        elif kind == "structured":
            self._clear()
            print(f"  {event.get('why')}: asking with {event.get('now')} instead", file=self.out, flush=True)
        elif kind == "switch":
            self._clear()
            print(f"  switching to the knob mode ({event.get('why')})", file=self.out, flush=True)


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos}): pass an object, "
                                         f"e.g. '{{\"top_k\": 20}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {type(value).__name__}")
    return value


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value
    return parse


def _proposer_kwargs(args: argparse.Namespace, *, watch: bool = False) -> dict[str, Any]:
    """Constructor arguments for the proposer the flags ask for (the LLM's only when it is the LLM)."""
    from autoresearch_kit.propose import resolve_spec

    kw: dict[str, Any] = {}
    given = {name: getattr(args, name, None) for name, _ in _LLM_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.proposer in ("llm", "auto"):
        kw.update({k: v for k, v in (("model", args.model), ("base_url", args.base_url)) if v})
        try:
            is_llm = resolve_spec(args.proposer, **kw) == "llm"
        except ValueError:
            is_llm = False
        if is_llm:
            kw.update(given)
            if watch:
                w = _LLMWatch()
                kw.update(on_progress=w.on_progress, on_token=w.on_token)
                args._llm_watch = w         # cmd_run clears its live line before printing a give-up
            return kw
    if given:
        flags = ", ".join(flag for name, flag in _LLM_FLAGS if name in given)
        raise UserError(f"{flags} only apply to the LLM proposer: add --proposer llm (with --model/--base-url, "
                        f"or OPENAI_BASE_URL), or leave them out.")
    if args.proposer == "replay":
        if not args.patches:
            raise UserError("--proposer replay needs --patches DIR (a folder of .patch/.diff files).")
        if not Path(args.patches).is_dir():
            raise UserError(f"--patches {args.patches}: no such directory.")
        kw["patches"] = args.patches
    return kw


def _new_lab_or_typo(path: Path, given: str | None) -> None:
    """`run` makes a lab where there is none; not where the path looks like a typo of one."""
    import difflib

    from autoresearch_kit.lab import is_lab

    _not_a_file(path)
    if is_lab(path):
        return
    if given is not None:
        parent = path.parent if path.parent.is_dir() else None
        labs = [p.name for p in parent.iterdir() if p.is_dir() and p.name != path.name and is_lab(p)] if parent else []
        near = difflib.get_close_matches(path.name, labs, n=1, cutoff=0.75)
        if near:
            raise UserError(f"{path} is not a lab, and {parent / near[0]} is: pass --lab {parent / near[0]}, "
                            f"or create a new lab there with `autoresearch init {path}` first.")
    print(f"new lab: {path} (`autoresearch init` makes one without running anything)", flush=True)


def _make_lab(args: argparse.Namespace, *, verbose: bool = False):
    from autoresearch_kit.lab import Lab

    kw = _proposer_kwargs(args, watch=True)
    path = _lab_dir(args.lab)
    _not_a_file(path)
    return Lab(path, budget=args.budget, proposer=args.proposer, data_dir=args.data,
               seed=args.seed, device=args.device, threshold=args.threshold, proposer_kwargs=kw,
               verbose=verbose, rebaseline=getattr(args, "rebaseline", False),
               noise_runs=getattr(args, "noise_runs", None), cluster=getattr(args, "cluster", None),
               calibrate=getattr(args, "calibrate", None))


def _save_refused(lab_path: Path, error) -> Path | None:
    """Append a give-up's refused replies to <lab>/runs/refused.jsonl (no experiment holds them)."""
    import json
    from datetime import datetime, timezone

    from autoresearch_kit.ledger import scrub_secrets

    refused = (error.metadata or {}).get("refused")
    if not refused:
        return None
    path = lab_path / "runs" / "refused.jsonl"
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": error.reason,
              **scrub_secrets({k: v for k, v in error.metadata.items() if k != "errors"})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError:
        return None
    return path


def _proposer_name(args: argparse.Namespace) -> str:
    """The proposer `auto` stands for, for the banner (without building it: an LLM needs its endpoint)."""
    from autoresearch_kit.propose import resolve_spec

    try:
        return resolve_spec(args.proposer, **_proposer_kwargs(args))
    except ValueError:
        return args.proposer


def _check_data(args: argparse.Namespace) -> None:
    from autoresearch_kit import config

    d = Path(args.data).expanduser() if args.data else config.data_dir()
    if (d / "manifest.json").is_file():
        return
    from autoresearch_kit.data import prepare as prep

    default = config.cache_dir() / "data" / config.data_name()
    if not args.data and not config.env("DATA") and d == default and not prep.training_on_cuda():
        # A first run on a CPU or a Mac: the built-in corpus is offline and takes seconds,
        # exactly what `autoresearch prepare` would make here.
        print(f"autoresearch: no prepared data yet: preparing the built-in corpus into {d} "
              "(offline, a few seconds; `autoresearch prepare --help` for other data)", flush=True)
        try:
            prep.prepare(config.DEFAULT_DATASET, config.DEFAULT_VOCAB_SIZE, progress=False)
        except OSError as e:
            raise UserError(f"could not prepare the built-in corpus into {d} ({e}): free space there or "
                            "set AUTORESEARCH_CACHE to a writable folder, then run again.") from e
        return
    raise UserError(f"no prepared data at {d}: run `autoresearch prepare` first (or pass --data DIR).")


def _check_llm(lab, args: argparse.Namespace) -> None:
    """Before anything trains: an LLM endpoint that is down or misnamed fails here, in seconds."""
    from autoresearch_kit.propose.llm import LLMProposer

    if _proposer_name(args) != "llm":
        return
    proposer = lab.proposer
    if isinstance(proposer, LLMProposer):
        model = proposer.check_endpoint()    # raises a fatal ProposalError: one line, what to do
        print(f"llm: {model} at {proposer.endpoint} answers")


def cmd_run(args: argparse.Namespace) -> int:
    from autoresearch_kit.lab import format_record

    if args.steps < 0:
        raise UserError(f"--steps must be 0 or more, got {args.steps}.")
    if args.noise < 0:   # checked before anything trains (it used to fail after the baseline)
        raise UserError(f"--noise must be 0 (no noise runs) or more reruns of the parent, got {args.noise}.")
    _check_data(args)
    _new_lab_or_typo(_lab_dir(args.lab), args.lab)
    with _make_lab(args) as lab:
        if lab.recovered:
            print(f"experiment(s) {', '.join(lab.recovered)} were interrupted last time: recorded as aborted")
        print(f"lab {lab.path}  budget {lab.budget}  proposer {_proposer_name(args)}  "
              f"{'autopilot' if args.yes else 'asking before each run'}")
        _check_llm(lab, args)
        lab._autopilot = args.yes   # decisions are recorded as the autopilot's under --yes
        try:
            base = lab._baseline_record()
            if base is None or base["status"] != "ok" or lab.rebaseline_pending:
                bar = ProgressBar("baseline")
                lab.on_note = _lab_notes(lab, bar)   # its noise reruns show as they run
                bar.start()
                try:
                    rec = lab.baseline(on_event=bar)
                finally:
                    bar.close()
                print(format_record(rec))
                for note in (lab.calibration_note(), lab.eval_note(rec)):
                    if note and rec["status"] == "ok":
                        print(f"budget: {note}" if note.startswith("calibrated") else f"eval: {note}")
                if rec["status"] != "ok":
                    machine = _timeout_note(lab, rec)
                    if machine:
                        raise UserError(f"the baseline timed out: {machine}")
                    tail = "\n".join((rec["log_tail"] or "").splitlines()[-15:])
                    raise UserError(f"the baseline did not run ({rec['status']}: {rec['reason']}).\n{tail}\n"
                                    f"Fix {lab.path / 'train.py'} and run again.")
            if lab.sigma is not None and not args.noise:
                print(f"noise: sigma {lab.sigma:.6f} bpb (baseline reruns; gains within 2 sigma are not kept)")
                if lab.load_note():
                    print(f"noise: {lab.load_note()}")
            if args.noise:
                bar = ProgressBar("noise")
                lab.on_note = _lab_notes(lab, bar)
                bar.start()
                try:
                    n = lab.measure_noise(args.noise, on_event=bar)
                finally:
                    bar.close()
                print(f"noise: val_bpb {', '.join(f'{v:.6f}' for v in n['values'])}  sigma {n['sigma']:.6f}")
                if n["load_note"]:
                    print(f"noise: {n['load_note']}")
            if not _settle_undecided(lab, args.yes):
                return 0
            approve = _announce if args.yes else _interactive_approve(lab)
            failures, last_reason = 0, None
            done = 0
            while args.parallel > 1 and args.steps - done > 1:   # a last single one runs as below
                try:
                    done += _run_batch(lab, args, approve, min(args.parallel, args.steps - done), first=done == 0)
                except _Quit:
                    print("stopped")
                    break
            while done < args.steps:
                bar = ProgressBar(f"exp {len(lab.ledger) + 1:04d}", eval_s=_last_eval_seconds(lab))
                lab.on_note = _lab_notes(lab, bar)   # the reruns a narrow win gets are shown, not silent
                try:
                    rec = lab.step(approve=_starting(approve, bar), on_event=bar, feedback=args.feedback if done == 0 else "",
                                   decide=args.yes)
                except _Quit:
                    print("stopped")
                    break
                except Exception as e:
                    from autoresearch_kit.propose.base import ProposalError

                    if not isinstance(e, ProposalError):
                        raise
                    watch = getattr(args, "_llm_watch", None)
                    if watch is not None:
                        watch.clear()
                    saved = _save_refused(lab.path, e)
                    if getattr(e, "fatal", False):
                        # the endpoint is down, hung or refuses the request: asking again won't help
                        if saved:
                            print(f"the model's replies are kept in {saved}")
                        raise UserError(e.reason) from None
                    if e.reason == last_reason:
                        # the same failure twice: said once above, not again
                        raise UserError("the proposer failed the same way twice in a row (the reason is above); "
                                        "asking again won't help. Fix that, or try --proposer mutate (offline).") from None
                    failures, last_reason = failures + 1, e.reason
                    print(f"proposer gave up ({failures}/3): {e.reason}")
                    if saved:
                        print(f"  the model's replies are kept in {saved}")
                    if failures >= 3:
                        hint = (" Try --edit-mode knobs (small models), a bigger model, or --proposer mutate "
                                "(offline)." if _proposer_name(args) == "llm" else "")
                        raise UserError("the proposer failed 3 times in a row; see the reasons above." + hint) from None
                    continue
                finally:
                    bar.close()
                failures, last_reason = 0, None
                if rec["status"] == "rejected" and rec["decision_reason"]:
                    # the next proposal reads the reason as feedback too: the offline proposer
                    # steers by it ("try a higher lr"), an LLM sees it beside the history
                    lab.feedback = rec["decision_reason"]
                if rec["status"] != "rejected" and rec["decision"] is None:
                    try:
                        rec = _interactive_decide(lab, rec["id"])
                    except _Quit:
                        print(f"stopped; experiment {rec['id']} is undecided: `autoresearch decide` (or the next "
                              f"`autoresearch run`, or the panel) asks again")
                        break
                    except KeyboardInterrupt:
                        raise KeyboardInterrupt(f"experiment {rec['id']} ran and is undecided; `autoresearch decide` "
                                                f"(or the next run) asks again") from None
                print(format_record(rec))
                machine = _timeout_note(lab, rec)
                if machine:
                    print(f"      note: {machine}")
                note = _throughput_note(lab, rec) if args.yes else ""   # asked runs showed it before deciding
                if note:
                    print(note)
                done += 1
        finally:
            lab._autopilot = False
        best = lab.best()
        if best:
            print(f"best: {best['id']} val_bpb {best['val_bpb']:.6f}  {best['description']}")
        _write_report(lab.path, quiet=False, records=lab.ledger.records(curves=False))
    return 0


def _lab_notes(lab, bar: ProgressBar):
    """Lab.on_note for the CLI: the lab's own runs (rechecks, noise reruns) each get a line, and
    the bar follows the run that is starting."""
    def note(text: str) -> None:
        starting = text.endswith("starting...")
        bar.note(text, next_run=f"exp {len(lab.ledger) + 1:04d}" if starting else None)
    return note


def _run_batch(lab, args: argparse.Namespace, approve, n: int, *, first: bool) -> int:
    """One batch of `n` experiments (--parallel): every proposal approved first, then all run.

    The batch is decided by the rule (its best that beats the parent beyond noise is
    kept); `autoresearch decide ID --keep` overrides afterwards. Returns how many ran
    or were rejected.
    """
    from autoresearch_kit.lab import format_record
    from autoresearch_kit.propose.base import ProposalError

    where = args.cluster or f"{n} local workers"
    print(f"batch of {n} on {where}")
    bar = BatchProgress()
    try:
        recs = lab.step(approve=approve, on_event=bar, feedback=args.feedback if first else "", parallel=n)
    except ProposalError as e:
        watch = getattr(args, "_llm_watch", None)
        if watch is not None:
            watch.clear()
        raise UserError(f"the proposer gave up: {e.reason}") from None
    finally:
        bar.close()
    for rec in recs:
        print(format_record(lab.ledger.get(rec["id"])))
    return max(1, len(recs))


class BatchProgress:
    """The progress of a batch's runs: one line for all on a terminal, quarter lines per run in a log."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bars: dict[str, ProgressBar] = {}
        self._mu = threading.Lock()
        self._closed = threading.Event()
        self._last = 0.0
        if self.tty:
            threading.Thread(target=self._tick, name="autoresearch-batch-progress", daemon=True).start()

    def __call__(self, event: dict) -> None:
        exp = str(event.get("exp_id", "?"))
        with self._mu:
            bar = self.bars.get(exp)
            if bar is None:   # on a terminal the per-run bars only keep state; this draws them together
                bar = ProgressBar(f"exp {exp}", stream=io.StringIO() if self.tty else self.stream)
                bar.start()
                self.bars[exp] = bar
        bar(event)
        if self.tty and time.monotonic() - self._last > 0.25:
            self._draw()

    def line(self) -> str:
        """'0004 37% training 21s | 0005 35% training 21s'."""
        parts = []
        for exp, bar in list(self.bars.items()):
            p = float((bar._events[-1][1] if bar._events else {}).get("progress") or 0.0)
            name, detail = bar.phase()
            parts.append(f"{exp} {min(p, 1.0) * 100:3.0f}% {name} {detail.split(' ')[0]}")
        return " | ".join(parts)

    def _draw(self) -> None:
        with self._mu:
            self._last = time.monotonic()
            if self.bars and not self._closed.is_set():
                self.stream.write(f"\r{self.line()}\033[K")
                self.stream.flush()

    def _tick(self) -> None:
        while not self._closed.wait(1.0):
            self._draw()

    def close(self) -> None:
        self._closed.set()
        for bar in self.bars.values():
            bar.close()
        if self.tty and self.bars:
            self.stream.write("\n")
            self.stream.flush()


def _settle_undecided(lab, autopilot: bool) -> bool:
    """Experiments that ran but were never decided (Ctrl-C or q at the prompt): ask now.

    Under --yes the rule decides them (as the autopilot). Returns False when the person
    quit at a prompt.
    """
    for rec in lab.undecided():
        print(f"experiment {rec['id']} ran (val_bpb {rec['val_bpb']:.6f}: {rec['description']}) and was not decided")
        try:
            if autopilot:
                lab.decide(rec["id"], keep=None, decided_by="autopilot")
            else:
                _interactive_decide(lab, rec["id"])
        except _Quit:
            print(f"stopped; experiment {rec['id']} is still undecided")
            return False
        except ValueError as e:   # e.g. a hand edit of train.py that keeping it would overwrite
            print(f"left undecided: {e}")
            continue
        print(format_record_of(lab, rec["id"]))
    return True


def format_record_of(lab, exp_id: str) -> str:
    from autoresearch_kit.lab import format_record

    return format_record(lab.ledger.get(exp_id))


def cmd_decide(args: argparse.Namespace) -> int:
    """`autoresearch decide [ID] [--keep | --discard | --rule] [--reason R]`."""
    from autoresearch_kit.lab import Lab

    path = _lab_dir(args.lab)
    _require_lab(path, args.lab)
    with Lab(path, verbose=False) as lab:
        if args.id is None:
            if args.keep or args.discard:
                raise UserError("--keep / --discard need the experiment: `autoresearch decide ID --keep`.")
            todo = lab.undecided()
            if not todo:
                print(f"lab {path}: no experiment is waiting for a decision")
                return 0
            if args.rule:
                for rec in todo:
                    print(format_record_of(lab, lab.decide(rec["id"], keep=None)["id"]))
                return 0
            _settle_undecided(lab, autopilot=False)
            return 0
        try:
            rec = lab.ledger.get(args.id)
        except KeyError as e:
            raise UserError(str(e).strip("\"'")) from None
        if rec["status"] != "ok" or rec["kind"] != "candidate":
            raise UserError(f"experiment {rec['id']} is a {rec['kind']} with status {rec['status']}: only a "
                            f"candidate that ran ok is kept or discarded.")
        if rec["decision"] and (args.keep or args.discard or args.rule):
            print(f"experiment {rec['id']} was decided before ({rec['decision']}, by {rec['decided_by'] or 'the rule'}"
                  f"{': ' + rec['decision_reason'] if rec['decision_reason'] else ''}): deciding it again")
        if args.keep or args.discard:
            out = lab.decide(rec["id"], keep=bool(args.keep), reason=args.reason, decided_by="human")
        elif args.rule:
            out = lab.decide(rec["id"], keep=None)
        else:
            try:
                out = _interactive_decide(lab, rec["id"])
            except _Quit:
                print(f"experiment {rec['id']} is still undecided")
                return 0
        print(format_record_of(lab, out["id"]))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """`autoresearch recover`: rebuild a lost or damaged ledger.sqlite from results.tsv and git."""
    from autoresearch_kit.lab import recover_ledger
    from autoresearch_kit.ledger import DB_NAME, Ledger, LedgerLostError

    path = _lab_dir(args.lab)
    _require_lab(path, args.lab)
    if (path / DB_NAME).is_file() and (path / DB_NAME).stat().st_size > 0:
        try:
            Ledger(path).close()
        except LedgerLostError:
            pass
        else:
            raise UserError(f"the ledger of {path} is fine: nothing to recover (`autoresearch status` shows it).")
    out = recover_ledger(path)
    aside = f"; the damaged file is kept as {out['moved_aside']}" if out["moved_aside"] else ""
    print(f"rebuilt the ledger of {path}: {out['experiments']} experiments ({out['from_git']} from git, "
          f"{out['tsv_only']} from results.tsv only), kept line at {out['tip'] or 'init'}{aside}. Curves, log tails, "
          f"budgets and reasons are not in results.tsv and were not recovered; results.tsv before: "
          f"results.tsv.before-recover")
    return 0


def _status_table(records: list[dict]) -> str:
    from autoresearch_kit.sandbox import isolation_label

    cols = ("id", "parent", "kind", "status", "val_bpb", "delta", "train s", "decision", "by", "isolation",
            "proposer", "description")
    by_id = {r["id"]: r for r in records}
    rows = []
    for r in records:
        parent = by_id.get(r["parent_id"] or "")
        delta = ""
        if r["val_bpb"] is not None and parent and parent["val_bpb"] is not None and r["kind"] != "baseline":
            delta = f"{r['val_bpb'] - parent['val_bpb']:+.6f}"
        decision = r["decision"] or ("rejected" if r["status"] == "rejected" else "")
        if r["within_noise"]:
            decision += "~noise"
        desc = r["description"]
        if r["status"] == "rejected" and r["decision_reason"]:
            desc += f"  (rejected: {r['decision_reason']})"
        elif r["status"] not in ("ok", "rejected") and r["reason"]:
            desc += f"  ({r['reason'][:60]})"
        secs = r["training_seconds"]
        ratio = ""   # compute against the parent's: a token-budget gain bought with a slower model shows
        if secs and parent and parent["training_seconds"] and r["kind"] != "baseline":
            ratio = f" x{secs / parent['training_seconds']:.1f}"
        rows.append((r["id"], r["parent_id"] or "-", r["kind"], r["status"],
                     f"{r['val_bpb']:.6f}" if r["val_bpb"] is not None else "-", delta or "-",
                     f"{secs:.1f}{ratio}" if secs else "-", decision or "-", r["decided_by"] or "-", isolation_label(r), r["proposer"] or "-", desc))
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols[:-1])]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols[:-1], widths)) + "  " + cols[-1]]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from autoresearch_kit.ledger import Ledger

    path = _lab_dir(args.lab)
    _require_lab(path, args.lab)
    led = Ledger(path, readonly=True)  # works while `autoresearch run` holds the lab
    try:
        records = led.records()
        best = led.best()
    finally:
        led.close()
    if not records:
        print(f"lab {path}: no experiments yet (`autoresearch run --lab {path}`)")
        return 0
    print(_status_table(records))
    n = {k: sum(r["status"] == k for r in records) for k in ("ok", "rejected", "running")}
    failed = len(records) - sum(n.values())
    kept = sum(r["decision"] == "keep" for r in records)
    print(f"\n{len(records)} experiments ({n['ok']} ran ok, {kept} kept, {failed} failed or aborted, "
          f"{n['rejected']} rejected" + (f", {n['running']} running" if n["running"] else "") + ")"
          + (f"; best {best['id']} val_bpb {best['val_bpb']:.6f}: {best['description']}" if best else ""))
    return 0


def _write_report(path: Path, out: Path | None = None, *, quiet: bool = True, records: list | None = None
                  ) -> Path | None:
    """progress.png from the ledger: points labelled with the ids `status` shows (results.tsv has commits)."""
    from autoresearch_kit.ledger import Ledger
    from autoresearch_kit.plots import load_results, save_progress, summary

    if records is None:
        with Ledger(path, readonly=True) as led:   # readonly: works while a run holds the lab
            records = led.records(curves=False)
    if load_results(records)["val_bpb"].notna().sum() == 0:
        if not quiet:
            print("no finished experiments yet: no progress.png")
        return None
    try:
        if out is not None:
            out = out.expanduser()
            if out.is_dir():
                out = out / "progress.png"   # --out a folder: the report goes in it
            out.parent.mkdir(parents=True, exist_ok=True)
        target = save_progress(records, out or path / "progress.png")
    except OSError as e:   # a read-only lab, a full disk, a file where a folder should be: one line
        raise UserError(f"cannot write {out or path / 'progress.png'} ({e.strerror or e}): pass --out PATH "
                        f"somewhere writable.") from None
    s = summary(records)
    print(f"wrote {target}: {s['experiments']} experiments, {s['kept']} kept, {s['discarded']} discarded, "
          f"{s['failed']} failed or aborted; baseline {s['baseline']:.6f} -> best {s['best']:.6f}")
    return target


def cmd_report(args: argparse.Namespace) -> int:
    path = _lab_dir(args.lab)
    _require_lab(path, args.lab)
    if _write_report(path, Path(args.out) if args.out else None, quiet=False) is None:
        raise UserError(f"lab {path} has no finished experiments yet: `autoresearch run --lab {path}` first.")
    return 0


# ---- parser ------------------------------------------------------------------------------------

def _budget(text: str):
    from autoresearch_kit.config import Budget

    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line (with where to look), not the whole usage."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `autoresearch` (sub-commands init, prepare, run, status, report)."""
    p = _Parser(prog="autoresearch",
                                description="An agent edits train.py, a fixed budget trains it, "
                                            "val bits-per-byte scores it; you decide.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    lab_help = "lab directory (default: the current directory if it is a lab, else ./lab)"

    q = sub.add_parser("init", help="create a new lab from the templates (program.md + train.py)")
    q.add_argument("dir", help="the new lab directory")
    q.add_argument("--program", help="start from this program.md instead of the template")
    q.add_argument("--train", help="start from this train.py instead of the template")
    q.set_defaults(func=cmd_init)

    q = sub.add_parser("prepare", help="download/build the corpus, train the tokenizer, write token shards")
    try:
        from autoresearch_kit.data.prepare import add_prepare_args
    except ImportError:  # pragma: no cover - the data module is part of the package
        add_prepare_args = None
    if add_prepare_args is not None:
        add_prepare_args(q)
    q.set_defaults(func=cmd_prepare)

    q = sub.add_parser("run", help="run the research loop (asks before each run unless --yes)")
    q.add_argument("--lab", help=lab_help)
    q.add_argument("--steps", type=int, default=10, help="experiments to run (default 10)")
    q.add_argument("--budget", type=_budget, default=None,
                   help="training budget per run: 60s, 5min, 50M-tokens, 1e15-flops "
                        "(default: the lab's, else 60 s on CPU/MPS, 300 s on CUDA)")
    q.add_argument("--proposer", choices=("auto", "mutate", "llm", "replay"), default="auto",
                   help="who proposes edits: mutate (offline), llm (OpenAI-compatible), replay (patches); "
                        "default auto: llm when --model/--base-url, AUTORESEARCH_MODEL or OPENAI_BASE_URL is "
                        "set, else mutate (AUTORESEARCH_PROPOSER forces one)")
    q.add_argument("--model", help="model name for --proposer llm")
    q.add_argument("--base-url", help="OpenAI-compatible endpoint for --proposer llm (key: OPENAI_API_KEY)")
    q.add_argument("--edit-mode", choices=("auto", "edits", "knobs"), default=None,
                   help="LLM: edits (SEARCH/REPLACE, capable models), knobs (one constant as JSON, small models); "
                        "default auto: knobs for a small local model or after free-form edits fail")
    q.add_argument("--max-tokens", type=_positive(int), default=None, metavar="N", help="LLM: reply length cap")
    q.add_argument("--timeout", type=_positive(float), default=None, metavar="S",
                   help="LLM: seconds to wait for the server (default 120)")
    q.add_argument("--max-wait", type=_positive(float), default=None, metavar="S",
                   help="LLM: seconds one proposal may take in all, retries included (default 600, "
                        "AUTORESEARCH_LLM_MAX_WAIT); past it the run stops with what to do")
    q.add_argument("--context", type=_positive(int), default=None, metavar="N", dest="context_size",
                   help="LLM: the server's context in tokens, when it does not report it (AUTORESEARCH_CONTEXT)")
    q.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                   help="LLM: extra request fields, e.g. '{\"top_k\": 20}' or a llama.cpp grammar")
    q.add_argument("--patches", help="folder of patch files for --proposer replay")
    q.add_argument("--yes", "-y", action="store_true", help="autopilot: run every proposal, decide by the rule")
    q.add_argument("--threshold", type=float, default=0.0,
                   help="keep a candidate that beats its parent's val_bpb by more than this (default 0)")
    q.add_argument("--noise", type=int, default=0, metavar="K",
                   help="first rerun the parent K times to measure noise; gains within 2 sigma are flagged")
    q.add_argument("--feedback", default="", help="a note to the proposer for the first step")
    q.add_argument("--seed", type=int, default=42, help="training seed (default 42)")
    q.add_argument("--device", choices=("cuda", "mps", "cpu"), help="force a device (default: detected)")
    q.add_argument("--data", help="prepared data directory (default: the last one prepared)")
    q.add_argument("--rebaseline", action="store_true",
                   help="the lab is pinned to its data: run a new baseline on other prepared data instead of refusing")
    q.add_argument("--noise-runs", type=int, default=None, metavar="K",
                   help="reruns of the baseline that measure the noise before the first candidate (default 2, "
                        "AUTORESEARCH_NOISE_RUNS; 0 skips); gains within 2 sigma are not kept")
    q.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="a new lab turns its seconds budget into the tokens its baseline trains in it (one extra "
                        "run), so later runs do not depend on the machine's load (default: on for a CPU lab "
                        "given no --budget; --no-calibrate keeps seconds)")
    q.add_argument("--parallel", type=_positive(int), default=1, metavar="N",
                   help="run N proposals at once, one per Dask worker (one per GPU locally); the best that beats "
                        "the parent beyond noise is kept (default 1: one at a time)")
    q.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="a Dask scheduler to run on, e.g. tcp://host:8786 (default: local workers)")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("decide", help="keep or discard an experiment that ran and was not decided")
    q.add_argument("id", nargs="?", help="the experiment (default: ask about each undecided one)")
    q.add_argument("--lab", help=lab_help)
    how = q.add_mutually_exclusive_group()
    how.add_argument("--keep", action="store_true", help="keep it (it becomes the parent)")
    how.add_argument("--discard", action="store_true", help="discard it")
    how.add_argument("--rule", action="store_true", help="apply the rule (keep if it beats its parent)")
    q.add_argument("--reason", default="", help="why (recorded; the proposer reads it)")
    q.set_defaults(func=cmd_decide)

    q = sub.add_parser("recover", help="rebuild a lost or damaged ledger.sqlite from results.tsv and git")
    q.add_argument("--lab", help=lab_help)
    q.set_defaults(func=cmd_recover)

    q = sub.add_parser("status", help="show the lab's experiments as a table")
    q.add_argument("--lab", help=lab_help)
    q.set_defaults(func=cmd_status)

    q = sub.add_parser("report", help="write progress.png (val_bpb over experiments)")
    q.add_argument("--lab", help=lab_help)
    q.add_argument("--out", help="output path (default: <lab>/progress.png)")
    q.set_defaults(func=cmd_report)
    return p


def _locked_text(args: argparse.Namespace, exc: Exception) -> str:
    """The lab-in-use error in terms of the command line (the library's names lab.close() etc.)."""
    import json

    path = _lab_dir(getattr(args, "lab", None))
    try:
        pid = json.loads((path / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(exc)
    return (f"lab {path} is in use by process {pid} (another `autoresearch run`, or a notebook's Lab): wait for "
            f"it to finish, or stop it (a notebook: lab.close()); `autoresearch status` works meanwhile.")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """`--budget -3s` as `--budget=-3s`: argparse reads a value that starts with '-' as an option
    ("expected one argument"); glued, the budget parser says what is wrong with it."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--budget", "--noise", "--steps", "--threshold") and i + 1 < len(argv) \
                and argv[i + 1][:1] == "-" and argv[i + 1][1:2].isdigit():
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _sigterm_as_interrupt(signum, frame):
    # `kill PID` (or a scheduler's stop) should end a run like Ctrl-C: the training process
    # group is killed and the run recorded as aborted, instead of leaving an orphan behind
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"autoresearch: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `autoresearch` and `python -m autoresearch_kit`; returns the exit status."""
    import signal
    import warnings

    import sqlite3

    from autoresearch_kit.lab import GitLostError
    from autoresearch_kit.ledger import LabLockedError, LedgerLostError, is_disk_full
    from autoresearch_kit.propose.base import ProposalError

    args = build_parser().parse_args(_glue_negative_values(sys.argv[1:] if argv is None else list(argv)))
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        # the Lab re-raises with "experiment 0005 interrupted and recorded as aborted" when a run was cut
        what = str(e) or "a run in progress, if any, is recorded as aborted"
        print(f"\ninterrupted: {what}; `autoresearch status` shows the ledger", file=sys.stderr)
        return EXIT_INTERRUPT
    except LabLockedError as e:
        print(f"autoresearch: error: {_locked_text(args, e)}", file=sys.stderr)
        return EXIT_USER
    except (LedgerLostError, GitLostError) as e:
        print(f"autoresearch: error: {e}", file=sys.stderr)
        return EXIT_USER
    except (OSError, sqlite3.OperationalError) as e:
        if not is_disk_full(e) or os.environ.get("AUTORESEARCH_DEBUG"):
            raise
        text = str(e) if str(e).startswith("disk full") else f"disk full ({e}): free some space and run again"
        print(f"autoresearch: error: {text}", file=sys.stderr)
        return EXIT_USER
    except (UserError, FileNotFoundError, ProposalError) as e:
        print(f"autoresearch: error: {e}", file=sys.stderr)
        return EXIT_USER
    except ValueError as e:  # bad values the library rejects with a message (e.g. a budget)
        if os.environ.get("AUTORESEARCH_DEBUG"):
            raise
        print(f"autoresearch: error: {e}", file=sys.stderr)
        return EXIT_USER
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    raise SystemExit(main())
