"""Prepare a dataset: corpus -> tokenizer -> uint16 token shards (+ manifest) in the cache.

    python prepare.py                                   # built-in corpus, default vocabulary
    python prepare.py --dataset tinystories --vocab-size 8192
    python prepare.py --dataset notes/ --vocab-size bytes
    autoresearch prepare ...                            # the same flags

    from autoresearch_kit.data import prepare
    path = prepare("builtin", vocab_size=4096)          # -> Path of the prepared directory

Stages: read the corpus and hash its text; reuse the directory if it already holds
the same text prepared with the same tokenizer settings (say so, change nothing);
else train the BPE on the training documents only, encode every document with
`<|bos|>` in front (tiktoken, all cores), and write the shards through
`shards.write_prepared` (manifest last, so a directory with a manifest is complete).
Finally `<cache>/data/LATEST` names the directory, so `python train.py` and the runner
pick it up without flags.

The manifest's `source` records the dataset, document counts, the sha256 of the text,
the validation rule and (builtin) the val chapter ids; `baselines.unigram_bpb` is the
bits per byte of the val split under the train split's unigram token distribution:
the score of a model that has learned token frequencies and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from autoresearch_kit import config
from autoresearch_kit.data import shards
from autoresearch_kit.data.corpus import HF_ALIASES, load_corpus, text_sha256, tinystories_available
from autoresearch_kit.data.tokenizer import DEFAULT_MAX_CHARS, make_tokenizer, parse_vocab_size, training_on_cuda

# Bumped when the way documents become tokens changes, so old directories are rebuilt.
PIPELINE_VERSION = 1
_ENCODE_BATCH = 2048  # documents per encode_ordinary_batch call: big enough for the thread pool
# The exceptions that mean "the user asked for something that can't be done" (bad path,
# offline Hub dataset, bad vocab size, missing package): one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError, ImportError)
# A run that sees its training tokens more often than this is mostly memorising them
# (on an H200 the built-in corpus, ~170 passes in 300 s, scored 1.39 bpb at 10 s and 2.42 at 300 s).
EPOCHS_WARN = 3.0


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def default_dataset(progress: bool = True) -> str:
    """The dataset `prepare` uses when none is named: large enough for the device's budget.

    On CPU/MPS the built-in corpus (1M tokens is plenty for 60 s). On CUDA, where a
    300 s run would see the built-in corpus ~170 times, TinyStories when it can be read
    (a local copy in AUTORESEARCH_TINYSTORIES, the Hugging Face cache when offline, or
    huggingface.co within 3 s), saying so; else the built-in corpus with a warning.
    """
    if not training_on_cuda():
        return config.DEFAULT_DATASET
    ok, why = tinystories_available()
    if ok:
        _say(progress, f"CUDA: preparing TinyStories by default, from {why} (--dataset builtin for the small "
                       "built-in corpus)")
        return "tinystories"
    print(f"prepare: warning: CUDA, but TinyStories cannot be read ({why}): preparing the built-in corpus "
          "(~1M tokens), which a 300 s GPU run sees ~170 times, so the loop rewards training less. Prepare a "
          "larger corpus: `--dataset tinystories` online, `--dataset tinystories:PATH` (or "
          "AUTORESEARCH_TINYSTORIES=PATH) for a local copy, or `--dataset path/to/your/texts`.",
          file=sys.stderr, flush=True)
    return config.DEFAULT_DATASET


def default_data_dir(dataset: str, vocab_size: int | str, limit: int | None = None) -> Path:
    """`<cache>/data/<name>-bpe<V>`: builtin/tinystories by name, a local path by its
    basename plus a short hash of its absolute path (two folders called `data/` differ)."""
    name = str(dataset)
    alias, sep, _ = name.partition(":")
    if sep and alias in HF_ALIASES:  # tinystories:PATH is TinyStories, wherever the copy lives
        name = alias
    if name != "builtin" and not name.startswith("hf:") and name not in HF_ALIASES:
        p = Path(name).expanduser().resolve()
        name = f"{p.stem or 'data'}_{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    if limit is not None:
        name = f"{name}-limit{limit}"
    return config.cache_dir() / "data" / config.data_name(name, vocab_size)


def _encode(enc, docs: Iterable[str], bos: int, threads: int, progress: bool, label: str,
            total_docs: int) -> np.ndarray:
    """All documents as one uint16 stream, each preceded by BOS (no per-token Python loop)."""
    chunks: list[np.ndarray] = []
    bos_arr = np.array([bos], dtype=np.uint16)
    batch: list[str] = []
    done, last = 0, time.time()

    def flush():
        nonlocal done, last
        parts = []
        for ids in enc.encode_ordinary_batch(batch, num_threads=threads):
            parts.append(bos_arr)
            parts.append(np.array(ids, dtype=np.uint16))
        # One array per batch, not two per document: 2M TinyStories docs stay cheap to hold.
        chunks.append(np.concatenate(parts))
        done += len(batch)
        batch.clear()
        if progress and time.time() - last > 2.0:  # a line every few seconds on long jobs
            last = time.time()
            print(f"      {label}: {done:,}/{total_docs:,} documents ({100 * done / max(total_docs, 1):.0f}%)",
                  flush=True)

    for doc in docs:
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    if batch:
        flush()
    if not chunks:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate(chunks)


def unigram_bpb(train: np.ndarray, val: np.ndarray, token_bytes: np.ndarray) -> float:
    """Bits per byte of `val` under the unigram distribution of `train` (add-one smoothed,
    over the tokens that carry bytes; BOS and other 0-byte tokens are left out of both sums,
    as the metric does)."""
    V = len(token_bytes)
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=V)[:V].astype(np.float64)
    scored = token_bytes > 0
    counts = np.where(scored, counts + 1.0, 0.0)
    logp = np.full(V, -np.inf)
    logp[scored] = np.log2(counts[scored] / counts.sum())
    v = np.asarray(val, dtype=np.int64)
    v = v[scored[v]]
    nbytes = int(token_bytes[v].sum())
    return float(-logp[v].sum() / nbytes) if nbytes else float("nan")


def _tokenizer_settings(vocab_size, max_chars) -> dict:
    """What must match for a prepared directory to be reused."""
    return {"pipeline": PIPELINE_VERSION, "vocab_size": str(vocab_size),
            "max_chars": None if str(vocab_size) == "bytes" else max_chars}


def _reusable(directory: Path, sha: str, settings: dict) -> shards.PreparedData | None:
    try:
        data = shards.PreparedData.open(directory)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    m = data.manifest
    if m.get("source", {}).get("sha256") != sha or m.get("prepare", {}).get("settings") != settings:
        return None
    if data.verify():  # a shard changed on disk since: rebuild rather than trust it
        return None
    return data


def _summary(data: shards.PreparedData) -> str:
    s = data.manifest["splits"]
    tr, va = s["train"], s["val"]
    bpt = tr["bytes"] / max(tr["tokens"], 1)
    base = data.manifest.get("baselines", {}).get("unigram_bpb")
    base_txt = f"; unigram baseline {base:.3f} bpb" if base is not None else ""
    return (f"{_fmt_count(tr['tokens'])} train tokens ({tr['docs']:,} docs), {_fmt_count(va['tokens'])} val tokens "
            f"({va['docs']:,} docs), vocab {data.vocab_size}, {bpt:.2f} bytes/token{base_txt}")


def _record_latest(directory: Path) -> None:
    root = config.cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    d = directory.resolve()
    # A directory inside <cache>/data is named by its folder name; one elsewhere by its
    # absolute path (config.data_dir joins the two, and an absolute path wins the join).
    name = d.name if d.parent == root.resolve() else str(d)
    tmp = root / (config.LATEST_FILE + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / config.LATEST_FILE)


def prepare(dataset: str | None = None, vocab_size: int | str | None = None, data_dir: str | os.PathLike | None = None,
            force: bool = False, progress: bool = True, *, limit: int | None = None,
            max_chars: int | None = DEFAULT_MAX_CHARS, threads: int | None = None) -> Path:
    """Prepare `dataset` for training and return the prepared directory.

    Parameters
    ----------
    dataset : str, optional
        ``"builtin"`` (offline), ``"tinystories"``, ``"tinystories:PATH"`` (a local
        copy), ``"hf:OWNER/NAME"`` or a local path (see `autoresearch_kit.data.corpus`).
        Default: `default_dataset()` (built-in on CPU/MPS; TinyStories on CUDA when
        it can be read, else the built-in corpus with a warning).
    vocab_size : int or "bytes", optional
        BPE vocabulary including ``<|bos|>``; default 8192 with CUDA, else 4096.
    data_dir : path, optional
        Where to write; default ``<cache>/data/<dataset>-bpe<V>``.
    force : bool
        Rebuild even if the directory already holds this text with this tokenizer.
    progress : bool
        Print stage lines (False: silent).
    limit : int, optional
        Read at most this many documents per source split (quick experiments, tests).
    max_chars : int, optional
        Characters of training text the BPE learns from at most.
    threads : int, optional
        Encoding threads (default: all cores).

    Returns
    -------
    Path
        The prepared directory (also recorded in ``<cache>/data/LATEST``).
    """
    t0 = time.time()
    vocab = parse_vocab_size(vocab_size)
    if dataset is None:
        dataset = default_dataset(progress)
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(dataset, vocab, limit)
    _say(progress, f"[1/4] reading {dataset} ...")
    corpus = load_corpus(dataset, limit=limit)
    sha, counts = text_sha256(corpus)
    if counts["train_docs"] == 0 or counts["val_docs"] == 0:
        msg = (f"{dataset} gave {counts['train_docs']} training and {counts['val_docs']} validation documents; "
               "both must be non-empty (raise --limit or add documents).")
        raise ValueError(msg)
    total_mb = (counts["train_bytes"] + counts["val_bytes"]) / 1e6
    _say(progress, f"      {counts['train_docs']:,} train / {counts['val_docs']:,} val documents, {total_mb:.2f} MB "
                   f"of text, sha256 {sha[:12]} ({time.time() - t0:.1f}s)")
    settings = _tokenizer_settings(vocab, max_chars)
    if not force:
        data = _reusable(directory, sha, settings)
        if data is not None:
            _record_latest(directory)
            _say(progress, f"reusing prepared data in {directory}: {_summary(data)} "
                           "(same text, same tokenizer settings; --force rebuilds)")
            return directory
    # From here the directory is being rebuilt: drop its manifest first, so nobody reads
    # a half-written mix of old and new shards as complete.
    (directory / shards.MANIFEST).unlink(missing_ok=True)

    t1 = time.time()
    label = "bytes" if vocab == "bytes" else f"BPE vocab {vocab}"
    _say(progress, f"[2/4] tokenizer: {label}" + ("" if vocab == "bytes" else " (rustbpe, training documents only)"))
    enc, tok_info = make_tokenizer(vocab, corpus.train, max_chars=max_chars)
    bos = enc.encode_single_token(shards.BOS)
    short = ""
    if vocab != "bytes" and enc.n_vocab < int(vocab):
        # rustbpe stops when no pair repeats: a small or repetitive corpus gives fewer ids
        short = f"; the corpus only supports {enc.n_vocab} of the {vocab} asked for (too little varied text)"
    _say(progress, f"      {enc.n_vocab} ids, <|bos|> = {bos}{short} ({time.time() - t1:.1f}s)")

    t2 = time.time()
    threads = threads or os.cpu_count() or 1
    _say(progress, f"[3/4] encoding with tiktoken on {threads} threads ...")
    train = _encode(enc, corpus.train, bos, threads, progress, "train", counts["train_docs"])
    val = _encode(enc, corpus.val, bos, threads, progress, "val", counts["val_docs"])
    _say(progress, f"      {_fmt_count(train.size)} train + {_fmt_count(val.size)} val tokens ({time.time() - t2:.1f}s)")

    t3 = time.time()
    _say(progress, f"[4/4] writing shards to {directory}")
    token_bytes = shards.token_byte_lengths(enc)
    source = {"dataset": str(dataset), "sha256": sha, **counts, "split_rule": corpus.split_rule, **corpus.info}
    if corpus.val_ids is not None:
        source["val_ids"] = corpus.val_ids
    extra = {
        # seconds: reading, tokenizer training and encoding (the shard write comes after)
        "prepare": {"settings": settings, "seconds": round(time.time() - t0, 2), "threads": threads},
        "baselines": {"unigram_bpb": unigram_bpb(train, val, token_bytes),
                      "note": "val bits/byte under the train split's add-one unigram token distribution"},
    }
    shards.write_prepared(directory, encoding=enc, train=train, val=val, source=source,
                          tokenizer_info=tok_info, extra=extra)
    _record_latest(directory)
    data = shards.PreparedData.open(directory)
    _say(progress, f"      done in {time.time() - t3:.1f}s")
    _say(progress, f"prepared {directory} in {time.time() - t0:.1f}s: {_summary(data)}")
    return directory


# ----------------------------------------------------------------------------- pinning and epochs


def _manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir).expanduser() / shards.MANIFEST
    if not path.is_file():
        msg = (f"No prepared data in {Path(data_dir).expanduser()} (no {shards.MANIFEST}). Run `python prepare.py` "
               "(or `autoresearch prepare`) first, or point at a prepared directory.")
        raise FileNotFoundError(msg)
    return json.loads(path.read_text())


def manifest_identity(manifest: dict) -> dict:
    """What a score depends on in a manifest: the text, its split, the tokenizer, the tokens.

    Left out: timestamps, timings, thread counts, paths (the same text prepared twice, or
    from a moved folder, is the same data) and the tokenizer pickle's own hash (pickles
    differ across tiktoken versions; the token shards' hashes already pin the tokenizer's
    effect).
    """
    src, tok, splits = manifest.get("source", {}), manifest.get("tokenizer", {}), manifest.get("splits", {})
    return {
        "format": manifest.get("format"),
        "text_sha256": src.get("sha256"),
        "split_rule": src.get("split_rule"),
        "train_docs": src.get("train_docs"), "val_docs": src.get("val_docs"),
        "limit": src.get("limit"),
        "tokenizer": {k: tok.get(k) for k in ("name", "vocab_size", "bos_id", "kind")},
        "splits": {name: {"tokens": info.get("tokens"), "sha256": info.get("sha256")}
                   for name, info in sorted(splits.items())},
    }


def manifest_hash(data_dir: str | os.PathLike) -> str:
    """A short hash of the prepared data a score depends on (dataset text, split, tokenizer, tokens).

    Computed from manifest.json's content (`manifest_identity`), so it is the same after
    re-preparing the same text with the same tokenizer (`--force`, another machine, a
    moved folder) and differs when the text, the validation split, the tokenizer or the
    token shards differ. A Lab records it and refuses other data (see `Lab(rebaseline=)`).

    Parameters
    ----------
    data_dir : path
        A prepared data directory.

    Returns
    -------
    str
        16 hex digits.

    Raises
    ------
    FileNotFoundError
        When `data_dir` holds no manifest.json.
    """
    ident = manifest_identity(_manifest(data_dir))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def describe_data(data_dir: str | os.PathLike) -> str:
    """A few words naming prepared data: ``"builtin, bpe4096 (1.23M train tokens)"``."""
    m = _manifest(data_dir)
    src, tok = m.get("source", {}), m.get("tokenizer", {})
    name = src.get("dataset", "?")
    if src.get("local_copy"):
        name = f"{name} (local copy)"
    if src.get("limit") is not None:
        name = f"{name} limit {src['limit']}"
    kind = "bytes" if tok.get("kind") == "bytes" or tok.get("name") == "bytes" else f"bpe{tok.get('vocab_size')}"
    return f"{name}, {kind} ({_fmt_count(m.get('splits', {}).get('train', {}).get('tokens', 0))} train tokens)"


def training_epochs(data_dir: str | os.PathLike, tokens: float) -> tuple[float, str | None]:
    """How many times a run of `tokens` training tokens sees the prepared training split.

    Parameters
    ----------
    data_dir : path
        A prepared data directory.
    tokens : float
        Training tokens the run consumes (measured, or the budget's).

    Returns
    -------
    (float, str or None)
        ``epochs = tokens / train tokens``, and a warning text when it exceeds
        `EPOCHS_WARN` (3): past a few passes a small model memorises its training text,
        val_bpb gets worse the longer it trains, and the loop rewards training less.
    """
    if tokens is None or not math.isfinite(float(tokens)) or float(tokens) < 0:
        msg = f"tokens must be a non-negative number of training tokens, got {tokens!r}."
        raise ValueError(msg)
    m = _manifest(data_dir)
    train = int(m.get("splits", {}).get("train", {}).get("tokens", 0))
    if train <= 0:
        msg = f"{data_dir} has no training tokens; run `python prepare.py --force`."
        raise ValueError(msg)
    epochs = float(tokens) / train
    if epochs <= EPOCHS_WARN:
        return epochs, None
    warning = (f"this run sees its {_fmt_count(train)} training tokens {epochs:.1f} times ({_fmt_count(tokens)} tokens): "
               f"past ~{EPOCHS_WARN:g} epochs a small model memorises its training text and the loop rewards "
               "training less. Prepare a larger corpus (on a GPU: `autoresearch prepare --dataset tinystories`, "
               "or your own texts) or use a smaller budget.")
    return epochs, warning


# ----------------------------------------------------------------------------- command line


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the prepare flags (shared by `python prepare.py` and `autoresearch prepare`)."""
    parser.add_argument("--dataset", default=None,
                        help="builtin (offline), tinystories (Hugging Face, online once), tinystories:PATH "
                             "(a local copy), hf:OWNER/NAME, or a path to a .txt/.jsonl/.json/.parquet file or a "
                             "folder of them (default: builtin on CPU/MPS; on CUDA tinystories when reachable, "
                             "else builtin with a warning)")
    parser.add_argument("--vocab-size", default=None,
                        help="BPE vocabulary size including <|bos|> (default: 8192 with CUDA, else 4096), "
                             "or 'bytes' for the 257-id byte tokenizer")
    parser.add_argument("--data-dir", default=None, type=Path,
                        help="where to write (default: <cache>/data/<dataset>-bpe<V>; cache = AUTORESEARCH_CACHE "
                             "or ~/.cache/autoresearch_kit)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the prepared data is up to date")
    parser.add_argument("--limit", type=int, default=None,
                        help="read at most N documents per source split (quick trials)")
    parser.add_argument("--tokenizer-chars", type=float, default=DEFAULT_MAX_CHARS,
                        help=f"characters of training text the BPE learns from at most (default {DEFAULT_MAX_CHARS:.0e})")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def run_prepare(args: argparse.Namespace) -> Path:
    """Run `prepare` from parsed `add_prepare_args` flags; returns the prepared directory."""
    limit = getattr(args, "limit", None)
    max_chars = getattr(args, "tokenizer_chars", DEFAULT_MAX_CHARS)
    return prepare(dataset=args.dataset, vocab_size=args.vocab_size, data_dir=args.data_dir, force=args.force,
                   progress=not getattr(args, "quiet", False), limit=limit,
                   max_chars=None if max_chars is None else int(max_chars))


def main(argv: list[str] | None = None) -> int:
    """`python prepare.py`: user mistakes print one line and exit 2 (no traceback)."""
    parser = add_prepare_args(argparse.ArgumentParser(
        prog="prepare.py", description="Prepare data for train.py: corpus -> tokenizer -> token shards."))
    args = parser.parse_args(argv)
    try:
        run_prepare(args)
    except USER_ERRORS as e:
        if os.environ.get("AUTORESEARCH_DEBUG"):
            raise
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nprepare.py: interrupted; nothing was recorded as prepared", file=sys.stderr)
        return 130
    return 0


class _CallableModule(types.ModuleType):
    """`autoresearch_kit.data.prepare` is both this module and, once imported, the
    attribute the package exposes as its `prepare` function: Python's import system sets
    `autoresearch_kit.data.prepare = <module>` after the first import, shadowing the
    function of the same name in data/__init__.py. Calling the module calls `prepare`."""

    def __call__(self, *args, **kwargs) -> Path:
        return prepare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["EPOCHS_WARN", "USER_ERRORS", "add_prepare_args", "default_data_dir", "default_dataset", "describe_data",
           "main", "manifest_hash", "manifest_identity", "prepare", "run_prepare", "training_epochs", "unigram_bpb"]
