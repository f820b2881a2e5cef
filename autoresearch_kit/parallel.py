"""Experiments in parallel, one per GPU or worker, through Dask distributed.

The driver (a Lab, the CLI) keeps the ledger, git and every decision; a worker only
trains and scores, through the same `runner.run_budgeted` and the same isolation as a
local run. This module is the engine between them:

- `connect(cluster, workers=N, device=...)` gives an `Engine`: with no cluster, a local
  Dask cluster of N worker processes on loopback (on CUDA each pinned to one GPU through
  CUDA_VISIBLE_DEVICES, round-robin when N exceeds the GPUs; on CPU the cores are shared
  out through AUTORESEARCH_CPU_THREADS); with an address ("tcp://host:8786"), a
  `distributed.Client` or a cluster object (dask-jobqueue's SLURMCluster,
  dask-kubernetes' KubeCluster, ...), that cluster. An address that does not answer
  fails within CONNECT_TIMEOUT seconds, naming it.
- `Engine.ensure_data(path)` makes sure every worker has the prepared data the lab is
  pinned to: a worker that sees the same directory with the same manifest hash uses it
  (a shared filesystem), any other gets the files shipped through Dask in chunks into
  its own cache (`<cache>/shipped/<manifest hash>/`), where they are checked against the
  manifest's sha256 before use. A run never trains on data whose hash differs.
- `Engine.submit(...)` starts one run on some worker and returns a `RunHandle`;
  `Engine.wait(handles)` yields them as they finish. Live step events travel back
  through the scheduler's event log (`Worker.log_event` -> `Client.subscribe_topic`)
  and reach the caller's `on_event` on a driver thread while the run trains; a stop
  is a `distributed.Event` the worker polls each second.

Faults: a worker that dies mid-run ends that run `aborted` with the worker named (the
task is never run twice: a local cluster's scheduler allows no retries, and on any
cluster the task refuses to start again once it has started somewhere); the rest of the
batch goes on. Workers should run one task at a time (`dask worker --nthreads 1`): a run
owns its GPU.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from autoresearch_kit import config

CONNECT_TIMEOUT = float(os.environ.get("AUTORESEARCH_CLUSTER_TIMEOUT") or 5.0)   # seconds to reach a scheduler
CHUNK_BYTES = 16 * 2**20        # data is shipped to workers in pieces of this size
STOP_POLL_SECONDS = 1.0         # how often a worker looks at the driver's stop / cancel
SHIPPED = "shipped"             # <cache>/shipped/<manifest hash>/: data a driver sent
TOPIC = "autoresearch-events"   # the event-log topic (one per engine: TOPIC-<token>)


class ClusterError(RuntimeError):
    """The cluster cannot be reached or used (the message says what to do)."""


def _need_distributed():
    try:
        import distributed
    except ImportError:
        msg = ("Parallel runs need Dask distributed: pip install 'autoresearch-kit[parallel]' "
               "(or pip install 'dask[distributed]'), or run one experiment at a time (no --parallel).")
        raise ClusterError(msg) from None
    return distributed


def _gpu_count(device: str) -> int:
    if device != "cuda":
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch/CUDA: treat as none
        return 0


_NANNY_PRE_SPAWN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def local_worker_env(n: int, device: str, gpus: int | None = None, cpus: int | None = None) -> list[dict[str, str]]:
    """The environment of each of `n` local workers: its GPU, or its share of the cores.

    On CUDA worker i sees GPU i mod G only (CUDA_VISIBLE_DEVICES), so a run's device 0 is
    its own GPU. On CPU each worker's training threads (AUTORESEARCH_CPU_THREADS, which
    the runner turns into the run's OMP_NUM_THREADS) get cpus // n cores, at least one, so
    n runs do not fight over every core.
    """
    gpus = _gpu_count(device) if gpus is None else gpus
    cpus = cpus or os.cpu_count() or 1
    out = []
    for i in range(n):
        env = {"AUTORESEARCH_WORKER_INDEX": str(i)}
        if device == "cuda" and gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        else:
            env["AUTORESEARCH_CPU_THREADS"] = str(max(1, cpus // n))
        out.append(env)
    return out


def connect(cluster: Any = None, *, workers: int = 2, device: str = "cpu",
            local_directory: str | os.PathLike | None = None) -> "Engine":
    """An Engine on `cluster`, or on a new local cluster of `workers` processes.

    Parameters
    ----------
    cluster : None, str, distributed.Client or a Dask cluster object
        None: a local cluster on 127.0.0.1 (closed with the engine). A str: a scheduler
        address such as "tcp://10.0.0.5:8786". A Client or cluster: used as it is (a
        cluster object is wrapped in a Client; neither is closed by the engine).
    workers : int
        Local workers to start (ignored with a cluster).
    device : str
        "cuda", "mps" or "cpu": how local workers are pinned.

    Raises
    ------
    ClusterError
        Dask is missing, or the scheduler does not answer within CONNECT_TIMEOUT.
    """
    distributed = _need_distributed()
    if cluster is None:
        return Engine._local(int(workers), device, local_directory)
    if isinstance(cluster, distributed.Client):
        return Engine(cluster, owns=False, shared_fs=False, address=str(cluster.scheduler.address))
    if isinstance(cluster, str):
        address = cluster if "://" in cluster else f"tcp://{cluster}"
        try:
            client = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT}s", set_as_default=False)
        except (OSError, TimeoutError) as e:
            msg = (f"no Dask scheduler answers at {address} (waited {CONNECT_TIMEOUT:g} s: {type(e).__name__}). "
                   f"Start one there (`dask scheduler`, then `dask worker {address} --nthreads 1` per GPU), check "
                   f"the address and port, or leave out --cluster to run on local workers.")
            raise ClusterError(msg) from None
        return Engine(client, owns=True, shared_fs=False, address=address)
    if hasattr(cluster, "scheduler_address"):
        client = distributed.Client(cluster, set_as_default=False)
        return Engine(client, owns=False, shared_fs=False, address=str(cluster.scheduler_address), owns_client=True)
    msg = (f"cluster= takes a scheduler address ('tcp://host:8786'), a distributed.Client or a Dask cluster "
           f"object, not {type(cluster).__name__}.")
    raise TypeError(msg)


class RunHandle:
    """One run submitted to the cluster: its experiment id, future and stop."""

    def __init__(self, exp_id: str, future: Any, stop_name: str, marker: str) -> None:
        self.exp_id = exp_id
        self.future = future
        self.stop_name = stop_name
        self.marker = marker
        self.worker: str | None = None     # where it started, from its first event

    def __repr__(self) -> str:
        return f"RunHandle({self.exp_id!r}, {self.future.status}, worker={self.worker})"


class Engine:
    """A Dask client that runs budgeted experiments on workers (see the module docstring)."""

    def __init__(self, client: Any, *, owns: bool, shared_fs: bool, address: str, cluster: Any = None,
                 owns_client: bool = False) -> None:
        self.client = client
        self.cluster = cluster
        self.address = address
        self.shared_fs = shared_fs          # the workers see the driver's files (a local cluster)
        self._owns = owns                   # close the cluster (local) or the client (an address)
        self._owns_client = owns_client or owns
        self.token = uuid.uuid4().hex[:12]
        self.topic = f"{TOPIC}-{self.token}"
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[dict], Any]] = {}
        self._handles: dict[str, RunHandle] = {}
        self._closed = False
        self._shipped: dict[str, set[str]] = {}   # manifest hash -> workers known to have it
        self._all_workers = _takes_n_workers(client)   # newer schedulers list 5 workers unless asked for all
        client.subscribe_topic(self.topic, self._on_log_event)
        self._dispatcher = threading.Thread(target=self._dispatch, name="autoresearch-cluster-events", daemon=True)
        self._dispatcher.start()

    @classmethod
    def _local(cls, n: int, device: str, local_directory: str | os.PathLike | None) -> "Engine":
        distributed = _need_distributed()
        if n < 1:
            msg = f"parallel needs at least 1 worker, got {n}."
            raise ValueError(msg)
        where = Path(local_directory) if local_directory else config.cache_dir() / "dask-workers"
        where.mkdir(parents=True, exist_ok=True)
        scheduler = {"cls": distributed.Scheduler,
                     "options": {"host": "127.0.0.1", "dashboard": False, "allowed_failures": 0}}
        specs = {}
        for i, env in enumerate(local_worker_env(n, device)):
            specs[f"autoresearch-{i}"] = {"cls": distributed.Nanny, "options": {
                "nthreads": 1, "host": "127.0.0.1", "env": env, "local_directory": str(where),
                "memory_limit": 0, "silence_logs": 40}}
        # A Nanny puts its pre-spawn variables (OMP_NUM_THREADS=1, ...) into *this* process's
        # os.environ before each spawn: the driver's later runs would train on one thread "set by
        # you". None drops them; each run's threads come from the runner (AUTORESEARCH_CPU_THREADS).
        import dask

        keep_environ = {f"distributed.nanny.pre-spawn-environ.{k}": None for k in _NANNY_PRE_SPAWN}
        try:
            with dask.config.set(keep_environ):
                cluster = distributed.SpecCluster(workers=specs, scheduler=scheduler, silence_logs=40,
                                                  name="autoresearch")
            client = distributed.Client(cluster, set_as_default=False)
            client.wait_for_workers(n, timeout=120)
        except Exception as e:  # noqa: BLE001 - say it in one line
            import __main__

            hint = ""
            if getattr(__main__, "__file__", None):   # a script: spawned workers import it again
                hint = (f"; in a script ({Path(__main__.__file__).name}), put the code that runs the lab under "
                        f"`if __name__ == \"__main__\":` (each worker is a new Python process that imports it)")
            msg = f"could not start {n} local Dask workers ({type(e).__name__}: {e}){hint}; or run without parallel."
            raise ClusterError(msg) from None
        return cls(client, owns=True, shared_fs=True, address=str(cluster.scheduler_address), cluster=cluster)

    # ---- workers and data ------------------------------------------------------------------------

    def workers(self) -> dict[str, dict]:
        """{address: {"name", "nthreads"}} of the workers the scheduler knows now."""
        info = (self.client.scheduler_info(n_workers=-1) if self._all_workers
                else self.client.scheduler_info())["workers"]
        return {a: {"name": w.get("name"), "nthreads": w.get("nthreads")} for a, w in info.items()}

    def ensure_data(self, data_path: str | os.PathLike, timeout: float = 600.0) -> str:
        """Make sure every worker has this prepared data (same manifest hash); ship it where not.

        Returns the manifest hash. Raises ClusterError when there is no worker, or a worker
        could not take the data (its message names the worker).
        """
        from autoresearch_kit.data.prepare import manifest_hash

        path = Path(data_path).expanduser().resolve()
        digest = manifest_hash(path)
        workers = list(self.workers())
        if not workers:
            msg = f"the Dask cluster at {self.address} has no workers: start some (`dask worker {self.address} --nthreads 1`)."
            raise ClusterError(msg)
        known = self._shipped.setdefault(digest, set())
        todo = [w for w in workers if w not in known]
        if not todo:
            return digest
        mine = kit_fingerprint()
        theirs = self.client.run(kit_fingerprint, workers=todo)
        other = {w: f for w, f in theirs.items() if (f["version"], f["code"]) != (mine["version"], mine["code"])}
        if other:   # a run must go through the same runner and sandbox code as a local one
            w, f = next(iter(other.items()))
            msg = (f"worker {w} runs another autoresearch_kit ({f['version']}, code {f['code']} at {f['path']}) than "
                   f"this driver ({mine['version']}, code {mine['code']}): install the same kit on every worker "
                   f"(e.g. pip install -e <this checkout>), then run again.")
            raise ClusterError(msg)
        have = self.client.run(worker_has_data, digest, str(path), workers=todo)
        missing = [w for w, where in have.items() if not where]
        if missing:
            self._ship(path, digest, missing, timeout)
        known.update(todo)
        return digest

    def _ship(self, path: Path, digest: str, workers: list[str], timeout: float) -> None:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        names = sorted(manifest.get("files", {}))
        self.client.run(begin_shipment, digest, workers=workers)
        for name in names:
            size = (path / name).stat().st_size
            with open(path / name, "rb") as f:
                for offset in range(0, max(size, 1), CHUNK_BYTES):
                    piece = f.read(CHUNK_BYTES)
                    self.client.run(receive_chunk, digest, name, offset, piece, workers=workers)
        done = self.client.run(seal_shipment, digest, (path / "manifest.json").read_bytes(), workers=workers)
        bad = {w: why for w, why in done.items() if why}
        if bad:
            w, why = next(iter(bad.items()))
            msg = f"worker {w} could not take the prepared data {digest}: {why}"
            raise ClusterError(msg)

    # ---- runs ----------------------------------------------------------------------------------------

    def submit(self, exp_id: str, source: str, budget: Any, *, data_path: str | os.PathLike, digest: str,
               workdir: str | os.PathLike, run_kwargs: dict | None = None,
               on_event: Callable[[dict], Any] | None = None) -> RunHandle:
        """Start one run of `source` on some worker; `on_event` gets its step events on a driver thread."""
        stop_name = f"autoresearch-stop-{self.token}-{exp_id}"
        marker = f"autoresearch-started-{self.token}-{exp_id}"
        spec = {"exp_id": exp_id, "source": source, "budget": str(budget), "data_path": str(data_path),
                "digest": digest, "workdir": str(workdir), "shared_fs": self.shared_fs, "topic": self.topic,
                "stop": stop_name, "marker": marker, "run_kwargs": dict(run_kwargs or {})}
        if on_event is not None:
            self._sinks[exp_id] = on_event
        future = self.client.submit(run_on_worker, spec, key=f"autoresearch-run-{self.token}-{exp_id}",
                                    pure=False, retries=0)
        handle = RunHandle(exp_id, future, stop_name, marker)
        self._handles[exp_id] = handle
        return handle

    def stop(self, handle: RunHandle) -> None:
        """Ask the worker to end this run (it ends ``aborted``, within about a second)."""
        distributed = _need_distributed()
        try:
            distributed.Event(handle.stop_name, client=self.client).set()
        except Exception:  # noqa: BLE001 - a cluster that is gone: the run is gone too
            pass

    def result(self, handle: RunHandle, workdir: str | os.PathLike) -> Any:
        """The RunResult of a finished handle; a lost worker or task gives an ``aborted`` one."""
        from autoresearch_kit.runner import RunResult

        try:
            res, log = handle.future.result()
        except Exception as e:  # noqa: BLE001 - KilledWorker, CommClosedError, CancelledError, ...
            where = f"worker {handle.worker}" if handle.worker else "its worker"
            name = type(e).__name__
            why = (f"{where} died mid-run (killed, out of memory, or its machine went away); the run is not retried"
                   if name in ("KilledWorker", "CommClosedError", "FutureCancelledError", "CancelledError")
                   else f"the cluster lost the run ({name}: {str(e)[:300]})")
            res, log = RunResult(status="aborted", reason=why), b""
        finally:
            self._sinks.pop(handle.exp_id, None)
            self._handles.pop(handle.exp_id, None)
            self._forget(handle)
        if log and not self.shared_fs:   # the worker's log comes home with the result
            wd = Path(workdir)
            wd.mkdir(parents=True, exist_ok=True)
            (wd / "run.log").write_bytes(log)
            res.log_path = str(wd / "run.log")
        return res

    def _forget(self, handle: RunHandle) -> None:
        try:   # scheduler metadata cannot be deleted, only emptied
            self.client.set_metadata(["autoresearch", handle.marker], None)
        except Exception:  # noqa: BLE001 - a cluster that is gone
            pass

    def wait(self, handles: list[RunHandle]) -> Iterator[RunHandle]:
        """Yield the handles as their runs finish (first done, first out)."""
        distributed = _need_distributed()
        by_future = {h.future.key: h for h in handles}
        for fut in distributed.as_completed([h.future for h in handles], loop=self.client.loop):
            yield by_future[fut.key]

    def run(self, exp_id: str, source: str, budget: Any, *, stop: threading.Event | None = None,
            **kw) -> Any:
        """One run, start to end (the sequential path of a lab on a cluster)."""
        handle = self.submit(exp_id, source, budget, **kw)
        while not handle.future.done():
            if stop is not None and stop.wait(0.2):
                self.stop(handle)
                stop = None
            elif stop is None:
                time.sleep(0.2)
        return self.result(handle, kw["workdir"])

    # ---- events --------------------------------------------------------------------------------------

    def _on_log_event(self, event: Any) -> None:
        """Called on the client's event loop: hand over to the dispatcher at once."""
        try:
            _stamp, msg = event
        except (TypeError, ValueError):
            return
        self._events.put(msg)

    def _dispatch(self) -> None:
        while True:
            msg = self._events.get()
            if msg is None:
                return
            if not isinstance(msg, dict):
                continue
            exp_id, event = msg.get("exp"), msg.get("event")
            handle = self._handles.get(exp_id)
            if handle is not None and msg.get("where"):
                handle.worker = msg["where"]
            sink = self._sinks.get(exp_id)
            if sink is not None and isinstance(event, dict) and event.get("kind") != "worker":
                try:
                    sink(event)
                except Exception:  # noqa: BLE001 - a broken view must not stop the others' events
                    pass

    def close(self) -> None:
        """Stop the dispatcher; close the client (and the local cluster) this engine made."""
        if self._closed:
            return
        self._closed = True
        self._events.put(None)
        for h in list(self._handles.values()):
            self.stop(h)
        try:
            if self._owns_client:
                self.client.close(timeout=10)
            if self._owns and self.cluster is not None:
                self.cluster.close(timeout=20)
        except Exception:  # noqa: BLE001 - closing a cluster that is already gone
            pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({self.address}, {len(self.workers())} workers)"


