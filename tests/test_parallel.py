"""Batches in parallel through Dask: a local cluster, a "two-machine" cluster, faults.

Every run is real (the runner, the sandbox, a tiny GPT on the tiny fixture data); the
clusters are real Dask schedulers and workers on 127.0.0.1. The "two-machine" cluster is
a `dask scheduler` and `dask worker` processes, each worker in its own working directory
and cache, and (under bubblewrap) unable to see the driver's data directory, so the
prepared data can only reach it through the driver's shipment.

    python -m pytest tests/test_parallel.py -x -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_lab import BUDGET, LRProposer, base_lab, lab_dir  # noqa: F401 (fixtures)

from autoresearch_kit import parallel
from autoresearch_kit.lab import Lab
from autoresearch_kit.ledger import TSV_NAME


def test_a_batch_of_two_runs_at_once_on_two_local_workers(lab_dir):
    threads_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with Lab(lab_dir, budget=BUDGET, proposer=LRProposer(), verbose=False) as lab:
        parent = lab.parent_id
        seen: dict[str, list[float]] = {}   # exp_id -> arrival times of its step events
        recs = lab.step(parallel=2, on_event=lambda e: seen.setdefault(e["exp_id"], []).append(time.monotonic()))
        assert len(recs) == 2
        a, b = recs
        assert a["source_hash"] != b["source_hash"]                     # two different proposals
        assert a["parent_id"] == b["parent_id"] == parent
        assert a["status"] == b["status"] == "ok", (a["reason"], b["reason"])
        assert {a["extra"]["worker"], b["extra"]["worker"]} and a["extra"]["worker"] != b["extra"]["worker"]
        assert set(seen) == {a["id"], b["id"]} and min(map(len, seen.values())) >= 2  # live events of both
        ea, eb = a["extra"], b["extra"]   # each run's start and end on its worker (unix time)
        assert ea["worker_began"] < eb["worker_ended"] and eb["worker_began"] < ea["worker_ended"], \
            "the two runs did not run at the same time"
        # one decision per run; at most one kept, and it is the better that beat the parent
        assert a["decision"] and b["decision"]
        kept = [r for r in recs if r["decision"] == "keep"]
        parent_bpb = lab.ledger.get(parent)["val_bpb"]
        if kept:
            (k,) = kept
            assert k["val_bpb"] == min(a["val_bpb"], b["val_bpb"]) < parent_bpb
            assert lab.parent_id == k["id"]
        else:
            assert lab.parent_id == parent
        # the second proposal saw the first as a sibling in its history
        ctx = lab.proposer.contexts[-1]
        assert ctx.history[-1].status == "running" and ctx.history[-1].source_hash == a["source_hash"]
        rows = (lab_dir / TSV_NAME).read_text().splitlines()
        assert sum(a["description"] in r or b["description"] in r for r in rows) == 2
        assert (lab_dir / "runs" / a["id"] / "run.log").is_file()
        # each worker trains on its share of the cores, and says so
        assert all("local worker's share" in r["extra"]["cpu_threads_why"] for r in recs), ea["cpu_threads_why"]
        # a sequential step afterwards still works (on the same workers)
        one = lab.step()
        assert isinstance(one, dict) and one["status"] == "ok"
    # Dask's nanny leaves the driver's environment alone (it would pin every later run to one thread)
    assert {k: os.environ.get(k) for k in threads_env} == threads_env


def test_batch_stop_one_run_the_other_finishes(lab_dir):
    with Lab(lab_dir, budget="6s", proposer=LRProposer(), verbose=False) as lab:
        stopped: list[str] = []

        def on_event(e):
            if not stopped and e.get("step", 0) >= 1:
                stopped.append(e["exp_id"])
                assert lab.stop_run(e["exp_id"])

        recs = lab.step(parallel=2, on_event=on_event)
        by_id = {r["id"]: r for r in recs}
        gone = by_id[stopped[0]]
        other = next(r for r in recs if r["id"] != stopped[0])
        assert gone["status"] == "aborted", gone["reason"]
        assert other["status"] == "ok", other["reason"]
        assert lab.running is None


def test_unreachable_scheduler_fails_in_seconds_naming_it(lab_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with Lab(lab_dir, budget=BUDGET, proposer=LRProposer(), verbose=False, cluster=address) as lab:
        n = len(lab.ledger)
        t0 = time.monotonic()
        with pytest.raises(parallel.ClusterError, match=address.replace(".", r"\.")):
            lab.step(parallel=2)
        assert time.monotonic() - t0 < 20
        assert len(lab.ledger) == n                  # nothing recorded


# ---- a cluster of separate processes ("two machines") -------------------------------------------

def _wait_for(path: Path, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not (path.is_file() and path.stat().st_size > 0):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


@pytest.fixture()
def remote_cluster(tmp_path, tiny_data):
    """A `dask scheduler` and two `dask worker` processes, each worker with its own directory,
    cache and HOME, and (bubblewrap) a tmpfs over the driver's data directory."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is needed to hide the driver's files from the workers")
    sched_file = tmp_path / "scheduler.json"
    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_EVAL_TOKENS="4096", PYTHONUNBUFFERED="1")
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    _wait_for(sched_file)
    address = json.loads(sched_file.read_text())["address"]
    hidden = str(Path(tiny_data).parent)
    workers = []
    for i in range(2):
        home = tmp_path / f"machine{i}"
        (home / "work").mkdir(parents=True)
        wenv = {**env, "HOME": str(home), "AUTORESEARCH_CACHE": str(home / "cache")}
        cmd = ["bwrap", "--dev-bind", "/", "/", "--tmpfs", hidden, "--die-with-parent", "--chdir", str(home / "work"),
               sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
               "--name", f"machine{i}", "--local-directory", str(home / "work"), "--no-dashboard"]
        p = subprocess.Popen(cmd, env=wenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        workers.append(home)
    try:
        yield {"address": address, "homes": workers, "procs": procs}
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_workers(address: str, n: int) -> None:
    import distributed

    with distributed.Client(address, timeout="20s", set_as_default=False) as c:
        c.wait_for_workers(n, timeout=60)


def test_two_machine_cluster_ships_the_data_and_scores_there(lab_dir, remote_cluster):
    from autoresearch_kit.data.prepare import manifest_hash

    address = remote_cluster["address"]
    _wait_workers(address, 2)
    digest = manifest_hash(os.environ["AUTORESEARCH_DATA"])
    with Lab(lab_dir, budget=BUDGET, proposer=LRProposer(), verbose=False, cluster=address) as lab:
        recs = lab.step(parallel=2)
        assert [r["status"] for r in recs] == ["ok", "ok"], [r["reason"] for r in recs]
        for home in remote_cluster["homes"]:   # each "machine" got its own checked copy
            shipped = home / "cache" / "shipped" / digest
            assert (shipped / "manifest.json").is_file() and (shipped / "val.bin").is_file()
        where = {r["extra"]["worker_data"] for r in recs}
        assert all("/shipped/" + digest in w for w in where)
        assert {r["extra"]["worker"].split(" ")[0] for r in recs} == {"machine0", "machine1"}
        for r in recs:   # the record names the machine it ran on, not the driver's alone
            hw = r["hardware"]
            assert hw["worker"] == r["extra"]["worker"] and "hardware" not in r["extra"]
            assert hw["device"] == "cpu" and hw["host"] == socket.gethostname() and hw["cpu_count"] >= 1
            assert hw["device_name"] == hw["cpu"] and hw["cuda"] is None
            assert hw["precision"] in ("bfloat16", "float32") and hw["precision"] == r["extra"]["start"]["precision"]
            assert "python" in hw and "platform" in hw
        for r in recs:   # the log came home with the result
            log = lab_dir / "runs" / r["id"] / "run.log"
            assert log.is_file() and "val_bpb" in log.read_text()
        # the same scores as this machine would give: same data, same seed, same code
        again = lab.ledger.get(recs[0]["id"])
        assert again["extra"]["isolation"] == recs[0]["extra"]["isolation"]


def test_a_worker_killed_mid_run_ends_that_run_aborted_and_the_batch_goes_on(lab_dir, remote_cluster):
    import distributed

    address = remote_cluster["address"]
    _wait_workers(address, 2)
    with distributed.Client(address, set_as_default=False) as c:
        pids = c.run(os.getpid)               # worker address -> pid (bwrap shares the PID namespace here)
    with Lab(lab_dir, budget="8s", proposer=LRProposer(), verbose=False, cluster=address) as lab:
        killed: list[str] = []
        lock = threading.Lock()

        errors: list[BaseException] = []

        def on_event(e):
            with lock:
                if killed or e.get("step", 0) < 1:
                    return
                killed.append(e["exp_id"])
            try:
                assert e["exp_id"] in lab.running["batch"]   # the batch is visible while it runs
                worker = lab._engine._handles[e["exp_id"]].worker
                addr = worker[worker.index("(") + 1:-1]
                os.kill(pids[addr], signal.SIGKILL)
            except BaseException as x:  # noqa: BLE001 - the engine swallows a view's errors: keep them
                errors.append(x)

        recs = lab.step(parallel=2, on_event=on_event)
        assert not errors, errors
        by_id = {r["id"]: r for r in recs}
        dead = by_id[killed[0]]
        other = next(r for r in recs if r["id"] != killed[0])
        assert dead["status"] == "aborted" and "died mid-run" in dead["reason"], dead["reason"]
        assert other["status"] == "ok", other["reason"]
        assert lab.ledger.get(dead["id"])["decision"] == "discard"


def test_cli_run_parallel_records_every_run_of_each_batch(lab_dir):
    """`autoresearch run --parallel 2 --steps 3 --yes`: a batch of 2, then one of 1, all recorded."""
    r = subprocess.run([sys.executable, "-m", "autoresearch_kit", "run", "--lab", str(lab_dir), "--steps", "3",
                        "--parallel", "2", "--yes", "--proposer", "mutate"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch of 2 on 2 local workers" in r.stdout
    with Lab(lab_dir, verbose=False) as lab:
        cands = [x for x in lab.ledger.records(curves=False) if x["kind"] == "candidate"]
        assert len(cands) == 3 and all(x["status"] == "ok" and x["decision"] for x in cands)
        assert len({x["source_hash"] for x in cands}) == 3
        assert sum(x["decision"] == "keep" for x in cands[:2]) <= 1     # a batch keeps at most its best
        assert all(x["decided_by"] == "autopilot" for x in cands)
    rows = (lab_dir / TSV_NAME).read_text().splitlines()
    assert len(rows) == 1 + 1 + 3                                          # header, baseline, 3 runs


_DRIVER = """
import sys
from autoresearch_kit.lab import Lab
from test_lab import LRProposer

if __name__ == "__main__":
    with Lab(sys.argv[1], budget="30s", proposer=LRProposer(), verbose=False) as lab:
        lab.step(parallel=2)
"""


def _strays(marker: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace") or \
                        marker in (p / "environ").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_a_killed_driver_leaves_its_batch_aborted_and_no_process_behind(lab_dir, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    marker = f"AR_TEST_DRIVER_{os.getpid()}_{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "AR_TEST_MARKER": marker}
    p = subprocess.Popen([sys.executable, str(script), str(lab_dir)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:   # wait until both runs train (their logs have steps), then kill -9 the driver
        while sum("step" in (f.read_text(errors="replace")) for f in (lab_dir / "runs").glob("*/run.log")) < 2:
            assert p.poll() is None and time.monotonic() - t0 < 120, "the batch never started"
            time.sleep(0.5)
    finally:
        p.kill()
        p.wait()
    t1 = time.monotonic()
    while _strays(marker) and time.monotonic() - t1 < 30:    # workers and runs end once the driver is gone
        time.sleep(0.5)
    assert not _strays(marker), "processes of the killed driver's batch are still running"
    with Lab(lab_dir, verbose=False) as lab:
        assert len(lab.recovered) == 2
        for exp_id in lab.recovered:
            assert lab.ledger.get(exp_id)["status"] == "aborted"


def _line(src: str, name: str) -> str:
    return next(ln for ln in src.splitlines() if ln.startswith(f"{name} = "))


def test_a_batch_llm_sees_the_proposals_before_it_and_mutate_draws_different_moves(tmp_path, kit_env):
    """propose_batch makes N different proposals; the LLM's second prompt lists the first (no run needed)."""
    from fake_openai import FakeOpenAI, Reply

    from conftest import tiny_train_source

    src = tiny_train_source()
    (tmp_path / "train.py").write_text(src)
    a, b = _line(src, "MATRIX_LR"), _line(src, "EMBED_LR")
    replies = [Reply(f"DESCRIPTION: MARKER-ONE matrix lr up\nRATIONALE: r.\n\ntrain.py\n<<<<<<< SEARCH\n{a}\n=======\n"
                     f"{a.replace('0.02', '0.03', 1)}\n>>>>>>> REPLACE\n"),
               Reply(f"DESCRIPTION: embed lr down\nRATIONALE: r.\n\ntrain.py\n<<<<<<< SEARCH\n{b}\n=======\n"
                     f"{b.replace('0.2', '0.1', 1)}\n>>>>>>> REPLACE\n")]
    with FakeOpenAI(replies) as server:
        kw = {"base_url": server.url, "model": "fake-model", "api_key": "sk-test", "edit_mode": "edits",
              "retry_delay": 0.01, "timeout": 5.0}
        with Lab(tmp_path / "lab", train=tmp_path / "train.py", proposer="llm", proposer_kwargs=kw,
                 verbose=False) as lab:
            got = lab.propose_batch(2)
        second = json.dumps(server.chats[1]["body"]["messages"])
    assert [p.description for p in got] == ["MARKER-ONE matrix lr up", "embed lr down"]
    assert "MARKER-ONE" not in json.dumps(server.chats[0]["body"]["messages"])
    assert "MARKER-ONE" in second                    # the first of the batch, shown to the second
    with Lab(tmp_path / "lab2", train=tmp_path / "train.py", proposer="mutate", verbose=False) as lab:
        batch = lab.propose_batch(4)
    assert len({p.source_hash for p in batch}) == 4 and len({p.description for p in batch}) == 4


def test_the_batch_panel_reviews_runs_and_decides_a_batch(lab_dir):
    """Three proposals shown with their diffs; one skipped with a reason; two run at once, live, decided."""
    from autoresearch_kit.ui import BatchPanel

    with Lab(lab_dir, budget=BUDGET, proposer=LRProposer(), verbose=False) as lab:
        panel = BatchPanel(lab, 3)
        panel.wait(60)
        assert len(panel.cards) == 3, panel.message.value
        assert all("MATRIX_LR" in c.widget.children[1].value for c in panel.cards)     # each card shows its diff
        skipped = panel.cards[2].proposal
        panel.cards[2].choice.value = "skip"
        panel.cards[2].reason.value = "SKIP-REASON too close to the others"
        panel.run_button.click()
        panel.wait(400)
        assert "batch done" in panel.message.value, panel.message.value
        recs = panel.records
        assert len(recs) == 2 and all(r["status"] == "ok" and r["decision"] for r in recs)
        assert set(panel.events) == {r["id"] for r in recs}            # both curves arrived live
        assert panel.image.value[:4] == b"\x89PNG"
        assert all(row.stop.disabled for row in panel.rows.values())  # per-run Stop, done now
        rejected = [r for r in lab.ledger.records(curves=False) if r["status"] == "rejected"]
        assert rejected[-1]["source_hash"] == skipped.source_hash
        assert "SKIP-REASON" in rejected[-1]["decision_reason"]
        kept = [r["id"] for r in recs if r["decision"] == "keep"]
        assert (f"kept {kept[0]}" if kept else "nothing kept") in panel.outcome.value


def test_a_worker_with_other_kit_code_is_refused_before_anything_is_recorded(lab_dir, monkeypatch):
    """The driver compares its kit's code hash with each worker's: another runner must not score."""
    with Lab(lab_dir, budget=BUDGET, proposer=LRProposer(), verbose=False) as lab:
        n = len(lab.ledger)
        engine = lab._engine_for(2)
        monkeypatch.setattr(parallel, "_FINGERPRINT", {"version": "0.1.0", "code": "not-the-same", "path": "/x"})
        engine._shipped.clear()
        with pytest.raises(parallel.ClusterError, match="runs another autoresearch_kit"):
            lab.step(parallel=2)
        assert len(lab.ledger) == n
