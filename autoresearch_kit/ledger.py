"""The ledger: one record per experiment, in SQLite, mirrored to autoresearch's results.tsv.

A lab directory holds `ledger.sqlite` (the full record: diff, decision, run fields,
curve, budget, hardware, timestamps) and `results.tsv` (the original autoresearch
columns, so its analysis notebook and scripts read our labs unchanged).

    from autoresearch_kit.ledger import Ledger
    with Ledger("my_lab") as led:                       # takes the lab lock
        eid = led.start(None, src_hash, "", "baseline", "human", "60s", {"device": "cpu"},
                        kind="baseline")
        led.finish(eid, run_result, commit=sha)
        led.decide(eid, "keep", "baseline", decided_by="rule")
        led.history()                                   # pandas DataFrame
    Ledger("my_lab", readonly=True).history()           # from a second notebook, no lock

Durability: every write is one SQLite transaction (WAL journal), so a process killed
mid-write leaves either the old or the new record, never half of one. `results.tsv` is
rewritten from the database after every change (temp file + fsync + os.replace) and
again each time a writable Ledger opens, so a kill between the two writes is repaired
on the next open. Rows left "running" by a dead process become "aborted" via recover().

results.tsv rows (the original's vocabulary is exactly keep / discard / crash, and its
analysis notebook treats the first non-crash row as the baseline):

    status ok + decision keep          -> keep
    status ok + decision discard       -> discard
    status ok, undecided, kind baseline -> keep     (the baseline is the first kept point)
    status ok, undecided, candidate    -> undecided (`autoresearch decide`, or the next run, asks)
    status ok, noise / rerun records   -> no row    (they repeat an experiment)
    crash                              -> crash     (val_bpb 0.000000, memory 0.0, as the original)
    timeout/diverged/invalid/aborted   -> the ledger's status, val_bpb left empty (no score: an
                                          analysis that drops `crash` rows must not read 0.0)
    running, rejected (never ran)      -> no row    (both are in the database)

The ledger also records the tip of the lab's kept line (`tip()`, the current parent),
in the same transaction as the keep that moves it; the Lab moves its git workspace
after, and repairs it from here if a process died in between.

Only one writer per lab: `Ledger(lab)` holds an flock on `<lab>/.lock` until close()
(or until the process dies, so resuming after kill -9 just works).

Run the tests with `python -m pytest tests/test_ledger.py -q`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pandas is imported where used: harness-side processes never pay for it
    import pandas as pd

    from autoresearch_kit.runner import RunResult

DB_NAME = "ledger.sqlite"
TSV_NAME = "results.tsv"
LOCK_NAME = ".lock"
TSV_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
SCHEMA_VERSION = 1

KINDS = ("baseline", "candidate", "noise", "rerun", "calibration")
STATUSES = ("running", "ok", "crash", "timeout", "diverged", "invalid", "aborted", "rejected")
RUN_STATUSES = ("ok", "crash", "timeout", "diverged", "invalid", "aborted")  # what finish() accepts
CRASH_LIKE = ("crash", "timeout", "diverged", "invalid", "aborted")
DECISIONS = ("keep", "discard")
DECIDERS = ("human", "rule", "autopilot")
INTERRUPTED = "interrupted: the process ended during the run"

# (column, SQL type). Order = the order of records() keys and history() columns.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("parent_id", "TEXT"),
    ("kind", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL"),
    ("decision", "TEXT"),
    ("decision_reason", "TEXT NOT NULL DEFAULT ''"),
    ("decided_by", "TEXT"),
    ("within_noise", "INTEGER NOT NULL DEFAULT 0"),
    ("description", "TEXT NOT NULL DEFAULT ''"),
    ("proposer", "TEXT NOT NULL DEFAULT ''"),
    ("source_hash", "TEXT NOT NULL DEFAULT ''"),
    ("diff", "TEXT NOT NULL DEFAULT ''"),
    ("proposal_meta", "TEXT NOT NULL DEFAULT '{}'"),
    ("budget", "TEXT NOT NULL DEFAULT ''"),
    ("hardware", "TEXT NOT NULL DEFAULT '{}'"),
    ("commit", "TEXT"),
    # RunResult fields (runner.py); `curve` and `extra` are JSON text
    ("val_bpb", "REAL"),
    ("steps", "INTEGER"),
    ("tokens", "INTEGER"),
    ("flops", "REAL"),
    ("peak_memory_gb", "REAL"),
    ("mfu", "REAL"),
    ("params", "INTEGER"),
    ("training_seconds", "REAL"),
    ("total_seconds", "REAL"),
    ("wall_seconds", "REAL"),
    ("eval_seconds", "REAL"),
    ("eval_tokens", "INTEGER"),
    ("reason", "TEXT NOT NULL DEFAULT ''"),
    ("log_tail", "TEXT NOT NULL DEFAULT ''"),
    ("log_path", "TEXT NOT NULL DEFAULT ''"),
    ("seed", "INTEGER"),
    ("device", "TEXT NOT NULL DEFAULT ''"),
    ("torch_version", "TEXT NOT NULL DEFAULT ''"),
    ("curve", "TEXT NOT NULL DEFAULT '[]'"),
    ("extra", "TEXT NOT NULL DEFAULT '{}'"),
    ("created_at", "TEXT NOT NULL"),
    ("started_at", "TEXT"),
    ("finished_at", "TEXT"),
    ("decided_at", "TEXT"),
)
COLUMNS = tuple(name for name, _ in _COLUMNS)
_JSON_COLUMNS = {"proposal_meta": dict, "hardware": dict, "curve": list, "extra": dict}
_TIME_COLUMNS = ("created_at", "started_at", "finished_at", "decided_at")
# RunResult fields the ledger keeps in their own columns; any other field goes into `extra`
_RUN_COLUMNS = ("val_bpb", "steps", "tokens", "flops", "peak_memory_gb", "mfu", "params",
                "training_seconds", "total_seconds", "wall_seconds", "eval_seconds", "eval_tokens",
                "reason", "log_tail", "log_path", "seed", "device", "torch_version")

# Metadata keys that may hold credentials. Matched on the lower-cased name with '-' -> '_'.
# Deliberately not "token" as a substring: tokens_used / prompt_tokens are what we want kept.
_SECRET_NAMES = {"key", "token", "auth", "authorization", "password", "passwd", "secret",
                 "credential", "credentials", "bearer", "cookie", "headers"}
_SECRET_PARTS = ("api_key", "apikey", "secret", "password", "authorization", "credential")
_SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password")
_SECRET_VALUE = re.compile(r"^(sk-|Bearer\s|ghp_|hf_)[A-Za-z0-9_\-]{12,}")


class LabLockedError(RuntimeError):
    """Another Ledger (this process or another) holds the lab directory's lock."""


