"""The prepared-data format: token shards as uint16 memmaps plus a manifest.

A prepared data directory (made by `python prepare.py` / `autoresearch prepare`) holds:

    manifest.json      source, sizes, sha256 of each shard, tokenizer, split rule
    tokenizer.json     the tiktoken.Encoding as data (split pattern, merge ranks, specials):
                       loading it runs no code, unlike a pickle
    token_bytes.npy    int32[vocab_size]: UTF-8 bytes of each token id (specials: 0)
    train.bin          uint16 token stream, every document starts with BOS
    val.bin            uint16 token stream of the pinned validation documents

Light imports only (json, numpy; tiktoken when the tokenizer is asked for): the
training child reads this through the harness.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # 2: tokenizer.json (was a pickle), hashes of every file
BOS = "<|bos|>"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOKEN_BYTES = "token_bytes.npy"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def token_byte_lengths(encoding) -> np.ndarray:
    """Bytes per token id via decode_single_token_bytes (decoding to str and re-encoding
    miscounts tokens that split a multi-byte character). Special tokens count 0 bytes."""
    special = set(encoding.special_tokens_set)
    special_ids = {encoding.encode_single_token(s) for s in special}
    out = np.zeros(encoding.n_vocab, dtype=np.int32)
    for i in range(encoding.n_vocab):
        if i in special_ids:
            continue
        try:
            out[i] = len(encoding.decode_single_token_bytes(i))
        except KeyError:  # a hole in the id space: never produced, so it carries no bytes
            out[i] = 0
    return out


def bytes_encoding():
    """The 'bytes' tokenizer: 256 byte tokens + BOS (id 256), as a tiktoken.Encoding."""
    import tiktoken

    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]",  # no pre-splitting beyond single characters; merges never happen
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={BOS: 256},
    )


def encoding_to_json(encoding) -> bytes:
    """A tiktoken.Encoding as JSON bytes: name, split pattern, merge ranks, special tokens."""
    ranks = encoding._mergeable_ranks  # tiktoken keeps the ranks it was built from
    return json.dumps({
        "name": encoding.name, "pat_str": encoding._pat_str,
        "mergeable_ranks": [[base64.b64encode(tok).decode("ascii"), int(rank)]
                            for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])],
        "special_tokens": {k: int(v) for k, v in encoding._special_tokens.items()},
    }, separators=(",", ":")).encode()


def encoding_from_json(raw: bytes):
    """The tiktoken.Encoding that `encoding_to_json` wrote. Plain data: no code runs."""
    import tiktoken

    spec = json.loads(raw)
    return tiktoken.Encoding(
        name=str(spec["name"]), pat_str=str(spec["pat_str"]),
        mergeable_ranks={base64.b64decode(tok): int(rank) for tok, rank in spec["mergeable_ranks"]},
        special_tokens={str(k): int(v) for k, v in spec["special_tokens"].items()},
    )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_prepared(directory: str | os.PathLike, *, encoding, train: np.ndarray, val: np.ndarray,
                   source: dict, tokenizer_info: dict | None = None, extra: dict | None = None) -> Path:
    """Write a prepared data directory from token streams (each doc already BOS-prefixed).

    Writes shards first and the manifest last (atomically), so a directory with a
    manifest is always complete.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if encoding.n_vocab > 65536:
        msg = f"vocab size {encoding.n_vocab} does not fit uint16 shards; use a vocab of at most 65536."
        raise ValueError(msg)
    splits = {}
    for name, arr in (("train", train), ("val", val)):
        arr = np.asarray(arr, dtype=np.uint16)
        _atomic_write_bytes(d / f"{name}.bin", arr.tobytes())
        splits[name] = {"tokens": int(arr.size), "file": f"{name}.bin", "sha256": _sha256_file(d / f"{name}.bin")}
    _atomic_write_bytes(d / TOKENIZER, encoding_to_json(encoding))
    tb = token_byte_lengths(encoding)
    tmp = d / "token_bytes.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, tb)
    os.replace(tmp, d / TOKEN_BYTES)
    bos_id = encoding.encode_single_token(BOS)
    for name in ("train", "val"):
        arr = np.asarray(train if name == "train" else val)
        splits[name]["docs"] = int((arr == bos_id).sum())
        splits[name]["bytes"] = int(tb[arr.astype(np.int64)].sum())
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "tokenizer": {"name": encoding.name, "vocab_size": encoding.n_vocab, "bos_id": int(bos_id),
                      "sha256": _sha256_file(d / TOKENIZER), **(tokenizer_info or {})},
        "splits": splits,
        "files": {name: _sha256_file(d / name) for name in (TOKENIZER, TOKEN_BYTES, "train.bin", "val.bin")},
        **(extra or {}),
    }
    _atomic_write_bytes(d / MANIFEST, json.dumps(manifest, indent=2).encode())
    return d


@dataclass
class PreparedData:
    """Read-only view of a prepared data directory (memmapped; cheap to open)."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "PreparedData":
        d = Path(directory).expanduser()
        m = d / MANIFEST
        if not m.is_file():
            msg = (f"No prepared data in {d} (no {MANIFEST}). Run `python prepare.py` "
                   "(or `autoresearch prepare`) first, or set AUTORESEARCH_DATA to a prepared directory.")
            raise FileNotFoundError(msg)
        manifest = json.loads(m.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            msg = f"{d} was prepared by another version (format {manifest.get('format')}); run `python prepare.py --force`."
            raise ValueError(msg)
        return cls(d, manifest)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def bos_id(self) -> int:
        return int(self.manifest["tokenizer"]["bos_id"])

    @cached_property
    def train(self) -> np.ndarray:
        return np.memmap(self.path / "train.bin", dtype=np.uint16, mode="r")

    @cached_property
    def val(self) -> np.ndarray:
        return np.memmap(self.path / "val.bin", dtype=np.uint16, mode="r")

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return np.load(self.path / "token_bytes.npy")

    @cached_property
    def tokenizer(self):
        """The tiktoken.Encoding, read from tokenizer.json (data, never code)."""
        return encoding_from_json(self.tokenizer_bytes())

    def tokenizer_bytes(self) -> bytes:
        return (self.path / TOKENIZER).read_bytes()

    def verify(self) -> list[str]:
        """Files whose sha256 no longer matches the manifest (empty when intact)."""
        bad = []
        for name, digest in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.is_file() or _sha256_file(p) != digest:
                bad.append(name)
        return bad

    def check(self) -> None:
        """Raise ValueError unless every file matches the manifest's hash.

        Cheap after the first call in a process: a file whose size, mtime and inode are
        those seen when its hash last matched is not read again (a full sha256 of the
        built-in data takes ~20 ms; of TinyStories ~1 s).
        """
        bad = []
        for name, digest in self.manifest.get("files", {}).items():
            p = self.path / name
            try:
                st = p.stat()
            except OSError:
                bad.append(name)
                continue
            key = (str(p.resolve()), digest)
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            if _VERIFIED.get(key) == stamp:
                continue
            if _sha256_file(p) != digest:
                bad.append(name)
            else:
                _VERIFIED[key] = stamp
        if bad:
            msg = (f"The prepared data in {self.path} no longer matches its manifest ({', '.join(bad)} changed): "
                   "nothing is scored on it. Prepare it again: `python prepare.py --force`.")
            raise ValueError(msg)


_VERIFIED: dict[tuple[str, str], tuple[int, int, int, int]] = {}
