"""The prepared-data format: token shards as uint16 memmaps plus a manifest.

A prepared data directory (made by `python prepare.py` / `autoresearch prepare`) holds:

    manifest.json      source, sizes, sha256 of each shard, tokenizer, split rule
    tokenizer.pkl      a pickled tiktoken.Encoding (BPE trained locally, or raw bytes)
    token_bytes.npy    int32[vocab_size]: UTF-8 bytes of each token id (specials: 0)
    train.bin          uint16 token stream, every document starts with BOS
    val.bin            uint16 token stream of the pinned validation documents

Light imports only (json, numpy; tiktoken when the tokenizer is asked for): the
training child reads this through the harness.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
BOS = "<|bos|>"
MANIFEST = "manifest.json"


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
    _atomic_write_bytes(d / "tokenizer.pkl", pickle.dumps(encoding))
    tb = token_byte_lengths(encoding)
    tmp = d / "token_bytes.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, tb)
    os.replace(tmp, d / "token_bytes.npy")
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
                      "sha256": _sha256_file(d / "tokenizer.pkl"), **(tokenizer_info or {})},
        "splits": splits,
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
        """The tiktoken.Encoding (unpickled on first use)."""
        with open(self.path / "tokenizer.pkl", "rb") as f:
            return pickle.load(f)

    def verify(self) -> list[str]:
        """Shards whose sha256 no longer matches the manifest (empty when intact)."""
        bad = []
        for name, info in self.manifest["splits"].items():
            p = self.path / info["file"]
            if not p.is_file() or _sha256_file(p) != info["sha256"]:
                bad.append(name)
        return bad
