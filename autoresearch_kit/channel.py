"""The trusted channel from the harness (inside train.py's process) to the runner.

Why a channel of its own: the runner must never take a metric from anything the
candidate can fake. stdout is the candidate's (it may print a summary block that looks
like ours), and so is every file it can write. So the runner opens a pipe, passes only
its write end to the child (AUTORESEARCH_CHANNEL_FD), and gives the harness a fresh
random key (AUTORESEARCH_CHANNEL_KEY). The harness removes both from os.environ the
moment it is imported, before any line of train.py runs, and signs every message with
HMAC-SHA256. The runner accepts only lines whose signature checks and whose sequence
numbers increase; anything else on the pipe is dropped and counted.

Wire format, one message per line:

    <hex hmac-sha256 of JSON> <JSON {"seq": n, "kind": "...", "data": {...}}>\\n

Kinds sent by the harness: "start", "step" (metric events for live curves), "status"
(e.g. diverged), "result" (the final record). This is defence in depth, not a sandbox:
see docs/THREAT_MODEL.md.

Stdlib only: imported by the training child.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field

FD_VAR = "AUTORESEARCH_CHANNEL_FD"
KEY_VAR = "AUTORESEARCH_CHANNEL_KEY"
MAX_LINE = 1 << 20  # a result record is a few KB; anything near 1 MB is not ours


def _sign(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class ChildChannel:
    """Child side: holds the fd and key that it took out of the environment."""

    def __init__(self, fd: int | None, key: bytes | None) -> None:
        self._fd, self._key, self._seq = fd, key, 0

    @classmethod
    def from_env(cls) -> "ChildChannel":
        """Take (and remove) the channel from os.environ; a no-op channel when absent."""
        fd, key = os.environ.pop(FD_VAR, None), os.environ.pop(KEY_VAR, None)
        if fd is None or key is None:
            return cls(None, None)
        return cls(int(fd), bytes.fromhex(key))

    @property
    def connected(self) -> bool:
        return self._fd is not None

    def send(self, kind: str, data: dict) -> None:
        if self._fd is None:
            return
        self._seq += 1
        body = json.dumps({"seq": self._seq, "kind": kind, "data": data}, separators=(",", ":"),
                          default=float).encode()
        line = _sign(self._key, body).encode() + b" " + body + b"\n"
        try:
            # One write per message: under PIPE_BUF it is atomic; above, we are the only
            # trusted writer, so interleaving can only come from a forged write (dropped).
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            self._fd = None  # the runner went away; training output still reaches stdout


@dataclass
class ParentChannel:
    """Parent side: creates the pipe and key, and verifies what comes back."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    read_fd: int = -1
    write_fd: int = -1
    last_seq: int = 0
    rejected: int = 0
    _buf: bytes = b""  # an incomplete line, until its newline arrives

    def open(self) -> dict[str, str]:
        """Create the pipe; returns the environment entries for the child."""
        self.read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.write_fd, True)
        return {FD_VAR: str(self.write_fd), KEY_VAR: self.key.hex()}

    def close_child_end(self) -> None:
        """Call after the child started, so EOF arrives when the child (group) exits."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def verify(self, raw: bytes) -> dict | None:
        """Return the message dict for a genuine line, else None (and count it)."""
        raw = raw.rstrip(b"\n")
        sig, _, body = raw.partition(b" ")
        # Compare bytes: compare_digest refuses str with non-ASCII characters (TypeError),
        # and a forged line may carry any bytes.
        if not body or len(raw) > MAX_LINE or not hmac.compare_digest(sig, _sign(self.key, body).encode()):
            self.rejected += 1
            return None
        try:
            msg = json.loads(body)
        except ValueError:
            self.rejected += 1
            return None
        if not isinstance(msg, dict) or msg.get("seq", 0) <= self.last_seq:
            self.rejected += 1  # a replayed or reordered line
            return None
        self.last_seq = msg["seq"]
        return msg

    def feed(self, chunk: bytes) -> list[dict]:
        """Add bytes read from the pipe; return the genuine messages they completed."""
        *complete, self._buf = (self._buf + chunk).split(b"\n")
        if len(self._buf) > MAX_LINE:  # no line of ours is this long: drop it, count it
            self._buf, self.rejected = b"", self.rejected + 1
        return [msg for msg in map(self.verify, complete) if msg is not None]

    def lines(self):
        """Yield verified messages until EOF (blocking; run it in a thread)."""
        with os.fdopen(self.read_fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                yield from self.feed(chunk)
        self.read_fd = -1
