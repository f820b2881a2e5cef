"""The workspace: a lab directory backed by its own git repository.

Every experiment becomes a commit, so any of them can be diffed, restored or branched
from later; the accepted versions of train.py form a branch.

    from autoresearch_kit.workspace import Workspace
    ws = Workspace("my_lab")
    ws.init(open("train.py").read(), open("program.md").read())   # first commit on `kept`
    ws.commit_experiment("0001", baseline_src, None, "baseline")  # refs/experiments/0001
    ws.keep("0001")                                              # kept -> 0001, lab/train.py updated
    ws.commit_experiment("0002", candidate_src, "0001", "lower the learning rate")
    ws.diff("0001", "0002"); ws.source("0002"); ws.log()
    ws.checkout("0001")                                          # continue from an older experiment

Layout of the repository (inside the lab directory, `.git/`):

    refs/heads/kept           the kept line: its tip is the current parent, lab/train.py.
                              Ancestry of the tip = one commit per kept experiment (message =
                              the description), down to the `init` commit.
    refs/experiments/<id>     every committed experiment (kept, discarded, crashed, rejected if
                              the Lab commits those), parent = its parent experiment's commit.
    refs/heads/lines/<id>     a kept line that checkout() (or keep() of an experiment off the
                              line) moved away from, named after its tip experiment; nothing
                              is ever unreachable.

Only train.py and program.md are tracked (the workspace writes a .gitignore for the
rest: runs/, ledger.sqlite, results.tsv, progress.png, .lock). Commits are made with
git plumbing (hash-object / mktree / commit-tree / update-ref), so they never touch the
files in the lab directory except where documented (keep/checkout write train.py).
git runs with the user's global and system config ignored and a local identity, so it
works on a machine where git was never configured, and no hooks run.

Run the tests with `python -m pytest tests/test_workspace.py -q`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

KEPT = "kept"
KEPT_REF = f"refs/heads/{KEPT}"
EXP_PREFIX = "refs/experiments/"
LINES_PREFIX = "refs/heads/lines/"
TRACKED = ("train.py", "program.md")
IDENTITY = ("autoresearch_kit", "autoresearch_kit@localhost")
GITIGNORE = """\
# written by autoresearch_kit: only train.py and program.md are versioned
runs/
ledger.sqlite
ledger.sqlite-*
results.tsv
results.tsv.*
ledger.sqlite.*
data.json
.*.tmp
progress.png
.lock
.gitignore
__pycache__/
.ipynb_checkpoints/
"""
_TRAILER = re.compile(r"^Experiment: (\S+)\s*$", re.MULTILINE)
_INIT_MESSAGE = "init: starting train.py and program.md"


class GitError(RuntimeError):
    """A git command failed; the message carries the command and git's stderr."""