def _takes_n_workers(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


# ---- on the worker ----------------------------------------------------------------------------------
# These run inside Dask workers (client.run / client.submit): the kit is installed there.

_FINGERPRINT: dict | None = None


def kit_fingerprint() -> dict:
    """{"version", "code", "path"}: the kit's version and a hash of its Python sources (the runner,
    the sandbox, the scoring), so the driver can refuse a worker that would run other code."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import hashlib

        import autoresearch_kit

        root = Path(autoresearch_kit.__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _FINGERPRINT = {"version": getattr(autoresearch_kit, "__version__", "?"), "code": h.hexdigest()[:12],
                        "path": str(root)}
    return dict(_FINGERPRINT)


def _shipped_root() -> Path:
    return config.cache_dir() / SHIPPED


def _data_matches(path: Path, digest: str) -> bool:
    from autoresearch_kit.data.prepare import manifest_hash

    try:
        return (path / "manifest.json").is_file() and manifest_hash(path) == digest
    except Exception:  # noqa: BLE001 - unreadable: not the data
        return False


def worker_has_data(digest: str, driver_path: str) -> str | None:
    """Where this worker has the prepared data with this manifest hash, or None.

    Looked for at the driver's path (a shared filesystem), among the data shipped here,
    and among the data this worker prepared itself (the same text and tokenizer give
    the same hash, so `prepare` on a worker is as good as a shipment).
    """
    own = sorted(p for p in (config.cache_dir() / "data").glob("*") if p.is_dir())
    for path in (Path(driver_path), _shipped_root() / digest, config.data_dir(), *own):
        if _data_matches(path, digest):
            return str(path)
    return None


def _incoming(digest: str) -> Path:
    return _shipped_root() / f".incoming-{digest}-{os.getpid()}"


def begin_shipment(digest: str) -> None:
    d = _incoming(digest)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)


def receive_chunk(digest: str, name: str, offset: int, piece: bytes) -> None:
    if "/" in name or name.startswith("."):
        msg = f"refusing a shipped file named {name!r}"
        raise ValueError(msg)
    p = _incoming(digest) / name
    with open(p, "r+b" if p.exists() else "wb") as f:
        f.seek(offset)
        f.write(piece)


def seal_shipment(digest: str, manifest: bytes) -> str:
    """Check the shipped files against their manifest and move them in place; "" or why not."""
    from autoresearch_kit.data.shards import PreparedData

    d = _incoming(digest)
    try:
        (d / "manifest.json").write_bytes(manifest)
        bad = PreparedData.open(d).verify()
        if bad:
            return f"the shipped files {', '.join(bad)} do not match their sha256 in the manifest"
        if not _data_matches(d, digest):
            return "the shipped manifest has another hash"
        final = _shipped_root() / digest
        if _data_matches(final, digest):   # another worker of this machine was first
            shutil.rmtree(d, ignore_errors=True)
            return ""
        shutil.rmtree(final, ignore_errors=True)
        os.replace(d, final)
        return ""
    except OSError as e:
        shutil.rmtree(d, ignore_errors=True)
        return f"{type(e).__name__}: {e}"


def _plain(value: Any) -> Any:
    """A msgpack-safe copy of an event (numpy scalars and the like become floats or text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


_GPU_NAMES: dict[str, str | None] = {}


def worker_hardware(device_type: str) -> dict:
    """What a run on this worker ran on, in `device.hardware_fingerprint`'s keys, found without
    importing torch here (a worker process must not hold a CUDA context): the GPU's name from
    nvidia-smi for the GPU CUDA_VISIBLE_DEVICES pins this worker to, the CPU from /proc/cpuinfo."""
    import importlib.metadata
    import platform
    import socket

    from autoresearch_kit.config import cpu_name

    out: dict[str, Any] = {"device": device_type or None, "host": socket.gethostname(), "cpu": cpu_name(),
                           "cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "platform": sys.platform}
    try:
        out["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device_type == "cpu":
        out["device_name"] = out["cpu"]
    elif device_type.startswith("cuda"):
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        if visible not in _GPU_NAMES:
            try:
                done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible],
                                      capture_output=True, text=True, timeout=10)
                names = done.stdout.strip().splitlines() if done.returncode == 0 else []
                _GPU_NAMES[visible] = names[0].strip() if names else None
            except (OSError, subprocess.SubprocessError):
                _GPU_NAMES[visible] = None
        if _GPU_NAMES[visible]:
            out["device_name"] = _GPU_NAMES[visible]
    return out


def run_on_worker(spec: dict) -> tuple[Any, bytes]:
    """Run one experiment here through the runner; returns (RunResult, the log if not shared)."""
    import distributed

    from autoresearch_kit import runner
    from autoresearch_kit.runner import RunResult

    worker = distributed.get_worker()
    here = f"{worker.name} ({worker.address})"
    client = distributed.get_client()
    before = client.get_metadata(["autoresearch", spec["marker"]], default=None)
    if before:
        reason = (f"worker {before} died mid-run (killed, out of memory, or its machine went away); the scheduler "
                  f"started it again on {here}, which does not run it twice")
        return RunResult(status="aborted", reason=reason, budget=spec["budget"]), b""
    client.set_metadata(["autoresearch", spec["marker"]], here)

    def send(event: dict) -> None:
        try:
            worker.log_event(spec["topic"], {"exp": spec["exp_id"], "where": here, "event": _plain(event)})
        except Exception:  # noqa: BLE001 - events are a view; the result carries the whole curve
            pass

    send({"kind": "worker", "worker": here, "phase": "starting"})
    where = worker_has_data(spec["digest"], spec["data_path"])
    if where is None:
        reason = (f"worker {here} has no prepared data with manifest hash {spec['digest']} (the driver ships it "
                  f"before a batch; a worker that joined since gets it at the next one)")
        return RunResult(status="aborted", reason=reason, budget=spec["budget"]), b""
    if spec["shared_fs"]:
        workdir = Path(spec["workdir"])
    else:
        workdir = Path(worker.local_directory) / "autoresearch-runs" / spec["exp_id"]
        shutil.rmtree(workdir, ignore_errors=True)
    stop = threading.Event()
    done = threading.Event()
    key = worker.get_current_task()

    def watch() -> None:   # the driver's stop, or the driver gone (the task released)
        ev = distributed.Event(spec["stop"])
        while not done.wait(STOP_POLL_SECONDS):
            try:
                wanted = worker.state.tasks.get(key)
                if ev.is_set() or wanted is None or wanted.state in ("cancelled", "released", "forgotten"):
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - the scheduler is gone: end the run
                stop.set()
                return

    threading.Thread(target=watch, name="autoresearch-stop-watch", daemon=True).start()
    began = time.time()
    try:
        res = runner.run_budgeted(spec["source"], spec["budget"], workdir=workdir, data_dir=where, on_event=send,
                                  stop=stop, **spec["run_kwargs"])
    finally:
        done.set()
    res.extra.update(worker=here, worker_data=where, worker_began=began, worker_ended=time.time(),
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    # The machine it ran on, not the driver's (the ledger merges it into the record's hardware).
    hardware = {**worker_hardware(str(res.extra.get("device_type") or "")), "worker": here}
    if "device_name" not in hardware and res.device:   # no nvidia-smi: what the run itself reported
        hardware["device_name"] = f"{res.device} (reported by the run)"
    started = res.extra.get("start") or {}
    for key in ("precision", "cuda"):   # as the run reported them (None: it never said), not the driver's
        hardware[key] = started.get(key)
    if started.get("torch"):   # torch.__version__ (2.11.0+cu130), as the driver's fingerprint spells it
        hardware["torch"] = started["torch"]
    res.extra["hardware"] = hardware
    if stop.is_set() and res.status == "aborted" and not res.reason:
        res.reason = "stopped from the driver"
    log = b""
    if not spec["shared_fs"]:
        try:
            log = Path(res.log_path).read_bytes()[-2 * 2**20:]
        except OSError:
            log = b""
    return res, log

