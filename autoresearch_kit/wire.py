"""The wire between the runner (trusted) and the candidate's process (untrusted).

The runner hands the child one end of a Unix socket pair (its fd in
AUTORESEARCH_CHANNEL_FD). Everything a score depends on travels over it, and the runner
decides it: the child asks for a step and for training batches, and the runner answers
from its own clock and token count; at `run.finish(model)` the runner sends validation
inputs and the child answers with logits, written into a shared-memory buffer the runner
passed over the socket (SCM_RIGHTS). Nothing the child says is taken as a number to
score: its reports (step losses, FLOPs per token, peak memory) are shown as its own.

Frame: an 8-byte header (JSON length, payload length, both big-endian uint32), a JSON
object with a "kind", then the payload bytes (token ids, or nothing).

    conn = Conn(sock)
    conn.send("batch", {"loader": 0, "batch_size": 16, "seq_len": 256})
    kind, header, payload = conn.recv()

Stdlib only: both sides import it, the child before torch.
"""

from __future__ import annotations

import json
import os
import socket
import struct

FD_VAR = "AUTORESEARCH_CHANNEL_FD"
_HEADER = struct.Struct("!II")
MAX_JSON = 1 << 20          # a message header is a few hundred bytes; 1 MB is not ours
MAX_PAYLOAD = 1 << 31       # a batch of token ids; logits go through shared memory


class WireError(Exception):
    """The other side closed the socket or sent something that is not a frame."""


class Conn:
    """One end of the socket: framed send / recv, plus passing an fd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def from_env(cls) -> "Conn | None":
        """The child's end, taken (and removed) from os.environ; None without a runner."""
        fd = os.environ.pop(FD_VAR, None)
        if fd is None:
            return None
        return cls(socket.socket(fileno=int(fd)))

    def send(self, kind: str, header: dict | None = None, payload: bytes | memoryview = b"",
             fds: list[int] | None = None) -> None:
        body = json.dumps({"kind": kind, **(header or {})}, separators=(",", ":"), default=float).encode()
        frame = _HEADER.pack(len(body), len(payload)) + body
        try:
            if fds:
                socket.send_fds(self.sock, [frame], fds)
            else:
                self.sock.sendall(frame)
            if len(payload):
                self.sock.sendall(payload)
        except OSError as e:
            msg = f"the other side of the run's socket is gone ({e})"
            raise WireError(msg) from e

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except OSError as e:
                msg = f"the run's socket failed ({e})"
                raise WireError(msg) from e
            if k == 0:
                msg = "the other side closed the run's socket"
                raise WireError(msg)
            got += k
        return buf

    def recv(self, with_fds: bool = False) -> tuple[str, dict, bytearray] | tuple[str, dict, bytearray, list[int]]:
        fds: list[int] = []
        if with_fds:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, _HEADER.size, 4)
            except OSError as e:
                msg = f"the run's socket failed ({e})"
                raise WireError(msg) from e
            if not data:
                msg = "the other side closed the run's socket"
                raise WireError(msg)
            head = bytearray(data) + (self._exact(_HEADER.size - len(data)) if len(data) < _HEADER.size else b"")
        else:
            head = self._exact(_HEADER.size)
        n_json, n_payload = _HEADER.unpack(bytes(head))
        if n_json > MAX_JSON or n_payload > MAX_PAYLOAD:
            msg = f"a frame of {n_json} + {n_payload} bytes is not a message of this protocol"
            raise WireError(msg)
        try:
            header = json.loads(bytes(self._exact(n_json)))
        except ValueError as e:
            msg = "a frame whose header is not JSON"
            raise WireError(msg) from e
        if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
            msg = "a frame without a kind"
            raise WireError(msg)
        payload = self._exact(n_payload) if n_payload else bytearray()
        kind = header.pop("kind")
        return (kind, header, payload, fds) if with_fds else (kind, header, payload)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
