"""Landlock: an unprivileged, per-process file-access allow-list (Linux 5.13+), via ctypes.

    from autoresearch_kit import landlock
    landlock.abi()                                   # 0 where the kernel has none
    landlock.restrict(read=["/usr", "/etc"], write=["/run/runs/abc"])   # this process, for good

Used by the fork server (forkserver.py): the server runs inside one bubblewrap sandbox
(namespaces, the mount view), and each child it forks restricts itself with Landlock
before train.py's first line, so it can write only its own run directory and read only
the system, Python, the kit and that directory; not the other runs of the same server.
With ABI 6 or later it is also scoped: it cannot signal, or connect to the abstract Unix
sockets of, processes outside its own domain (the server, earlier or later runs), and with
ABI 4 or later it cannot connect or bind TCP. A restriction cannot be lifted, and it is
inherited by every process the child starts.

Stdlib only: the fork server imports it.
"""

from __future__ import annotations

import ctypes
import os
import sys

_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446   # the same on x86_64 and aarch64
_CREATE_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE = 1 << 13, 1 << 14          # ABI 2, ABI 3 (IOCTL_DEV, ABI 5, is left unhandled: GPU ioctls)
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1   # ABI 4
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1   # ABI 6
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
_READ = EXECUTE | READ_FILE | READ_DIR


class _Ruleset(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version (0: none, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        v = _libc().syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(v), 0)


def _handled_fs(version: int) -> int:
    bits = (1 << 13) - 1          # ABI 1: EXECUTE .. MAKE_SYM
    if version >= 2:
        bits |= REFER
    if version >= 3:
        bits |= TRUNCATE
    return bits


def restrict(read: list[str], write: list[str]) -> int:
    """Restrict this process (and what it starts) to reading `read` + `write` and writing `write`.

    Paths that do not exist are skipped. Returns the ABI used.

    Raises
    ------
    OSError
        The kernel has no Landlock, or a rule could not be added.
    """
    version = abi()
    if version < 1:
        msg = "this kernel has no Landlock (Linux 5.13+ with CONFIG_SECURITY_LANDLOCK)"
        raise OSError(msg)
    libc = _libc()
    attr = _Ruleset(_handled_fs(version), (NET_BIND_TCP | NET_CONNECT_TCP) if version >= 4 else 0,
                    (SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL) if version >= 6 else 0)
    size = 24 if version >= 6 else 16 if version >= 4 else 8
    fd = libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"landlock_create_ruleset: {os.strerror(e)}")
    try:
        full = _handled_fs(version)
        for paths, access in ((read, _READ), (write, full)):
            for p in paths:
                try:
                    pfd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = access if os.path.isdir(p) else access & _FILE_ONLY
                    rule = _PathBeneath(allowed, pfd)
                    if libc.syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, f"landlock_add_rule {p}: {os.strerror(e)}")
                finally:
                    os.close(pfd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
        if libc.syscall(_SYS_RESTRICT, fd, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_restrict_self: {os.strerror(e)}")
    finally:
        os.close(fd)
    return version
