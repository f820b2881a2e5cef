"""The Lab: propose -> review -> run -> decide -> record, on one lab directory. No UI.

    from autoresearch_kit import Lab
    lab = Lab("my_lab", budget="60s", proposer="mutate")
    lab.baseline()                       # the starting train.py, run once
    rec = lab.step()                     # propose -> run -> decide by the rule -> record
    rec = lab.step(approve=my_callback)  # the seam the notebook panel and the CLI plug into
    lab.autopilot(steps=10)              # unattended; Ctrl-C stops after recording the run
    lab.history(); lab.best(); lab.checkout("0003"); lab.measure_noise(3)

A lab directory (see docs/CONTRACTS.md) holds program.md, train.py (the current parent:
the tip of the kept line), a git workspace (`.git`, every experiment a commit), the
ledger (`ledger.sqlite` + `results.tsv`) and `runs/<id>/` (train.py and run.log of each
run). Everything the Lab knows lives there, so a new Lab on the same directory picks up
exactly where the last one stopped; a run interrupted by a killed process shows as
`aborted` and nothing else changes. The ledger is the source of truth: it records the
tip of the kept line (the current parent) before git moves, and opening a lab moves the
workspace to it if a killed process left them apart. One Lab per directory at a time
(a lock).

Where a new lab's files come from (`Lab(path, program=..., train=...)`), for each file:
a path you pass explicitly (it must exist); with the default names, the file already in
the lab directory, else the one in the current directory (so `autoresearch run` in a
checkout of this repository starts from its train.py and program.md), else the package
templates (`autoresearch_kit/templates/`). An existing lab ignores both arguments.

Decisions. The rule keeps a candidate when its val_bpb beats its parent's (the tip of the
kept line it edits, as the original autoresearch compares with the current best of its
branch) by more than `threshold`. Right after the baseline (`noise_runs`, default 2) and
after any `measure_noise(k)` (k reruns of the parent with other seeds) the Lab knows
sigma, the run-to-run standard deviation; a gain above the threshold but within 2
standard errors is flagged "within noise" and not kept by the rule; `confirm(exp_id)`
reruns it to check. A candidate whose runs are at seeds its parent also ran with (one
run: seed 42) is compared with the parent at those seeds (paired); its standard error is
the lab's pooled paired-difference SD (`paired_noise`) / sqrt(m) once measured, else
sigma * sqrt(2 / m); see `verdict`. The
human has the last word: `decide(keep=True/False)` overrides, and the ledger records
who decided (`human`, `rule` or `autopilot`).

Data: a lab is pinned to its prepared data (`data.json`, the manifest hash); other data is
refused unless `rebaseline=True` starts a new baseline on it (see the class docstring).

Interrupts: a KeyboardInterrupt during a run kills the training process group, the
run is recorded as `aborted`, and then the KeyboardInterrupt is raised again so that a
loop (autopilot, the CLI) stops. A `stop` event (the panel's Stop button) ends the run
as `aborted` without raising.

Run the tests with `python -m pytest tests/test_lab.py -q`.
"""

from __future__ import annotations

import ast
import errno
import html
import inspect
import json
import math
import os
import re
import statistics
import threading
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from autoresearch_kit import config, runner
from autoresearch_kit.ledger import (CRASH_LIKE, DB_NAME, TSV_NAME, LabLockedError,  # noqa: F401 (re-exported)
                                     Ledger, LedgerLostError, is_disk_full, lost_message)
from autoresearch_kit.propose.base import (HistoryEntry, Proposal, ProposalContext, ProposalError,
                                           source_hash)
from autoresearch_kit.runner import RunResult
from autoresearch_kit.workspace import Workspace, read_text

if TYPE_CHECKING:
    import pandas as pd

    from autoresearch_kit.config import Budget

RUNS = "runs"
PENDING = "result.pending.json"   # runs/<id>/: a finished result the ledger could not take (disk full)
_PENDING_RESERVE = 1 << 20        # bytes reserved for it when the run starts, overwritten in place
HAND_EDIT = "hand edit of train.py"
DATA_PIN = "data.json"   # the data the lab is pinned to (see Lab(rebaseline=))
# statuses whose log tail is worth showing the proposer (aborted = the user stopped it)
_FAILED_RUNS = ("crash", "timeout", "diverged", "invalid")
_PROPOSAL_KINDS = ("baseline", "candidate")   # noise/rerun records repeat an experiment


NOISE_RUNS = 2   # default reruns of the baseline that measure sigma (AUTORESEARCH_NOISE_RUNS)
_SIGMA_NOTE = re.compile(r"(sigma \d[\d.e-]*, gain [+-][\d.]+ sigma)")
RECHECK_BELOW = 3.0   # a one-run win by less than this many sigma is rerun once before it is kept
PAIRED_MIN = 3   # common seeds (candidate and parent) from which the rule decides on paired differences
PAIRED_SD_MIN_DF = 2   # degrees of freedom a pooled paired-difference SD needs before one-seed verdicts use it


def _all_seed_scores(recs: list[dict]) -> dict[str, dict[int, float]]:
    """{experiment id: {seed: val_bpb}} of every ok proposal (baseline, candidate) and its
    noise/rerun records of the same source: `Lab._seed_scores` for all of them in one pass."""
    by_id = {r["id"]: r for r in recs}
    scores: dict[str, dict[int, float]] = {}
    for r in recs:
        if r["kind"] in _PROPOSAL_KINDS and r["status"] == "ok" and r["val_bpb"] is not None and r["seed"] is not None:
            scores.setdefault(r["id"], {})[int(r["seed"])] = r["val_bpb"]
    for r in recs:
        owner = by_id.get(r["parent_id"]) if r["kind"] in ("noise", "rerun") else None
        if (owner is not None and owner["id"] in scores and r["status"] == "ok" and r["val_bpb"] is not None
                and r["seed"] is not None and r["source_hash"] == owner["source_hash"]):
            scores[owner["id"]].setdefault(int(r["seed"]), r["val_bpb"])
    return scores


def _noise_runs(value: int | None) -> int:
    if value is None:
        text = config.env("NOISE_RUNS")
        value = NOISE_RUNS if text is None else text
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or str(value).strip() != str(n):
        msg = f"noise_runs must be a whole number >= 0 (AUTORESEARCH_NOISE_RUNS / --noise-runs), got {value!r}."
        raise ValueError(msg)
    return n


def template_path(name: str) -> Path:
    """Path of a packaged template (`program.md` or `train.py`)."""
    return Path(str(resources.files("autoresearch_kit") / "templates" / name))


class DiskFullError(OSError):
    """The disk filled up while a finished run was being recorded; its result is kept for the next open."""

    def __str__(self) -> str:  # one line that starts with "disk full", without OSError's "[Errno 28]"
        return str(self.strerror)


class GitLostError(RuntimeError):
    """The lab's git repository is missing (or lacks experiments the ledger recorded)."""


def is_lab(path: str | os.PathLike) -> bool:
    """Whether `path` is a lab directory (it has a ledger, or the results.tsv of one that lost it)."""
    p = Path(path).expanduser()
    if (p / DB_NAME).is_file():
        return True
    # a lab that lost its ledger is still one (so `autoresearch run` there says so, instead
    # of starting a new lab in ./lab): its results.tsv or its experiments' refs remain
    return (p / ".git").is_dir() and ((p / TSV_NAME).is_file() or (p / ".git" / "refs" / "experiments").is_dir())


def _initial_text(name: str, given: str | os.PathLike, lab_dir: Path) -> str:
    """The starting program.md / train.py of a new lab (the rule in the module docstring)."""
    path = Path(given).expanduser()
    if str(given) != name:  # an explicit path: it must exist
        if path.is_file():
            return read_text(path)
        msg = f"{given} not found: pass the path of an existing {name} (or leave it out to start from the template)."
        raise FileNotFoundError(msg)
    for candidate in (lab_dir / name, path):  # the lab directory's own file, then the current directory's
        if candidate.is_file():
            return read_text(candidate)
    return read_text(template_path(name))


def timeout_phase(run: "dict | RunResult") -> str | None:
    """Where a timed-out run was when the hard limit killed it, from its curve.

    ``setup`` (no training step yet: start-up, imports, compile, warm-up), ``training``
    (the budget was not spent) or ``evaluation`` (the budget was spent: scoring did not
    finish). None when the run did not time out. Only ``training`` is train.py's doing
    for certain; the other two are outside the training window, the machine's.
    """
    get = run.get if isinstance(run, dict) else lambda k, d=None: getattr(run, k, d)
    if get("status") != "timeout":
        return None
    curve = [e for e in (get("curve") or []) if isinstance(e, dict)]
    if not curve:
        return "setup"

    def num(e, k):
        v = e.get(k)
        return float(v) if isinstance(v, (int, float)) else None

    p = num(curve[-1], "progress")
    if p is None:
        return "training"
    if p >= 0.999:
        return "evaluation"
    # The last step event is logged before the step that crossed the budget was refused,
    # so its progress is short of 1 by about one step: project one more step (twice, for slack)
    # from the last two events (they are at most 10/s, and the last step always comes).
    if len(curve) >= 2:
        p0, s0, s1 = num(curve[-2], "progress"), num(curve[-2], "step"), num(curve[-1], "step")
        if None not in (p0, s0, s1) and s1 > s0 and p > p0 and p + 2 * (p - p0) / (s1 - s0) >= 0.999:
            return "evaluation"
    return "training"


_PHASE_NOTE = {
    "setup": ("outside the training window, before the first training step (start-up, compile, warm-up): "
              "the machine was too slow or busy, unless train.py does slow work before it trains"),
    "evaluation": ("outside the training window: the budget was spent and the evaluation did not finish "
                   "in time: the machine was too slow or busy, not a fault of train.py"),
}


_PHASE_NOTE_MARK = "outside the training window"


def _ledger_lost(path: Path) -> str | None:
    """What is wrong when the lab's ledger is missing or empty while git still has its experiments."""
    db = path / DB_NAME
    if db.is_file() and db.stat().st_size > 0:
        return None
    if not (path / ".git").is_dir() or not Workspace(path).experiments():
        return None
    return "missing" if not db.exists() else "an empty file"


def _git_lost(ledger: Ledger, ws: Workspace) -> str | None:
    """A message when the ledger has committed experiments that the workspace does not have (.git deleted)."""
    recs = [r for r in ledger.records(curves=False) if r["commit"]]
    if not recs:
        return None
    have = ws.commits() if ws.initialized else {}
    lost = [r["id"] for r in recs if r["id"] not in have]
    if not lost:
        return None
    return (f"The lab {ws.lab_dir} has lost its git repository ({ws.git_dir}"
            f"{' is missing' if not ws.git_dir.is_dir() else ' lacks ' + str(len(lost)) + ' experiments'}): "
            f"the ledger records {len(recs)} committed experiments ({lost[0]} .. {lost[-1]} missing), whose "
            f"train.py lived there. Nothing was changed. Restore .git from a backup; each run's train.py is also "
            f"in {ws.lab_dir / RUNS}/<id>/train.py and its diff in the ledger.")


def _looks_like_source(text: str) -> bool:
    """A string answer to approve() is an edited train.py (not a rejection reason) when it
    is several lines of valid Python that imports something, as every train.py does."""
    if "\n" not in text.strip() or "import" not in text:
        return False
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


