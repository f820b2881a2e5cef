"""A fork server for the runner: torch imported once, one forked child per experiment.

Every experiment used to start a fresh `python train.py`, which paid ~11 s on the H100
box before its first line of real work (`import torch` 3.9 s, `torch._dynamo` 4.4 s,
`torch._inductor.compile_fx` 3.0 s; docs/PERFORMANCE.md). The fork server is a helper
process, started lazily by `run_budgeted` (one per runner process), that has imported
torch, dynamo, inductor, numpy, tiktoken and the kit's child-side modules *without
initialising CUDA*, and forks one child per experiment:

    from autoresearch_kit import forkserver
    child = forkserver.spawn(workdir, env, stdout_fd, channel_fd, "cuda")  # None: use subprocess
    child.pid, child.wait(timeout=1.0), child.returncode                   # like subprocess.Popen

The child does what `python train.py` under the runner would: a session (process group)
of its own, the workdir as cwd, exactly the runner's environment (channel fd and key, run
id), stdout+stderr on the runner's pipe, stdin /dev/null, SIGKILL when its parent (the
server) dies; then it runs train.py as `__main__` and exits with Python's exit code (0,
a SystemExit code, 1 with the traceback for an uncaught exception, SIGINT for an
uncaught KeyboardInterrupt). It ends with `os._exit` after the non-daemon threads and the
atexit handlers ran (train.py's and torch's, as at a normal exit): the interpreter's
final teardown (~2 s on the GPU box) is skipped, as in any forked child.

So that the runner's kill and stray logic sees what it would see for `python train.py`,
the child rewrites its /proc identity in place: the server starts with a placeholder
AUTORESEARCH_RUN_ID that each child overwrites with its own run id (so descendants that
fork without exec, or setsid and close their fds, still carry the marker in
/proc/<pid>/environ), and its command line reads `python train.py`.

Safety. fork() in a process with threads is hazardous (a lock held by another thread
stays locked in the child), so the server refuses to fork (the runner falls back to a
subprocess) unless it has exactly one thread and the CUDA driver was never initialised
in it (no open /dev/nvidia*: a CUDA context does not survive fork; libcuda.so merely mapped,
as after `import torch` on a CUDA build, is fine). numpy's OpenBLAS pool is stopped by its
own fork handler; after each import a probe fork checks that nothing else is left, and an
import that leaves a thread is dropped: the server restarts with the modules before it.
(Inductor asks torch.cuda.is_available() at import, which starts an NVML or driver thread;
for CUDA servers a forked child answers instead while the server preloads: see
_pin_cuda_facts.) For CUDA runs a forked probe child
must initialise CUDA and run a kernel before the server says it is ready. The
server exits when the runner's end of its control socket closes (the runner exited or
was killed, whatever thread started it) and its children die with it (PR_SET_PDEATHSIG);
it also kills a child whose runner-side handle was closed. Linux only.

When: AUTORESEARCH_FORKSERVER=0 turns it off, =1 on for every device; unset, it is on
for CUDA runs on Linux (on a CPU, `import torch` costs ~1.5 s: little to win). Any
failure (the server cannot start, dies, refuses) gives None and the runner starts
`python train.py` as before. Differences from a fresh process worth knowing: all
children of one server share its hash seed (PYTHONHASHSEED) and its import-time state;
the server restarts whenever the environment (other than AUTORESEARCH_* and PYTEST_*
variables, and OMP_NUM_THREADS, which each child applies itself) differs from the one it
imported under, so import-time settings such as TORCHINDUCTOR_* always match.

Stdlib only at import: the runner imports this module. Tests:
`python -m pytest tests/test_forkserver.py -q`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SWITCH_VAR = "AUTORESEARCH_FORKSERVER"
RUN_ID_VAR = "AUTORESEARCH_RUN_ID"
FD_VAR = "AUTORESEARCH_CHANNEL_FD"     # channel.FD_VAR (not imported: keep this module light)
_PLACEHOLDER_ID = "0" * 32             # run ids are uuid4().hex: 32 characters, rewritten in place
READY_TIMEOUT_SECONDS = 300.0          # imports on a cold disk can take a minute or more
REPLY_TIMEOUT_SECONDS = 30.0           # fork + setsid: milliseconds
_MAX_MESSAGE = 1 << 20
# What the server imports before forking: what the harness and a typical train.py import,
# minus autoresearch_kit.harness itself (it takes the channel out of the environment at
# import, so each child must import it afresh).
# In this order: when an import leaves a thread behind, the server restarts with the
# modules before it (see _get_server), so the cheap and essential ones come first.
PRELOAD = ("numpy", "tiktoken", "torch", "torch.nn", "torch.nn.functional", "torch.nn.attention",
           "torch.utils.flop_counter", "autoresearch_kit.config", "autoresearch_kit.wire",
           "autoresearch_kit.landlock",
           "autoresearch_kit.device", "autoresearch_kit.data.shards", "autoresearch_kit.data.loader",
           "autoresearch_kit.metric", "torch._dynamo", "torch._inductor.compile_fx")
_BOOT = ("import sys; from autoresearch_kit.forkserver import _serve; "
         "_serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == 'cuda')")


def enabled(device_type: str) -> bool:
    """Whether run_budgeted should try the fork server for a run on `device_type`.

    AUTORESEARCH_FORKSERVER=0/1 decides; unset, only CUDA runs use it. Linux only.
    """
    if not sys.platform.startswith("linux") or not hasattr(socket, "send_fds"):
        return False
    value = os.environ.get(SWITCH_VAR, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value:
        log.warning("%s=%r is not 0 or 1; using the default (on for CUDA only)", SWITCH_VAR, value)
    return device_type.split(":")[0] == "cuda"


class ForkedChild:
    """A training child forked by the server: the part of subprocess.Popen the runner uses."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.server_lost = False      # the server died before reporting the exit code
        self._sock = sock             # closing it makes the server kill the child

    def poll(self) -> int | None:
        """The exit code if the child has exited, else None."""
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code (reported by the server, which reaps the child).

        Raises subprocess.TimeoutExpired after `timeout` seconds, as Popen.wait does.
        """
        if self.returncode is not None:
            return self.returncode
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(["train.py"], timeout)
        try:
            data = self._sock.recv(4096)
        except OSError:
            data = b""
        try:
            self.returncode = int(json.loads(data)["returncode"]) if data else None
        except (ValueError, KeyError, TypeError):
            self.returncode = None
        if self.returncode is None:
            # The server died: its children get SIGKILL (PR_SET_PDEATHSIG). Make sure.
            self.server_lost = True
            self.returncode = -signal.SIGKILL
            for kill in (os.killpg, os.kill):
                try:
                    kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            log.warning("the fork server died while running pid %d; the run ends as killed", self.pid)
        self._sock.close()
        return self.returncode

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()


# --------------------------------------------------------------------------- runner side


class _Refused(Exception):
    """The server answered that forking is unsafe now (threads, CUDA driver)."""


class _Server:
    """The runner's handle on one server process (its control socket and Popen)."""

    def __init__(self, env: dict[str, str], preload: tuple[str, ...], device_type: str, wrap=None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sandboxed = wrap is not None
        self._ns: str | None = None   # the server's PID namespace, when sandboxed
        # In a sandbox the server cannot see the runner's pid (its own PID namespace): it
        # watches its parent as it finds it (bubblewrap's init) and the control socket.
        argv = [sys.executable, "-c", _BOOT, str(theirs.fileno()), "0" if wrap else str(os.getpid()),
                ",".join(preload), device_type]
        if wrap is not None:
            argv, env = wrap(argv, env)
        try:
            self.proc = subprocess.Popen(argv,
                                         env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.info: dict[str, Any] = {}

    def handshake(self) -> str | None:
        """Wait for the server's imports; None when it is ready, else why not."""
        try:
            ready, _, _ = select.select([self.sock], [], [], READY_TIMEOUT_SECONDS)
            data = self.sock.recv(_MAX_MESSAGE) if ready else None
        except OSError as e:
            return f"no answer ({e})"
        if data is None:
            return f"not ready after {READY_TIMEOUT_SECONDS:.0f} s"
        if not data:
            return f"exited while importing (code {self.proc.poll()})"
        try:
            self.info = json.loads(data)
        except ValueError:
            return "sent a garbled greeting"
        return None if self.info.get("ready") else str(self.info.get("error") or "refused")

    def alive(self) -> bool:
        return self.proc.poll() is None and self.sock.fileno() >= 0

    def request(self, cwd: str, env: dict[str, str], stdout_fd: int, channel_fd: int,
                policy: dict | None = None) -> ForkedChild:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            payload = json.dumps({"cwd": cwd, "env": env, "landlock": policy}).encode()
            socket.send_fds(self.sock, [payload], [theirs.fileno(), stdout_fd, channel_fd])
            theirs.close()
            ready, _, _ = select.select([mine], [], [], REPLY_TIMEOUT_SECONDS)
            reply = json.loads(mine.recv(_MAX_MESSAGE) or b"null") if ready else None
        except BaseException:
            mine.close()  # the server kills a child whose handle is closed
            theirs.close()
            raise
        if not isinstance(reply, dict) or "pid" not in reply:
            mine.close()
            if isinstance(reply, dict) and reply.get("error"):
                raise _Refused(str(reply["error"]))
            raise OSError("the fork server did not answer")
        pid = int(reply["pid"])
        if self.sandboxed:  # the server answers with the child's pid in its namespace
            host = self.members().get(pid)
            if host is None:
                mine.close()
                raise OSError(f"the sandboxed fork server's child {pid} is not to be found from outside")
            pid = host
        return ForkedChild(pid, mine)

    def namespace(self) -> str | None:
        """The server's PID namespace (read from bubblewrap's init, the runner's grandchild)."""
        if self._ns is None:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                    if ppid == self.proc.pid:
                        self._ns = os.readlink(f"/proc/{name}/ns/pid")
                        break
                except (OSError, ValueError, IndexError):
                    continue
        return self._ns

    def members(self) -> dict[int, int]:
        """{pid in the server's namespace: host pid} for every process in it."""
        ns, found = self.namespace(), {}
        if ns is None:
            return found
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{name}/ns/pid") != ns:
                    continue
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            found[int(line.split()[-1])] = int(name)
                            break
            except (OSError, ValueError):
                continue
        return found

    def kill_strays(self) -> list[int]:
        """SIGKILL every process in the server's namespace but bubblewrap's init and the
        server: what a finished run left behind, whatever it did to its environment."""
        killed = []
        for inner, host in self.members().items():
            if inner in (1, 2) or host == self.proc.pid:
                continue
            try:
                os.kill(host, signal.SIGKILL)
                killed.append(host)
            except OSError:
                pass
        return killed

    def close(self) -> None:
        self.sock.close()  # the server exits on EOF; its children die with it
        try:
            self.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_lock = threading.Lock()
_server: _Server | None = None
_server_key: tuple | None = None
_failed: dict[tuple, str] = {}   # env key -> why the server could not start (not retried)
_preload: dict[tuple, int] = {}  # env key -> how many of PRELOAD a server may import (thread-free)


# Set per run in a sandboxed server's children (sandbox.stage), read by libraries at use, not import.
_PER_RUN = ("HOME", "TMPDIR", "PWD", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# Chosen per run by the runner from the machine's load (runner.cpu_threads): a child applies
# it itself (torch.set_num_threads in _child), so one server serves every thread count.
_THREADS_VAR = "OMP_NUM_THREADS"


def _env_key(env: dict[str, str], sandboxed: bool = False) -> tuple:
    """What the server's imports could depend on: the environment minus per-run variables."""
    skip = _PER_RUN if sandboxed else ()
    return tuple(sorted((k, v) for k, v in env.items()
                        if not k.startswith(("AUTORESEARCH_", "PYTEST_")) and k not in skip
                        and k != _THREADS_VAR)) + (("sandbox", sandboxed),)


def _server_env(env: dict[str, str]) -> dict[str, str]:
    server_env = {k: v for k, v in env.items() if not k.startswith("AUTORESEARCH_") and k != _THREADS_VAR}
    server_env[RUN_ID_VAR] = _PLACEHOLDER_ID
    # Triton's driver check calls torch.cuda.is_available(), which initialises the CUDA driver
    # (cuInit: a driver thread, a context that does not survive fork) unless torch asks NVML.
    server_env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    server_env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")
    return server_env


def _get_server(env: dict[str, str], device_type: str, wrap=None) -> _Server | None:
    """The running server for this environment, started (and waited for) if need be."""
    global _server, _server_key
    key = _env_key(env, wrap is not None) + (("device", device_type),)
    if _server is not None and (_server_key != key or not _server.alive()):
        _server.close()
        _server = None
    while _server is None:
        if key in _failed:
            return None
        server = _Server(_server_env(env), PRELOAD[:_preload.get(key, len(PRELOAD))], device_type, wrap)
        try:
            problem = server.handshake()
        except BaseException:
            server.close()
            raise
        if problem is None:
            _server, _server_key = server, key
            atexit.register(shutdown)
            log.info("autoresearch fork server pid %d ready: %d of %d modules imported in %.1f s",
                     server.proc.pid, server.info.get("imported", 0), len(PRELOAD),
                     server.info.get("import_seconds", float("nan")))
            break
        server.close()
        safe = server.info.get("safe_prefix")
        if isinstance(safe, int) and 0 < safe < _preload.get(key, len(PRELOAD)):
            # An import left a thread: start again with the modules before it.
            _preload[key] = safe
            log.info("autoresearch fork server: %s; retrying with the first %d modules only", problem, safe)
            continue
        _failed[key] = problem
        log.warning("autoresearch fork server unavailable (%s); training children start as "
                    "`python train.py` (set %s=0 to stop trying)", problem, SWITCH_VAR)
    return _server


def prestart(env: dict[str, str], device_type: str, wrap=None) -> threading.Thread | None:
    """Start the server for `env` in a background thread, so the first run need not wait for it.

    `env` is a child environment as the runner builds it (`runner._child_env`); the run id
    may be missing. Returns the thread (None when the server is off for `device_type`); a
    run that starts meanwhile waits for the same server instead of starting another.
    """
    device_type = device_type.split(":")[0]
    if not enabled(device_type):
        return None

    def start() -> None:
        with _lock:
            try:
                _get_server(env, device_type, wrap)
            except Exception as e:  # the first run will try again, and fall back
                log.warning("autoresearch fork server could not be started ahead (%s)", e)

    thread = threading.Thread(target=start, name="autoresearch-forkserver-prestart", daemon=True)
    thread.start()
    return thread


def spawn(cwd: str | os.PathLike, env: dict[str, str], stdout_fd: int, channel_fd: int,
          device_type: str, wrap=None, policy: dict | None = None) -> ForkedChild | None:
    """Fork a training child from the server, or None when the runner should use a subprocess.

    Parameters
    ----------
    cwd
        The workdir holding train.py.
    env
        The child's complete environment (the runner's `_child_env`), with the channel's
        fd number as this process knows it: the child is told its own.
    stdout_fd
        Write end of the runner's output pipe (the child's stdout and stderr).
    channel_fd
        Write end of the trusted channel.
    device_type
        "cuda", "mps" or "cpu" (see `enabled`).
    wrap
        Sandboxed runs: starts the server inside bubblewrap (`sandbox.server_wrap`).
    policy
        Sandboxed runs: the Landlock rules (`{"read": [...], "write": [...]}`) the child
        applies to itself before train.py runs (`sandbox.stage`).

    Returns
    -------
    ForkedChild or None
        None when the server is off, unavailable or failed; nothing was started then.
    """
    device_type = device_type.split(":")[0]
    if not enabled(device_type) or len(env.get(RUN_ID_VAR, "")) != len(_PLACEHOLDER_ID):
        return None
    with _lock:
        try:
            server = _get_server(env, device_type, wrap)
            if server is None:
                return None
            return server.request(str(cwd), env, stdout_fd, channel_fd, policy)
        except _Refused as e:  # the server became unsafe to fork from: stop trying in this session
            _failed[_env_key(env, wrap is not None) + (("device", device_type),)] = str(e)
            log.warning("autoresearch fork server refused (%s); training children start as `python train.py`", e)
            _drop_server()
            return None
        except OSError as e:
            # A dead or confused server: drop it (the next run starts a fresh one) and fall back.
            log.warning("autoresearch fork server failed (%s); this run starts as `python train.py`", e)
            _drop_server()
            return None


def _drop_server() -> None:
    global _server, _server_key
    if _server is not None:
        _server.close()
    _server, _server_key = None, None


def kill_sandbox_strays() -> list[int]:
    """After a sandboxed forked run: kill what it left in the server's namespace."""
    server = _server
    if server is None or not server.sandboxed or not server.alive():
        return []
    return server.kill_strays()


def server_pid() -> int | None:
    """Pid of the running server, if any (for tests and diagnostics)."""
    server = _server
    return server.proc.pid if server is not None and server.alive() else None


def shutdown() -> None:
    """Stop the server (it also stops by itself when this process exits)."""
    with _lock:
        _drop_server()


# --------------------------------------------------------------------------- server side


def _thread_names() -> list[str]:
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue
    return names


def _hazard() -> str | None:
    """Why forking now would be unsafe, or None."""
    names = _thread_names()
    if len(names) != 1 or threading.active_count() != 1:
        return (f"the server has {len(names)} threads ({threading.active_count()} Python threads; "
                f"names {', '.join(names)})")
    # libcuda.so is mapped by `import torch` on a CUDA build, which is harmless (DataLoader
    # workers fork such processes daily); cuInit is not: it opens /dev/nvidiactl.
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            return "the CUDA driver was initialised in the server (a CUDA context does not survive fork)"
    return None


def _pin_cuda_facts() -> Callable[[], None]:
    """Answer torch.cuda.is_available() and device_count() without the driver while preloading.

    Inductor asks at import time (`torch._inductor.runtime.benchmarking`), and either way of
    answering leaves a thread in the server: cuInit starts a driver thread, NVML one of its
    own. A forked child asks instead (it exits; its threads go with it), and the server's
    torch.cuda answers with that count until the returned function restores the originals
    after the preload: modules imported meanwhile keep the answer a fresh process would get.
    """
    import torch

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, str(int(torch.cuda.device_count())).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        count = int(os.read(r, 64) or b"0")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    cuda = torch.cuda
    saved = cuda.is_available, cuda.device_count
    cuda.is_available = lambda: count > 0
    cuda.device_count = lambda: count

    def restore() -> None:
        cuda.is_available, cuda.device_count = saved

    return restore


def _cuda_probe() -> str | None:
    """Fork a child that initialises CUDA and runs one kernel: None if it worked, else why not."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import torch

            if torch.cuda.is_available():
                torch.zeros(1, device="cuda").add_(1)
                torch.cuda.synchronize()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return None if _returncode(status) == 0 else f"a forked child could not use CUDA (exit {_returncode(status)})"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "a forked child hung initialising CUDA"
        time.sleep(0.02)


def _identity_area() -> tuple[int, int, int, int]:
    """arg_start, arg_end, env_start, env_end of this process (/proc/self/stat fields 48-51)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return tuple(int(x) for x in fields[45:49])  # fields[0] is field 3 (state)


def _rewrite_identity(run_id: str) -> None:
    """Make /proc/self/environ carry run_id and /proc/self/cmdline read `python train.py`."""
    import ctypes

    arg_start, arg_end, env_start, env_end = _identity_area()
    block = ctypes.string_at(env_start, env_end - env_start)
    needle = f"\0{RUN_ID_VAR}={_PLACEHOLDER_ID}\0".encode()
    at = (b"\0" + block).find(needle)
    if at < 0 or len(run_id) != len(_PLACEHOLDER_ID):
        raise RuntimeError("the run-id placeholder is missing from the environment block")
    ctypes.memmove(env_start + at + len(RUN_ID_VAR) + 1, run_id.encode("ascii"), len(run_id))
    title = os.fsencode(sys.executable) + b"\0train.py\0"
    room = arg_end - arg_start
    if len(title) <= room:
        ctypes.memmove(arg_start, title + b"\0" * (room - len(title)), room)


def _set_pdeathsig() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):
        pass


def _exit_code(e: SystemExit) -> int:
    """The process exit status Python gives `raise SystemExit(code)`."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, bool) or not isinstance(code, int):
        try:
            print(code, file=sys.stderr)
        except Exception:
            pass
        return 1
    return code & 0xFF


def _print_exception(e: BaseException, path: str) -> None:
    """The traceback as `python train.py` prints it: from train.py's frames on."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    if tb is not None:
        e.__traceback__ = tb  # PyErr_Display prints the exception's own traceback
    try:
        sys.excepthook(type(e), e, e.__traceback__)
    except Exception:
        pass


def _run_main(path: str) -> int:
    """Run train.py as __main__; the exit status a fresh interpreter would end with."""
    import runpy

    interrupted = False
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt as e:
        _print_exception(e, path)
        code, interrupted = 1, True
    except BaseException as e:
        _print_exception(e, path)
        code = 1
    # As at a normal exit: wait for non-daemon threads, then the atexit handlers.
    try:
        threading._shutdown()
    except BaseException:
        pass
    try:
        import atexit as _atexit

        _atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if interrupted:  # Python ends an uncaught KeyboardInterrupt by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _child(request: dict, stdout_fd: int, channel_fd: int, sync_w: int, server_pid: int) -> int:
    """In the forked child: become `python train.py` under the runner, run it, give its code."""
    _set_pdeathsig()
    if os.getppid() != server_pid:
        return 1  # the server is gone already
    try:  # out of memory, the kernel kills this run first, not the server or the runner
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    os.setsid()
    env = dict(request["env"])
    _rewrite_identity(env[RUN_ID_VAR])
    os.write(sync_w, b"1")  # the group exists and the marker is set: the server may answer
    os.close(sync_w)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(stdout_fd, 1)
    os.dup2(stdout_fd, 2)
    os.close(stdout_fd)
    os.set_inheritable(channel_fd, True)
    env[FD_VAR] = str(channel_fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    threads = env.get(_THREADS_VAR, "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        # The server imported torch without it (its OpenMP read the variable then): set it now.
        sys.modules["torch"].set_num_threads(int(threads))
    if request.get("landlock"):
        # Sandboxed: from here on this process (and all it starts) reads only the system,
        # Python, the kit and its run, and writes only its run and its scratch folder.
        import tempfile

        from autoresearch_kit import landlock

        tempfile.tempdir = None  # the server's /tmp is shared by its children: not theirs to use
        # /proc writable: the CUDA driver names its threads by writing /proc/self/task/<tid>/comm
        # (cudaGetDeviceCount failed with error 304 on the H200 without it), in this child and in
        # inductor's compile workers. Other processes' /proc entries stay guarded by Landlock's
        # ptrace rule (no access across domains) and the server's own PID namespace.
        landlock.restrict(read=request["landlock"]["read"], write=request["landlock"]["write"] + ["/proc"])
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path = os.path.join(request["cwd"], "train.py")
    sys.argv = [path]
    sys.path[0] = request["cwd"]  # `python train.py` puts the script's folder first
    return _run_main(path)


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _probe_fork() -> None:
    """Fork and reap a child that exits at once: fork handlers (OpenBLAS's) stop their pools."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _serve(ctrl_fd: int, parent_pid: int, preload: str, cuda: bool = False) -> None:
    """The server's main loop (runs in the helper process, never returns)."""
    import importlib
    import traceback

    ctrl = socket.socket(fileno=ctrl_fd)
    if parent_pid == 0:  # in a sandbox: the parent as this process finds it (bubblewrap's init)
        parent_pid = os.getppid()
    t0 = time.perf_counter()
    problem, safe, imported = None, None, 0
    unpin = None
    try:
        for i, name in enumerate(m for m in preload.split(",") if m):
            importlib.import_module(name)
            if cuda and unpin is None and "torch" in sys.modules:
                unpin = _pin_cuda_facts()
            if len(os.listdir("/proc/self/task")) > 1:
                _probe_fork()
            problem = _hazard()
            if problem is not None:  # this import left a thread or the CUDA driver: the ones before are safe
                problem, safe = f"{problem} after importing {name}", i
                break
            imported = i + 1
        _identity_area()  # readable, or the child could not rewrite its identity
        if problem is None and cuda:  # the proof that matters: a forked child can use the GPU
            problem = _cuda_probe() or _hazard()
        if problem is None and f"{RUN_ID_VAR}={_PLACEHOLDER_ID}".encode() not in open("/proc/self/environ", "rb").read():
            problem = "the run-id placeholder is not in the server's environment"
    except BaseException as e:
        problem = "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        if unpin is not None:
            unpin()
    hello = {"ready": problem is None, "error": problem, "pid": os.getpid(), "imported": imported,
             "safe_prefix": safe, "import_seconds": round(time.perf_counter() - t0, 3),
             "threads": _thread_names()}
    try:
        ctrl.send(json.dumps(hello).encode())
    except OSError:
        os._exit(1)
    if problem is not None:
        os._exit(1)

    children: dict[int, socket.socket] = {}  # pid -> the runner's handle on it
    pidfds: dict[int, int] = {}              # pidfd -> pid: readable when the child exits

    def kill(pid: int) -> None:
        for k in (os.killpg, os.kill):
            try:
                k(pid, signal.SIGKILL)
            except OSError:
                pass

    def shut_down() -> None:
        for pid in children:
            kill(pid)
        os._exit(0)

    while True:
        if os.getppid() != parent_pid:
            shut_down()
        watched = [ctrl, *children.values(), *pidfds]
        try:
            readable, _, _ = select.select(watched, [], [], 0.5)
        except InterruptedError:
            readable = []
        # Reap every child that exited and report its code on its handle.
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock = children.pop(pid, None)
            for fd in [fd for fd, p in pidfds.items() if p == pid]:
                del pidfds[fd]
                os.close(fd)
            if sock is not None:
                try:
                    sock.send(json.dumps({"returncode": _returncode(status)}).encode())
                except OSError:
                    pass
                sock.close()
        for pid, sock in list(children.items()):
            if sock in readable:  # the runner closed its handle: the run is over for it
                try:
                    gone = sock.recv(16) == b""
                except OSError:
                    gone = True
                if gone:
                    kill(pid)
        if ctrl not in readable:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, _MAX_MESSAGE, 8)
        except OSError:
            msg, fds = b"", []
        if not msg:
            shut_down()  # the runner is gone
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        handle = socket.socket(fileno=fds[0])
        stdout_fd, channel_fd = fds[1], fds[2]
        try:
            request = json.loads(msg)
            problem = _hazard()
        except ValueError:
            request, problem = None, "a garbled request"
        if problem is not None:
            for fd in (stdout_fd, channel_fd):
                os.close(fd)
            try:
                handle.send(json.dumps({"error": problem}).encode())
            except OSError:
                pass
            handle.close()
            continue
        sync_r, sync_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(sync_r)
                for s in (ctrl, handle, *children.values()):
                    s.close()
                for fd in pidfds:
                    os.close(fd)
                code = _child(request, stdout_fd, channel_fd, sync_w, os.getppid())
            except BaseException:
                try:
                    traceback.print_exc()
                    sys.stderr.flush()
                except BaseException:
                    pass
            finally:
                os._exit(code)  # never back into the server's loop
        os.close(sync_w)
        for fd in (stdout_fd, channel_fd):  # only the child holds the runner's pipes now
            os.close(fd)
        try:
            select.select([sync_r], [], [], REPLY_TIMEOUT_SECONDS)
        finally:
            os.close(sync_r)
        children[pid] = handle
        if hasattr(os, "pidfd_open"):
            try:
                pidfds[os.pidfd_open(pid)] = pid
            except OSError:
                pass  # an older kernel: the 0.5 s poll reaps it
        try:
            handle.send(json.dumps({"pid": pid}).encode())
        except OSError:
            kill(pid)


__all__ = ["ForkedChild", "PRELOAD", "SWITCH_VAR", "enabled", "prestart", "server_pid", "shutdown", "spawn"]
