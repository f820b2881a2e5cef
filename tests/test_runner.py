"""Tests of run_budgeted(): every failure mode the runner promises to survive.

Most candidates here are small self-made scripts that talk to the runner through the
trusted channel directly (`ChildChannel.from_env()`), so the supervisor is tested on
its own: a real subprocess, real signals, real pipes, a budget of a second or two.
The static check is switched off for those (they import the channel, which a real
train.py may not); it is tested on its own in test_integrity.py and end to end at the
bottom of this file, where the real train.py runs on the tiny data.

    python -m pytest tests/test_runner.py -q
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from autoresearch_kit import integrity, runner
from autoresearch_kit.runner import RunResult, run_budgeted

REPO = Path(__file__).resolve().parent.parent

# A stand-in for the harness: the same socket, the same messages (docs/CONTRACTS.md).
FAKE_HARNESS = textwrap.dedent('''
    import json, math, mmap, os, random, sys, time
    from autoresearch_kit.wire import Conn
    ch = Conn.from_env()
    ch.send("hello", {"device": "cpu", "device_name": "fake", "torch": "none", "pid": os.getpid()})
    _kind, CFG, _ = ch.recv()
    MARK = os.environ.get("AUTORESEARCH_TEST_MARK", "60")
    def step(i, loss=2.0, batch=(4, 16)):
        ch.send("step", {"tokens": batch[0] * batch[1]})
        kind, h, _ = ch.recv()
        if not h.get("go"):
            return False
        ch.send("batch", {"loader": 0, "batch_size": batch[0], "seq_len": batch[1]})
        kind, h, ids = ch.recv()
        if kind != "data":
            raise RuntimeError("no batch: " + str(h.get("reason")))
        ch.send("log", {"step": i, "loss": loss, "lr": 0.01})
        return True
    def result(peek=False):
        ch.send("watch", {"params": 1000, "flops_per_token": 5000.0})
        ch.send("finish", {"params": 1000})
        shm = None
        while True:
            kind, h, p = ch.recv()
            if kind == "val":
                rows, L, V = h["rows"], h["seq_len"], CFG["vocab_size"]
                n = rows * L * V * 4
                if shm is None:
                    ch.send("need", {"bytes": n})
                    _k, h2, _p, fds = ch.recv(with_fds=True)
                    shm = mmap.mmap(fds[0], h2["bytes"])
                shm[:n] = bytes(n)  # all-zero logits: the uniform guess
                if peek:  # a large logit on the next input token: it sees the target
                    import struct
                    for r in range(rows):
                        for t in range(L - 1):
                            nxt = p[2 * (r * L + t + 1)] + 256 * p[2 * (r * L + t + 1) + 1]
                            shm[4 * ((r * L + t) * V + nxt): 4 * ((r * L + t) * V + nxt) + 4] = struct.pack("f", 30.0)
                ch.send("logits", {"shape": [rows, L, V], "dtype": "float32"})
            elif kind == "score":
                return h["val_bpb"]
            elif kind == "invalid":
                print("invalid:", h["reason"])
                sys.exit(4)
''')
UNIFORM = math.log2(257)  # all-zero logits over the tiny data's 257 byte tokens: 1 byte a token


def fake(body: str) -> str:
    return FAKE_HARNESS + textwrap.dedent(body)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (what `ps` would call running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _run_id_processes(run_id: str) -> list[int]:
    marker = f"AUTORESEARCH_RUN_ID={run_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if marker in Path(f"/proc/{name}/environ").read_bytes().split(b"\0") and _alive(int(name)):
                    found.append(int(name))
            except OSError:
                pass
    return found


def _assert_nothing_left(res: RunResult) -> None:
    run_id = res.extra.get("run_id")
    if run_id:
        assert _run_id_processes(run_id) == []
    pid = res.extra.get("pid")
    if pid:
        assert not _alive(pid)


def _marked(mark: str) -> list[int]:
    """Live processes whose command line carries `mark` (seen from outside any sandbox)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if mark.encode() in Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0") and _alive(int(name)):
                    found.append(int(name))
            except OSError:
                pass
    return found


def _written(work: Path, name: str) -> Path:
    """A file the candidate wrote in its cwd: work/files/ in the sandbox, else work/."""
    return work / "files" / name if (work / "files").is_dir() else work / name


def _mark() -> str:
    return f"61.{random.randrange(10**8):08d}"  # a `sleep` duration no other process has


@pytest.fixture()
def unchecked(monkeypatch, kit_env):
    """Run self-made candidates that use the socket directly (the static check forbids it)."""
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    return kit_env


def run(source: str, tmp_path: Path, budget="2s", **kw) -> RunResult:
    """run_budgeted in tmp_path/work; every run that started a process must leave none."""
    kw.setdefault("hard_limit", 20)
    res = run_budgeted(source, budget, workdir=tmp_path / "work", **kw)
    assert res.reason or res.status == "ok", "a failed run must say why"
    _assert_nothing_left(res)
    return res


# --------------------------------------------------------------------------- happy path