class LedgerLostError(RuntimeError):
    """ledger.sqlite is missing, empty or damaged while the lab has a history (results.tsv, git).

    Nothing was written: results.tsv is left as it was. `autoresearch recover` (or
    `autoresearch_kit.lab.recover_ledger`) rebuilds the ledger from results.tsv and the
    lab's git refs, moving a damaged file aside first.
    """


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception says the disk (or quota) is full: OSError ENOSPC/EDQUOT or SQLite's FULL."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def lost_message(lab_dir: Path, what: str) -> str:
    """The one-paragraph error for a lab whose ledger is gone, with the way back."""
    return (f"The ledger of lab {lab_dir} is {what}, but the lab has a history (results.tsv or git "
            f"experiments): nothing was changed, results.tsv is as it was. Rebuild the ledger from results.tsv "
            f"and the git refs with `autoresearch recover --lab {lab_dir}` (in Python: "
            f"autoresearch_kit.lab.recover_ledger({str(lab_dir)!r})); a damaged ledger.sqlite is moved aside, "
            f"not deleted. Or restore ledger.sqlite from a backup.")


def _tsv_rows(path: Path) -> int:
    """Data rows of a results.tsv (0 when missing or unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _q(name: str) -> str:
    # every identifier is quoted: `commit` is an SQL keyword
    return f'"{name}"'


def _is_secret_name(name: str) -> bool:
    n = str(name).lower().replace("-", "_")
    return n in _SECRET_NAMES or any(p in n for p in _SECRET_PARTS) or n.endswith(_SECRET_SUFFIXES)


def scrub_secrets(meta: Any) -> Any:
    """Copy of `meta` without anything that looks like a credential.

    Drops keys named like api_key / authorization / secret / password / *_token (nested
    dicts and lists included) and string values shaped like API keys (``sk-...``).
    ``tokens_used``, ``prompt_tokens`` and ``max_tokens`` are kept.
    """
    if isinstance(meta, dict):
        return {str(k): scrub_secrets(v) for k, v in meta.items()
                if not _is_secret_name(k) and not (isinstance(v, str) and _SECRET_VALUE.match(v))}
    if isinstance(meta, (list, tuple)):
        return [scrub_secrets(v) for v in meta if not (isinstance(v, str) and _SECRET_VALUE.match(v))]
    return meta


def _dumps(value: Any) -> str:
    # default=str: metadata may carry Paths, Budgets, numpy scalars; a record must never fail
    return json.dumps(value, default=str, sort_keys=True)


def _clean_description(text: str) -> str:
    return " ".join(str(text or "").split())


def tsv_status(rec: dict) -> str | None:
    """The results.tsv status of a record, or None for no row.

    keep / discard for decided ok runs (the baseline is a keep), ``undecided`` for an ok
    candidate nobody decided yet, and the ledger's own status for a failed or stopped run
    (crash, timeout, diverged, invalid, aborted).
    """
    status, decision = rec["status"], rec["decision"]
    if status in CRASH_LIKE:
        return status
    if status != "ok":
        return None  # running, rejected
    if decision in DECISIONS:
        return decision
    if rec["kind"] == "baseline":
        return "keep"
    return "undecided" if rec["kind"] == "candidate" else None


def tsv_row(rec: dict) -> str | None:
    """One results.tsv line (no newline) for a record, or None if it has no row."""
    status = tsv_status(rec)
    if status is None:
        return None
    commit = (rec.get("commit") or "")[:7]
    ran_ok = rec["status"] == "ok"
    mem = rec["peak_memory_gb"] if ran_ok and rec["peak_memory_gb"] is not None else 0.0
    if ran_ok and rec["val_bpb"] is not None:
        bpb = f"{rec['val_bpb']:.6f}"
    else:  # no score: the original writes 0.000000 for a crash; other failures leave it empty
        bpb = "0.000000" if status == "crash" else ""
    return "\t".join((commit, bpb, f"{mem:.1f}", status, _clean_description(rec["description"])))


class Ledger:
    """Experiment records of one lab directory (SQLite), mirrored to results.tsv.

    Parameters
    ----------
    lab_dir : str or Path
        The lab directory; created if missing (unless ``readonly``).
    readonly : bool
        Open without the lock and without writing anything (e.g. an analysis notebook
        reading a lab another process is running). Writes raise.

    Raises
    ------
    LabLockedError
        When another Ledger (another process, or this one) has the directory open.
    """

    def __init__(self, lab_dir: str | os.PathLike, *, readonly: bool = False, _rebuild: bool = False) -> None:
        self.lab_dir = Path(lab_dir).expanduser().resolve()
        self.readonly = readonly
        # _rebuild (lab.recover_ledger only): a fresh database over an existing history;
        # results.tsv is left alone until end_rebuild() writes it from the rebuilt records
        self._rebuilding = _rebuild
        self.db_path = self.lab_dir / DB_NAME
        self.tsv_path = self.lab_dir / TSV_NAME
        self._mu = threading.RLock()       # the Lab may record from a background run thread
        self._mine: set[str] = set()       # ids this instance started: recover() leaves them alone
        self._lock_file = None
        self._conn: sqlite3.Connection | None = None
        self._copy_dir = None              # readonly on a lab we cannot write: a private copy
        if readonly:
            if not self.db_path.exists() or self.db_path.stat().st_size == 0:
                if _tsv_rows(self.tsv_path):
                    raise LedgerLostError(lost_message(self.lab_dir, "missing" if not self.db_path.exists()
                                                       else "an empty file"))
                msg = f"No ledger at {self.db_path}: open the lab once with Ledger({str(self.lab_dir)!r}) or Lab(...) to create it."
                raise FileNotFoundError(msg)
            self._open_readonly()
        else:
            self.lab_dir.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            self.moved_aside: Path | None = None
            try:
                if _rebuild:
                    self._move_aside()
                empty = not self.db_path.exists() or self.db_path.stat().st_size == 0
                if empty and _tsv_rows(self.tsv_path) and not _rebuild:  # never start a new ledger over a history
                    raise LedgerLostError(lost_message(self.lab_dir, "missing" if not self.db_path.exists()
                                                       else "an empty file"))
                self._conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None,
                                             timeout=30)
                self._conn.row_factory = sqlite3.Row
                try:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.execute("PRAGMA synchronous=FULL")
                    self._create_schema()
                except sqlite3.DatabaseError as e:   # "file is not a database", "disk image is malformed"
                    if isinstance(e, sqlite3.OperationalError):  # locked, disk full, I/O: not damage
                        raise
                    raise LedgerLostError(lost_message(self.lab_dir, f"damaged ({e})")) from None
                self._write_tsv(opening=True)  # repairs a results.tsv left stale by a kill between the two writes
            except BaseException:
                self.close()
                raise

    def _move_aside(self) -> None:
        """(rebuild) Keep a damaged database and its WAL as ledger.sqlite.damaged-<time>*, never delete them."""
        if not self.db_path.exists():
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.moved_aside = self.db_path.with_name(f"{DB_NAME}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = self.db_path.with_name(DB_NAME + suffix)
            if src.exists():
                os.replace(src, self.db_path.with_name(f"{DB_NAME}.damaged-{stamp}{suffix}"))

    def _open_readonly(self) -> None:
        """Open without writing. A WAL database read-only needs its -shm file (SQLite creates it
        on open): in a directory we cannot write (a read-only mount, another user's lab) read a
        private copy of the database and its WAL instead, so status/report still work."""
        try:
            self._conn = self._connect_ro(self.db_path)
            return
        except sqlite3.OperationalError:
            self._close_conn()
        except sqlite3.DatabaseError as e:
            self._close_conn()
            raise LedgerLostError(lost_message(self.lab_dir, f"damaged ({e})")) from None
        import shutil
        import tempfile

        self._copy_dir = tempfile.mkdtemp(prefix="autoresearch-ledger-")
        for suffix in ("", "-wal"):
            src = self.db_path.with_name(DB_NAME + suffix)
            if src.exists():
                shutil.copyfile(src, Path(self._copy_dir) / (DB_NAME + suffix))
        self._conn = self._connect_ro(Path(self._copy_dir) / DB_NAME, copy=True)

    @staticmethod
    def _connect_ro(path: Path, copy: bool = False) -> sqlite3.Connection:
        # the copy is opened read-write (it is ours) so SQLite can replay its WAL into it
        uri = path.as_uri() + ("" if copy else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # errors show up here, not later
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- lock ---------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writer per lab is then up to the user
            import warnings
            warnings.warn("fcntl is not available: the lab directory is not locked against a second writer.",
                          stacklevel=3)
            return
        path = self.lab_dir / LOCK_NAME
        f = open(path, "a+")  # noqa: SIM115 - held open for the Ledger's lifetime; "a+" keeps the holder's note
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                f.close()
                msg = (f"Cannot lock {path} ({e.strerror}): the filesystem may not support file locks "
                       f"(some network mounts). Put the lab directory on a local disk.")
                raise RuntimeError(msg) from e
            f.seek(0)
            holder = f.read()
            f.close()
            raise LabLockedError(self._locked_message(holder)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}) + "\n")
        f.flush()
        self._lock_file = f

    def _locked_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            who = f"process {info['pid']} on {info['host']} (started {info['started']})"
            same = info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        except (ValueError, KeyError, TypeError):
            who, same = "another process", False
        hint = " This is the current process: an earlier Lab/Ledger object on it is still open." if same else ""
        return (f"Lab directory {self.lab_dir} is already open by {who}.{hint} Close it with lab.close() "
                f"(or ledger.close()) or stop that process; to inspect it read-only use "
                f"Ledger({str(self.lab_dir)!r}, readonly=True).")

    def close(self) -> None:
        """Close the database and release the lab lock. Safe to call twice."""
        with self._mu:
            self._close_conn()
            if self._copy_dir is not None:
                import shutil

                shutil.rmtree(self._copy_dir, ignore_errors=True)
                self._copy_dir = None
            if self._lock_file is not None:
                import fcntl
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._conn is None:
            return f"Ledger({str(self.lab_dir)!r}, closed)"
        n = len(self)
        best = self.best()
        tail = f", best {best['val_bpb']:.6f} ({best['id']})" if best else ""
        mode = ", readonly" if self.readonly else ""
        return f"Ledger({str(self.lab_dir)!r}{mode}: {n} experiments{tail})"

    # ---- storage ------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            msg = f"The ledger of {self.lab_dir} is closed: open it again with Ledger({str(self.lab_dir)!r})."
            raise RuntimeError(msg)
        return self._conn

    def _create_schema(self) -> None:
        db = self._db()
        with self._tx():
            cols = ",\n  ".join(f"{_q(n)} {t}" for n, t in _COLUMNS)
            db.execute(f"CREATE TABLE IF NOT EXISTS experiments (\n  {cols}\n)")
            # forward compatibility: a ledger written by an older kit gains the new columns
            have = {row[1] for row in db.execute("PRAGMA table_info(experiments)")}
            for name, sqltype in _COLUMNS:
                if name not in have:
                    sqltype = sqltype.replace(" NOT NULL", "").replace(" PRIMARY KEY", "")
                    db.execute(f"ALTER TABLE experiments ADD COLUMN {_q(name)} {sqltype}")
            # the lab's current parent (the tip of the kept line), written in the same
            # transaction as the decision that moves it: the workspace follows it (Lab)
            db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        if self.readonly:
            msg = (f"This Ledger on {self.lab_dir} was opened with readonly=True and cannot record; "
                   f"open it with Ledger({str(self.lab_dir)!r}) (one writer at a time).")
            raise RuntimeError(msg)
        db = self._db()
        with self._mu:
            # BEGIN inside the try and COMMIT too: a Ctrl-C right after BEGIN, or a COMMIT that
            # fails (disk full), must not leave a transaction open (every later write would
            # fail with "cannot start a transaction within a transaction").
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _row(self, exp_id: str) -> dict:
        exp_id = self._norm_id(exp_id)
        with self._mu:  # one connection shared by threads: reads wait for a write in progress
            row = self._db().execute("SELECT * FROM experiments WHERE id = ?", (exp_id,)).fetchone()
            ids = [] if row is not None else [r[0] for r in self._db().execute(
                "SELECT id FROM experiments ORDER BY CAST(id AS INTEGER)")]
        if row is None:
            have = f"ids run from {ids[0]} to {ids[-1]}" if ids else "it has no experiments yet"
            msg = f"No experiment {exp_id!r} in the ledger of {self.lab_dir}: {have}."
            raise KeyError(msg)
        return self._decode(row)

    @staticmethod
    def _norm_id(exp_id: str | int) -> str:
        # "3", 3 and "0003" all name experiment 0003
        s = str(exp_id).strip()
        return f"{int(s):04d}" if s.isdigit() else s

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict:
        rec = {name: row[name] for name in COLUMNS if name in row.keys()}
        for name, typ in _JSON_COLUMNS.items():
            try:
                rec[name] = json.loads(rec[name]) if rec.get(name) else typ()
            except ValueError:
                rec[name] = typ()
        rec["within_noise"] = bool(rec.get("within_noise"))
        return rec

    def _update(self, db: sqlite3.Connection, exp_id: str, values: dict) -> None:
        sets = ", ".join(f"{_q(k)} = ?" for k in values)
        db.execute(f"UPDATE experiments SET {sets} WHERE id = ?", (*values.values(), exp_id))

    def _insert(self, db: sqlite3.Connection, values: dict) -> str:
        last = db.execute("SELECT MAX(CAST(id AS INTEGER)) FROM experiments").fetchone()[0]
        exp_id = f"{(last or 0) + 1:04d}"
        values = {"id": exp_id, **values}
        names = ", ".join(_q(k) for k in values)
        marks = ", ".join("?" for _ in values)
        db.execute(f"INSERT INTO experiments ({names}) VALUES ({marks})", tuple(values.values()))
        return exp_id

    def _check_parent(self, parent_id: str | None) -> str | None:
        if parent_id is None:
            return None
        parent_id = self._norm_id(parent_id)
        self._row(parent_id)  # KeyError with the known ids when missing
        return parent_id

    def _write_tsv(self, *, opening: bool = False) -> None:
        """Rewrite results.tsv from the database, atomically (temp + fsync + os.replace).

        ``opening``: the rewrite when a writable Ledger opens. Rows of results.tsv are never
        removed by the ledger (a record, once it has a row, keeps one), so a database that
        would write fewer rows than the file has lost records: refuse rather than overwrite.
        """
        if self.readonly or self._rebuilding:
            return
        lines = ["\t".join(TSV_HEADER)]
        # only the columns a row needs: decoding every curve on every write would grow O(n * steps)
        cols = ", ".join(_q(c) for c in ("id", "kind", "status", "decision", "commit", "val_bpb",
                                         "peak_memory_gb", "description"))
        with self._mu:
            rows = self._db().execute(f"SELECT {cols} FROM experiments ORDER BY CAST(id AS INTEGER)").fetchall()
        for row in rows:
            line = tsv_row(dict(zip(row.keys(), row)))
            if line is not None:
                lines.append(line)
        if opening:
            have = _tsv_rows(self.tsv_path)
            if have > len(lines) - 1:
                what = ("empty" if not rows else
                        f"missing records ({len(lines) - 1} results.tsv rows from the database, {have} in the file)")
                raise LedgerLostError(lost_message(self.lab_dir, what))
        tmp = self.lab_dir / f".{TSV_NAME}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.tsv_path)
        except BaseException:
            # disk full mid-write: no half temp file left behind; results.tsv is the old one,
            # and the next write (or open) brings it up to date from the database
            tmp.unlink(missing_ok=True)
            raise

    # ---- writes -------------------------------------------------------------------------------

    def start(self, parent_id: str | None, source_hash: str, diff: str, description: str, proposer: str,
              budget: Any, hardware: dict | None, proposal_meta: dict | None = None,
              kind: str = "candidate", *, commit: str | None = None) -> str:
        """Record an experiment that is about to run; returns its id (status ``running``).

        Parameters
        ----------
        parent_id : str or None
            The experiment this one edits (None for the baseline).
        source_hash : str
            ``propose.base.source_hash`` of the candidate train.py.
        diff : str
            Unified diff against the parent.
        description, proposer : str
            One line for results.tsv; who proposed it (``human``, ``mutate``, ``llm``, ...).
        budget : Budget or str
            Stored as ``str(budget)``.
        hardware : dict
            Fingerprint (device name, torch version, ...), stored as JSON.
        proposal_meta : dict, optional
            The proposal's metadata; credential-looking keys are dropped before storing.
        kind : {"baseline", "candidate", "noise", "rerun", "calibration"}
        commit : str, optional
            The workspace commit of this experiment, if already made.
        """
        if kind not in KINDS:
            msg = f"kind must be one of {', '.join(KINDS)}; got {kind!r}."
            raise ValueError(msg)
        now = _now()
        with self._tx() as db:
            values = {
                "parent_id": self._check_parent(parent_id), "kind": kind, "status": "running",
                "description": str(description or ""), "proposer": str(proposer or ""),
                "source_hash": str(source_hash or ""), "diff": str(diff or ""),
                "proposal_meta": _dumps(scrub_secrets(proposal_meta or {})),
                "budget": str(budget) if budget is not None else "",
                "hardware": _dumps(scrub_secrets(hardware or {})), "commit": commit,
                "created_at": now, "started_at": now,
            }
            exp_id = self._insert(db, values)
            self._mine.add(exp_id)
        self._write_tsv()
        return exp_id

    def finish(self, exp_id: str, result: "RunResult | dict", commit: str | None = None) -> dict:
        """Record a run's outcome (all RunResult fields), its status and finished_at.

        Parameters
        ----------
        exp_id : str
            An experiment in status ``running``.
        result : RunResult or dict
            ``runner.RunResult`` (or its ``to_dict()``). Fields without a column go to ``extra``.
        commit : str, optional
            The workspace commit sha; None keeps the one recorded at start.

        Returns
        -------
        dict
            The updated record.
        """
        d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        status = d.get("status")
        if status not in RUN_STATUSES:
            msg = f"A run result's status must be one of {', '.join(RUN_STATUSES)}; got {status!r}."
            raise ValueError(msg)
        exp_id = self._norm_id(exp_id)
        with self._tx() as db:
            rec = self._row(exp_id)
            if rec["status"] != "running":
                msg = (f"Experiment {exp_id} is not running (status {rec['status']!r}): finish() records a run "
                       f"started with start(); start a new experiment to run it again.")
                raise ValueError(msg)
            values: dict[str, Any] = {k: d.get(k) for k in _RUN_COLUMNS if k in d}
            for k in ("reason", "log_tail", "log_path", "device", "torch_version"):
                values[k] = str(values.get(k) or "")
            values["status"] = status
            values["curve"] = _dumps(d.get("curve") or [])
            known = set(_RUN_COLUMNS) | {"status", "curve", "extra", "budget"}
            extra = dict(d.get("extra") or {})
            extra.update({k: v for k, v in d.items() if k not in known})  # fields a newer runner adds
            ran_on = extra.pop("hardware", None)
            if isinstance(ran_on, dict):   # a run elsewhere (a Dask worker): the machine it ran on
                values["hardware"] = _dumps(scrub_secrets({**(rec["hardware"] or {}), **ran_on}))
            values["extra"] = _dumps(scrub_secrets(extra))
            if not rec["budget"] and d.get("budget"):
                values["budget"] = str(d["budget"])
            if commit is not None:
                values["commit"] = commit
            values["finished_at"] = _now()
            self._update(db, exp_id, values)
            self._mine.discard(exp_id)
        self._write_tsv()
        return self.get(exp_id)

    def decide(self, exp_id: str, decision: str | None, reason: str = "", decided_by: str = "human",
               within_noise: bool = False, *, tip: str | None = None) -> dict:
        """Record keep / discard (or None to clear the decision) for a finished experiment.

        Only ``ok`` runs can be kept. A crashed run may be marked discard (it stays a
        ``crash`` row in results.tsv). ``tip``: an experiment to record as the new tip of
        the kept line (see `tip()`), in the same transaction as the decision.

        Returns
        -------
        dict
            The updated record.
        """
        if decision not in (*DECISIONS, None):
            msg = f"decision must be 'keep', 'discard' or None; got {decision!r}."
            raise ValueError(msg)
        if decided_by not in DECIDERS:
            msg = f"decided_by must be one of {', '.join(DECIDERS)}; got {decided_by!r}."
            raise ValueError(msg)
        exp_id = self._norm_id(exp_id)
        with self._tx() as db:
            rec = self._row(exp_id)
            if rec["status"] in ("running", "rejected"):
                msg = f"Experiment {exp_id} is {rec['status']}: only a finished run can be kept or discarded."
                raise ValueError(msg)
            if decision == "keep" and rec["status"] != "ok":
                msg = (f"Experiment {exp_id} cannot be kept: its run ended with status {rec['status']!r} "
                       f"({rec['reason'] or 'no reason recorded'}). Only ok runs have a val_bpb to keep.")
                raise ValueError(msg)
            self._update(db, exp_id, {
                "decision": decision, "decision_reason": str(reason or ""),
                "decided_by": decided_by if decision else None, "within_noise": int(bool(within_noise)),
                "decided_at": _now() if decision else None,
            })
            if tip is not None:
                self._set_tip(db, tip)
        self._write_tsv()
        return self.get(exp_id)

    def reject(self, parent_id: str | None, source_hash: str, diff: str, description: str, proposer: str,
               reason: str, *, proposal_meta: dict | None = None, decided_by: str = "human",
               commit: str | None = None) -> str:
        """Record a proposal that was never run (status ``rejected``); returns its id.

        The reason is stored as both ``reason`` and ``decision_reason`` so the next
        proposal context can show it. Rejected proposals are not rows of results.tsv.
        """
        if decided_by not in DECIDERS:
            msg = f"decided_by must be one of {', '.join(DECIDERS)}; got {decided_by!r}."
            raise ValueError(msg)
        now = _now()
        with self._tx() as db:
            exp_id = self._insert(db, {
                "parent_id": self._check_parent(parent_id), "kind": "candidate", "status": "rejected",
                "description": str(description or ""), "proposer": str(proposer or ""),
                "source_hash": str(source_hash or ""), "diff": str(diff or ""),
                "proposal_meta": _dumps(scrub_secrets(proposal_meta or {})),
                "reason": str(reason or ""), "decision_reason": str(reason or ""), "decided_by": decided_by,
                "commit": commit, "created_at": now, "decided_at": now,
            })
        self._write_tsv()
        return exp_id

    def restore(self, exp_id: str, values: dict) -> str:
        """Insert a record rebuilt from elsewhere (`lab.recover_ledger`), keeping its id.

        ``values`` holds column values (unknown keys raise); ``kind``, ``status`` and
        ``created_at`` default to candidate / rejected / now. JSON columns may be given
        as Python objects. Raises ValueError if the id is already recorded.
        """
        exp_id = self._norm_id(exp_id)
        unknown = set(values) - set(COLUMNS)
        if unknown:
            msg = f"restore(): unknown ledger columns {sorted(unknown)}; the columns are {', '.join(COLUMNS)}."
            raise ValueError(msg)
        row = {"kind": "candidate", "status": "rejected", "created_at": _now(), **values, "id": exp_id}
        for name in _JSON_COLUMNS:
            if name in row and not isinstance(row[name], str):
                row[name] = _dumps(row[name])
        if row["kind"] not in KINDS or row["status"] not in STATUSES:
            msg = f"restore(): kind {row['kind']!r} / status {row['status']!r} is not one the ledger knows."
            raise ValueError(msg)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM experiments WHERE id = ?", (exp_id,)).fetchone():
                msg = f"Experiment {exp_id} is already in the ledger of {self.lab_dir}."
                raise ValueError(msg)
            names = ", ".join(_q(k) for k in row)
            db.execute(f"INSERT INTO experiments ({names}) VALUES ({', '.join('?' for _ in row)})",
                       tuple(row.values()))
        self._write_tsv()
        return exp_id

    def end_rebuild(self) -> None:
        """After `restore()`-ing a rebuilt history: write results.tsv from it (lab.recover_ledger)."""
        self._rebuilding = False
        self._write_tsv()

    def set_commit(self, exp_id: str, commit: str) -> None:
        """Attach the workspace commit sha to an experiment (e.g. committed after start)."""
        exp_id = self._norm_id(exp_id)
        with self._tx() as db:
            self._row(exp_id)
            self._update(db, exp_id, {"commit": commit})
        self._write_tsv()

    def tip(self) -> str | None:
        """The experiment at the tip of the kept line (the lab's current parent), as recorded.

        None before anything was kept. The Lab moves its git workspace to follow it, so a
        process killed between the two writes is repaired when the lab opens again.
        """
        with self._mu:
            try:
                row = self._db().execute("SELECT value FROM state WHERE key = 'tip'").fetchone()
            except sqlite3.OperationalError:  # a read-only look at a ledger from before the table
                return None
        return row[0] if row is not None and row[0] else None

    def set_tip(self, exp_id: str) -> None:
        """Record `exp_id` as the tip of the kept line (e.g. after a checkout)."""
        with self._tx() as db:
            self._set_tip(db, exp_id)

    def _set_tip(self, db: sqlite3.Connection, exp_id: str) -> None:
        exp_id = self._norm_id(exp_id)
        self._row(exp_id)  # KeyError with the known ids when missing
        db.execute("INSERT INTO state (key, value) VALUES ('tip', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (exp_id,))

    def recover(self) -> list[str]:
        """Mark experiments left ``running`` by a process that died as ``aborted``.

        Runs started by this Ledger object are left alone. Only status and reason change.

        Returns
        -------
        list of str
            The ids that were marked aborted.
        """
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM experiments WHERE status = 'running' ORDER BY CAST(id AS INTEGER)")
                   if r[0] not in self._mine]
            for exp_id in ids:
                self._update(db, exp_id, {"status": "aborted", "reason": INTERRUPTED})
        if ids:
            self._write_tsv()
        return ids

    # ---- reads --------------------------------------------------------------------------------

    def get(self, exp_id: str) -> dict:
        """The record of one experiment (JSON fields decoded). KeyError if unknown."""
        return self._row(exp_id)

    def records(self, *, curves: bool = True) -> list[dict]:
        """All records, oldest first, as plain dicts (JSON fields decoded).

        ``curves=False`` leaves ``curve`` empty: decoding every loss curve dominates the
        cost of a long ledger (300 runs x 1000 steps: ~1.4 s with curves, measured on a 2-core VM).
        """
        cols = "*" if curves else ", ".join(_q(c) if c != "curve" else "'[]' AS curve" for c in COLUMNS)
        with self._mu:
            rows = self._db().execute(f"SELECT {cols} FROM experiments ORDER BY CAST(id AS INTEGER)").fetchall()
        return [self._decode(r) for r in rows]

    def history(self, *, curves: bool = True) -> "pd.DataFrame":
        """All records as a pandas DataFrame indexed by id (timestamps as UTC datetimes).

        ``curves=False`` skips the loss curves (fast, for tables refreshed after every step).
        """
        import pandas as pd

        df = pd.DataFrame(self.records(curves=curves), columns=list(COLUMNS))
        for col in _TIME_COLUMNS:
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df.set_index("id", drop=False).rename_axis(None)

    def best(self) -> dict | None:
        """The current best to beat: lowest val_bpb among ok runs that were kept, or the baseline.

        A baseline counts unless it was explicitly discarded. Ties go to the earlier id.
        None if no such experiment exists yet.
        """
        with self._mu:
            row = self._db().execute(
                "SELECT * FROM experiments WHERE status = 'ok' AND val_bpb IS NOT NULL "
                "AND (decision = 'keep' OR (kind = 'baseline' AND decision IS NULL)) "
                "ORDER BY val_bpb ASC, CAST(id AS INTEGER) ASC LIMIT 1").fetchone()
        return self._decode(row) if row is not None else None

    def __len__(self) -> int:
        with self._mu:
            return self._db().execute("SELECT COUNT(*) FROM experiments").fetchone()[0]