class Workspace:
    """Git-backed lab directory: experiment commits, the kept line, checkout.

    Parameters
    ----------
    lab_dir : str or Path
        The lab directory (created if missing). The repository is `lab_dir/.git`,
        created by init().

    Raises
    ------
    RuntimeError
        When git is not installed.
    """

    def __init__(self, lab_dir: str | os.PathLike) -> None:
        self.lab_dir = Path(lab_dir).expanduser().resolve()
        self.git_dir = self.lab_dir / ".git"
        self._git_exe = shutil.which("git")
        if self._git_exe is None:
            msg = ("git was not found on PATH: install git (apt install git, brew install git or "
                   "conda install git); the workspace keeps every experiment as a git commit.")
            raise RuntimeError(msg)

    # ---- git plumbing ----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # Drop inherited GIT_* (e.g. GIT_DIR from a hook) and ignore the user's global/system
        # config: a global commit.gpgsign, hooksPath or autocrlf must not change our commits.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
                   LC_ALL="C", GIT_AUTHOR_NAME=IDENTITY[0], GIT_AUTHOR_EMAIL=IDENTITY[1],
                   GIT_COMMITTER_NAME=IDENTITY[0], GIT_COMMITTER_EMAIL=IDENTITY[1])
        return env

    def _git(self, *args: str, input: str | None = None, check: bool = True) -> str:
        cmd = [self._git_exe, f"--git-dir={self.git_dir}", f"--work-tree={self.lab_dir}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self._env(),
                              cwd=self.lab_dir, encoding="utf-8", errors="surrogateescape")
        if check and proc.returncode != 0:
            msg = f"git {' '.join(args)} failed in {self.lab_dir} (exit {proc.returncode}): {proc.stderr.strip()}"
            raise GitError(msg)
        return proc.stdout

    def _is_ancestor(self, a: str, b: str) -> bool:
        cmd = [self._git_exe, f"--git-dir={self.git_dir}", "merge-base", "--is-ancestor", a, b]
        return subprocess.run(cmd, env=self._env(), capture_output=True).returncode == 0

    def _resolve(self, ref: str) -> str | None:
        out = self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).strip()
        return out or None

    def _commit_of(self, exp_id: str) -> str | None:
        return self._resolve(EXP_PREFIX + _norm_id(exp_id))

    def _rev(self, what: str) -> str:
        """Commit sha of an experiment id, `kept`, a lines/ branch or a sha."""
        what = str(what).strip()
        sha = self._commit_of(what) if what else None
        # an all-digit name is an experiment id, never a sha prefix ("0009" could prefix a sha)
        if sha is None and what and not what.isdigit():
            sha = self._resolve(what)
        if sha is None:
            known = self.experiments()
            have = f"known experiments: {known[0]} .. {known[-1]}" if known else "no experiment is committed yet"
            msg = f"No experiment or revision {what!r} in the workspace {self.lab_dir} ({have})."
            raise KeyError(msg)
        return sha

    def _blob(self, text: str) -> str:
        return self._git("hash-object", "-w", "--stdin", input=text).strip()

    def _commit(self, files: dict[str, str], parent: str | None, message: str) -> str:
        entries = "".join(f"100644 blob {self._blob(text)}\t{name}\n" for name, text in sorted(files.items()))
        tree = self._git("mktree", input=entries).strip()
        args = ["commit-tree", tree, "-F", "-"]
        if parent:
            args += ["-p", parent]
        return self._git(*args, input=message if message.endswith("\n") else message + "\n").strip()

    def _tip_label(self, sha: str) -> str:
        """The experiment id of a commit; ``init`` for the root commit; ``hand-<sha>`` for a
        commit someone made by hand (no Experiment trailer)."""
        msg = self._git("log", "-1", "--format=%B", sha)
        m = _TRAILER.search(msg)
        if m:
            return m.group(1)
        return "init" if not self._git("log", "-1", "--format=%P", sha).strip() else f"hand-{sha[:7]}"

    def _move_kept(self, sha: str, write: bool = True) -> None:
        """Point `kept` at sha, archiving the old line under lines/<tip id> if it would be lost."""
        old = self._resolve(KEPT_REF)
        if old and old != sha and not self._is_ancestor(old, sha):
            self._git("update-ref", LINES_PREFIX + self._tip_label(old), old)
        self._git("update-ref", "-m", "autoresearch: move kept line", KEPT_REF, sha)
        # keep `git status` in the lab directory truthful: index = the kept tree
        self._git("read-tree", KEPT_REF)
        if write:
            self._write_file("train.py", self._git("show", f"{sha}:train.py"))

    def _write_file(self, name: str, text: str) -> None:
        path = self.lab_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    # ---- public API ------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether the repository exists and has a kept line."""
        return self.git_dir.is_dir() and self._resolve(KEPT_REF) is not None

    def init(self, train_source: str, program_source: str) -> str:
        """Create the repository and its first commit on `kept` (train.py, program.md).

        Writes both files and a .gitignore into the lab directory. On a workspace that
        already has a kept line, changes nothing and returns its tip (resume).

        Returns
        -------
        str
            The sha of the kept tip.
        """
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        if not self.git_dir.is_dir():
            # --template= : no sample hooks; HEAD -> kept so `git log` in the lab shows the line
            self._git("init", "--quiet", "--template=")
            self._git("symbolic-ref", "HEAD", KEPT_REF)
            for key, value in (("user.name", IDENTITY[0]), ("user.email", IDENTITY[1]),
                               ("commit.gpgsign", "false"), ("core.autocrlf", "false"),
                               ("gc.auto", "0")):  # gc.auto=0: no surprise repacks mid-session
                self._git("config", key, value)
        tip = self._resolve(KEPT_REF)
        if tip is not None:
            self.refresh_ignore()
            return tip
        (self.lab_dir / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
        self._write_file("train.py", train_source)
        self._write_file("program.md", program_source)
        sha = self._commit({"train.py": train_source, "program.md": program_source}, None, _INIT_MESSAGE)
        self._git("update-ref", KEPT_REF, sha)
        self._git("read-tree", KEPT_REF)
        return sha

    def refresh_ignore(self) -> None:
        """A lab made by an older kit gets the files it now writes (data.json, ...) ignored too;
        a .gitignore the user wrote (without our first line) is left alone."""
        path = self.lab_dir / ".gitignore"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return
        if not text.startswith(GITIGNORE.splitlines()[0]):
            return
        missing = [line for line in GITIGNORE.splitlines() if line not in text.splitlines()]
        if missing:
            try:
                path.write_text(text.rstrip("\n") + "\n" + "\n".join(missing) + "\n", encoding="utf-8")
            except OSError:
                pass   # a read-only lab: git status shows a file more, nothing breaks

    def _require_init(self) -> None:
        if not self.initialized:
            msg = f"The workspace {self.lab_dir} has no repository yet: call init(train_source, program_source) first."
            raise RuntimeError(msg)

    def commit_experiment(self, exp_id: str, source: str, parent_id: str | None, message: str,
                          trailers: dict[str, str] | None = None) -> str:
        """Commit an experiment's train.py as refs/experiments/<id>.

        The commit's parent is the parent experiment's commit (the kept tip when
        ``parent_id`` is None, e.g. the baseline). program.md is the lab's current one.
        The message's first line is the description; an ``Experiment: <id>`` trailer
        names the experiment; ``trailers`` add lines after it (the Lab's ``Budget:`` and
        ``Data:``, what a lost ledger is rebuilt with). Committing the same id again with the
        same source is a no-op (returns the existing sha).

        Returns
        -------
        str
            The commit sha (the ledger's ``commit``).
        """
        self._require_init()
        exp_id = _norm_id(exp_id)
        if parent_id is None:
            parent = self._resolve(KEPT_REF)
        else:
            parent = self._commit_of(parent_id)
            if parent is None:
                msg = (f"Parent experiment {parent_id!r} has no commit in {self.lab_dir}: commit it with "
                       f"commit_experiment() before its children.")
                raise KeyError(msg)
        existing = self._commit_of(exp_id)
        if existing is not None:
            if self.source(exp_id) == source:
                return existing
            msg = f"Experiment {exp_id} is already committed with a different train.py; experiment ids are never reused."
            raise ValueError(msg)
        program_path = self.lab_dir / "program.md"
        program = (read_text(program_path) if program_path.exists()
                   else self._git("show", f"{parent}:program.md"))
        subject = " ".join(str(message or f"experiment {exp_id}").split())  # one line, as results.tsv
        trailer = f"Experiment: {exp_id}" + (f"\nParent: {_norm_id(parent_id)}" if parent_id is not None else "")
        trailer += "".join(f"\n{k}: {' '.join(str(v).split())}" for k, v in (trailers or {}).items() if v)
        sha = self._commit({"train.py": source, "program.md": program}, parent, f"{subject}\n\n{trailer}\n")
        # the empty old-value makes update-ref refuse if the ref appeared meanwhile
        self._git("update-ref", EXP_PREFIX + exp_id, sha, "")
        return sha

    def keep(self, exp_id: str, *, write: bool = True) -> str:
        """Move the kept line to an experiment and write its train.py to lab/train.py.

        Normally a fast-forward (the experiment's parent is the kept tip). If the old
        tip would become unreachable it is kept as ``lines/<old tip id>`` (a commit made
        by hand: ``lines/hand-<sha>``). ``write=False`` leaves lab/train.py as it is.

        Returns
        -------
        str
            The new kept tip sha.
        """
        self._require_init()
        sha = self._rev(exp_id)
        self._move_kept(sha, write=write)
        return sha

    def working_source(self) -> str | None:
        """The lab directory's train.py as it is on disk (None if it is missing)."""
        path = self.lab_dir / "train.py"
        return read_text(path) if path.is_file() else None

    def hand_commit(self) -> tuple[str, str] | None:
        """(sha, subject) when the kept tip is a commit someone made by hand (`git commit` in the
        lab directory: no Experiment trailer, not the init commit); else None."""
        if not self.initialized:
            return None
        tip = self.head()
        if self._tip_label(tip).startswith("hand-"):
            return tip, self._git("log", "-1", "--format=%s", tip).strip()
        return None

    def checkout(self, exp_id: str) -> str:
        """Continue from any past experiment: it becomes the current parent.

        Writes its train.py into the lab directory and moves `kept` to it; the line it
        leaves stays reachable as ``lines/<old tip id>``. Later kept experiments grow a
        new branch of the tree from here. program.md is not touched (it is the human's
        current instructions).

        Returns
        -------
        str
            The new kept tip sha.
        """
        return self.keep(exp_id)

    def source(self, exp_id: str) -> str:
        """train.py of an experiment (or of `kept`, a lines/ branch, a sha)."""
        self._require_init()
        return self._git("show", f"{self._rev(exp_id)}:train.py")

    def program(self, exp_id: str) -> str:
        """program.md as it was when the experiment was committed."""
        self._require_init()
        return self._git("show", f"{self._rev(exp_id)}:program.md")

    def diff(self, a_id: str, b_id: str, path: str | None = "train.py") -> str:
        """Unified diff (git diff) of train.py from experiment a to b; path=None: all tracked files."""
        self._require_init()
        args = ["diff", "--no-color", "--no-ext-diff", "--no-renames", self._rev(a_id), self._rev(b_id)]
        return self._git(*args, *(["--", path] if path else []))

    def commit(self, exp_id: str) -> str | None:
        """The commit sha of an experiment, or None if it was never committed."""
        return self._commit_of(exp_id) if self.git_dir.is_dir() else None

    def head(self) -> str:
        """The kept tip sha (the current parent)."""
        self._require_init()
        return self._resolve(KEPT_REF)

    def head_id(self) -> str | None:
        """The experiment id at the kept tip (None while it is the init commit or a commit made by hand)."""
        label = self._tip_label(self.head())
        return None if label == "init" or label.startswith("hand-") else label

    def log(self, ref: str = KEPT) -> list[tuple[str, str | None, str]]:
        """The kept line (or any line), newest first: (sha, exp_id or None for init, subject)."""
        self._require_init()
        out = self._git("log", "--format=%H%x1f%B%x1e", self._rev(ref))
        entries = []
        for chunk in out.split("\x1e"):
            chunk = chunk.strip("\n")
            if not chunk:
                continue
            sha, body = chunk.split("\x1f", 1)
            m = _TRAILER.search(body)
            entries.append((sha, m.group(1) if m else None, body.strip().splitlines()[0] if body.strip() else ""))
        return entries

    def experiments(self) -> list[str]:
        """Ids of every committed experiment, in id order."""
        return sorted(self.commits(), key=lambda s: (len(s), s))

    def commits(self) -> dict[str, str]:
        """{experiment id: commit sha} of every committed experiment (one git call)."""
        if not self.git_dir.is_dir():
            return {}
        out = self._git("for-each-ref", "--format=%(refname) %(objectname)", EXP_PREFIX)
        return {ref[len(EXP_PREFIX):]: sha for ref, sha in (line.split() for line in out.splitlines() if line)}

    def lines(self) -> dict[str, str]:
        """Archived kept lines: {branch name: tip sha}, e.g. {'lines/0007': '3f2a...'}."""
        if not self.git_dir.is_dir():
            return {}
        out = self._git("for-each-ref", "--format=%(refname) %(objectname)", LINES_PREFIX)
        return {ref[len("refs/heads/"):]: sha for ref, sha in (line.split() for line in out.splitlines() if line)}

    def __repr__(self) -> str:
        if not self.initialized:
            return f"Workspace({str(self.lab_dir)!r}, not initialized)"
        return (f"Workspace({str(self.lab_dir)!r}: kept at {self.head()[:7]} ({self.head_id() or 'init'}), "
                f"{len(self.experiments())} experiments, {len(self.lines())} archived lines)")


def read_text(path: str | os.PathLike) -> str:
    """A text file of the lab (train.py, program.md), or a ValueError that names it when it is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = (f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): it must be a plain "
               f"text file; save it as UTF-8 (or restore it with `git -C {path.parent} checkout {path.name}`).")
        raise ValueError(msg) from None


def _norm_id(exp_id: str | int) -> str:
    # "3", 3 and "0003" all name experiment 0003 (the ledger's ids)
    s = str(exp_id).strip()
    return f"{int(s):04d}" if s.isdigit() else s