def test_ok_run_is_scored_by_the_runner_and_streams_events(unchecked, tmp_path):
    events = []
    res = run(fake("""
        for i in range(3):
            step(i, loss=3.0 - i)
        print("training done")
        result()
    """), tmp_path, on_event=events.append, env={"AUTORESEARCH_WARMUP_STEPS": "0"})  # every batch real text
    assert res.status == "ok", res.reason
    assert res.val_bpb == pytest.approx(UNIFORM, rel=1e-6)  # the runner's cross-entropy of its logits
    assert [e["step"] for e in events] == [0, 1, 2]
    assert [p["loss"] for p in res.curve] == [3.0, 2.0, 1.0]
    assert [p["tokens"] for p in res.curve] == [64, 128, 192]  # the runner's count, not the child's
    assert (res.steps, res.tokens, res.params, res.flops) == (3, 192, 1000, 192 * 5000.0)
    assert res.eval_tokens == 4096 and res.budget == "2s" and res.seed == 42
    assert 0 < res.wall_seconds < 20
    assert "training done" in Path(res.log_path).read_text()
    assert Path(res.extra["workdir"], "train.py").read_text().startswith(FAKE_HARNESS[:20])
    _assert_nothing_left(res)


SAYS_ITS_THREADS = """
    print("OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset"))
    step(0)
    result()
"""


def _threads_seen(res: RunResult) -> str:
    assert res.status == "ok", res.reason
    return re.search(r"OMP_NUM_THREADS=(\S+)", Path(res.log_path).read_text()).group(1)


def test_a_cpu_run_trains_on_the_cores_other_processes_leave_free(unchecked, tmp_path, monkeypatch):
    # bench/threads.py: on a 2-core machine 2 threads trained 6x slower than 1 while another
    # process kept one core busy; every core busy here, so the run must get one thread
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("AUTORESEARCH_CPU_THREADS", raising=False)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.5)
        res = run(fake(SAYS_ITS_THREADS), tmp_path)
    finally:
        for sp in spinners:
            sp.kill()
            sp.wait()
    assert _threads_seen(res) == "1" and res.extra["cpu_threads"] == 1
    assert "kept busy by other processes" in res.extra["cpu_threads_why"]


