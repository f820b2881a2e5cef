"""The tokenizer: byte-level BPE trained locally with rustbpe, used through tiktoken.

    from autoresearch_kit.data.tokenizer import train_bpe, make_tokenizer
    enc = train_bpe(documents, vocab_size=4096)     # tiktoken.Encoding, <|bos|> = 4095
    enc, info = make_tokenizer("bytes", [])          # 256 byte tokens + <|bos|> (256)

As in nanochat: rustbpe learns the merges (fast, parallel, in Rust) and tiktoken encodes
(fast, multi-threaded) with the same GPT-4-style split pattern, except that digits split
in runs of at most two (`\\p{N}{1,2}`, not three), which suits small vocabularies. The one
special token `<|bos|>` gets the last id; it starts every document. `vocab_size` counts it:
a 4096 vocabulary is 256 bytes + 3839 merges + BOS.

Default vocabulary: 8192 when CUDA is the device (AUTORESEARCH_DEVICE, else whether torch
sees a GPU), 4096 on CPU/MPS (`config.DEFAULT_VOCAB_SIZE`): the embedding and output layers
of a small CPU model stay cheap, and a 4096 vocabulary is already ~3.6 bytes per token on
English. `"bytes"` skips training: 257 ids, about 1 token per byte.

Train the tokenizer on the training documents only, so no statistics of the validation
text leak into the model through the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from autoresearch_kit import config
from autoresearch_kit.data.shards import BOS, bytes_encoding

# GPT-4's pattern (cl100k) with \p{N}{1,3} -> \p{N}{1,2}, as nanochat uses.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
MIN_VOCAB = 257  # 256 byte tokens + BOS
MAX_VOCAB = 65536  # shards are uint16
# Characters of training text fed to rustbpe at most (nanochat trains on ~2B; merges of a
# 4-8k vocabulary settle long before that, and this keeps TinyStories' pass under a minute).
DEFAULT_MAX_CHARS = 300_000_000


def training_on_cuda() -> bool:
    """Whether training will run on CUDA: AUTORESEARCH_DEVICE, else whether torch sees a GPU."""
    forced = (config.env("DEVICE") or "").strip().lower()
    if forced:
        return forced.startswith("cuda")
    try:
        import torch
    except ImportError:  # no torch on this machine: it won't train here either
        return False
    return bool(torch.cuda.is_available())


def default_vocab_size() -> int:
    """8192 when training will run on CUDA, else `config.DEFAULT_VOCAB_SIZE` (4096)."""
    return 8192 if training_on_cuda() else config.DEFAULT_VOCAB_SIZE


def parse_vocab_size(value) -> int | str:
    """'bytes' -> 'bytes'; '4096' / 4096 -> 4096; anything else raises ValueError."""
    if value is None:
        return default_vocab_size()
    if str(value).strip().lower() in ("bytes", "byte", "256"):
        return "bytes"
    try:
        v = int(str(value).strip())
    except ValueError:
        v = None
    if v is None or not MIN_VOCAB <= v <= MAX_VOCAB:
        msg = (f"--vocab-size must be 'bytes' or a whole number from {MIN_VOCAB} to {MAX_VOCAB} "
               f"(e.g. 4096 on CPU, 8192 on a GPU), got {value!r}.")
        raise ValueError(msg)
    return v


def _capped(texts: Iterable[str], max_chars: int | None, seen: dict) -> Iterator[str]:
    for text in texts:
        if max_chars is not None and seen["chars"] >= max_chars:
            return
        seen["docs"] += 1
        seen["chars"] += len(text)
        yield text


def train_bpe(texts: Iterable[str], vocab_size: int, *, max_chars: int | None = DEFAULT_MAX_CHARS,
              stats: dict | None = None):
    """Train a byte-level BPE with rustbpe and return it as a tiktoken.Encoding.

    Parameters
    ----------
    texts : Iterable[str]
        Training documents (never the validation ones).
    vocab_size : int
        Total ids including ``<|bos|>`` (which gets id ``n_vocab - 1``).
    max_chars : int, optional
        Stop feeding documents once this many characters have gone in.
    stats : dict, optional
        Filled with ``{"docs", "chars"}`` actually used for training.

    Returns
    -------
    tiktoken.Encoding
        Named ``"bpe<vocab_size>"``. On a corpus too small for that many merges the
        vocabulary comes out smaller; ``n_vocab`` tells the truth.
    """
    try:
        import rustbpe
    except ImportError as e:
        msg = "Training a BPE tokenizer needs rustbpe: pip install rustbpe (or use --vocab-size bytes)."
        raise ImportError(msg) from e
    import tiktoken

    vocab_size = int(vocab_size)
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        msg = f"vocab_size must be between {MIN_VOCAB} and {MAX_VOCAB}, got {vocab_size}."
        raise ValueError(msg)
    seen = {"docs": 0, "chars": 0}
    tok = rustbpe.Tokenizer()
    # rustbpe's vocab_size counts byte tokens + merges; BOS comes on top.
    tok.train_from_iterator(_capped(texts, max_chars, seen), vocab_size - 1, pattern=SPLIT_PATTERN)
    if seen["docs"] == 0:
        msg = "No training documents to learn a tokenizer from."
        raise ValueError(msg)
    ranks = {bytes(k): int(v) for k, v in tok.get_mergeable_ranks()}
    assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe ranks are not dense"
    if stats is not None:
        stats.update(seen)
    return tiktoken.Encoding(name=f"bpe{vocab_size}", pat_str=tok.get_pattern(), mergeable_ranks=ranks,
                             special_tokens={BOS: len(ranks)})


def make_tokenizer(vocab_size: int | str, train_texts: Iterable[str], *,
                   max_chars: int | None = DEFAULT_MAX_CHARS) -> tuple[object, dict]:
    """The tokenizer for `vocab_size` (an int or ``"bytes"``), and its manifest entry.

    Returns
    -------
    (tiktoken.Encoding, dict)
        The dict (stored as manifest ``tokenizer`` fields) records kind, requested vocab
        size, split pattern and how much text trained it.
    """
    if str(vocab_size) == "bytes":
        return bytes_encoding(), {"kind": "bytes", "requested_vocab_size": "bytes"}
    stats: dict = {}
    enc = train_bpe(train_texts, int(vocab_size), max_chars=max_chars, stats=stats)
    info = {"kind": "bpe", "requested_vocab_size": int(vocab_size), "pattern": SPLIT_PATTERN,
            "trainer": f"rustbpe {_version('rustbpe')}",
            "trained_on_docs": stats["docs"], "trained_on_chars": stats["chars"], "max_chars": max_chars}
    return enc, info


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


__all__ = ["SPLIT_PATTERN", "default_vocab_size", "make_tokenizer", "parse_vocab_size", "train_bpe", "training_on_cuda"]