class Lab:
    """One research lab directory: the agent proposes, you decide, the ledger remembers.

    Parameters
    ----------
    path : str or Path
        The lab directory. Created if new; opened (and locked) if it exists.
    program, train : str or Path
        Where a new lab copies program.md and train.py from (see the module docstring
        for the rule). Ignored when the lab exists.
    budget : str or Budget, optional
        Training budget of every run: "60s", "50M-tokens", "1e15-flops" or a Budget.
        Default: the budget the lab's baseline ran with, else AUTORESEARCH_BUDGET, else
        300 s on CUDA and 60 s on CPU/MPS.
    proposer : str or Proposer
        "auto" (the default: "llm" when AUTORESEARCH_PROPOSER, AUTORESEARCH_MODEL or
        OPENAI_BASE_URL says so, else "mutate", offline), "mutate", "llm", "replay", or
        any object with `.name` and `.propose(context)`.
    data_dir : str or Path, optional
        Prepared data (default `config.data_dir()`: AUTORESEARCH_DATA, then the data
        `prepare` wrote last).
    seed : int
        Training seed of every candidate (noise reruns use other seeds).
    device : str, optional
        "cuda", "mps" or "cpu" (default: detected).
    threshold : float
        A candidate is kept when it beats its parent's val_bpb by more than this.
    proposer_kwargs : dict, optional
        Passed to `propose.make_proposer` with a proposer name (model=, base_url=, ...).
    verbose : bool
        Print one line per finished experiment.
    rebaseline : bool
        The lab is pinned to the data it was created with (`data.json`: the
        `manifest_hash` of the prepared data). Opening it on other data raises, unless
        this is True: then the next run is a new baseline on the new data (the current
        parent's train.py, a new root of the experiment tree) and the lab is pinned to
        the new data once it ran ok. Scores made on the old data are never compared with it.
    noise_runs : int, optional
        Reruns of the baseline with other seeds that measure the lab's noise (sigma)
        right after it, so the rule knows what a real gain is from the start: a gain
        within 2 sigma / sqrt(n) is not kept. Default AUTORESEARCH_NOISE_RUNS, else 2
        (each costs one budget); 0 skips (then gains above `threshold` are kept until
        `measure_noise` runs). A lab that has no sigma yet measures it before its next run.
    sandbox : str, optional
        "auto", "require" or "off" (default AUTORESEARCH_SANDBOX, else "auto").
    calibrate : bool, optional
        A budget that does not depend on the machine's load: with a seconds budget, a new
        lab first runs its train.py once under it (kind ``calibration``, never a parent)
        and then uses the tokens that run trained as the budget of every run, the
        baseline included ("what fits in 60 s here", measured once). Later sessions keep
        that token budget. A token budget's scores show the compute each run used.
        Default (None): on for a new CPU lab given no budget (no ``budget=``, no
        AUTORESEARCH_BUDGET), off otherwise: on the 2-core development machine one other
        busy process moved a 30 s baseline's val_bpb by 0.1 bpb, 30 times its seed noise
        (docs/NOISE.md). A budget you give is used as given; ``calibrate=False`` keeps the
        default seconds.
    cluster : str, distributed.Client or Dask cluster, optional
        Where the runs train: a scheduler address ("tcp://host:8786"), a Client, or a
        cluster object (dask-jobqueue, dask-kubernetes). None (default): runs train in
        this machine's processes, one at a time; `step(parallel=N)` / `autopilot(parallel=N)`
        then start N local Dask workers (one per GPU). The ledger, git and the decisions
        stay here; workers get the prepared data shipped (checked by its manifest hash).

    Raises
    ------
    LabLockedError
        When another Lab (or Ledger) has this directory open.
    ValueError
        When the prepared data is not the data the lab is pinned to (and no `rebaseline`).
    """

    def __init__(self, path: str | os.PathLike, program: str | os.PathLike = "program.md",
                 train: str | os.PathLike = "train.py", budget: "str | Budget | None" = None,
                 proposer: Any = "auto", data_dir: str | os.PathLike | None = None, seed: int = 42,
                 device: str | None = None, threshold: float = 0.0, *, proposer_kwargs: dict | None = None,
                 verbose: bool = True, rebaseline: bool = False, noise_runs: int | None = None,
                 sandbox: str | None = None, cluster: Any = None, calibrate: bool | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        noise_runs = _noise_runs(noise_runs)     # a bad value fails before anything is opened
        config.cpu_threads_setting()             # so does a bad AUTORESEARCH_CPU_THREADS
        from autoresearch_kit import sandbox as _sandbox

        self.sandbox = _sandbox.mode(sandbox)    # auto | require | off (AUTORESEARCH_SANDBOX)
        if self.path.exists() and not self.path.is_dir():
            msg = f"{self.path} is a file; a lab is a directory. Choose a new directory name, e.g. Lab('mylab')."
            raise ValueError(msg)
        if (self.path / ".git").exists() and not is_lab(self.path) and not Workspace(self.path).initialized:
            msg = (f"{self.path} is a git repository that is not a lab: a lab keeps its own repository. "
                   f"Choose a new directory, e.g. Lab({str(self.path / 'lab')!r}).")
            raise ValueError(msg)
        lost = _ledger_lost(self.path)
        if lost:   # never start a new ledger beside git's experiments (it would reuse their ids)
            raise LedgerLostError(lost_message(self.path, lost))
        new = not is_lab(self.path)
        if new:  # read the starting files before creating anything, so a bad path leaves no half lab
            train_src = _initial_text("train.py", train, self.path)
            program_src = _initial_text("program.md", program, self.path)
        self.ledger = Ledger(self.path)   # takes the lock
        self._hand_description: str | None = None   # the subject of a hand commit, for its experiment
        self.verbose = verbose
        self.on_note: Callable[[str], Any] | None = None   # see _note
        try:
            self.workspace = Workspace(self.path)
            gone = _git_lost(self.ledger, self.workspace)
            if gone:
                raise GitLostError(gone)
            if not self.workspace.initialized:
                if not new:  # a ledger (with nothing committed yet) without its repository: start one
                    train_src = _initial_text("train.py", train, self.path)
                    program_src = _initial_text("program.md", program, self.path)
                self.workspace.init(train_src, program_src)
            else:
                self.workspace.refresh_ignore()
            self.pending_recorded = self._recover_pending()
            self.recovered = self.ledger.recover()
            moved = self._reconcile()
            (self.path / RUNS).mkdir(exist_ok=True)
        except BaseException:
            self.ledger.close()
            raise
        # resolved: runs start in runs/<id>/, where a relative --data path means nothing
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self.seed = int(seed)
        self.device = device
        self.threshold = float(threshold)
        self.verbose = verbose
        self.feedback = ""                      # carried into the next context, then cleared
        self._budget_arg = budget
        self._budget: Budget | None = None
        self._hardware: dict | None = None
        self._last_id: str | None = None
        self._autopilot = False
        self._proposer_arg = proposer
        self._proposer_kwargs = dict(proposer_kwargs or {})
        self._proposer = None
        self.sigma: float | None = self._sigma_from_ledger()
        self._prestart: threading.Thread | None = None   # runner.prestart's thread, see _start_ahead
        self._started_ahead = False
        # one run at a time per lab, whatever calls it (two panels, a panel and a cell): a
        # second call is refused; `running` and `watch_run` let a new view attach to it
        self._run_mu = threading.Lock()
        self.running: dict | None = None
        self._watchers: list[Callable[[dict], Any]] = []
        self.noise_runs = noise_runs
        self.cluster = cluster                  # where runs train (None: here; see parallel.py)
        self._calibrate_arg = calibrate         # a seconds budget becomes the tokens the baseline trains in it
        self._engine = None                     # parallel.Engine, made at the first run that needs one
        self.recheck_below = RECHECK_BELOW      # sigmas; see recheck()
        self.recheck_until_paired = True        # see recheck(): rerun gains inside the band until paired SD is known
        self._noise_tried = False               # measure the noise once per session at most
        try:
            self._rebaseline = self._open_pin(rebaseline)   # the data pin (see _open_pin)
        except BaseException:
            self.ledger.close()
            raise
        self._warn_budget_change()
        if self.pending_recorded and self.verbose:
            print(f"lab {self.path.name}: recorded the result(s) of {', '.join(self.pending_recorded)}, kept on disk "
                  f"when the disk was full")
        if self.recovered and self.verbose:
            print(f"lab {self.path.name}: experiment(s) {', '.join(self.recovered)} were interrupted and are "
                  f"recorded as aborted")
        if moved and self.verbose:
            print(f"lab {self.path.name}: the kept line now ends at {moved}, as the ledger records (the last "
                  f"session stopped before it moved the workspace)")

    # ---- settings -----------------------------------------------------------------------------

    @property
    def budget(self) -> "Budget":
        """The training budget of every run (see the class docstring for the default)."""
        if self._budget is None:
            from autoresearch_kit.config import Budget

            base, cal = self._baseline_record(), self._calibration_record()
            if cal is not None and base and base["budget"]:
                self._budget = Budget.parse(base["budget"])   # calibrated once: the lab keeps its tokens
            elif cal is not None and cal["tokens"]:           # stopped between calibration and baseline
                self._budget = Budget.parse(f"{int(cal['tokens'])}-tokens")
            elif self._budget_arg is not None:
                self._budget = Budget.parse(self._budget_arg)
            else:
                base = self._baseline_record()
                self._budget = (Budget.parse(base["budget"]) if base and base["budget"]
                                else config.default_budget(self._device_type()))
        return self._budget

    @property
    def calibrate(self) -> bool:
        """Whether a new lab turns its seconds budget into tokens (see the class docstring):
        `calibrate=` if given, else True on a CPU when no budget was asked for (no budget=,
        no AUTORESEARCH_BUDGET): docs/NOISE.md, "A budget that ignores the load"."""
        if self._calibrate_arg is not None:
            return bool(self._calibrate_arg)
        return self._budget_arg is None and not config.env("BUDGET") and self._device_type() == "cpu"

    @calibrate.setter
    def calibrate(self, value: bool | None) -> None:
        self._calibrate_arg = value

    @budget.setter
    def budget(self, value: "str | Budget") -> None:
        from autoresearch_kit.config import Budget

        self._budget = Budget.parse(value)

    def _warn_budget_change(self) -> None:
        base = self._baseline_record()
        if self._budget_arg is None or base is None or not base["budget"] or self._calibration_record() is not None:
            return
        from autoresearch_kit.config import Budget

        if Budget.parse(self._budget_arg) != Budget.parse(base["budget"]):
            import warnings

            warnings.warn(f"This lab's baseline ran with budget {base['budget']}, this session uses "
                          f"{Budget.parse(self._budget_arg)}: candidates are compared with parents trained "
                          f"under another budget. Leave the budget unset (no budget= / --budget) to keep the lab's.", stacklevel=3)

    @property
    def proposer(self):
        """The proposer object (built from its name on first use)."""
        if self._proposer is None:
            if hasattr(self._proposer_arg, "propose") and not self._proposer_kwargs:
                self._proposer = self._proposer_arg
            else:
                from autoresearch_kit.propose import make_proposer

                self._proposer = make_proposer(self._proposer_arg, **self._proposer_kwargs)
            if (getattr(self._proposer, "name", None) in ("mutate", "llm")
                    and getattr(self._proposer, "device", None) == "auto"):
                self._proposer.device = self._device_type()   # edit only the knobs of the device the lab runs on
        return self._proposer

    @proposer.setter
    def proposer(self, value: Any) -> None:
        # a new proposer starts from its own defaults: an LLM's base_url/model must not
        # follow the lab to `lab.proposer = "mutate"`
        self._proposer_arg, self._proposer, self._proposer_kwargs = value, None, {}

    def _device_type(self) -> str:
        if self.device:
            return self.device.split(":")[0]
        from autoresearch_kit.device import detect

        return detect(announce=False).type

    def _hardware_fingerprint(self) -> dict:
        if self._hardware is None:
            from autoresearch_kit.device import detect, hardware_fingerprint

            self._hardware = hardware_fingerprint(detect(self.device, announce=False))
        return self._hardware

    def _check_data(self) -> None:
        """Fail before anything is recorded when there is no prepared data."""
        d = self.data_dir if self.data_dir is not None else config.data_dir()
        if not (d / "manifest.json").is_file():
            msg = (f"No prepared data at {d}: run `autoresearch prepare` (or `python prepare.py`) first, "
                   f"or point data_dir= / AUTORESEARCH_DATA at a prepared directory.")
            raise FileNotFoundError(msg)

    # ---- the data pin -------------------------------------------------------------------------

    def _data_path(self) -> Path:
        return self.data_dir if self.data_dir is not None else config.data_dir()

    def _read_pin(self) -> dict | None:
        path = self.path / DATA_PIN
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            msg = (f"{path} is unreadable ({e}): restore it from a backup, or delete it to pin the lab to the "
                   f"current data.")
            raise ValueError(msg) from None

    def _write_pin(self, pin: dict) -> None:
        tmp = self.path / (DATA_PIN + ".tmp")
        tmp.write_text(json.dumps(pin, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path / DATA_PIN)

    def _current_data(self) -> dict | None:
        """{manifest_hash, data (in words), data_dir} of the prepared data, None when there is none."""
        from autoresearch_kit.data.prepare import describe_data, manifest_hash

        d = self._data_path()
        if not (d / "manifest.json").is_file():
            return None
        return {"manifest_hash": manifest_hash(d), "data": describe_data(d), "data_dir": str(d)}

    def _pin_to(self, current: dict, previous: dict | None = None, baseline_id: str | None = None) -> dict:
        pin = {**current, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "baseline": baseline_id,
               "history": []}
        # the scored set moves with the data only by hand: a re-baseline keeps the context
        pin["eval"] = (previous or {}).get("eval") or self._eval_settings()
        if previous is not None:
            old = {k: previous.get(k) for k in ("manifest_hash", "data", "data_dir", "pinned_at", "baseline")}
            pin["history"] = [*previous.get("history", []), old]
        self._write_pin(pin)
        return pin

    def _eval_settings(self) -> dict:
        """The scored set this lab pins when it is created: runner.eval_settings of its train.py."""
        from autoresearch_kit import runner

        path = self.path / "train.py"
        source = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
        return runner.eval_settings(source, self._device_type())

    def _eval_pin(self) -> dict:
        """The pinned scored set {tokens, seq_len, seq_len_from}; a pin from before gets one now."""
        pin = self._read_pin()
        if pin is None:
            return self._eval_settings()
        if not pin.get("eval"):
            pin["eval"] = self._eval_settings()
            self._write_pin(pin)
        return pin["eval"]

    def _mismatch(self, pin: dict, current: dict) -> str:
        return (f"lab {self.path.name} is pinned to {pin['data']} [{pin['manifest_hash']}], but the prepared data "
                f"is {current['data']} [{current['manifest_hash']}] in {current['data_dir']}: pass data_dir= / --data "
                f"with the lab's data, or re-baseline on the new data (Lab(..., rebaseline=True) / "
                f"`autoresearch run --rebaseline`).")

    def _open_pin(self, rebaseline: bool) -> bool:
        """Check the prepared data against the lab's pin; returns whether a re-baseline is pending.

        A lab without a pin (new, or made before pins) is pinned to the current data now,
        if there is prepared data (else at its first run).
        """
        current = self._current_data()
        if current is None:
            return False                 # nothing to compare yet; _check_data says what to run
        pin = self._read_pin()
        if pin is None:
            self._pin_to(current)
            return False
        if pin["manifest_hash"] != current["manifest_hash"] and not self._has_scores():
            self._pin_to(current, pin)   # nothing was scored on the old data: nothing to protect
            if self.verbose:
                print(f"lab {self.path.name}: pinned to {current['data']} (no run was scored on {pin['data']})")
            return False
        if pin["manifest_hash"] == current["manifest_hash"]:
            if rebaseline and self.verbose:
                print(f"lab {self.path.name}: already on {current['data']}; nothing to re-baseline")
            return False
        if not rebaseline:
            raise ValueError(self._mismatch(pin, current))
        if self.verbose:
            print(f"lab {self.path.name}: re-baselining on {current['data']} (was {pin['data']}): the next run is a "
                  f"new baseline of the current parent's train.py on the new data")
        return True

    @property
    def rebaseline_pending(self) -> bool:
        """True when the lab was opened with rebaseline=True on new data and the new baseline has not run ok."""
        return self._rebaseline

    @property
    def data_pin(self) -> dict | None:
        """The data this lab is pinned to: manifest_hash, data (in words), data_dir, pinned_at, history."""
        return self._read_pin()

    def _check_pin(self, kind: str) -> dict:
        """Before a run: the data must be the pinned data (or the re-baseline's); returns it.

        Catches `prepare` run on other data while this Lab is open, as well as on open.
        """
        current = self._current_data()
        assert current is not None, "_check_data runs first"
        pin = self._read_pin()
        if pin is None:
            self._pin_to(current)
        elif pin["manifest_hash"] != current["manifest_hash"] and not self._has_scores():
            self._pin_to(current, pin)   # nothing scored on the old data yet (e.g. `init`, then other data)
        elif pin["manifest_hash"] != current["manifest_hash"] and not (self._rebaseline and kind == "baseline"):
            raise ValueError(self._mismatch(pin, current))
        return current

    def _has_scores(self) -> bool:
        """Whether any run of this lab was scored (then its data must not change silently)."""
        return any(r["status"] == "ok" for r in self.ledger.records(curves=False))

    def _on_current_data(self, rec: dict) -> bool:
        """Whether an experiment was scored on the data the lab is pinned to (True if unknown: before pins)."""
        h = (rec.get("proposal_meta") or {}).get("manifest_hash")
        pin = self._read_pin()
        return h is None or pin is None or h == pin["manifest_hash"]

    # ---- state --------------------------------------------------------------------------------

    @property
    def parent_id(self) -> str | None:
        """The current parent: the experiment at the tip of the kept line (None before the baseline)."""
        return self.ledger.tip()

    def _follow_tip(self) -> str | None:
        """Move the workspace's kept line to the ledger's tip when they differ; returns the new tip.

        The ledger is the source of truth: every move of the kept line is recorded there
        first (in the same transaction as a keep), then made in git. A process killed in
        between leaves the workspace one step behind, and this catches it up.
        """
        tip = self.ledger.tip()
        if tip is None or tip == self.workspace.head_id():
            return None
        # an edit of lab/train.py nobody ran yet stays (it becomes the next proposal); else
        # train.py follows the kept line
        self.workspace.keep(tip, write=self._unrecorded_edit() is None)
        return tip

    def _reconcile(self) -> str | None:
        """On open: make the workspace agree with the ledger after a process died mid-update.

        Returns the experiment the kept line was moved to, if it had to be moved.
        """
        self._adopt_hand_commit()
        if self.ledger.tip() is None:  # a lab from before the ledger recorded the tip: adopt git's
            head = self.workspace.head_id()
            if head is not None and head in {r["id"] for r in self.ledger.records(curves=False)}:
                self.ledger.set_tip(head)
        moved = self._follow_tip()
        # experiments whose commit was made but not yet recorded (a run killed mid-way)
        missing = [r["id"] for r in self.ledger.records(curves=False) if not r["commit"]]
        if missing:
            commits = self.workspace.commits()
            for exp_id in missing:
                if exp_id in commits:
                    self.ledger.set_commit(exp_id, commits[exp_id])
        return moved

    # ---- hand edits ---------------------------------------------------------------------------

    def _recorded_hashes(self) -> set[str]:
        """Sources that have an experiment. A run that was `aborted` (stopped, interrupted, its
        worker lost) taught nothing: its train.py written back by hand is a new experiment."""
        return {r["source_hash"] for r in self.ledger.records(curves=False)
                if r["source_hash"] and r["status"] != "aborted"}

    def _unrecorded_edit(self) -> str | None:
        """lab/train.py when it differs from the kept line (git's tip and the ledger's) and no
        experiment has its text: an edit that exists nowhere else."""
        src = self.workspace.working_source()
        if src is None or source_hash(src) in self._recorded_hashes():
            return None
        known = {self.workspace.source("kept")}
        tip = self.ledger.tip()
        if tip is not None:
            known.add(self.workspace.source(tip))
        return None if src in known else src

    def hand_edit(self) -> str | None:
        """The lab's train.py when a person edited it and it has not run yet, else None.

        The next `propose()` (so `step()`, the panel and `autoresearch run`) returns it as
        a proposal by ``human`` instead of asking the agent; nothing moves the kept line
        over it (decide/checkout refuse while it is pending). Before the baseline the file
        is simply what the baseline runs.
        """
        self._adopt_hand_commit()
        return self._unrecorded_edit() if self.ledger.tip() is not None else None

    def _adopt_hand_commit(self) -> None:
        """A `git commit` made by hand on the kept line becomes a hand edit of train.py.

        The commit stays as ``lines/hand-<sha>`` and the kept line goes back to the
        ledger's tip; lab/train.py keeps the committed text (or a later edit of it), which
        the next proposal takes, with the commit's subject as its description.
        """
        found = self.workspace.hand_commit()
        if found is None or self.ledger.tip() is None:  # before the baseline: the baseline runs the file
            return
        sha, subject = found
        committed = self.workspace.source(sha)
        if self.workspace.working_source() is None:
            (self.path / "train.py").write_text(committed, encoding="utf-8")
        self.workspace.keep(self.ledger.tip(), write=False)
        if source_hash(self.workspace.working_source()) not in self._recorded_hashes():
            self._hand_description = " ".join(subject.split()) or HAND_EDIT
        if self.verbose:
            print(f"lab {self.path.name}: your commit {sha[:7]} ({subject}) on the kept line is kept as branch "
                  f"lines/hand-{sha[:7]}; its train.py is taken as your next experiment")

    def _refuse_over_hand_edit(self, what: str) -> None:
        if self.hand_edit() is not None:
            msg = (f"{self.path / 'train.py'} has edits that have not run yet, and {what} would overwrite it. "
                   f"Run it first (the next lab.step() / `autoresearch run` / panel proposal takes it as your "
                   f"experiment), or move it aside and restore the kept version with "
                   f"`git -C {self.path} checkout train.py`. Nothing was changed.")
            raise ValueError(msg)

    def _sync_train_file(self) -> None:
        """Put the kept line's train.py back into the lab when the file holds a recorded experiment's
        text (a rejected or discarded hand edit: it is in git), never over an unrecorded edit."""
        tip = self.ledger.tip()
        src = self.workspace.working_source()
        if tip is None or src is None or self._unrecorded_edit() is not None:
            return
        kept = self.workspace.source(tip)
        if src != kept:
            (self.path / "train.py").write_text(kept, encoding="utf-8")
            if self.verbose:
                owner = next((r["id"] for r in self.ledger.records(curves=False)
                              if r["source_hash"] == source_hash(src)), "?")
                print(f"lab {self.path.name}: train.py is the kept version ({tip}) again; your edit is experiment "
                      f"{owner} (refs/experiments/{owner}; lab.checkout({owner!r}) continues from it if it ran ok)")

    # ---- results kept aside (disk full) --------------------------------------------------------

    def _pending_path(self, exp_id: str) -> Path:
        return self.path / RUNS / exp_id / PENDING

    def _reserve_pending(self, exp_id: str) -> None:
        """Reserve room for the result before the run: a full disk later can still take it."""
        path = self._pending_path(exp_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(b" " * _PENDING_RESERVE)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # no room even now: the ledger write may still succeed; nothing to keep aside
            path.unlink(missing_ok=True)

    def _keep_pending(self, exp_id: str, result: RunResult, sha: str | None) -> Path | None:
        """Write the result into its reserved file (in place: no new blocks). None if that failed too."""
        import json

        path = self._pending_path(exp_id)
        if not path.is_file():
            return None
        d = {"exp_id": exp_id, "commit": sha, "result": result.to_dict()}
        size = path.stat().st_size
        for drop in ((), ("curve",), ("curve", "log_tail")):   # the numbers matter most
            for k in drop:
                d["result"][k] = [] if k == "curve" else ""
            data = json.dumps(d, default=str).encode()
            if len(data) <= size:
                break
        else:
            return None
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return None
        return path

    def _recover_pending(self) -> list[str]:
        """On open: record results kept aside when the disk was full; drop stale reservations."""
        import json

        done = []
        for path in sorted((self.path / RUNS).glob(f"*/{PENDING}")):
            try:
                d = json.loads(path.read_text(encoding="utf-8") or "null")
            except (OSError, ValueError):
                d = None
            exp_id = path.parent.name
            if isinstance(d, dict) and "result" in d:
                try:
                    rec = self.ledger.get(exp_id)
                except KeyError:  # not ours to judge: leave the file
                    continue
                if rec["status"] == "running":
                    self.ledger.finish(exp_id, RunResult.from_dict(d["result"]), commit=d.get("commit"))
                    done.append(exp_id)
            path.unlink(missing_ok=True)   # recorded now, or an unused reservation
        return done

    # ---- undecided ----------------------------------------------------------------------------

    def undecided(self) -> list[dict]:
        """Experiments that ran ok and wait for a decision (e.g. after Ctrl-C at the prompt), oldest first."""
        return [r for r in self.ledger.records(curves=False)
                if r["kind"] == "candidate" and r["status"] == "ok" and r["decision"] is None]

    @property
    def last_id(self) -> str | None:
        """The most recent experiment this Lab ran or recorded (else the ledger's latest)."""
        if self._last_id is not None:
            return self._last_id
        recs = self.ledger.records(curves=False)
        return recs[-1]["id"] if recs else None

    def _calibration_record(self) -> dict | None:
        """The last calibration run that ran ok (see `Lab(calibrate=)`), or None."""
        cal = [r for r in self.ledger.records(curves=False) if r["kind"] == "calibration" and r["status"] == "ok"]
        return cal[-1] if cal else None

    def _calibrate_budget(self, source: str, on_event=None, stop=None) -> None:
        """Run train.py once under the seconds budget; the tokens it trained become the lab's budget."""
        from autoresearch_kit.config import Budget

        seconds = self.budget
        result = self._run(source, parent_id=None, kind="calibration", proposer="baseline", on_event=on_event,
                           stop=stop, description=f"calibration: tokens trained in {seconds}")
        if not result.ok or not result.tokens:
            msg = (f"the calibration run did not run ({result.status}: {result.reason or 'no tokens trained'}); "
                   f"fix {self.path / 'train.py'}, or run without calibrate (a seconds budget).")
            raise RuntimeError(msg)
        self._budget = Budget.parse(f"{int(result.tokens)}-tokens")
        if self.verbose:
            print(f"lab {self.path.name}: {self.calibration_note()}")

    def calibration_note(self) -> str:
        """What the calibration measured and the budget it set ("" for a lab that did not calibrate)."""
        cal = self._calibration_record()
        if cal is None:
            return ""
        rate = f" ({cal['tokens'] / cal['training_seconds']:,.0f} tok/s)" if cal["training_seconds"] else ""
        return (f"calibrated: {cal['budget']} trained {cal['tokens']:,} tokens here{rate}; every run gets "
                f"{self.budget} whatever the machine's load (calibrate=False / --no-calibrate keeps seconds)")

    def eval_note(self, rec: dict | None = None) -> str:
        """A note when scoring a run (default: the baseline) took more than a quarter of its
        training time, with how to score a fixed span instead ("" otherwise)."""
        rec = rec or self._baseline_record()
        if not rec or rec["status"] != "ok" or not rec.get("eval_seconds") or not rec.get("training_seconds"):
            return ""
        if rec["eval_seconds"] <= 0.25 * rec["training_seconds"]:
            return ""
        return (f"scoring {rec['eval_tokens']:,} validation tokens took {rec['eval_seconds']:.0f} s per run "
                f"(training {rec['training_seconds']:.0f} s): a new lab made with AUTORESEARCH_EVAL_TOKENS=N "
                f"scores the first N instead (pinned with the lab)")

    def _baseline_record(self) -> dict | None:
        base = [r for r in self.ledger.records(curves=False) if r["kind"] == "baseline"]
        ok = [r for r in base if r["status"] == "ok"]
        return (ok or base or [None])[-1]

    def _scores(self, exp_id: str) -> list[float]:
        """val_bpb of an experiment and of its noise/confirmation reruns (same source)."""
        rec = self.ledger.get(exp_id)
        vals = [rec["val_bpb"]] if rec["status"] == "ok" and rec["val_bpb"] is not None else []
        for r in self.ledger.records(curves=False):
            if (r["kind"] in ("noise", "rerun") and r["parent_id"] == rec["id"] and r["status"] == "ok"
                    and r["val_bpb"] is not None and r["source_hash"] == rec["source_hash"]):
                vals.append(r["val_bpb"])
        return vals

    def _sigma_from_ledger(self) -> float | None:
        """sigma pooled over every experiment run with 2 or more seeds on the lab's current
        data (noise measured before a re-baseline says nothing): sqrt(sum (n-1) s^2 / sum (n-1)).

        Pooling keeps every rerun's information: the baseline's 3 seeds alone give sigma to
        about +-50%; each confirm, recheck and measure_noise narrows it.
        """
        recs = self.ledger.records(curves=False)
        current = {r["id"] for r in recs if self._on_current_data(r)}
        ss, df = 0.0, 0
        for eid, by_seed in _all_seed_scores(recs).items():
            if eid in current and len(by_seed) >= 2:
                ss += statistics.variance(by_seed.values()) * (len(by_seed) - 1)
                df += len(by_seed) - 1
        return math.sqrt(ss / df) if df else None

    # ---- proposing ----------------------------------------------------------------------------

    def context(self, feedback: str = "", siblings: "list[Proposal] | tuple" = ()) -> ProposalContext:
        """What the proposer sees: program.md, the parent, the history, the last crash.

        The history lists every proposal (run or rejected) oldest first, with the
        decision and the human's reason; `seen_hashes` holds every train.py ever
        proposed, so none is proposed twice (a hand edit may repeat one whose runs were all
        aborted: `_recorded_hashes`). `siblings`: proposals of the same batch made
        before this one (see `step(parallel=)`): listed last in the history as running,
        their train.py counted as seen, and the seed moved on, so the next one differs.
        """
        recs = self.ledger.records(curves=False)
        parent_id = self.parent_id
        parent_source = self.workspace.source(parent_id) if parent_id else (self.path / "train.py").read_text()
        history = []
        for r in recs:
            if r["kind"] not in _PROPOSAL_KINDS:
                continue
            if r["decided_by"] == "human" or r["status"] == "rejected":
                reason = r["decision_reason"]
            elif r["status"] in CRASH_LIKE:
                reason = r["reason"]
            elif r["within_noise"]:
                reason = r["decision_reason"]
            else:
                reason = ""
            history.append(HistoryEntry(exp_id=r["id"], description=r["description"], status=r["status"],
                                        decision=r["decision"], val_bpb=r["val_bpb"], reason=reason,
                                        source_hash=r["source_hash"], diff=r["diff"]))
        for i, sib in enumerate(siblings):
            history.append(HistoryEntry(exp_id=f"batch-{i + 1}", description=sib.description, status="running",
                                        decision=None, reason="in this batch: it runs beside the next proposal, "
                                        "so propose something different", source_hash=sib.source_hash,
                                        diff=sib.diff))
        crashes = [r for r in recs if r["status"] in _FAILED_RUNS and r["log_tail"]]
        best = self.best()
        parent_scores = self._scores(parent_id) if parent_id else []
        text = " ".join(t for t in (self.feedback, feedback) if t)
        return ProposalContext(
            program=read_text(self.path / "program.md"),
            parent_source=parent_source, parent_id=parent_id,
            parent_val_bpb=statistics.fmean(parent_scores) if parent_scores else None,
            best_val_bpb=best["val_bpb"] if best else None, history=history,
            last_crash_log=crashes[-1]["log_tail"] if crashes else "", feedback=text,
            seen_hashes={r["source_hash"] for r in recs if r["source_hash"]} | {p.source_hash for p in siblings},
            seed=self.seed * 100_003 + len(recs) + 7_919 * len(siblings))

    def propose(self, feedback: str = "", *, on_token: Callable[[str], None] | None = None,
                siblings: "list[Proposal] | tuple" = ()) -> Proposal:
        """Ask the proposer for the next candidate (not run, not recorded).

        Parameters
        ----------
        feedback : str
            Free text the agent reads with this request (added to any pending feedback).
        on_token : callable, optional
            Receives the proposer's streamed text (LLM proposers), e.g. to show it typing.
        siblings : list of Proposal
            Proposals already made for the same batch (see `context`).

        Raises
        ------
        ProposalError
            When the proposer gives up; its `reason` says why.
        """
        self._start_ahead()
        edit = self.hand_edit() if not siblings else None   # a batch takes a hand edit as its first
        if edit is not None:   # a person edited lab/train.py: that is the next experiment
            description = self._hand_description or HAND_EDIT
            try:
                proposal = self.submit(edit, description)
            except ValueError as e:
                msg = (f"{self.path / 'train.py'} was edited by hand and cannot run as it is: "
                       f"{str(e).removeprefix('This edit of train.py cannot run: ')}. Fix the file, or restore the "
                       f"kept version with `git -C {self.path} checkout train.py`.")
                raise ValueError(msg) from None
            proposal.metadata["hand_edit"] = True
            proposal.rationale = proposal.rationale or "edited by hand in the lab directory"
            self._hand_description = None
            self.feedback = ""
            if self.verbose:
                print(f"lab {self.path.name}: {self.path / 'train.py'} was edited by hand: proposing your edit "
                      f"({description}) before asking {getattr(self.proposer, 'name', 'the proposer')}")
            return proposal
        ctx = self.context(feedback, siblings) if siblings else self.context(feedback)
        if on_token is not None and "on_token" in inspect.signature(self.proposer.propose).parameters:
            proposal = self.proposer.propose(ctx, on_token=on_token)
        else:
            proposal = self.proposer.propose(ctx)
        self.feedback = ""
        if proposal.parent_id is None:
            proposal.parent_id = ctx.parent_id
        return proposal

    def submit(self, source: str | os.PathLike, description: str, *, original: Proposal | None = None) -> Proposal:
        """Turn a human-written train.py into a Proposal (proposer ``human``), validated.

        Parameters
        ----------
        source : str or Path
            The new train.py text (or a path to it).
        description : str
            One line for results.tsv.
        original : Proposal, optional
            The proposal this edits; its proposer is noted in the metadata.

        Raises
        ------
        ValueError
            When the edit cannot run (does not compile, changes nothing, repeats an
            experiment, fails the integrity check).
        """
        from autoresearch_kit.propose.edits import make_proposal

        if isinstance(source, Path):
            source = source.read_text(encoding="utf-8")
        meta: dict[str, Any] = {}
        if original is not None:
            meta = {"edited_from": original.proposer, "original_description": original.description,
                    "original_source_hash": original.source_hash}
        import dataclasses

        # a person may run again what only ever ran to `aborted` (the agent is not offered it)
        ctx = dataclasses.replace(self.context(), seen_hashes=self._recorded_hashes())
        try:
            return make_proposal(ctx, source, description, proposer="human",
                                 rationale=original.rationale if original else "", metadata=meta)
        except ProposalError as e:
            msg = f"This edit of train.py cannot run: {e.reason}"
            raise ValueError(msg) from None

    def reject(self, proposal: Proposal, reason: str = "") -> dict:
        """Record a proposal as rejected (never run); the reason reaches the next context."""
        exp_id = self.ledger.reject(proposal.parent_id or self.parent_id, proposal.source_hash, proposal.diff,
                                    proposal.description, proposal.proposer, reason,
                                    proposal_meta={**proposal.metadata, "rationale": proposal.rationale},
                                    decided_by="human")
        # the workspace keeps its train.py too: nothing proposed is ever lost
        parent = proposal.parent_id or self.parent_id
        try:
            sha = self.workspace.commit_experiment(exp_id, proposal.source, parent, proposal.description)
            self.ledger.set_commit(exp_id, sha)
        except KeyError:  # parent never committed (no baseline yet): the diff in the ledger suffices
            pass
        self._sync_train_file()   # a rejected hand edit: lab/train.py goes back to the kept version
        if reason:
            # the next proposal reads the reason as feedback too (whoever rejected: panel, CLI, cell):
            # the offline proposer steers by feedback ("try a higher lr"), an LLM also sees it in the history
            self.feedback = " ".join(t for t in (self.feedback, reason) if t)
        self._last_id = exp_id
        rec = self.ledger.get(exp_id)
        self._say(rec)
        return rec

    # ---- running ------------------------------------------------------------------------------

    def watch_run(self, fn: Callable[[dict], Any]) -> Callable[[], None]:
        """Also send every step event of the lab's runs to ``fn`` (e.g. a second panel attaching to
        the run in progress: `running["events"]` holds what it missed). Returns a function that
        stops it."""
        self._watchers.append(fn)
        return lambda: self._watchers.remove(fn) if fn in self._watchers else None

    def stop_run(self, exp_id: str | None = None) -> bool:
        """End the lab's run in progress as ``aborted`` (whoever started it); False if none is running.

        In a batch (`step(parallel=N)`), `exp_id` stops that run only; without it, all of them.
        """
        now = self.running
        if now is None:
            return False
        if exp_id is not None and now.get("batch"):
            one = now["batch"].get(exp_id)
            if one is None:
                return False
            one["stop"].set()
            return True
        now["stop"].set()
        return True

    def _run(self, source: str, **kw) -> RunResult:
        """Record, commit, run and record again, one run per lab at a time (RuntimeError for a second)."""
        return self._exclusive(self._run_one, source, **kw)

    def _exclusive(self, fn: Callable, *args, **kw):
        """fn(*args, **kw) holding the lab's run lock: one run or batch per lab at a time."""
        if not self._run_mu.acquire(blocking=False):
            now = self.running or {}
            msg = (f"experiment {now.get('exp_id', '?')} ({now.get('description', '')}) is running in this lab: one "
                   f"run at a time (a batch counts as one). Wait for it (lab.running shows it) or stop it, then run again.")
            raise RuntimeError(msg)
        try:
            return fn(*args, **kw)
        finally:
            self.running = None
            self._run_mu.release()

    def _fan_out(self, on_event: Callable[[dict], Any] | None) -> Callable[[dict], Any]:
        def emit(event: dict) -> None:
            if self.running is not None and len(self.running["events"]) < 100_000:
                self.running["events"].append(event)
            for fn in [on_event, *self._watchers]:
                if fn is not None:
                    try:
                        fn(event)
                    except Exception:  # noqa: BLE001 - a broken view must not end the run's reporting
                        if fn is on_event:
                            raise
        return emit

    def _begin(self, source: str, *, parent_id: str | None, kind: str, description: str, proposer: str,
               diff: str = "", meta: dict | None = None) -> str:
        """Check the data and the parent, then record the experiment as ``running``; its id."""
        self._check_data()
        data = self._check_pin(kind)
        if parent_id is not None and not self._on_current_data(self.ledger.get(parent_id)):
            other = self.ledger.get(parent_id)["proposal_meta"].get("data")
            msg = (f"Experiment {parent_id} was scored on other data ({other}): "
                   f"a child of it on this data could not be compared with it. Continue from an experiment made "
                   f"since the re-baseline (lab.checkout).")
            raise ValueError(msg)
        meta = {**(meta or {}), "manifest_hash": data["manifest_hash"], "data": data["data"]}
        budget, hardware = self.budget, self._hardware_fingerprint()
        exp_id = self.ledger.start(parent_id, source_hash(source), diff, description, proposer, budget, hardware,
                                   proposal_meta=meta, kind=kind)
        self._last_id = exp_id
        return exp_id

    def _commit_run(self, exp_id: str, source: str, parent_id: str | None, description: str) -> str:
        """Commit the candidate (refs/experiments/<id>) and reserve room for its result; the commit."""
        rec = self.ledger.get(exp_id)
        # what recover_ledger needs to keep the lab comparable: the budget and the data it ran on
        trailers = {"Budget": rec["budget"], "Data": (rec["proposal_meta"] or {}).get("manifest_hash")}
        sha = self.workspace.commit_experiment(exp_id, source, parent_id, description, trailers)
        self._reserve_pending(exp_id)
        return sha

    def _run_kwargs(self, seed: int | None) -> dict:
        """What run_budgeted gets besides the source and budget (the same here and on a worker)."""
        scored = self._eval_pin()   # one scored set for every run of the lab (data.json)
        kw: dict[str, Any] = {"seed": self.seed if seed is None else seed, "device": self.device,
                              "sandbox": self.sandbox, "eval_tokens": scored.get("tokens") or "all",
                              "eval_seq_len": scored.get("seq_len")}
        limit = self._sized_hard_limit()
        if limit is not None:
            kw["hard_limit"] = limit
        return kw

    def _launch(self, exp_id: str, source: str, *, seed: int | None, on_event: Callable[[dict], Any],
                stop: threading.Event) -> RunResult:
        """Train and score one run: here (the default), or on the lab's cluster when it has one."""
        workdir = self.path / RUNS / exp_id
        if self._engine is None and self.cluster is None:
            return runner.run_budgeted(source, self.budget, workdir=workdir, data_dir=self.data_dir,
                                       on_event=on_event, stop=stop, **self._run_kwargs(seed))
        engine = self._engine_for(1)
        data = self._data_path()
        digest = engine.ensure_data(data)
        return engine.run(exp_id, source, self.budget, stop=stop, data_path=data, digest=digest, workdir=workdir,
                          run_kwargs=self._run_kwargs(seed), on_event=on_event)

    def _engine_for(self, n: int):
        """The lab's parallel.Engine: its cluster, or n local workers (a bigger one when n grew)."""
        from autoresearch_kit import parallel

        if self._engine is not None:
            if self.cluster is not None or len(self._engine.workers()) >= n:
                return self._engine
            self._engine.close()
            self._engine = None
        self._engine = parallel.connect(self.cluster, workers=n, device=self._device_type())
        return self._engine

    def _aborted(self, e: BaseException) -> RunResult:
        why = "interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        return RunResult(status="aborted", reason=why, budget=str(self.budget))

    def _run_one(self, source: str, *, parent_id: str | None, kind: str, description: str, proposer: str,
                 diff: str = "", meta: dict | None = None, seed: int | None = None,
                 on_event: Callable[[dict], Any] | None = None, stop: threading.Event | None = None) -> RunResult:
        """Record, commit, run and record again. Raises KeyboardInterrupt after recording one."""
        exp_id = self._begin(source, parent_id=parent_id, kind=kind, description=description, proposer=proposer,
                             diff=diff, meta=meta)
        stop = stop if stop is not None else threading.Event()   # so stop_run() can end any run
        self.running = {"exp_id": exp_id, "description": description, "kind": kind, "started": time.time(),
                        "events": [], "stop": stop}
        on_event = self._fan_out(on_event)
        sha: str | None = None
        try:
            sha = self._commit_run(exp_id, source, parent_id, description)
            result = self._launch(exp_id, source, seed=seed, on_event=on_event, stop=stop)
        except BaseException as e:  # a broken setup or a Ctrl-C outside the runner's wait
            self._finish(exp_id, self._aborted(e), sha)
            raise
        return self._end(exp_id, result, sha, stop)

    def _end(self, exp_id: str, result: RunResult, sha: str | None, stop: threading.Event | None) -> RunResult:
        """Record a finished run; KeyboardInterrupt after recording one that Ctrl-C ended."""
        result.extra["exp_id"] = exp_id
        phase = timeout_phase(result)
        if phase in _PHASE_NOTE:   # say whose fault it was, for the person and the proposer alike
            result.reason = f"{result.reason}; {_PHASE_NOTE[phase]}" if result.reason else _PHASE_NOTE[phase]
        self._finish(exp_id, result, sha)
        interrupted = (result.status == "aborted" and not (stop is not None and stop.is_set())
                       and "KeyboardInterrupt" in result.reason)
        if interrupted:
            self._say(self.ledger.get(exp_id))
            raise KeyboardInterrupt(f"experiment {exp_id} interrupted and recorded as aborted")
        return result

    def _run_batch(self, proposals: list[Proposal], on_event: Callable[[dict], Any] | None,
                   stop: threading.Event | None) -> list[str]:
        """Run proposals at the same time on the lab's cluster; record each as it finishes.

        One batch (or run) per lab at a time, as for `_run`. The data is checked on every
        worker (and shipped where missing) before anything is recorded. Returns the
        experiment ids in proposal order. A Ctrl-C stops every run, records them as
        ``aborted`` and raises KeyboardInterrupt.
        """
        return self._exclusive(self._run_batch_locked, proposals, on_event, stop)

    def _run_batch_locked(self, proposals: list[Proposal], on_event, stop) -> list[str]:
        engine = self._engine_for(len(proposals))
        data = self._data_path()
        digest = engine.ensure_data(data)   # before anything is recorded: a failure here records nothing
        stop = stop if stop is not None else threading.Event()
        self.running = {"exp_id": None, "description": f"a batch of {len(proposals)}", "kind": "batch",
                        "started": time.time(), "events": [], "stop": stop, "batch": {}}
        emit = self._fan_out(on_event)
        run_kwargs = self._run_kwargs(None)   # the same for every run of the batch: read the ledger once
        runs: dict[str, dict] = {}   # exp_id -> {handle, sha, stop}
        ids: list[str] = []
        done: set[str] = set()
        try:
            for p in proposals:
                parent = p.parent_id or self.parent_id
                exp_id = self._begin(p.source, parent_id=parent, kind="candidate", description=p.description,
                                     proposer=p.proposer, diff=p.diff,
                                     meta={**p.metadata, "rationale": p.rationale, "batch": len(proposals)})
                ids.append(exp_id)
                sha = None
                try:
                    sha = self._commit_run(exp_id, p.source, parent, p.description)
                    handle = engine.submit(exp_id, p.source, self.budget, data_path=data, digest=digest,
                                           workdir=self.path / RUNS / exp_id, run_kwargs=run_kwargs,
                                           on_event=lambda e, i=exp_id: emit({**e, "exp_id": i}))
                except BaseException as e:
                    self._finish(exp_id, self._aborted(e), sha)
                    done.add(exp_id)
                    raise
                runs[exp_id] = {"handle": handle, "sha": sha, "stop": threading.Event()}
                self.running["batch"][exp_id] = {"description": p.description, "stop": runs[exp_id]["stop"]}
                self.running["exp_id"] = self.running["exp_id"] or exp_id
            watcher = threading.Thread(target=self._watch_stops, args=(engine, runs, stop, done),
                                       name="autoresearch-batch-stops", daemon=True)
            watcher.start()
            for handle in engine.wait([r["handle"] for r in runs.values()]):
                exp_id = handle.exp_id
                result = engine.result(handle, self.path / RUNS / exp_id)
                run_stop = runs[exp_id]["stop"]
                self._end(exp_id, result, runs[exp_id]["sha"], stop if stop.is_set() else run_stop)
                done.add(exp_id)
                self._say(self.ledger.get(exp_id))
        except BaseException as e:
            self._abort_batch(engine, runs, done, e)
            raise
        finally:
            done.update(runs)   # ends the watcher
        return ids

    def _watch_stops(self, engine, runs: dict[str, dict], stop: threading.Event, done: set[str]) -> None:
        """Pass the batch's Stop (all runs) and each run's Stop to the workers."""
        sent: set[str] = set()
        while not set(runs) <= done:
            for exp_id, r in runs.items():
                if exp_id not in sent and exp_id not in done and (stop.is_set() or r["stop"].is_set()):
                    engine.stop(r["handle"])
                    sent.add(exp_id)
            time.sleep(0.2)

    def _abort_batch(self, engine, runs: dict[str, dict], done: set[str], error: BaseException) -> None:
        """Stop every run of a batch not yet recorded, and record it (its result if it comes back in time)."""
        left = [i for i in runs if i not in done]
        for exp_id in left:
            engine.stop(runs[exp_id]["handle"])
        deadline = time.monotonic() + 20.0
        for exp_id in left:
            handle = runs[exp_id]["handle"]
            try:
                handle.future.result(timeout=max(0.1, deadline - time.monotonic()))
                result = engine.result(handle, self.path / RUNS / exp_id)
                if result.status == "aborted":
                    result.reason = self._aborted(error).reason
            except BaseException:  # noqa: BLE001 - not back in time, or the cluster is gone
                result = self._aborted(error)
            result.extra["exp_id"] = exp_id
            self._finish(exp_id, result, runs[exp_id]["sha"])
            done.add(exp_id)

    def _finish(self, exp_id: str, result: RunResult, sha: str | None) -> None:
        """Record a run's result, even when Ctrl-C lands meanwhile (re-raised after) or the disk is full.

        An interrupted write is rolled back whole; left so, the finished run would stay
        ``running`` and be recovered as ``aborted`` next time: its result lost. A full
        disk: the write is retried, then the result goes into the space reserved for it
        at the start of the run (runs/<id>/result.pending.json), which the next open
        records, and DiskFullError says so in one line.
        """
        import time

        for delay in (0.0, 0.5, 1.5):
            time.sleep(delay)
            try:
                try:
                    self.ledger.finish(exp_id, result, commit=sha)
                except KeyboardInterrupt:
                    if self.ledger.get(exp_id)["status"] == "running":
                        self.ledger.finish(exp_id, result, commit=sha)
                    raise
            except Exception as e:
                if not is_disk_full(e):
                    raise
                if self.ledger.get(exp_id)["status"] != "running":   # recorded; results.tsv lags
                    self._pending_path(exp_id).unlink(missing_ok=True)
                    if self.verbose:
                        print(f"lab {self.path.name}: disk full: experiment {exp_id} is recorded, results.tsv is "
                              f"behind until the next write")
                    return
                continue
            self._pending_path(exp_id).unlink(missing_ok=True)
            return
        kept = self._keep_pending(exp_id, result, sha)
        score = f"val_bpb {result.val_bpb:.6f}" if result.val_bpb is not None else result.status
        where = (f"kept in {kept}, recorded when the lab opens next" if kept else
                 "not kept (no room even for the reserved file)")
        msg = (f"disk full: the result of experiment {exp_id} ({score}) could not be written to the ledger; "
               f"{where}. Free some space in {self.path}.")
        raise DiskFullError(errno.ENOSPC, msg)

    def _sized_hard_limit(self) -> float | None:
        """A hard limit sized from this lab's measured runs, when the runner's default is too short.

        1.5 x the slowest of the last ok runs under this budget (whole wall time: start-up,
        training, evaluation), and twice the limit a run outgrew outside its training
        window (a machine too slow for the default). None: the runner's default stands
        (also whenever AUTORESEARCH_HARD_LIMIT or AUTORESEARCH_GRACE is set by hand).
        """
        default_of = getattr(runner, "_hard_limit", None)
        if default_of is None or config.env("HARD_LIMIT") or config.env("GRACE"):
            return None
        budget = str(self.budget)
        recs = [r for r in self.ledger.records(curves=False) if r["budget"] == budget][-10:]
        needed = 0.0
        for r in recs:
            if r["status"] == "ok" and r["wall_seconds"]:
                needed = max(needed, 1.5 * r["wall_seconds"])
            elif r["status"] == "timeout" and _PHASE_NOTE_MARK in (r["reason"] or ""):
                needed = max(needed, 2.0 * float((r["extra"] or {}).get("hard_limit") or 0.0))
        try:
            default = float(default_of(self.budget, None, self._device_type()))
        except Exception:  # noqa: BLE001 - a runner that changed its helper: keep its default
            return None
        return round(needed) if needed > default else None

    def run_budgeted(self, proposal: Proposal | str, on_event: Callable[[dict], Any] | None = None,
                     stop: threading.Event | None = None) -> RunResult:
        """Train a proposal under the lab's budget and record it (undecided).

        The run lives in `runs/<id>/`; the ledger has it as ``running`` before the
        process starts. `result.extra["exp_id"]` names the experiment.

        Parameters
        ----------
        proposal : Proposal or str
            A proposal, or train.py source (recorded as a human edit).
        on_event : callable, optional
            Gets each step event (step, loss, lr, tokens, progress, ...), on a thread.
        stop : threading.Event, optional
            Set it to end the run as ``aborted``.

        Raises
        ------
        KeyboardInterrupt
            After recording the run as aborted, when Ctrl-C interrupted it.
        FileNotFoundError
            When there is no prepared data (nothing is recorded).
        """
        if isinstance(proposal, str):
            proposal = self.submit(proposal, "human edit")
        self._ensure_baseline(on_event, stop)
        parent = proposal.parent_id or self.parent_id
        meta = {**proposal.metadata, "rationale": proposal.rationale}
        return self._run(proposal.source, parent_id=parent, kind="candidate", description=proposal.description,
                         proposer=proposal.proposer, diff=proposal.diff, meta=meta, on_event=on_event, stop=stop)

    def baseline(self, on_event: Callable[[dict], Any] | None = None, stop: threading.Event | None = None) -> dict:
        """Run the lab's starting train.py once and keep it; a no-op when a baseline ran ok.

        A failed baseline is recorded and can be run again after fixing `lab/train.py`.
        """
        done = self._baseline_record()
        if self._rebaseline:
            return self._learn_noise(self._run_rebaseline(on_event, stop), on_event, stop)
        if done is not None and done["status"] == "ok":
            return self._learn_noise(done, on_event, stop)
        source = read_text(self.path / "train.py")
        if self.calibrate and self._calibration_record() is None and self.budget.kind == "seconds":
            self._calibrate_budget(source, on_event, stop)
        result = self._run(source, parent_id=None, kind="baseline", description="baseline", proposer="baseline",
                           on_event=on_event, stop=stop)
        rec = self._decide_baseline(result, "baseline")
        if self.verbose and self.eval_note(rec):
            print(f"lab {self.path.name}: {self.eval_note(rec)}")
        return self._learn_noise(rec, on_event, stop)

    def _decide_baseline(self, result, reason: str) -> dict:
        """Keep a baseline that ran ok (it becomes the tip), discard one that did not; its record."""
        exp_id = result.extra["exp_id"]
        by = "autopilot" if self._autopilot else "rule"
        if result.ok:
            try:
                self.ledger.decide(exp_id, "keep", reason, decided_by=by, tip=exp_id)
            finally:
                self._follow_tip()
        else:
            self.ledger.decide(exp_id, "discard", f"baseline {result.status}: {result.reason}", decided_by=by)
        rec = self.ledger.get(exp_id)
        self._say(rec)
        return rec

    def _learn_noise(self, base: dict, on_event=None, stop=None) -> dict:
        """After an ok baseline: measure the noise (noise_runs reruns) if the lab has no sigma yet."""
        if (base["status"] == "ok" and self.noise_runs > 0 and self.sigma is None and not self._noise_tried
                and not (stop is not None and stop.is_set())):
            self._noise_tried = True
            n = self.measure_noise(self.noise_runs, on_event=on_event, stop=stop)
            if self.verbose and n["sigma"] is not None:
                print(f"lab {self.path.name}: noise sigma {n['sigma']:.6f} bpb from {len(n['values'])} runs of "
                      f"{n['exp_id']}; gains within 2 sigma are not kept (noise_runs=0 skips this)")
                if n["load_note"]:
                    print(f"lab {self.path.name}: {n['load_note']}")
        return base

    def _run_rebaseline(self, on_event=None, stop=None) -> dict:
        """The new baseline of a re-baseline: the current parent's train.py on the new data,
        a new root of the experiment tree (parent None); the pin moves once it ran ok."""
        pin, current = self._read_pin(), self._current_data()
        parent = self.parent_id
        source = self.workspace.source(parent) if parent else (self.path / "train.py").read_text(encoding="utf-8")
        what = f"baseline on {current['data'] if current else 'new data'}"
        desc = f"{what} (re-baselined from {pin['data']}" + (f", experiment {parent})" if parent else ")")
        result = self._run(source, parent_id=None, kind="baseline", description=desc, proposer="baseline",
                           meta={"rebaseline_of": parent, "previous_manifest_hash": pin and pin["manifest_hash"]},
                           on_event=on_event, stop=stop)
        rec = self._decide_baseline(result, "baseline (re-baselined on new data)")
        if result.ok:
            self._pin_to(self._check_pin("baseline"), pin, baseline_id=rec["id"])
            self._rebaseline = False
            self.sigma = None          # the old data's noise says nothing about the new data
        return rec

    def _ensure_baseline(self, on_event: Callable[[dict], Any] | None = None,
                         stop: threading.Event | None = None) -> None:
        """Run the baseline if it has not run ok (once), else raise with what to fix."""
        base = self.baseline(on_event=on_event, stop=stop)
        if base["status"] != "ok":
            tail = "\n".join(base["log_tail"].splitlines()[-15:])
            msg = (f"The baseline (experiment {base['id']}) did not run: {base['status']}: {base['reason']}\n{tail}\n"
                   f"Fix {self.path / 'train.py'} and run lab.baseline() again.")
            raise RuntimeError(msg)

    # ---- deciding -----------------------------------------------------------------------------

    def _seed_scores(self, exp_id: str) -> dict[int, float]:
        """{seed: val_bpb} of an experiment and its noise/confirmation reruns (same source)."""
        rec = self.ledger.get(exp_id)
        out = {}
        if rec["status"] == "ok" and rec["val_bpb"] is not None and rec["seed"] is not None:
            out[int(rec["seed"])] = rec["val_bpb"]
        for r in self.ledger.records(curves=False):
            if (r["kind"] in ("noise", "rerun") and r["parent_id"] == rec["id"] and r["status"] == "ok"
                    and r["val_bpb"] is not None and r["source_hash"] == rec["source_hash"] and r["seed"] is not None):
                out.setdefault(int(r["seed"]), r["val_bpb"])
        return out

    def _pairs(self, exp_id: str, parent_id: str) -> list[tuple[int, float, float]]:
        """(seed, parent val_bpb, candidate val_bpb) at every seed both have run with."""
        cand, par = self._seed_scores(exp_id), self._seed_scores(parent_id)
        return [(s, par[s], cand[s]) for s in sorted(cand) if s in par]

    def paired_noise(self) -> dict:
        """The lab's pooled standard deviation of paired differences (parent minus candidate
        at the same seed), measured wherever a candidate has 2 or more seeds in common with
        its parent (after `recheck`, `confirm`, or a paired `measure_noise`).

        Returns
        -------
        dict
            ``sd`` (None until ``df`` reaches `PAIRED_SD_MIN_DF`), ``df`` (the pooled degrees
            of freedom: sum of m - 1 over those experiments), ``experiments`` (how many) and
            ``sd_any`` (the pooled value whatever ``df``; None without any).
        """
        recs = self.ledger.records(curves=False)
        scores = _all_seed_scores(recs)
        ss, df, n = 0.0, 0, 0
        for r in recs:
            if r["kind"] != "candidate" or r["id"] not in scores or r["parent_id"] not in scores:
                continue
            if not self._on_current_data(r):
                continue
            cand, par = scores[r["id"]], scores[r["parent_id"]]
            diffs = [par[s] - cand[s] for s in cand if s in par]
            if len(diffs) >= 2:
                ss += statistics.variance(diffs) * (len(diffs) - 1)
                df += len(diffs) - 1
                n += 1
        sd_any = math.sqrt(ss / df) if df else None
        return {"sd": sd_any if df >= PAIRED_SD_MIN_DF else None, "df": df, "experiments": n, "sd_any": sd_any}

    def _paired_verdict(self, out: dict, rec: dict, pairs: list[tuple[int, float, float]]) -> dict:
        """The rule on paired differences: gain = mean(parent - candidate) over the common
        seeds, band = 2 standard errors of that mean (stdev of the differences / sqrt(m)).

        Seed-to-seed variation that parent and candidate share (the data order, the init)
        cancels in the difference, so this band is narrower than the unpaired 2 sigma / sqrt(n).
        """
        diffs = [p - c for _, p, c in pairs]
        m = len(diffs)
        gain, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(m)
        band = 2 * se
        out.update(gain=gain, band=band, paired=True, pairs=m, paired_se=se, se=se,
                   val_bpb=statistics.fmean(c for _, _, c in pairs),
                   parent_val_bpb=statistics.fmean(p for _, p, _ in pairs))
        what = f"paired over {m} seeds: gain {gain:+.6f} +- {se:.6f}" + self._sigma_note(gain, ", ")
        if gain <= self.threshold:
            out["reason"] = f"does not beat parent {rec['parent_id']} by more than {self.threshold:g} ({what})"
        elif gain <= band:
            out.update(within_noise=True, reason=f"within noise ({what}; 2 SE = {band:.6f}): not kept; "
                                                 f"lab.confirm({rec['id']!r}, k) adds seeds")
        else:
            out.update(keep=True, reason=f"beats parent {rec['parent_id']} ({what}; 2 SE = {band:.6f})")
        return out

    def _sigma_note(self, gain: float, lead: str = " ") -> str:
        """ "(sigma 0.0022, gain 2.3 sigma)": the noise next to every verdict; "" before it is measured."""
        if not self.sigma:
            return " (noise not measured: lab.measure_noise())" if lead == " " else ""
        body = f"sigma {self.sigma:.6f}, gain {gain / self.sigma:+.1f} sigma"
        return f" ({body})" if lead == " " else f"{lead}{body}"

    def verdict(self, exp_id: str | None = None) -> dict:
        """The rule's verdict on a finished experiment.

        Returns
        -------
        dict
            ``keep`` (bool), ``within_noise`` (bool), ``gain`` (parent minus candidate
            val_bpb, means over reruns; None for a failed run), ``val_bpb``,
            ``parent_val_bpb``, ``sigma``, ``se`` (the standard error of ``gain``),
            ``band`` (2 ``se``: a gain within it is ``within_noise``), ``threshold``,
            ``paired``, ``pairs`` and a readable ``reason`` that names sigma.

            When every run of the candidate is at a seed its parent also ran with (one
            run right after a proposal: seed 42, which the baseline and every kept
            candidate have), the comparison is paired: ``paired`` True, ``pairs`` (m),
            ``gain`` the mean of parent minus candidate at those seeds (not the mean of
            the parent's noise runs), ``paired_se`` = ``se``. With fewer than
            `PAIRED_MIN` (3) pairs the SE is the lab's pooled paired-difference SD /
            sqrt(m) (``paired_sd``; see `paired_noise`) once one is measured, else
            sigma * sqrt(2 / m); from `PAIRED_MIN` pairs on (after `confirm`) it is the
            SD of this experiment's own differences / sqrt(m). A candidate with seeds its
            parent lacks is compared unpaired: the two means, SE sigma * sqrt(1/n + 1/n_parent).
            ``throughput_note`` ("" or e.g. "1.2k tok/s vs the parent's 2.4k (x0.5): ...") on a
            seconds budget when the candidate trained more than 1.5x faster or slower than its parent.
        """
        rec = self.ledger.get(exp_id or self.last_id)
        out = {"exp_id": rec["id"], "keep": False, "within_noise": False, "gain": None, "val_bpb": None,
               "parent_val_bpb": None, "sigma": self.sigma, "band": None, "threshold": self.threshold,
               "se": None, "paired": False, "pairs": 0,
               "throughput_note": ""}
        if rec["kind"] not in _PROPOSAL_KINDS:
            msg = f"Experiment {rec['id']} is a {rec['kind']} rerun of {rec['parent_id']}: only proposals are decided."
            raise ValueError(msg)
        if rec["status"] != "ok":
            out["reason"] = f"{rec['status']}: {rec['reason'] or 'no reason recorded'}"
            return out
        cand = self._scores(rec["id"])
        out["val_bpb"] = statistics.fmean(cand)
        if rec["parent_id"] is None:  # a baseline: nothing to beat
            out.update(keep=True, reason="baseline")
            return out
        ref = self._scores(rec["parent_id"])
        if not ref:
            out.update(keep=True, reason=f"parent {rec['parent_id']} has no score to beat")
            return out
        out["parent_val_bpb"] = statistics.fmean(ref)
        # a seconds-budget run much faster or slower than its parent: the machine's load may
        # have decided the score (the CLI, the panel and the API all read it here)
        out["throughput_note"] = throughput_note(rec, self.ledger.get(rec["parent_id"]), self.budget)
        gain = out["parent_val_bpb"] - out["val_bpb"]
        out["gain"] = gain
        pairs = self._pairs(rec["id"], rec["parent_id"])
        if len(pairs) >= PAIRED_MIN:   # candidate and parent at the same seeds: decide on the differences
            return self._paired_verdict(out, rec, pairs)
        cand_seeds = self._seed_scores(rec["id"])
        if pairs and len(pairs) == len(cand_seeds):   # every candidate run has a parent run at its seed
            return self._few_pairs_verdict(out, rec, pairs)
        runs = f" (mean of {len(cand)} runs)" if len(cand) > 1 else ""
        vs = f" vs {len(ref)}" if len(ref) > 1 else ""
        if gain <= self.threshold:
            out["reason"] = (f"val_bpb {out['val_bpb']:.6f}{runs} does not beat parent {rec['parent_id']} "
                             f"({out['parent_val_bpb']:.6f}) by more than {self.threshold:g}: "
                             + (f"worse by {-gain:.6f}" if gain < 0 else f"better by only {gain:.6f}")
                             + self._sigma_note(gain))
            return out
        if self.sigma:   # different seeds on the two sides: two independent means
            se = self.sigma * math.sqrt(1 / len(cand) + 1 / len(ref))
            band = 2 * se
            out.update(band=band, se=se)
            what = f"2 SE = {band:.6f}, SE = sigma*sqrt(1/{len(cand)} + 1/{len(ref)}), unpaired"
            if gain <= band:
                out.update(within_noise=True, reason=(
                    f"gain {gain:+.6f}{runs}{vs} is within noise ({what}{self._sigma_note(gain, ', ')}): "
                    f"not kept; lab.confirm({rec['id']!r}) reruns it to check"))
                return out
            out.update(keep=True, reason=(f"val_bpb {out['val_bpb']:.6f}{runs} beats parent {rec['parent_id']} "
                                          f"({out['parent_val_bpb']:.6f}{vs}) by {gain:.6f} ({what})"
                                          + self._sigma_note(gain)))
            return out
        out.update(keep=True, reason=(f"val_bpb {out['val_bpb']:.6f}{runs} beats parent {rec['parent_id']} "
                                      f"({out['parent_val_bpb']:.6f}) by {gain:.6f}" + self._sigma_note(gain)))
        return out

    def _few_pairs_verdict(self, out: dict, rec: dict, pairs: list[tuple[int, float, float]]) -> dict:
        """The rule for a candidate with fewer than `PAIRED_MIN` runs, each at a seed its parent
        also ran with (one seed right after a run: the parent's score at that seed, not the
        mean of its noise runs). gain = mean(parent - candidate) over those m seeds; its
        standard error is the lab's pooled paired-difference SD / sqrt(m) where one was
        measured (`paired_noise`), else sigma * sqrt(2 / m): the SE of a difference of two
        independent runs, the most a shared seed can leave (conservative)."""
        m = len(pairs)
        diffs = [p - c for _, p, c in pairs]
        gain = statistics.fmean(diffs)
        out.update(gain=gain, paired=True, pairs=m, val_bpb=statistics.fmean(c for _, _, c in pairs),
                   parent_val_bpb=statistics.fmean(p for _, p, _ in pairs))
        seeds = ", ".join(str(s) for s, _, _ in pairs)
        at = f"at the same seed{'s' if m > 1 else ''} {seeds}" + (f" (mean of {m} runs)" if m > 1 else "")
        pooled = self.paired_noise()
        if pooled["sd"] is not None:
            se = pooled["sd"] / math.sqrt(m)
            how = (f"SE {se:.6f}: paired SD {pooled['sd']:.6f} pooled from {pooled['experiments']} experiment"
                   f"{'s' if pooled['experiments'] != 1 else ''}, {pooled['df']} df")
            out.update(paired_sd=pooled["sd"])
        elif self.sigma:
            se = self.sigma * math.sqrt(2 / m)
            how = f"SE {se:.6f} = sigma*sqrt(2/{m}): no paired SD measured yet"
        else:
            se = None
            how = ""
        if se is not None:
            out.update(band=2 * se, se=se, paired_se=se)
        if gain <= self.threshold:
            out["reason"] = (f"val_bpb {out['val_bpb']:.6f} does not beat parent {rec['parent_id']} "
                             f"({out['parent_val_bpb']:.6f}) {at} by more than {self.threshold:g}: "
                             + (f"worse by {-gain:.6f}" if gain < 0 else f"better by only {gain:.6f}")
                             + self._sigma_note(gain))
        elif se is not None and gain <= 2 * se:
            out.update(within_noise=True, reason=(
                f"gain {gain:+.6f} {at} is within noise (2 SE = {2 * se:.6f}; {how}{self._sigma_note(gain, ', ')}): "
                f"not kept; lab.confirm({rec['id']!r}) reruns it to check"))
        else:
            band = f" ({how}; 2 SE = {2 * se:.6f})" if se is not None else ""
            out.update(keep=True, reason=(f"val_bpb {out['val_bpb']:.6f} beats parent {rec['parent_id']} "
                                          f"({out['parent_val_bpb']:.6f}) {at} by {gain:.6f}{band}"
                                          + self._sigma_note(gain)))
        return out

    def decide(self, exp_id: str | None = None, keep: bool | None = None, reason: str = "",
               decided_by: str = "human") -> dict:
        """Keep or discard a finished experiment; keeping makes it the new parent.

        Discarding the current parent (a candidate kept earlier, e.g. by the rule) moves
        the kept line back to that candidate's parent.

        Parameters
        ----------
        exp_id : str, optional
            Default: the last experiment run.
        keep : bool, optional
            None applies the rule (recorded as decided by ``rule``, or ``autopilot`` when
            ``decided_by="autopilot"``); True/False is a person's decision (``decided_by``).
        reason : str
            Why (default for the rule: its verdict's reason).

        Returns
        -------
        dict
            The updated ledger record.
        """
        v = self.verdict(exp_id)
        exp_id = v["exp_id"]
        if keep is None:
            keep, by, reason = v["keep"], ("autopilot" if decided_by == "autopilot" else "rule"), reason or v["reason"]
        else:
            by = decided_by
        tip = None
        if keep:
            tip = exp_id
        elif exp_id == self.parent_id:  # discarding the current parent (kept before): back to its parent
            tip = self.ledger.get(exp_id)["parent_id"]
        if tip is not None and tip != self.parent_id:
            self._refuse_over_hand_edit(f"{'keeping' if keep else 'discarding'} experiment {exp_id}")
        try:
            rec = self.ledger.decide(exp_id, "keep" if keep else "discard", reason, decided_by=by,
                                     within_noise=v["within_noise"], tip=tip)
        finally:  # also after a Ctrl-C: the workspace follows what the ledger recorded
            self._follow_tip()
        self._sync_train_file()   # a discarded hand edit: lab/train.py goes back to the kept version
        self._say(rec)
        return rec

    # ---- the loop -----------------------------------------------------------------------------

    def _answer(self, proposal: Proposal, answer: Any) -> tuple[str, Any]:
        """Read approve()'s answer: ("run", Proposal) or ("reject", reason)."""
        if answer is True:
            return "run", proposal
        if answer is False or answer is None:
            return "reject", ""
        if isinstance(answer, Proposal):
            if answer.source == proposal.source:
                return "run", answer
            return "run", self.submit(answer.source, answer.description or proposal.description, original=proposal)
        if isinstance(answer, str):
            if _looks_like_source(answer):
                return "run", self.submit(answer, f"{proposal.description} (edited)", original=proposal)
            return "reject", answer
        msg = (f"approve() returned {type(answer).__name__}: return True (run it), False or a reason string "
               f"(reject), or a Proposal / train.py source (run your edit instead).")
        raise TypeError(msg)

    def step(self, approve: Callable[[Proposal], Any] | None = None, on_event: Callable[[dict], Any] | None = None,
             *, feedback: str = "", stop: threading.Event | None = None, decide: bool = True,
             parallel: int = 1) -> "dict | list[dict]":
        """One experiment: propose -> approve -> run -> decide -> record.

        With ``parallel=N`` (N > 1) one batch instead: N different proposals from the
        current parent (each proposer sees the ones before it), each approved before
        anything runs, trained at the same time on N workers (see `Lab(cluster=)`),
        recorded as each finishes; then the best of them that beats the parent beyond
        noise (after the narrow-win recheck) is kept and the others are discarded (they
        stay in the tree). Returns the list of records then, in proposal order.

        Parameters
        ----------
        approve : callable, optional
            ``approve(proposal)`` returns True (run it), False or a reason string
            (reject: recorded, never run, the reason reaches the next context), or a
            Proposal / train.py source (run this human edit instead, proposer
            ``human``). None runs every proposal.
        on_event : callable, optional
            Step events of the run (live curves, progress bars).
        feedback : str
            Free text for the proposer, this step only.
        stop : threading.Event, optional
            Ends the run as ``aborted``.
        decide : bool
            Apply the rule after the run (default); False leaves the decision to
            ``lab.decide``.
        parallel : int
            Proposals in the batch (1, the default: the sequential step).

        Returns
        -------
        dict
            The ledger record of the experiment (or of the rejected proposal); a list of
            them with ``parallel`` > 1.
        """
        if int(parallel) != 1:
            return self._batch_step(int(parallel), approve, on_event, feedback=feedback, stop=stop, decide=decide)
        self._ensure_baseline(on_event, stop)
        proposal = self.propose(feedback)
        if approve is not None:
            what, value = self._answer(proposal, approve(proposal))
            if what == "reject":
                return self.reject(proposal, value)
            proposal = value
        result = self.run_budgeted(proposal, on_event=on_event, stop=stop)
        exp_id = result.extra["exp_id"]
        if not decide:
            rec = self.ledger.get(exp_id)
            self._say(rec)
            return rec
        self.recheck(exp_id, on_event=on_event, stop=stop)
        return self.decide(exp_id, keep=None, decided_by="autopilot" if self._autopilot else "rule")

    def propose_batch(self, n: int, feedback: str = "") -> list[Proposal]:
        """`n` different proposals from the current parent, each made knowing the ones before it.

        Raises ProposalError only when not even one could be made (fewer than n is fine:
        a proposer that ran out of ideas).
        """
        out: list[Proposal] = []
        for i in range(int(n)):
            try:
                out.append(self.propose(feedback if i == 0 else "", siblings=out))
            except ProposalError:
                if not out:
                    raise
                break
        return out

    def _batch_step(self, n: int, approve, on_event, *, feedback: str, stop, decide: bool) -> list[dict]:
        if n < 1:
            msg = f"parallel must be 1 or more, got {n}."
            raise ValueError(msg)
        self._ensure_baseline(on_event, stop)
        records: list[dict] = []
        to_run: list[Proposal] = []
        for proposal in self.propose_batch(n, feedback):
            if approve is not None:   # every proposal of the batch is reviewed before anything runs
                what, value = self._answer(proposal, approve(proposal))
                if what == "reject":
                    records.append(self.reject(proposal, value))
                    continue
                proposal = value
            to_run.append(proposal)
        return records + self.run_batch(to_run, on_event=on_event, stop=stop, decide=decide)

    def run_batch(self, proposals: list[Proposal], on_event: Callable[[dict], Any] | None = None,
                  stop: threading.Event | None = None, decide: bool = True) -> list[dict]:
        """Run approved proposals at the same time (see `step(parallel=)`); their records, in order.

        For a view that shows a batch (`propose_batch`) and asks before running it: the
        proposals run on the lab's cluster (N local workers by default), each event carries
        its ``exp_id``, `stop_run(exp_id)` stops one, and with `decide` the batch's best that
        beats the parent beyond noise is kept (`decide_batch`).
        """
        if not proposals:
            return []
        self._ensure_baseline(on_event, stop)
        ids = self._run_batch(list(proposals), on_event, stop)
        if decide:
            self.decide_batch(ids, on_event=on_event, stop=stop)
        return [self.ledger.get(i) for i in ids]

    def decide_batch(self, ids: list[str], on_event: Callable[[dict], Any] | None = None,
                     stop: threading.Event | None = None) -> list[dict]:
        """Decide a batch by the rule: keep its best candidate that beats the parent beyond noise.

        The candidates the rule would keep are tried best first (lowest val_bpb); a
        narrow win is rerun once (`recheck`) and the first that still wins is kept. Until
        the lab knows its paired SD, a candidate that beats the parent inside the band is
        rerun too (`recheck_until_paired`), as in the sequential `step`. The
        others are discarded (a candidate that won alone but lost to a sibling says so in
        its reason). Decided by ``autopilot`` during autopilot, else ``rule``.
        """
        by = "autopilot" if self._autopilot else "rule"
        todo = [i for i in ids if self.ledger.get(i)["decision"] is None]
        winner, tried = None, set()
        # Best first, judged afresh each round: a recheck adds runs and may give the lab its
        # paired SD, which narrows every sibling's band. Candidates: the rule's keeps, and
        # (while the lab learns its paired SD, as in `step`) gains inside the band, which
        # `recheck` reruns. Each is rechecked at most once; a rechecked keep is the winner.
        while winner is None:
            learning = self.recheck_until_paired and self.paired_noise()["sd"] is None
            ranked = sorted((v for v in map(self.verdict, todo)
                             if v["keep"] or (learning and v["gain"] is not None and v["gain"] > self.threshold)),
                            key=lambda v: v["val_bpb"])
            nxt = None
            for v in ranked:
                if v["exp_id"] not in tried:
                    nxt = v
                    break
                if v["keep"]:
                    winner = v
                    break
            if winner is not None or nxt is None:
                break
            tried.add(nxt["exp_id"])
            if not (stop is not None and stop.is_set()):
                self.recheck(nxt["exp_id"], on_event=on_event, stop=stop)
        out = []
        for i in todo:
            if winner is not None and i == winner["exp_id"]:
                continue
            v = self.verdict(i)
            if v["keep"]:   # a batch keeps at most one: its best
                beaten = (f"but {winner['exp_id']} of the same batch scored {winner['val_bpb']:.6f}"
                          if winner is not None else "but it did not hold up against its batch")
                reason = f"{v['reason']}; {beaten}: a batch keeps only its best"
                out.append(self.decide(i, keep=False, reason=reason, decided_by=by))
            else:   # the rule's own verdict (also for a win that did not survive its recheck)
                out.append(self.decide(i, keep=None, decided_by=by))
        if winner is not None:
            out.append(self.decide(winner["exp_id"], keep=None, decided_by=by))
        return out

    def autopilot(self, steps: int = 10, on_event: Callable[[dict], Any] | None = None, *,
                  confirm: int = 0, max_failures: int = 3, parallel: int = 1) -> list[dict]:
        """Run `steps` experiments unattended, each decided by the rule (``autopilot``).

        Parameters
        ----------
        steps : int
            Number of experiments (proposals that fail to materialise do not count).
        confirm : int
            Reruns of a within-noise candidate before the final decision (0: none).
        max_failures : int
            Stop after this many proposer failures in a row (re-raising the last).
        parallel : int
            Experiments per batch (see `step(parallel=)`); `steps` counts experiments.

        Returns
        -------
        list of dict
            The ledger records of the experiments, in order.

        Raises
        ------
        KeyboardInterrupt
            Ctrl-C stops the loop after the interrupted run is recorded as aborted.
        RuntimeError
            When the baseline did not run ok (it is recorded; the message says what to fix).
        """
        out: list[dict] = []
        failures = 0
        self._autopilot = True
        try:
            self._ensure_baseline(on_event)  # a failed baseline stops the loop here, after one try
            while len(out) < steps:
                try:
                    n = min(int(parallel), steps - len(out))
                    if n > 1:
                        batch = self.step(on_event=on_event, parallel=n)
                        failures = 0
                        out.extend(batch)
                        continue
                    rec = self.step(on_event=on_event)
                except ProposalError as e:
                    failures += 1
                    if self.verbose:
                        print(f"proposer gave up ({failures}/{max_failures}): {e.reason}")
                    if failures >= max_failures:
                        raise
                    continue
                failures = 0
                if confirm and rec["within_noise"]:
                    rec = self.confirm(rec["id"], k=confirm, on_event=on_event)
                out.append(rec)
        finally:
            self._autopilot = False
        return out

    # ---- noise --------------------------------------------------------------------------------

    def _rerun(self, exp_id: str, k: int, kind: str, on_event=None, stop=None,
               seeds: list[int] | None = None) -> list[float]:
        rec = self.ledger.get(exp_id)
        if rec["status"] != "ok":
            msg = f"Experiment {exp_id} did not run ok ({rec['status']}): rerun an experiment with a val_bpb."
            raise ValueError(msg)
        if k < 1:
            msg = f"k must be at least 1 (the number of reruns), got {k}."
            raise ValueError(msg)
        if not self._on_current_data(rec):
            msg = (f"Experiment {exp_id} was scored on other data ({rec['proposal_meta'].get('data')}): a rerun on "
                   f"this lab's data could not be compared with it. Rerun an experiment made since the re-baseline.")
            raise ValueError(msg)
        source = self.workspace.source(exp_id)
        used = {r["seed"] for r in self.ledger.records(curves=False)
                if r["id"] == exp_id or (r["parent_id"] == exp_id and r["kind"] in ("noise", "rerun"))}
        if seeds is None:
            seeds, s = [], self.seed
            while len(seeds) < k:  # the next seeds this experiment has not run with
                s += 1
                if s not in used:
                    seeds.append(s)
        for seed in [s for s in seeds if s not in used]:
            if stop is not None and stop.is_set():
                break
            self._note(f"{kind}: rerun of {exp_id} with seed {seed} starting...")
            self._run(source, parent_id=exp_id, kind=kind, description=f"{kind}: rerun of {exp_id} (seed {seed})",
                      proposer="rerun", seed=seed, on_event=on_event, stop=stop)
            self._note(format_record(self.ledger.get(self._last_id)))
        return self._scores(exp_id)

    def measure_noise(self, k: int = 3, on_event: Callable[[dict], Any] | None = None,
                      stop: threading.Event | None = None, *, paired: bool = True) -> dict:
        """Rerun the current parent with k other seeds and set `sigma` (run-to-run std,
        pooled over every experiment of the lab that has 2 or more seeds).

        Paired (the default): when the current parent is a kept candidate, its own parent
        is run at the same seeds where it lacks them, so the last keep is checked on k + 1
        pairs and the lab measures its paired-difference SD (`paired_noise`), which the
        one-seed verdicts then use. This costs up to 2k runs (k right after the baseline,
        which has no parent).

        Parameters
        ----------
        k : int
            New seeds for the parent.
        paired : bool
            Also run the parent's parent at those seeds (default True).

        Returns
        -------
        dict
            ``exp_id``, ``values`` (the parent's val_bpb and the reruns'), ``mean``,
            ``sigma`` (the lab's pooled run-to-run standard deviation, see below), ``pairs`` (seeds the parent shares with
            its own parent; 0 for a baseline) and ``paired_sd`` (the lab's pooled paired
            SD after this, None until measured).
        """
        self._ensure_baseline()
        parent = self.parent_id
        values = self._rerun(parent, k, "noise", on_event, stop)
        grand = self.ledger.get(parent)["parent_id"]
        if paired and grand is not None and self.ledger.get(grand)["status"] == "ok":
            missing = sorted(set(self._seed_scores(parent)) - set(self._seed_scores(grand)))
            if missing:
                self._rerun(grand, len(missing), "noise", on_event, stop, seeds=missing)
        self.sigma = self._sigma_from_ledger()
        pairs = len(self._pairs(parent, grand)) if grand is not None else 0
        speeds = self._throughputs(parent)
        return {"exp_id": parent, "values": values, "mean": statistics.fmean(values), "sigma": self.sigma,
                "pairs": pairs, "paired_sd": self.paired_noise()["sd"], "tok_per_s": speeds,
                "load_note": load_note(speeds, self.budget)}

    def _throughputs(self, exp_id: str) -> list[float]:
        """Training tokens/s of an experiment's ok runs (it and its reruns of the same source)."""
        rec = self.ledger.get(exp_id)
        runs = [rec] + [r for r in self.ledger.records(curves=False)
                        if r["kind"] in ("noise", "rerun") and r["parent_id"] == exp_id
                        and r["source_hash"] == rec["source_hash"]]
        return [v for v in (_tok_per_s(r) for r in runs) if v]

    def load_note(self, exp_id: str | None = None) -> str:
        """A warning when an experiment's reruns (default: the parent's) trained at very
        different speeds on a seconds budget, i.e. the machine's load is part of sigma; "" if not."""
        exp_id = exp_id or self.parent_id
        return load_note(self._throughputs(exp_id), self.budget) if exp_id else ""

    def recheck(self, exp_id: str | None = None, on_event: Callable[[dict], Any] | None = None,
                stop: threading.Event | None = None) -> bool:
        """Rerun a narrow win once before the rule keeps it; returns whether it reran.

        A one-run candidate that the rule would keep by less than `recheck_below`
        standard errors of its gain (default 3; 0 turns it off; the verdict's ``se``:
        the pooled paired SD, else sigma * sqrt(2)) is rerun with the next seed, and its
        parent at that seed if it lacks it (as `confirm(exp_id, 1)`, without deciding):
        a 2-3 SE win of one run is what luck most often looks like. Each recheck also adds
        a pair to the lab's paired-difference SD (`paired_noise`). `step` calls it before
        deciding.

        Until that paired SD is measured (`recheck_until_paired`, default True), a one-run
        candidate that beats its parent but not beyond the band is rerun the same way: the
        band then assumes no credit for the shared seed (sigma * sqrt(2) a run), and the
        paired SD measured on the CPU labs was 3 to 10 times smaller, so small real gains
        would be discarded. Two such reruns give the lab its paired SD.
        """
        v = self.verdict(exp_id)
        exp_id = v["exp_id"]
        one_run = (v["se"] and v["gain"] is not None and len(self._scores(exp_id)) == 1
                   and not (stop is not None and stop.is_set()))
        narrow = bool(one_run and v["keep"] and self.recheck_below and v["gain"] < self.recheck_below * v["se"])
        # Until the lab has its paired SD the band is sigma * 2 * sqrt(2), which on the measured
        # labs was 3-10 times the real SE of a one-seed difference (docs/NOISE.md): a candidate
        # that beats its parent inside that band is rerun too, so the lab learns its paired SD
        # (two such reruns give it) instead of discarding small real gains for good.
        learning = bool(one_run and not v["keep"] and v["gain"] > self.threshold and self.recheck_until_paired
                        and self.paired_noise()["sd"] is None)
        if not (narrow or learning):
            return False
        why = (f"wins by {v['gain'] / v['se']:.1f} SE (< {self.recheck_below:g})" if narrow else
               f"beats its parent by {v['gain'] / v['se']:.1f} SE before the lab knows its paired noise")
        self._note(f"{exp_id}: {why}: one more seed first (and its parent at that seed)")
        self._rerun(exp_id, 1, "rerun", on_event, stop)
        parent = self.ledger.get(exp_id)["parent_id"]
        missing = sorted(set(self._seed_scores(exp_id)) - set(self._seed_scores(parent)))
        if missing:
            self._rerun(parent, len(missing), "noise", on_event, stop, seeds=missing)
        self.sigma = self._sigma_from_ledger() or self.sigma   # the reruns add to the pooled sigma
        return True

    def confirm(self, exp_id: str | None = None, k: int = 1, on_event: Callable[[dict], Any] | None = None) -> dict:
        """Rerun a candidate k times with other seeds, and its parent at the same seeds
        where it has not run with them; re-apply the rule.

        With 3 or more common seeds the rule decides on the paired differences (parent
        minus candidate at the same seed) and their standard error, which shared
        seed-to-seed variation does not inflate. A decision made by a person is left
        alone (the new verdict is in the return value's ``verdict``); one made by the
        rule or autopilot is made again, if the experiment's parent is still the current
        parent.
        """
        exp_id = self.ledger.get(exp_id or self.last_id)["id"]
        self._rerun(exp_id, k, "rerun", on_event)
        parent = self.ledger.get(exp_id)["parent_id"]
        if parent is not None:
            missing = sorted(set(self._seed_scores(exp_id)) - set(self._seed_scores(parent)))
            if missing:   # pair every candidate seed with a parent run at the same seed
                self._rerun(parent, len(missing), "noise", on_event, seeds=missing)
        self.sigma = self._sigma_from_ledger() or self.sigma      # the reruns add to the pooled sigma
        rec = self.ledger.get(exp_id)
        if rec["decided_by"] != "human" and rec["parent_id"] == self.parent_id:
            by = rec["decided_by"] or ("autopilot" if self._autopilot else "rule")
            rec = self.decide(exp_id, keep=None, decided_by=by)
        return {**rec, "verdict": self.verdict(exp_id)}

    # ---- looking back -------------------------------------------------------------------------

    def history(self) -> "pd.DataFrame":
        """Every experiment as a DataFrame (the ledger's columns), oldest first."""
        return self.ledger.history()

    def best(self) -> dict | None:
        """The kept experiment (or baseline) with the lowest val_bpb, on the lab's current data."""
        best = self.ledger.best()
        if best is None or self._on_current_data(best):
            return best
        # a re-baselined lab: the ledger's best may be a score made on the old data
        ok = [r for r in self.ledger.records(curves=False) if r["status"] == "ok" and r["val_bpb"] is not None
              and (r["decision"] == "keep" or (r["kind"] == "baseline" and r["decision"] is None))
              and self._on_current_data(r)]
        return min(ok, key=lambda r: (r["val_bpb"], int(r["id"]))) if ok else None

    def checkout(self, exp_id: str) -> dict:
        """Continue from any past experiment that ran ok: it becomes the parent.

        The kept line it leaves stays in the workspace (``lines/<tip id>``); the next
        kept experiment grows a new branch of the tree from here.
        """
        rec = self.ledger.get(exp_id)
        if rec["status"] != "ok" or rec["kind"] not in _PROPOSAL_KINDS:
            msg = (f"Experiment {rec['id']} cannot be continued from: it is a {rec['kind']} with status "
                   f"{rec['status']!r}. Check out an experiment that ran ok (see lab.history()).")
            raise ValueError(msg)
        if rec["id"] != self.parent_id:
            self._refuse_over_hand_edit(f"checking out {rec['id']}")
        if not self._on_current_data(rec):
            msg = (f"Experiment {rec['id']} was scored on other data ({rec['proposal_meta'].get('data')}), before this "
                   f"lab was re-baselined: continue from an experiment made since.")
            raise ValueError(msg)
        self.ledger.set_tip(rec["id"])
        self._follow_tip()
        if self.verbose:
            print(f"lab {self.path.name}: continuing from {rec['id']} ({rec['description']})")
        return rec

    def panel(self, **kwargs):
        """The ipywidgets panel for this lab (JupyterLab)."""
        from autoresearch_kit.ui import panel as _panel

        self._start_ahead()
        return _panel.Panel(self, **kwargs)

    def batch_panel(self, n: int = 2, **kwargs):
        """The batch panel (ipywidgets): review `n` proposals, run them at once, watch every curve."""
        from autoresearch_kit.ui.batch import BatchPanel

        return BatchPanel(self, n, **kwargs)

    def _start_ahead(self) -> None:
        """Start the runner's fork server in the background, once (runner.prestart).

        Called where a run is coming but something slow comes first (a proposal, a person
        reading the panel): on a CUDA machine the server's imports (~11 s) happen then,
        instead of inside the next experiment. Nothing where the fork server is off.
        """
        if not self._started_ahead:
            self._started_ahead = True
            self._prestart = runner.prestart(self.device, sandbox=self.sandbox)

    # ---- housekeeping -------------------------------------------------------------------------

    def _say(self, rec: dict) -> None:
        if self.verbose:
            print(format_record(rec))

    def _note(self, text: str) -> None:
        """What the lab does on its own (noise reruns, rechecks): to `on_note` if set, else
        printed when verbose. The CLI sets on_note, so no run it pays for goes unseen."""
        if self.on_note is not None:
            self.on_note(text)
        elif self.verbose:
            print(text, flush=True)

    def close(self) -> None:
        """Release the lab (its lock) and the local cluster it started, if any. Safe to call twice."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.ledger.close()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.ledger.closed:
            return f"Lab({str(self.path)!r}, closed)"
        best = self.best()
        tail = f", best {best['val_bpb']:.6f} ({best['id']})" if best else ""
        return f"Lab({str(self.path)!r}: {len(self.ledger)} experiments, parent {self.parent_id}{tail})"

    def _repr_html_(self) -> str:
        if self.ledger.closed:
            return f"<b>Lab</b> {html.escape(str(self.path))} (closed)"
        try:
            from autoresearch_kit.ui.render import lab_html

            return lab_html(self)  # history table + progress plot
        except ImportError:  # matplotlib missing: the plain table below still says it all
            pass
        recs = self.ledger.records(curves=False)
        best = self.best()
        rows = []
        for r in recs[-15:]:
            bpb = f"{r['val_bpb']:.6f}" if r["val_bpb"] is not None else ""
            style = ("background:#e6ffec" if r["decision"] == "keep" else "color:#888" if r["decision"] == "discard"
                     else "background:#ffebe9" if r["status"] in CRASH_LIKE else "")
            noise = " (within noise)" if r["within_noise"] else ""
            cells = (r["id"], r["parent_id"] or "", r["kind"], r["status"], bpb,
                     (r["decision"] or "") + noise, r["decided_by"] or "", r["proposer"], r["description"])
            rows.append(f"<tr style='{style}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("id", "parent", "kind", "status", "val_bpb", "decision", "by",
                                                     "proposer", "description"))
        more = f"<div>({len(recs) - 15} earlier experiments: lab.history())</div>" if len(recs) > 15 else ""
        best_txt = (f"best <b>{best['val_bpb']:.6f}</b> ({html.escape(best['id'])}: "
                    f"{html.escape(best['description'])})" if best else "no result yet")
        return (f"<div><b>Lab</b> <code>{html.escape(str(self.path))}</code>: {len(recs)} experiments, "
                f"parent {html.escape(str(self.parent_id))}, budget {html.escape(str(self._budget or self._budget_arg or 'default'))}, "
                f"{best_txt}{more}<table style='font-size:12px'><tr>{head}</tr>{''.join(rows)}</table></div>")


def compute_note(rec: dict) -> str:
    """"12.3 s, 4.1e+12 FLOPs": the compute a run used, shown beside scores that a token or
    FLOP budget made (there a gain can be bought with a bigger, slower model); "" otherwise."""
    try:
        kind = config.Budget.parse(rec.get("budget") or "").kind
    except (ValueError, TypeError):
        return ""
    if kind == "seconds" or rec.get("val_bpb") is None:
        return ""
    secs, flops = rec.get("training_seconds"), rec.get("flops")
    parts = [f"{secs:.1f} s" if secs else "", f"{flops:.2g} FLOPs" if flops else ""]
    return ", ".join(p for p in parts if p)


def _tok_per_s(rec: dict | None) -> float | None:
    if not rec or rec.get("status") != "ok" or not rec.get("tokens") or not rec.get("training_seconds"):
        return None
    return rec["tokens"] / rec["training_seconds"]


LOAD_SPREAD = 1.15   # tok/s max / min over reruns of one train.py beyond which load shows in sigma


def load_note(speeds: list[float], budget) -> str:
    """A note when reruns of one train.py on a seconds budget trained at very different
    speeds (max / min > LOAD_SPREAD): the tokens a run fits then depend on the machine's
    load, and sigma measures the load as much as the seeds ("" otherwise)."""
    if budget is None or getattr(budget, "kind", None) != "seconds" or len(speeds) < 2:
        return ""
    lo, hi = min(speeds), max(speeds)
    if hi / lo <= LOAD_SPREAD:
        return ""
    return (f"the same train.py trained at {lo / 1000:.1f}k to {hi / 1000:.1f}k tok/s over these runs (x{hi / lo:.1f}): "
            f"on a seconds budget the machine's load is part of sigma; calibrate=True (--calibrate) or a "
            f"token budget (--budget N-tokens) leaves it out")


def throughput_note(rec: dict, parent: dict | None, budget) -> str:
    """A note when a seconds-budget run trained much faster or slower than its parent ("" if not).

    On a wall-clock budget a busy machine (other jobs, thermal throttling) changes how
    many tokens fit and so val_bpb, whatever the edit did: seen on a shared 2-core VM,
    where the same train.py ran at 1.2k and 4.2k tok/s minutes apart.
    """
    if budget is None or getattr(budget, "kind", None) != "seconds" or parent is None:
        return ""
    this, ref = _tok_per_s(rec), _tok_per_s(parent)
    if not this or not ref or 1 / 1.5 < this / ref < 1.5:
        return ""
    return (f"{this / 1000:.1f}k tok/s vs the parent's {ref / 1000:.1f}k (x{this / ref:.1f}): on a seconds budget "
            f"the machine's load counts as much as the edit; --budget N-tokens leaves load out")


def format_record(rec: dict) -> str:
    """One line for a ledger record: id, status, val_bpb, decision (by whom), description."""
    bpb = f"val_bpb {rec['val_bpb']:.6f}" if rec.get("val_bpb") is not None else f"{rec['status']}"
    compute = compute_note(rec)
    if compute:
        bpb += f" ({compute})"
    if rec["status"] not in ("ok", "rejected") and rec.get("reason"):
        bpb += f" ({rec['reason'][:80]})"
    decision = rec.get("decision") or ("rejected" if rec["status"] == "rejected" else
                                       "running" if rec["status"] == "running" else
                                       "-" if rec.get("kind") in ("noise", "rerun") else   # nothing to decide
                                       "undecided")
    if rec.get("within_noise"):
        decision += " (within noise)"
    by_rule = rec.get("decided_by") in ("rule", "autopilot")
    noise = _SIGMA_NOTE.search(rec.get("decision_reason") or "") if by_rule else None
    if noise:   # the rule's reason names sigma: show it beside the decision
        decision += f" ({noise.group(1)})"
    extra = rec.get("extra") or {}
    iso = str(extra.get("isolation") or "")
    if iso.startswith("none"):  # a score made without the sandbox says so wherever it is listed
        decision += " (unsandboxed)"
    if (extra.get("epochs") or 0) > 3:
        decision += f" ({extra['epochs']:.0f} epochs of the training data)"
    by = f" [{rec['decided_by']}]" if rec.get("decided_by") else ""
    why = f": {rec['decision_reason']}" if rec["status"] == "rejected" and rec.get("decision_reason") else ""
    scored = scored_set(rec)
    scored = f" [{scored}]" if scored and rec.get("val_bpb") is not None else ""
    return f"{rec['id']}  {rec['kind']:<9} {bpb:<22}{scored} {decision}{by}  {rec['description']}{why}"


def scored_set(rec: dict) -> str:
    """What a record's score was computed on, in words: "val 120,544 tok, ctx 256" ("" if unknown).

    From ``extra["eval"]`` (the runner's): the scored targets (all of the val split, or the
    first N), and the evaluation context. Two scores compare only when these agree.
    """
    ev = (rec.get("extra") or {}).get("eval") or {}
    if not ev.get("seq_len") or ev.get("tokens") is None:
        return ""
    span = "all" if ev.get("scored", "all") == "all" else "first"
    return f"val {span} {int(ev['tokens']):,} tok, ctx {int(ev['seq_len'])}"


def recover_ledger(path: str | os.PathLike) -> dict:
    """Rebuild a lab's lost or damaged ledger.sqlite from results.tsv and the lab's git refs.

    Every experiment committed under ``refs/experiments/<id>`` gets its record back:
    parent, description, train.py hash and diff from git; status, val_bpb, memory and
    the decision from its results.tsv row (matched by commit). An experiment without a
    row (rejected, undecided or interrupted: results.tsv cannot tell) comes back as
    ``rejected``; rows without a commit come back after them. The kept line's tip is
    the workspace's. A damaged ledger.sqlite is moved aside (``ledger.sqlite.damaged-*``),
    results.tsv is copied to ``results.tsv.before-recover`` first. Each run's budget and
    the data it was scored on come from its commit's ``Budget:`` / ``Data:`` trailers (older
    commits: the budget its run.log names), so the lab keeps its budget and its data pin.
    What neither holds (curves, log tails, hardware, reasons) is not recovered.

    Returns
    -------
    dict
        ``experiments`` (records restored), ``from_git``, ``tsv_only``, ``moved_aside``
        (path of the damaged file, or None) and ``tip``.
    """
    import csv
    import shutil

    path = Path(path).expanduser().resolve()
    ws = Workspace(path)
    tsv = path / TSV_NAME
    rows = []
    if tsv.is_file():
        with open(tsv, encoding="utf-8", errors="replace", newline="") as f:
            rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("status")]
    commits = ws.commits() if ws.initialized else {}
    if not rows and not commits:
        msg = f"{path} has neither results.tsv rows nor git experiments: there is nothing to recover a ledger from."
        raise FileNotFoundError(msg)
    if tsv.is_file():
        shutil.copyfile(tsv, path / f"{TSV_NAME}.before-recover")
    led = Ledger(path, _rebuild=True)   # takes the lock, moves a damaged file aside
    try:
        unused = list(range(len(rows)))
        restored, ids = 0, sorted(commits, key=lambda s: (len(s), s))
        for exp_id in ids:
            sha = commits[exp_id]
            body = ws._git("log", "-1", "--format=%B", sha)
            subject = body.strip().splitlines()[0] if body.strip() else ""
            trailer = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in body.splitlines()[1:])
                       if k.strip() in ("Parent", "Budget", "Data")}
            parent = trailer.get("Parent")
            source = ws.source(exp_id)
            kind = ("noise" if subject.startswith("noise:") else "rerun" if subject.startswith("rerun:")
                    else "baseline" if parent is None and subject == "baseline" else "candidate")
            values = {"parent_id": parent if parent in commits else None, "kind": kind, "description": subject,
                      "source_hash": source_hash(source), "commit": sha, "proposer": "",
                      "diff": ws.diff(parent, exp_id) if parent in commits else "",
                      "decision_reason": "recovered from results.tsv and git"}
            log = path / RUNS / exp_id / "run.log"
            if log.is_file():
                values["log_path"] = str(log)
            budget = trailer.get("Budget") or _budget_from_log(log)
            if budget:
                values["budget"] = budget   # else the lab would fall back to the default budget
            if trailer.get("Data"):
                values["proposal_meta"] = {"manifest_hash": trailer["Data"]}   # the lab's data pin holds
            row = next((i for i in unused if rows[i].get("commit") and sha.startswith(rows[i]["commit"])), None)
            if row is not None:
                unused.remove(row)
                values.update(_from_tsv_row(rows[row]))
            else:
                values.update(status="rejected", reason="recovered from git: no results.tsv row (rejected, "
                                                        "undecided or interrupted)")
            led.restore(exp_id, values)
            restored += 1
        last = max((int(i) for i in ids if i.isdigit()), default=0)
        for n, i in enumerate(unused, start=last + 1):   # rows of runs that were never committed
            led.restore(f"{n:04d}", {"kind": "candidate", "description": rows[i].get("description") or "",
                                     "commit": rows[i].get("commit") or None, **_from_tsv_row(rows[i])})
        head = ws.head_id() if ws.initialized else None
        if head is not None and head in commits:
            led.set_tip(head)
        led.end_rebuild()
        return {"experiments": restored + len(unused), "from_git": restored, "tsv_only": len(unused),
                "moved_aside": led.moved_aside, "tip": led.tip()}
    finally:
        led.close()


def _budget_from_log(log: Path) -> str | None:
    """The budget a run's log names ("run: budget 2k-tokens | seed ..."), for commits made before
    the Budget trailer; None when there is no such line or it does not parse."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            for _, line in zip(range(200), f):
                m = re.match(r"run: budget (\S+) \|", line)
                if m:
                    return str(config.Budget.parse(m.group(1)))
    except (OSError, ValueError):
        return None
    return None


def _from_tsv_row(row: dict) -> dict:
    """Ledger columns from one results.tsv row (status, decision, val_bpb, memory)."""
    status = (row.get("status") or "").strip()

    def num(key):
        try:
            return float(row.get(key) or "")
        except ValueError:
            return None

    if status in ("keep", "discard", "undecided"):
        return {"status": "ok", "decision": None if status == "undecided" else status,
                "val_bpb": num("val_bpb"), "peak_memory_gb": num("memory_gb"),
                "finished_at": None}
    known = status if status in CRASH_LIKE else "crash"
    return {"status": known, "reason": f"recovered from results.tsv ({status})"}