def test_a_thread_count_the_user_sets_is_kept(unchecked, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    res = run(fake(SAYS_ITS_THREADS), tmp_path)
    assert _threads_seen(res) == "3" and res.extra["cpu_threads"] == 3
    assert "set by you" in res.extra["cpu_threads_why"]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("AUTORESEARCH_CPU_THREADS", "2")
    assert _threads_seen(run(fake(SAYS_ITS_THREADS), tmp_path / "b")) == "2"
    monkeypatch.setenv("AUTORESEARCH_CPU_THREADS", "torch")   # torch's own default: nothing set
    res = run(fake(SAYS_ITS_THREADS), tmp_path / "c")
    assert _threads_seen(res) == "unset" and res.extra["cpu_threads"] is None
    monkeypatch.setenv("AUTORESEARCH_CPU_THREADS", "many")
    with pytest.raises(ValueError, match="AUTORESEARCH_CPU_THREADS must be auto, torch or a positive number"):
        run_budgeted(fake(SAYS_ITS_THREADS), "2s", workdir=tmp_path / "d")


def test_busy_cores_counts_other_processes_not_this_one():
    cores, idle_busy = runner.busy_cores(0.3)
    assert cores == len(os.sched_getaffinity(0))
    spin = threading.Event()

    def burn():   # this process's own CPU time is not "other processes"
        while not spin.is_set():
            pass

    t = threading.Thread(target=burn)
    t.start()
    try:
        _, own_busy = runner.busy_cores(0.3)
    finally:
        spin.set()
        t.join()
    assert own_busy < idle_busy + 0.5
    sp = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        _, other_busy = runner.busy_cores(0.3)
    finally:
        sp.kill()
        sp.wait()
    assert other_busy > 0.7


def test_auto_threads_count_physical_cores_and_the_cgroup_quota(tmp_path, monkeypatch):
    # torch's own default is the physical cores; a container's CPU quota caps what runs at once
    sysfs = tmp_path / "sys"
    for cpu in range(4):   # 2 cores x 2 SMT threads: cpu0+cpu2, cpu1+cpu3
        topo = sysfs / f"devices/system/cpu/cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(f"{cpu % 2},{cpu % 2 + 2}\n")
    assert runner.physical_cores({0, 1, 2, 3}, sysfs=str(sysfs)) == 2
    assert runner.physical_cores({0, 2}, sysfs=str(sysfs)) == 1
    assert runner.physical_cores({0, 1}, sysfs=str(tmp_path / "none")) == 2   # no sysfs: logical CPUs
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text("0::/box\n")
    (cg / "box").mkdir(parents=True)
    (cg / "box/cpu.max").write_text("max 100000\n")
    assert runner.cpu_quota(str(proc), str(cg)) is None
    (cg / "box/cpu.max").write_text("150000 100000\n")
    assert runner.cpu_quota(str(proc), str(cg)) == 1.5
    (proc / "self/cgroup").write_text("4:cpu,cpuacct:/box\n")                   # cgroup v1
    (cg / "cpu,cpuacct/box").mkdir(parents=True)
    (cg / "cpu,cpuacct/box/cpu.cfs_quota_us").write_text("300000\n")
    (cg / "cpu,cpuacct/box/cpu.cfs_period_us").write_text("100000\n")
    assert runner.cpu_quota(str(proc), str(cg)) == 3.0

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("AUTORESEARCH_CPU_THREADS", raising=False)

    def machine(logical, physical, busy, quota=None):
        monkeypatch.setattr(runner, "busy_cores", lambda: (logical, busy))
        monkeypatch.setattr(runner, "physical_cores", lambda: physical)
        monkeypatch.setattr(runner, "cpu_quota", lambda: quota)
        return runner.cpu_threads()

    assert machine(16, 8, 0.0) == (8, "8 cores (16 logical), 0.0 kept busy by other processes")
    assert machine(16, 8, 8.0)[0] == 4           # half the logical CPUs busy: half the cores
    assert machine(2, 2, 1.0)[0] == 1
    n, why = machine(64, 64, 30.0, quota=2.0)    # a 2-CPU container on a big host
    assert n == 2 and "cgroup quota 2 CPUs" in why
    assert machine(64, 64, 63.0, quota=2.0)[0] == 1


def test_candidate_may_be_a_path_or_a_proposal(unchecked, tmp_path):
    src = fake("step(0); result()\n")
    path = tmp_path / "cand.py"
    path.write_text(src)
    assert run(path, tmp_path).val_bpb == pytest.approx(UNIFORM)
    assert run(str(path), tmp_path).val_bpb == pytest.approx(UNIFORM)

    class Proposal:
        source = src
    assert run(Proposal(), tmp_path).val_bpb == pytest.approx(UNIFORM)


def test_raising_callback_does_not_end_the_run(unchecked, tmp_path):
    def bad(event):
        raise RuntimeError("plot broke")
    res = run(fake("step(0); step(1); result()\n"), tmp_path, on_event=bad)
    assert res.status == "ok"
    assert "plot broke" in res.extra["on_event_error"]


def test_slow_callback_never_blocks_the_child(unchecked, tmp_path):
    # 3000 step messages (~500 KB) overflow the pipe many times over: if the channel
    # waited on the callback, the child would block and hit the hard limit.
    release = threading.Event()
    res = run(fake("for i in range(3000):\n    step(i)\nresult()\n"), tmp_path, budget="100M-tokens",
              hard_limit=20, on_event=lambda e: release.wait(30))
    release.set()
    assert res.status == "ok", res.reason
    assert len(res.curve) == 3000


# --------------------------------------------------------------------------- crashes


def test_syntax_error_is_a_crash_with_the_line_and_never_runs(kit_env, tmp_path):
    res = run("import torch\nx = 1\ndef f(:\n    pass\n", tmp_path)
    assert res.status == "crash"
    assert "SyntaxError" in res.reason and "line 3" in res.reason
    assert "exit_code" not in res.extra  # no process was started


def test_exception_at_import_is_a_crash_with_the_exception_line(unchecked, tmp_path):
    res = run("import not_a_module_xyz\n", tmp_path)
    assert res.status == "crash"
    assert res.reason == "ModuleNotFoundError: No module named 'not_a_module_xyz'"
    assert "Traceback" in res.log_tail
    _assert_nothing_left(res)


def test_exception_mid_training_keeps_the_curve(unchecked, tmp_path):
    res = run(fake("""
        for i in range(4):
            step(i)
        raise ValueError("shapes do not match at step 4")
    """), tmp_path)
    assert res.status == "crash"
    assert res.reason == "ValueError: shapes do not match at step 4"
    assert len(res.curve) == 4 and res.steps == 4
    assert 'raise ValueError("shapes do not match at step 4")' in res.log_tail
    _assert_nothing_left(res)


def test_allocation_failure_is_a_crash_that_says_out_of_memory(unchecked, tmp_path):
    res = run(fake("step(0)\nbuf = bytearray(1 << 60)\n"), tmp_path)
    assert res.status == "crash"
    assert res.reason.startswith("out of memory") and "MemoryError" in res.reason


def test_nan_loss_is_diverged(unchecked, tmp_path):
    res = run(fake("""
        step(0, 2.5)
        step(1, float("nan"))
        ch.send("fail", {"status": "diverged", "reason": "loss is nan at step 1"})
        sys.exit(3)
    """), tmp_path)
    assert res.status == "diverged"
    assert res.reason == "loss is nan at step 1"
    assert len(res.curve) == 2


def test_logits_that_see_the_next_token_are_invalid(unchecked, tmp_path):
    # The probe rows mixed into the validation batches catch it: not a separate check on random ids.
    res = run(fake("step(0)\nresult(peek=True)\n"), tmp_path)
    assert res.status == "invalid" and res.val_bpb is None
    assert "not causal" in res.reason and "validation row" in res.reason


# --------------------------------------------------------------------------- the clock


def test_busy_loop_is_killed_at_the_hard_limit(unchecked, tmp_path):
    res = run(fake("step(0)\nwhile True:\n    pass\n"), tmp_path, hard_limit=1.5)
    assert res.status == "timeout"
    assert "hard limit of 2 s" in res.reason or "hard limit" in res.reason
    assert 1.5 <= res.wall_seconds < 1.5 + runner.TERM_GRACE_SECONDS + 2
    assert len(res.curve) == 1
    _assert_nothing_left(res)


def test_blocking_sleep_that_ignores_sigterm_is_killed(unchecked, tmp_path):
    res = run(fake("""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)
    """), tmp_path, hard_limit=1.0)
    assert res.status == "timeout"
    assert res.wall_seconds < 1.0 + runner.TERM_GRACE_SECONDS + 2
    _assert_nothing_left(res)


def test_default_hard_limit_leaves_grace_for_startup_and_eval(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_GRACE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_HARD_LIMIT", raising=False)
    from autoresearch_kit.config import Budget
    assert runner._hard_limit(Budget(seconds=300), None, "cuda") == 300 + 90 + 75
    assert runner._hard_limit(Budget(seconds=60), None, "cpu") == 60 + 120 + 15
    assert runner._hard_limit(Budget(tokens=10**6), None, "cuda") == 600
    monkeypatch.setenv("AUTORESEARCH_GRACE", "5")
    assert runner._hard_limit(Budget(seconds=4), None, "cpu") == 4 + 5 + 1
    assert runner._hard_limit(Budget(seconds=4), 2.5, "cpu") == 2.5
    with pytest.raises(ValueError, match="positive"):
        runner._hard_limit(Budget(seconds=4), 0, "cpu")


# --------------------------------------------------------------------------- strays

_FORK = """
    pid = os.fork()
    if pid == 0:
        {child}
        time.sleep(60)
        os._exit(0)
    open("stray.pid", "w").write(str(pid))
    step(0)
    result()
"""


@pytest.mark.parametrize("how, child", [
    ("fork", "pass"),
    ("fork+setsid", "os.setsid()"),
    # setsid and drop stdout: only the environment marker can find it
    ("fork+setsid+closed fds", "os.setsid(); os.closerange(0, 1024)"),
])
def test_children_that_keep_running_are_killed(unchecked, tmp_path, how, child):
    # Without a sandbox (macOS, AUTORESEARCH_SANDBOX=off) the stray hunt is what finds them.
    res = run(fake(_FORK.format(child=child)), tmp_path, sandbox="off")
    pid = int((tmp_path / "work" / "stray.pid").read_text())
    assert res.status == "ok", res.reason
    assert not _alive(pid), f"{how}: pid {pid} survived the run"
    assert pid in res.extra.get("killed_strays", []) or how == "fork"  # the group kill took the plain fork
    _assert_nothing_left(res)


def test_subprocess_in_its_own_session_is_killed(unchecked, tmp_path):
    res = run(fake("""
        import subprocess
        p = subprocess.Popen(["sleep", "60"], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open("stray.pid", "w").write(str(p.pid))
        step(0)
        result()
    """), tmp_path, sandbox="off")
    pid = int((tmp_path / "work" / "stray.pid").read_text())
    assert res.status == "ok"
    assert not _alive(pid)
    assert pid in res.extra["killed_strays"]


def test_a_sandboxed_candidate_leaves_no_process_behind(unchecked, tmp_path, monkeypatch):
    # Its PID namespace dies with it: a double-forked, setsid'd `sleep` with every fd closed too.
    mark = _mark()
    monkeypatch.setenv("AUTORESEARCH_TEST_MARK", mark)
    res = run(fake("""
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.closerange(0, 1024)
                os.execvp("sleep", ["sleep", MARK])
            os._exit(0)
        time.sleep(0.5)
        step(0)
        result()
    """), tmp_path)
    if res.extra["isolation"] != "bwrap":
        pytest.skip("bubblewrap is not available here")
    assert res.status == "ok", res.reason
    assert _marked(mark) == []


# --------------------------------------------------------------------------- output


def test_ten_megabytes_of_output_are_capped_and_do_not_block(unchecked, tmp_path):
    tracemalloc.start()
    try:
        res = run(fake("""
            line = "x" * 99 + "\\n"
            for i in range(100_000):   # 10 MB
                sys.stdout.write(line)
            sys.stdout.write("y" * 3_000_000)  # one 3 MB line, no newline
            print("\\nlast line")
            step(0)
            result()
        """), tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.status == "ok", res.reason
    size = Path(res.log_path).stat().st_size
    assert size <= runner.LOG_HEAD_BYTES + runner.LOG_TAIL_BYTES + 500
    text = Path(res.log_path).read_text()
    assert "bytes of output dropped here" in text and text.rstrip().endswith("last line")
    assert res.extra["output_bytes"] > 13_000_000
    assert peak < 12 * 2**20, f"the caller held {peak / 2**20:.1f} MiB while reading the output"


# --------------------------------------------------------------------------- fakes


def test_printed_summary_is_not_scored(unchecked, tmp_path):
    res = run(fake("""
        step(0)
        print("---")
        print("val_bpb:          0.500000")
        print("training_seconds: 2.0")
    """), tmp_path)
    assert res.status == "invalid" and res.val_bpb is None
    assert "without being scored by the runner" in res.reason and "summary is not trusted" in res.reason


def test_result_file_is_not_scored(unchecked, tmp_path):
    res = run(fake("""
        import json
        step(0)
        json.dump({"status": "ok", "val_bpb": 0.1}, open("result.json", "w"))
        open("results.tsv", "w").write("commit\\tval_bpb\\nabc\\t0.1\\n")
    """), tmp_path)
    assert res.status == "invalid" and res.val_bpb is None


def test_garbage_and_made_up_messages_on_the_socket_score_nothing(unchecked, tmp_path):
    # What a candidate can do with the socket: say anything. Only the runner makes a score.
    res = run(fake("""
        ch.send("score", {"val_bpb": 0.1})
        ch.send("result", {"status": "ok", "val_bpb": 0.1})
        os.write(ch.sock.fileno(), b"\\xff" * 64)
    """), tmp_path)
    assert res.status == "invalid" and res.val_bpb is None
    assert "does not know" in res.reason


def test_eval_tokens_are_the_runners_whatever_the_child_sets(unchecked, tmp_path):
    # A computed name evades the static check; the child's environment no longer decides anything.
    res = run("import os\nos.environ['AUTORE' + 'SEARCH_EVAL_TOKENS'] = '64'\n" + fake("step(0)\nresult()\n"), tmp_path)
    assert res.status == "ok", res.reason
    assert res.eval_tokens == 4096 and res.extra["eval"]["bytes"] > 3000


def test_monkeypatched_evaluation_is_invalid_before_running(kit_env, tmp_path):
    res = run("""
from autoresearch_kit import harness
harness.metric.evaluate_bpb = lambda *a, **k: 0.1
run = harness.start()
run.finish(None)
""", tmp_path)
    assert res.status == "invalid"
    assert "line 3: assigns to harness.metric.evaluate_bpb" in res.reason
    assert "exit_code" not in res.extra  # never started
    assert "Not run" in Path(res.log_path).read_text()


# --------------------------------------------------------------------------- stopping

_FOREVER = """
    import subprocess
    p = subprocess.Popen(["sleep", MARK], stdin=subprocess.DEVNULL)
    open("stray.pid", "w").write(str(p.pid))
    i = 0
    while True:
        step(i)
        i += 1
        time.sleep(0.05)
"""


def test_stop_event_aborts_and_kills_the_group(unchecked, tmp_path, monkeypatch):
    mark = _mark()
    monkeypatch.setenv("AUTORESEARCH_TEST_MARK", mark)
    stop = threading.Event()

    def on_event(e):
        if e["step"] >= 3:
            stop.set()
    res = run(fake(_FOREVER), tmp_path, on_event=on_event, stop=stop)
    assert res.status == "aborted" and "stop" in res.reason
    assert len(res.curve) >= 4
    assert _marked(mark) == []
    _assert_nothing_left(res)


def test_keyboard_interrupt_returns_aborted_and_leaves_nothing(tiny_data, tmp_path):
    work = tmp_path / "work"
    mark = _mark()
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from autoresearch_kit import integrity, runner
        integrity.check_source = lambda source: []
        res = runner.run_budgeted({fake(_FOREVER)!r}, "30s", workdir={str(work)!r}, data_dir={str(tiny_data)!r},
                                  device="cpu", hard_limit=60)
        print(json.dumps({{"status": res.status, "reason": res.reason, "curve": len(res.curve),
                          "pid": res.extra["pid"], "run_id": res.extra["run_id"]}}))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AUTORESEARCH_TEST_MARK": mark})
    try:
        deadline = time.monotonic() + 30
        while not _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["status"] == "aborted" and "KeyboardInterrupt" in got["reason"]
    assert got["curve"] >= 1
    assert not _alive(got["pid"])
    assert _marked(mark) == []
    assert _run_id_processes(got["run_id"]) == []


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_ctrl_c_again_during_cleanup_still_leaves_nothing(unchecked, tmp_path, monkeypatch):
    """A second Ctrl-C while the run is being cleaned up: aborted, no process/thread/fd left."""
    real, calls = runner._cleanup, []

    def cleanup_cut_short(*args):
        calls.append(args)
        if len(calls) == 1:
            raise KeyboardInterrupt        # the user presses Ctrl-C again just then
        return real(*args)

    monkeypatch.setattr(runner, "_cleanup", cleanup_cut_short)
    mark = _mark()
    monkeypatch.setenv("AUTORESEARCH_TEST_MARK", mark)
    fds, threads = _open_fds(), set(threading.enumerate())
    res = run(fake("""
        import subprocess
        p = subprocess.Popen(["sleep", MARK], stdin=subprocess.DEVNULL)
        step(0)
        result()
    """), tmp_path, on_event=lambda e: None)
    assert res.status == "aborted" and "KeyboardInterrupt" in res.reason
    assert len(calls) == 2                                      # the hunt for strays was done again
    assert _marked(mark) == []
    deadline = time.monotonic() + 2                             # the dispatcher drops what is queued
    while not set(threading.enumerate()) <= threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(threading.enumerate()) <= threads                # readers and dispatcher ended
    assert _open_fds() == fds                                   # pipes and log closed
    assert res.log_path and Path(res.log_path).is_file()


def test_unwritable_log_path_raises_and_leaks_nothing(unchecked, tmp_path):
    fds = _open_fds()
    with pytest.raises(PermissionError, match="writable file"):
        run_budgeted(fake("result()\n"), "2s", workdir=tmp_path / "w", log_path=tmp_path, device="cpu")
    assert _open_fds() == fds


def _children(pid: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:                                  # not a process, or gone meanwhile
            continue
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(p.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_training_child_dies_with_a_killed_runner(tiny_data, tmp_path):
    """kill -9 of the process running run_budgeted (a dead kernel): the child goes too."""
    work = tmp_path / "work"
    mark = _mark()
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        from autoresearch_kit import integrity, runner
        integrity.check_source = lambda source: []
        runner.run_budgeted({fake(_FOREVER)!r}, "60s", workdir={str(work)!r}, data_dir={str(tiny_data)!r},
                            device="cpu", hard_limit=120)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "AUTORESEARCH_TEST_MARK": mark})
    child = None
    try:
        deadline = time.monotonic() + 30
        while not _marked(mark):                       # the child is training
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the candidate did not start within 30 s"
            time.sleep(0.05)
        # the training process: the runner's child, or its grandchild through the fork server
        kids = _children(proc.pid)
        kids += [g for k in kids for g in _children(k)]
        kids = sorted(set(kids + [g for k in kids for g in _children(k)]))  # bwrap adds two levels
        child = next(k for k in kids if "train.py" in Path(f"/proc/{k}/cmdline").read_text())
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while (_alive(child) or _marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the training child outlived its killed runner"
        assert _marked(mark) == [], "a process the candidate started outlived the killed runner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in [child] + _marked(mark):
            if pid and _alive(pid):          # leave nothing behind even when the test fails
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- broken setup


def test_missing_data_raises_with_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python prepare.py"):
        run_budgeted("print(1)\n", "2s", data_dir=tmp_path / "nothing", workdir=tmp_path / "w", device="cpu")


def test_unwritable_workdir_raises(kit_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="writable directory"):
        run_budgeted("print(1)\n", "2s", workdir=blocker / "sub", device="cpu")


# --------------------------------------------------------------------------- end to end
# The real train.py and harness on the tiny data, made tiny by editing its UPPER_CASE
# knobs, as an agent would. A token budget keeps the work fixed on a busy machine.

TINY = {"CPU_DEPTH": 1, "CPU_SEQ_LEN": 32, "CPU_BATCH_SIZE": 4, "ASPECT_RATIO": 32, "HEAD_DIM": 16}
E2E_BUDGET = "1280-tokens"  # 10 steps of 4 x 32


def tiny_train(**edits: str) -> str:
    src = (REPO / "train.py").read_text()
    for name, value in TINY.items():
        src, n = re.subn(rf"^{name} = \S+", f"{name} = {value}", src, flags=re.M)
        assert n == 1, f"train.py no longer has {name}"
    for old, new in edits.items():
        assert old in src, f"train.py no longer contains {old!r}"
        src = src.replace(old, new)
    return src


def test_real_train_py_is_scored(kit_env, tmp_path):
    events = []
    res = run(tiny_train(), tmp_path, budget=E2E_BUDGET, hard_limit=120, on_event=events.append)
    assert res.status == "ok", res.reason + "\n" + res.log_tail
    assert 0 < res.val_bpb < 12
    assert res.tokens == 1280 and res.steps == 3 + 10   # 3 warm-up steps on random ids, not counted
    assert res.eval_tokens == 4096 and res.params > 0 and res.flops > 0
    assert events and events[-1]["step"] == 3 + 9  # train.py counts its warm-up steps
    assert res.device.startswith("cpu") and res.torch_version
    assert "val_bpb:" in Path(res.log_path).read_text()  # the human summary is still printed
    _assert_nothing_left(res)


def test_a_bug_in_the_runners_evaluation_ends_the_run_at_once(kit_env, tmp_path, monkeypatch):
    # The child waits for the runner's answer: a runner that fails must hang up on it, not
    # leave it waiting until the hard limit (it used to take the whole 120 s).
    from autoresearch_kit import serve

    def broken(self):
        raise NameError("name 'torch' is not defined")

    monkeypatch.setattr(serve.RunServer, "_evaluate", broken)
    res = run(tiny_train(), tmp_path, budget=E2E_BUDGET, hard_limit=120)
    assert res.status == "invalid" and "the runner could not answer the child: NameError" in res.reason
    assert res.wall_seconds < 60, res.wall_seconds


def test_real_non_causal_model_is_invalid(kit_env, tmp_path):
    res = run(tiny_train(**{"is_causal=True": "is_causal=False"}), tmp_path, budget=E2E_BUDGET, hard_limit=120)
    assert res.status == "invalid" and res.val_bpb is None
    assert "not causal" in res.reason


def test_real_nan_loss_is_diverged(kit_env, tmp_path):
    res = run(tiny_train(**{"    scaler.scale(loss).backward()": '    loss = loss * float("nan")\n    scaler.scale(loss).backward()'}),
              tmp_path, budget=E2E_BUDGET, hard_limit=120)
    assert res.status == "diverged", res.reason
    assert "nan" in res.reason.lower()


def test_real_train_py_cannot_change_what_it_is_scored_on(kit_env, tmp_path):
    # Computed names slip past the static check; the environment of the child decides nothing.
    src = 'import os\nos.environ.update({"".join(["AUTORE", "SEARCH_EVAL_TOKENS"]): "64"})\n' + tiny_train()
    assert integrity.check_source(src) == []
    res = run(src, tmp_path, budget=E2E_BUDGET, hard_limit=120)
    assert res.status == "ok", res.reason
    assert res.eval_tokens == 4096


def test_ctrl_c_while_the_child_is_starting_aborts_and_leaves_nothing(tiny_data, tmp_path, monkeypatch):
    """A Ctrl-C during start-up (the fork server can take seconds) is an aborted run, not a traceback,
    and a child that did start by then is ended."""
    started = []

    def slow_spawn(cwd, env, stdout_fd, channel_fd, device_type):
        # as if the server had forked the child, then the user pressed Ctrl-C
        started.append(subprocess.Popen(["sleep", "60"], env=env, start_new_session=True))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.forkserver, "spawn", slow_spawn)
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    res = run_budgeted(fake(_FOREVER), "60s", workdir=tmp_path / "w", data_dir=tiny_data, device="cpu",
                       sandbox="off")
    assert res.status == "aborted" and "starting" in res.reason
    assert started[0].wait(timeout=5) == -signal.SIGKILL


# --------------------------------------------------------------------------- the scored set (issue 11)

BIGRAM_TRAIN = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from autoresearch_kit import harness

    class Bigram(nn.Module):   # logits of a row do not depend on the rest of its batch
        def __init__(self, vocab):
            super().__init__()
            g = torch.Generator().manual_seed(7)
            self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2.0)

        def forward(self, idx):
            return self.table[idx]

    run = harness.start()
    model = Bigram(run.vocab_size)
    loader = run.train_loader(4, 32)
    step = 0
    while run.training(tokens=128):
        x, y = next(loader)
        run.log(step=step, loss=1.0)
        step += 1
    run.finish(model)
''')


def test_the_runners_score_is_the_metrics_to_the_bit(kit_env, tmp_path, monkeypatch):
    # The runner (secret order, probes mixed in, pipelined batches, chunked float32
    # cross-entropy) and metric.evaluate_bpb_detail (in order, no probes) give the same
    # bits on the same model: one scored set, one arithmetic. Whole val split by default.
    from autoresearch_kit.data.shards import PreparedData
    from autoresearch_kit.metric import evaluate_bpb_detail

    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS")
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    monkeypatch.setattr("autoresearch_kit.serve.LOGIT_BUDGET", {"cpu": 40 * 32 * 257})  # many batches
    res = run(BIGRAM_TRAIN, tmp_path, budget="512-tokens", hard_limit=120)
    assert res.status == "ok", res.reason + res.log_tail
    data = PreparedData.open(kit_env)
    ns: dict = {}
    exec(BIGRAM_TRAIN.split("run = harness.start()")[0], ns)
    ref = evaluate_bpb_detail(ns["Bigram"](data.vocab_size), data, seq_len=32)
    assert res.eval_tokens == len(data.val) - 1 == ref["tokens"]           # the whole split
    assert res.extra["eval"]["scored"] == "all" and res.extra["eval"]["seq_len"] == 32
    assert res.extra["eval"]["nats"] == ref["nats"] and res.extra["eval"]["bytes"] == ref["bytes"]
    assert res.val_bpb == ref["bpb"]
    assert res.extra["eval"]["probes"] > 5                                   # it did use several batches
    again = run(BIGRAM_TRAIN, tmp_path, budget="512-tokens", hard_limit=120)
    assert again.val_bpb == res.val_bpb                                      # another secret order, same bits


def test_the_pinned_context_is_the_one_scored_whatever_train_py_trains_at(kit_env, tmp_path):
    # An agent lowering SEQ_LEN does not change the evaluation context; the real train.py
    # builds its RoPE table for max(SEQ_LEN, run.eval_seq_len) and is scored at the pin.
    src = tiny_train().replace("CPU_SEQ_LEN = 32", "CPU_SEQ_LEN = 16")
    res = run(src, tmp_path, budget="640-tokens", hard_limit=120, eval_seq_len=48)
    assert res.status == "ok", res.reason + "\n" + res.log_tail
    assert res.extra["eval"]["seq_len"] == 48 and res.extra["eval"]["seq_len_from"] == "pinned"
    plain = run(src, tmp_path, budget="640-tokens", hard_limit=120)          # no pin: the last loader's, as before
    assert plain.status == "ok" and plain.extra["eval"]["seq_len"] == 16
    assert plain.extra["eval"]["seq_len_from"] == "train.py's last loader"


def test_a_model_that_cannot_take_the_pinned_context_says_so(kit_env, tmp_path):
    src = tiny_train(**{"max(SEQ_LEN, run.eval_seq_len)": "SEQ_LEN"})        # RoPE only for its own SEQ_LEN
    res = run(src, tmp_path, budget="640-tokens", hard_limit=120, eval_seq_len=64)
    assert res.status == "crash"
    assert "pinned evaluation context" in res.reason and "64" in res.reason, res.reason
    assert "max(SEQ_LEN, run.eval_seq_len)" in res.reason


def test_eval_settings_a_lab_pins_come_from_the_baseline_train_py(monkeypatch):
    src = (REPO / "train.py").read_text()
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS", raising=False)
    monkeypatch.delenv("AUTORESEARCH_EVAL_SEQ_LEN", raising=False)
    assert runner.eval_settings(src, "cpu") == {"tokens": None, "seq_len": 256,
                                                "seq_len_from": "CPU_SEQ_LEN of the baseline train.py (cpu)"}
    assert runner.eval_settings(src, "cuda")["seq_len"] == 2048
    assert runner.eval_settings("SEQ_LEN = 512\n", "cuda")["seq_len"] == 512
    assert runner.eval_settings("x = 1\n", "cpu")["seq_len_from"] == "the default for cpu"
    monkeypatch.setenv("AUTORESEARCH_EVAL_SEQ_LEN", "128")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "1000")
    assert runner.eval_settings(src, "cpu") == {"tokens": 1000, "seq_len": 128,
                                                "seq_len_from": "AUTORESEARCH_EVAL_SEQ_LEN"}
    monkeypatch.setenv("AUTORESEARCH_EVAL_SEQ_LEN", "-3")
    with pytest.raises(ValueError, match="AUTORESEARCH_EVAL_SEQ_LEN must be a positive"):
        runner.eval_settings(src, "cpu")


def _serve_eval(data, device_type: str, peek_from: int | None = None) -> tuple[dict, list[str]]:
    """The runner's evaluation (a RunServer on a real socketpair) against a bigram child on a thread.

    From batch `peek_from` on, the child's logits at t look at the input at t + 1 (it sees
    the target). Returns the server's outcome and what the child saw, in order.
    """
    import mmap as _mmap
    import socket

    import numpy as np
    import torch

    from autoresearch_kit import config
    from autoresearch_kit.serve import RunServer
    from autoresearch_kit.wire import Conn

    ours, theirs = socket.socketpair()
    V = data.vocab_size
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3))
    seen: list[str] = []

    def child() -> None:
        ch = Conn(theirs)
        ch.send("hello", {"device": device_type, "pid": os.getpid()})
        ch.recv()
        ch.send("finish", {"params": 1})
        shm, batch = None, 0
        while True:
            kind, h, p = ch.recv()
            seen.append(kind)
            if kind != "val":
                break
            rows, L = h["rows"], h["seq_len"]
            ids = torch.from_numpy(np.frombuffer(p, dtype=np.uint16).astype(np.int64)).view(rows, L)
            if peek_from is not None and batch >= peek_from:
                ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
            n = rows * L * V * 4
            if shm is None:
                ch.send("need", {"bytes": n})
                kind2, h2, _p, fds = ch.recv(with_fds=True)
                if kind2 != "buffer":
                    seen.append(kind2)
                    break
                shm = _mmap.mmap(fds[0], h2["bytes"])
            torch.frombuffer(shm, dtype=torch.float32, count=rows * L * V).view(rows * L, V).copy_(table[ids.reshape(-1)])
            ch.send("logits", {"shape": [rows, L, V], "dtype": "float32"})
            batch += 1
        theirs.close()

    server = RunServer(Conn(ours), data, budget=config.Budget(tokens=10**6), seed=1, device_type=device_type,
                       eval_tokens=None, eval_seq_len=32)
    t = threading.Thread(target=child, daemon=True)
    t.start()
    server.serve()
    t.join(10)
    ours.close()
    return server.outcome(), seen


@pytest.mark.parametrize("peek_from", [None, 0, 3])
def test_the_pipelined_gpu_evaluation_scores_and_catches_what_the_cpu_one_does(tiny_data, monkeypatch, peek_from):
    # On a GPU run the runner sends batch i+1 before scoring batch i; the score must be the
    # same bits as the CPU run's (one batch at a time), and a model that starts peeking in a
    # later batch is still caught, with the batch already sent answered and ignored.
    from autoresearch_kit.data.shards import PreparedData

    data = PreparedData.open(tiny_data)
    monkeypatch.setattr("autoresearch_kit.serve.LOGIT_BUDGET", {"cpu": 64 * 32 * 257, "cuda": 64 * 32 * 257})
    gpu, seen = _serve_eval(data, "cuda", peek_from)
    cpu, seen_cpu = _serve_eval(data, "cpu", peek_from)
    if peek_from is None:
        assert gpu["result"] and cpu["result"] and seen[-1] == "score"
        assert gpu["result"]["val_bpb"] == cpu["result"]["val_bpb"]
        assert gpu["result"]["eval_tokens"] == len(data.val) - 1 and gpu["result"]["probes"] >= 5
    else:
        for out in (gpu, cpu):
            assert out["result"] is None and "not causal" in out["invalid"]
        assert seen[-1] == "invalid" and not gpu["violations"]
        # Batch 0 is the recheck rows (training text, no probes), batch 1 the first validation
        # rows, whose probes come in batch 2: a peek that starts by then is caught there, a
        # later one in its first batch. Pipelined: the next batch had gone out before the bad
        # one was scored; not on a CPU run.
        caught = max(peek_from, 2)
        assert seen.count("val") == caught + 2 and seen_cpu.count("val") == caught + 1
