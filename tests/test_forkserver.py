"""Tests of the runner's fork server (autoresearch_kit/forkserver.py), through run_budgeted.

Each test forces the server on (AUTORESEARCH_FORKSERVER=1: on a CPU it is off by default)
and runs small self-made candidates that speak the trusted channel directly, as in
test_runner.py: what a forked child sees, the exit codes it ends with, and what happens
when the server dies, refuses, or its runner is killed.

    python -m pytest tests/test_forkserver.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoresearch_kit import forkserver, integrity
from autoresearch_kit.runner import RunResult, run_budgeted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")

from test_runner import FAKE_HARNESS as HARNESS  # noqa: E402  (the same socket-speaking stand-in)


def fake(body: str) -> str:
    return HARNESS + textwrap.dedent(body)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture()
def forked(monkeypatch, kit_env):
    """Fork server on, static check off (the candidates use the channel directly)."""
    monkeypatch.setenv(forkserver.SWITCH_VAR, "1")
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "off")  # a sandboxed run starts under bubblewrap instead
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    yield kit_env
    forkserver.shutdown()


def run(source: str, tmp_path: Path, name: str = "work", **kw) -> RunResult:
    kw.setdefault("hard_limit", 30)
    return run_budgeted(source, "2s", workdir=tmp_path / name, **kw)


def test_enabled_only_for_cuda_unless_told(monkeypatch):
    monkeypatch.delenv(forkserver.SWITCH_VAR, raising=False)
    assert forkserver.enabled("cuda") and not forkserver.enabled("cpu")
    monkeypatch.setenv(forkserver.SWITCH_VAR, "0")
    assert not forkserver.enabled("cuda")
    monkeypatch.setenv(forkserver.SWITCH_VAR, "1")
    assert forkserver.enabled("cpu")


def test_forked_child_looks_like_python_train_py(forked, tmp_path):
    res = run(fake("""
        facts = {"ppid": os.getppid(), "sid": os.getsid(0), "pid": os.getpid(), "cwd": os.getcwd(),
                 "argv0": sys.argv[0], "path0": sys.path[0], "name": __name__,
                 "run_id": os.environ["AUTORESEARCH_RUN_ID"],
                 "environ": open("/proc/self/environ", "rb").read().decode(errors="replace"),
                 "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace"),
                 "stdin": os.readlink("/proc/self/fd/0"), "channel_in_env": "AUTORESEARCH_CHANNEL_FD" in os.environ}
        open("facts.json", "w").write(json.dumps(facts))
        print("to stdout"); print("to stderr", file=sys.stderr)
        step(0); result()
    """), tmp_path)
    assert res.status == "ok", res.reason
    assert res.extra["forkserver"] is True
    facts = __import__("json").loads((tmp_path / "work" / "facts.json").read_text())
    assert facts["ppid"] == forkserver.server_pid()          # forked by the server...
    assert facts["sid"] == facts["pid"]                      # ...in a session of its own
    assert facts["cwd"] == str(tmp_path / "work") == facts["path0"]
    assert facts["argv0"].endswith("train.py") and facts["name"] == "__main__"
    assert facts["run_id"] == res.extra["run_id"]
    assert f"AUTORESEARCH_RUN_ID={res.extra['run_id']}" in facts["environ"].split("\0")  # the stray hunt's marker
    assert "train.py" in facts["cmdline"]
    assert facts["stdin"] == "/dev/null" and not facts["channel_in_env"]
    log = Path(res.log_path).read_text()
    assert "to stdout" in log and "to stderr" in log


@pytest.mark.parametrize("body, code, words", [
    ("sys.exit(7)", 7, ""),
    ("sys.exit('no data here')", 1, "no data here"),
    ("os._exit(5)", 5, ""),
    ("def f():\n    raise ValueError('boom')\nf()", 1, "ValueError: boom"),
    ("os.kill(os.getpid(), signal.SIGKILL)", -9, ""),
    ("raise KeyboardInterrupt", -2, "KeyboardInterrupt"),
])
def test_exit_codes_are_those_of_a_fresh_interpreter(forked, tmp_path, body, code, words):
    res = run(fake("import signal\n" + body + "\n"), tmp_path)
    assert res.extra["forkserver"] is True
    assert res.status == "crash" and res.extra["exit_code"] == code, (res.reason, res.extra["exit_code"])
    assert words in Path(res.log_path).read_text()


def test_traceback_starts_at_train_py(forked, tmp_path):
    res = run("def f():\n    raise ValueError('boom')\n\nf()\n", tmp_path)
    log = Path(res.log_path).read_text()
    assert res.status == "crash" and res.reason == "ValueError: boom"
    frames = [ln for ln in log.splitlines() if ln.strip().startswith("File ")]
    assert frames and all("train.py" in ln for ln in frames), log  # no runpy or fork-server frames


def test_atexit_handlers_of_train_py_run(forked, tmp_path):
    res = run(fake("""
        import atexit
        atexit.register(lambda: open("atexit.ran", "w").write("yes"))
        step(0); result()
    """), tmp_path)
    assert res.status == "ok" and (tmp_path / "work" / "atexit.ran").read_text() == "yes"


def test_server_killed_between_runs_falls_back_then_restarts(forked, tmp_path):
    first = run(fake("step(0); result()"), tmp_path, "a")
    pid = forkserver.server_pid()
    assert first.extra["forkserver"] is True and pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    second = run(fake("step(0); result()"), tmp_path, "b")
    assert second.status == "ok"                       # a dead server never costs a run
    third = run(fake("step(0); result()"), tmp_path, "c")
    assert third.status == "ok" and third.extra["forkserver"] is True
    assert forkserver.server_pid() not in (None, pid)


def test_server_killed_mid_run_kills_the_child(forked, tmp_path):
    work = tmp_path / "work"
    killer = {}

    def on_event(event):  # the child is training: kill its server under it
        if "done" not in killer:
            killer["done"] = True
            os.kill(forkserver.server_pid(), signal.SIGKILL)
    res = run(fake("""
        step(0)
        time.sleep(60)
    """), tmp_path, on_event=on_event)
    assert res.status == "crash" and "SIGKILL" in res.reason
    assert not _alive(res.extra["start"]["pid"])
    assert work.exists()


def test_an_import_that_leaves_a_thread_is_dropped_from_the_preload(forked, tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "threaded_mod.py").write_text("import threading, time\n"
                                          "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", str(mods))
    monkeypatch.setattr(forkserver, "PRELOAD", ("json", "threaded_mod", "numpy"))
    res = run(fake("step(0); result()"), tmp_path)
    assert res.status == "ok" and res.extra["forkserver"] is True
    assert forkserver._server.info["imported"] == 1    # json only: the server restarted without the rest


def _server_children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            out.append(int(p.name))
    return out


@pytest.mark.parametrize("how", ["exit", "kill -9 mid-run"])
def test_no_server_or_child_outlives_its_runner(kit_env, tmp_path, how):
    work = tmp_path / "work"
    body = "step(0); result()" if how == "exit" else "open('started', 'w').write(str(os.getpid()))\ntime.sleep(120)"
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from autoresearch_kit import forkserver, integrity, runner
        integrity.check_source = lambda source: []
        os.environ["AUTORESEARCH_FORKSERVER"] = "1"
        os.environ["AUTORESEARCH_SANDBOX"] = "off"
        res = runner.run_budgeted({fake(body)!r}, "60s", workdir={str(work)!r}, device="cpu", hard_limit=150)
        print(forkserver.server_pid(), res.extra["forkserver"], flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = child = None
    try:
        if how == "exit":
            out, err = proc.communicate(timeout=60)
            server_pid, used = out.split()
            assert used == "True", err
            server = int(server_pid)
        else:
            deadline = time.monotonic() + 60
            while not (work / "started").exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            child = int((work / "started").read_text())
            server = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[-1].split()[1])
            assert server in _server_children(proc.pid)
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 5
        while (_alive(server) or (child and _alive(child))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server), "the fork server outlived its runner"
        assert not (child and _alive(child)), "the training child outlived its runner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in (server, child):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_pinned_cuda_answers_match_torch_and_are_restored():
    """While preloading, torch.cuda answers from a forked child (inductor asks at import, and
    asking in the server leaves a driver or NVML thread): the same answers, originals back after."""
    code = textwrap.dedent('''
        import os, torch
        from autoresearch_kit import forkserver
        real = (torch.cuda.is_available(), torch.cuda.device_count())
        originals = (torch.cuda.is_available, torch.cuda.device_count)
        restore = forkserver._pin_cuda_facts()
        pinned = (torch.cuda.is_available(), torch.cuda.device_count())
        assert torch.cuda.is_available is not originals[0]
        restore()
        assert (torch.cuda.is_available, torch.cuda.device_count) == originals
        print(real == pinned, forkserver._hazard())
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "None"]


def test_prestarted_server_serves_the_first_run(forked, tmp_path):
    from autoresearch_kit import runner

    thread = runner.prestart("cpu")
    assert thread is not None
    thread.join(120)
    pid = forkserver.server_pid()
    assert pid is not None, "prestart did not leave a running server"
    res = run(fake("step(0); result()"), tmp_path)
    assert res.status == "ok" and res.extra["forkserver"] is True
    assert forkserver.server_pid() == pid, "the first run started another server instead of using the prestarted one"


def test_one_server_serves_runs_at_any_thread_count(forked, tmp_path, monkeypatch):
    # The runner picks each CPU run's thread count from the load (runner.cpu_threads): a
    # new count must not restart the server, and each child must train at its own count.
    seen, pids = [], []
    for n in (1, 2, 1):
        monkeypatch.setenv("AUTORESEARCH_CPU_THREADS", str(n))
        res = run(fake("""
            import torch
            open("threads.txt", "w").write(f"{os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}")
            step(0); result()
        """), tmp_path, name=f"t{len(seen)}")
        assert res.status == "ok" and res.extra["forkserver"] is True, res.reason
        assert res.extra["cpu_threads"] == n
        seen.append((tmp_path / f"t{len(seen)}" / "threads.txt").read_text())
        pids.append(forkserver.server_pid())
    assert seen == ["1 1", "2 2", "1 1"]
    assert len(set(pids)) == 1, "a new thread count restarted the fork server"


def test_prestart_is_off_where_the_fork_server_is(kit_env, monkeypatch):
    from autoresearch_kit import runner

    monkeypatch.delenv(forkserver.SWITCH_VAR, raising=False)
    assert runner.prestart("cpu") is None and runner.prestart("mps") is None   # off by default off CUDA
    monkeypatch.setenv(forkserver.SWITCH_VAR, "0")
    assert runner.prestart("cuda:0") is None and runner.prestart() is None
    assert forkserver.server_pid() is None


def test_a_lab_starts_the_server_while_the_first_proposal_is_written(forked, tmp_path):
    from autoresearch_kit.lab import Lab
    from conftest import tiny_train_source

    train = tmp_path / "train.py"
    train.write_text(tiny_train_source())
    lab = Lab(tmp_path / "lab", train=train, program="program.md", device="cpu", verbose=False)
    try:
        assert lab._prestart is None          # creating a lab (`autoresearch status`) starts nothing
        lab.propose()
        assert lab._prestart is not None
        lab._prestart.join(120)
        pid = forkserver.server_pid()
        assert pid is not None
        lab.propose()                         # once per lab
        assert forkserver.server_pid() == pid
    finally:
        lab.close()
