"""Corpora: where the documents come from, and which of them are validation.

    from autoresearch_kit.data.corpus import load_documents, load_corpus
    docs = load_documents("builtin", split="val")        # list[str], offline, shipped
    corpus = load_corpus("tinystories")                  # Hugging Face, needs the network once
    corpus = load_corpus("notes/")                       # a local file or folder
    for text in corpus.train: ...                        # re-iterable, never the val docs

Sources (`dataset` argument, also `--dataset` of `python prepare.py`):

builtin
    The shipped corpus (data/builtin/web.jsonl.xz): 1,388 chapters, 4.9 MB of English
    prose derived from the public-domain World English Bible. Works offline. The val
    split is pinned in the file: every 10th chapter in canonical order.
tinystories
    `roneneldan/TinyStories` from the Hugging Face Hub through `datasets` (2.1M short
    stories; about 1.9 GB to download once, then cached). Val = the dataset's own
    `validation` split. A local copy of the repository (its README.md and `data/*.parquet`,
    e.g. the fixture `scripts/make_tinystories_fixture.py` writes) is read instead with
    `tinystories:PATH` or `AUTORESEARCH_TINYSTORIES=PATH`: the same code path, offline.
    `tinystories-clean` is `karpathy/tinystories-gpt4-clean` (one train split; val by
    the hash rule below). `hf:OWNER/NAME` loads any Hub dataset with
    a `text` column the same way. Offline these fail within seconds, naming the
    offline alternatives.
a path
    A `.txt` file (documents are separated by blank lines: `sample_by="paragraph"`),
    a `.jsonl` / `.json` file (one document per record, `text` field), a `.parquet` file
    (`text` column), any of these compressed (`.gz`, `.bz2`, `.xz`, `.zst`), or a folder
    holding such files (searched recursively, in sorted order). Read with `datasets`.

The hash rule, for sources without a validation split of their own: a document is val
when the first 8 bytes of sha256(utf-8 text), as a big-endian integer, are 0 mod 20
(about 5%). It depends on the text alone, so val stays val when files are reordered or
appended to, and exact duplicates never straddle the split. If it picks no document at
all (tiny corpora), the document with the smallest hash is val.

Empty (whitespace-only) documents are dropped everywhere; surrounding newlines are stripped.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_FILE = Path(__file__).resolve().parent / "builtin" / "web.jsonl.xz"
BUILTIN_RULE = "builtin: val = chapters whose canonical index % 10 == 0 (pinned in web.jsonl.xz)"
HASH_MOD = 20
HASH_RULE = f"val = documents with int.from_bytes(sha256(text)[:8], 'big') % {HASH_MOD} == 0"
HF_ALIASES = {
    "tinystories": "roneneldan/TinyStories",
    "tinystories-clean": "karpathy/tinystories-gpt4-clean",
}
_HF_VAL_SPLITS = ("validation", "valid", "val", "test")
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_OFFLINE_HINT = ("Offline, use `--dataset builtin` (the shipped corpus), a local copy of TinyStories "
                 "(`--dataset tinystories:PATH` or AUTORESEARCH_TINYSTORIES=PATH), or a local file or folder "
                 "(`--dataset path/to/texts.txt|.jsonl|.parquet|folder/`).")
TINYSTORIES_ENV = "AUTORESEARCH_TINYSTORIES"   # a local copy of roneneldan/TinyStories (a folder)
# datasets caches a Hub dataset under <HF_DATASETS_CACHE>/<owner>___<snake_name>
_TINYSTORIES_CACHE_NAME = "roneneldan___tiny_stories"
_BATCH = 1000


@dataclass
class Corpus:
    """A source's documents, already split. `train` and `val` are re-iterable.

    Attributes
    ----------
    name : str
        What the user asked for (``"builtin"``, ``"tinystories"``, a path).
    train, val : Iterable[str]
        Documents; iterating again gives the same documents in the same order.
    split_rule : str
        How val was chosen, in words (copied into the prepared manifest).
    info : dict
        Where the documents came from (files, Hub repository, limit), for the manifest.
    val_ids : list[str] | None
        Stable ids of the val documents where the source has them (builtin chapters).
    """

    name: str
    train: Iterable[str]
    val: Iterable[str]
    split_rule: str
    info: dict = field(default_factory=dict)
    val_ids: list[str] | None = None


def _clean(text) -> str | None:
    if text is None:
        return None
    text = str(text).strip("\r\n")
    return text if text.strip() else None


def _hash_is_val(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HASH_MOD == 0


class _Texts:
    """Re-iterable documents of a Hugging Face Dataset column (arrow-backed, not in RAM).

    `keep` selects documents by hash rule ("train" / "val"); None keeps all.
    """

    def __init__(self, ds, column: str = "text", keep: str | None = None, fallback_val: int | None = None):
        self.ds, self.column, self.keep, self.fallback_val = ds, column, keep, fallback_val

    def __iter__(self) -> Iterator[str]:
        index = 0
        for batch in self.ds.select_columns([self.column]).iter(batch_size=_BATCH):
            for raw in batch[self.column]:
                text = _clean(raw)
                if text is None:
                    continue
                if self.keep is None:
                    yield text
                else:
                    is_val = _hash_is_val(text) or index == self.fallback_val
                    if is_val == (self.keep == "val"):
                        yield text
                index += 1


class _Stream:
    """Re-iterable documents of a streamed (IterableDataset) source, capped at `limit`."""

    def __init__(self, make, column: str = "text", keep: str | None = None):
        self.make, self.column, self.keep = make, column, keep

    def __iter__(self) -> Iterator[str]:
        for row in self.make():
            text = _clean(row.get(self.column))
            if text is None:
                continue
            if self.keep is None or _hash_is_val(text) == (self.keep == "val"):
                yield text


# ----------------------------------------------------------------------------- builtin


def _builtin(limit: int | None) -> Corpus:
    if not BUILTIN_FILE.is_file():
        msg = (f"The built-in corpus is missing ({BUILTIN_FILE}). Reinstall the package "
               "(`pip install -e .`) or rebuild it with `python scripts/build_corpus.py`.")
        raise FileNotFoundError(msg)
    train, val, val_ids = [], [], []
    with lzma.open(BUILTIN_FILE, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            rec = json.loads(line)
            (val if rec["split"] == "val" else train).append(rec["text"])
            if rec["split"] == "val":
                val_ids.append(rec["id"])
    info = {"file": BUILTIN_FILE.name, "license": "public domain (World English Bible, eBible.org)"}
    if limit is not None:
        info["limit"] = limit
    return Corpus("builtin", train, val, BUILTIN_RULE, info, val_ids)


# ----------------------------------------------------------------------------- Hugging Face


def _kit_cache() -> Path:
    from autoresearch_kit import config

    return config.cache_dir()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub, in a thread so a hanging DNS lookup can't stall us."""
    import socket

    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except Exception:  # noqa: BLE001 - any failure means "not reachable"; never kill the thread
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _offline() -> bool:
    return _truthy("HF_DATASETS_OFFLINE") or _truthy("HF_HUB_OFFLINE")


def _hf(name: str, repo: str, limit: int | None, local: Path | None = None) -> Corpus:
    """A Hub dataset (`repo`), or a local copy of one (`local`, a folder laid out as the
    Hub repository: README.md with its configs, data/*.parquet), read the same way."""
    offline = _offline()
    if local is not None:
        if not local.is_dir():
            msg = (f"No local copy of {repo} at {local} (for --dataset {name}): point it at a folder holding "
                   f"the dataset's files (README.md, data/*.parquet), e.g. one written by "
                   f"`python scripts/make_tinystories_fixture.py {local}`.")
            raise FileNotFoundError(msg)
        hub_repo, repo = repo, str(local)
    else:
        hub_repo = None
    is_dir = Path(repo).expanduser().is_dir()   # a local copy (also `hf:DIR`): no network needed
    if not is_dir and not offline and not _hub_reachable():
        msg = (f"Cannot reach huggingface.co to download {repo} for --dataset {name}. {_OFFLINE_HINT} "
               "If you downloaded it before, set HF_DATASETS_OFFLINE=1 to use the cached copy.")
        raise ConnectionError(msg)
    try:
        import datasets
    except ImportError as e:  # a base dependency, but a GPU box may have a trimmed env
        msg = f"--dataset {name} needs the `datasets` package: pip install datasets. {_OFFLINE_HINT}"
        raise ImportError(msg) from e
    datasets.logging.set_verbosity_error()  # no per-file progress spam from datasets
    kwargs = {}
    if is_dir:  # a local copy (`tinystories:DIR`, `hf:DIR`): our cache, no bars
        kwargs["cache_dir"] = str(_kit_cache() / "hf_datasets")
        datasets.disable_progress_bars()
    try:
        if limit is not None:
            # Streaming reads only the first `limit` rows instead of downloading everything.
            splits = list(datasets.get_dataset_split_names(repo))
        else:
            loaded = datasets.load_dataset(repo, **kwargs)
            splits = list(loaded)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError)
        where = ("HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local cache"
                 if offline and not is_dir else f"{type(e).__name__}: {str(e)[:300]}")
        msg = f"Could not load {repo} for --dataset {name} ({where}). {_OFFLINE_HINT}"
        raise ConnectionError(msg) from e
    train_split = "train" if "train" in splits else splits[0]
    val_split = next((s for s in _HF_VAL_SPLITS if s in splits and s != train_split), None)
    info = {"hub": hub_repo or repo, "train_split": train_split, "val_split": val_split}
    if hub_repo is not None:
        info["local_copy"] = str(Path(repo).resolve())
    if limit is not None:
        info["limit"] = limit

        def stream(split):
            return lambda: datasets.load_dataset(repo, split=split, streaming=True).take(limit)

        if val_split:
            return Corpus(name, _Stream(stream(train_split)), _Stream(stream(val_split)),
                          f"{info['hub']}: its own '{val_split}' split", info)
        return Corpus(name, _Stream(stream(train_split), keep="train"), _Stream(stream(train_split), keep="val"),
                      HASH_RULE, info)
    for split in (train_split, val_split):
        if split:
            _need_text_column(loaded[split].column_names, f"{repo} ({split})")
    if val_split:
        return Corpus(name, _Texts(loaded[train_split]), _Texts(loaded[val_split]),
                      f"{info['hub']}: its own '{val_split}' split", info)
    ds = loaded[train_split]
    return Corpus(name, _Texts(ds, keep="train"), _Texts(ds, keep="val"), HASH_RULE, info)


def _hf_datasets_cache() -> Path:
    """Where `datasets` caches Hub datasets, worked out without importing it (~1 s)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "datasets"


def tinystories_available(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether `--dataset tinystories` can be read here, decided fast and offline-safe.

    In order: ``AUTORESEARCH_TINYSTORIES`` (a local copy: available if the folder
    exists); with ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set, only a copy already
    in the Hugging Face datasets cache counts (no network call is made); otherwise a
    TCP connect to huggingface.co, given up after `timeout` seconds.

    Returns
    -------
    (bool, str)
        Available or not, and why, in words (for the line `prepare` prints).
    """
    local = os.environ.get(TINYSTORIES_ENV, "").strip()
    if local:
        if Path(local).expanduser().is_dir():
            return True, f"the local copy in {local} ({TINYSTORIES_ENV})"
        return False, f"{TINYSTORIES_ENV}={local} is not a folder"
    cached = _hf_datasets_cache() / _TINYSTORIES_CACHE_NAME
    if _offline():
        if cached.is_dir():
            return True, f"the copy in the Hugging Face cache ({cached}; offline mode is set)"
        return False, ("HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and TinyStories is not in the Hugging Face "
                       f"cache ({cached})")
    if _hub_reachable(timeout=timeout):
        how = "cached, reused" if cached.is_dir() else "about 1.9 GB, downloaded once"
        return True, f"huggingface.co is reachable ({how})"
    return False, f"huggingface.co did not answer within {timeout:g} s"


# ----------------------------------------------------------------------------- local files


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _need_text_column(columns: list[str], where) -> None:
    if "text" not in columns:
        msg = (f"{where} has no 'text' column (found: {', '.join(columns) or 'none'}). "
               "Each record needs its document in a field named 'text'.")
        raise ValueError(msg)


def _local(path: Path, limit: int | None) -> Corpus:
    if not path.exists():
        msg = (f"No such file or folder: {path}. --dataset takes `builtin`, `tinystories`, or a path to "
               "a .txt / .jsonl / .json / .parquet file or a folder of them.")
        raise FileNotFoundError(msg)
    if path.is_dir():
        # Skip hidden files and the kit's own cache, should it live inside the folder
        # (its manifest.json and datasets' json files are not documents).
        kit_cache = _kit_cache().resolve()
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and not p.resolve().is_relative_to(kit_cache))
        usable = [p for p in files if _builder(p)]
        if not usable:
            found = sorted({"".join(p.suffixes) or p.name for p in files})[:10]
            msg = (f"No .txt, .jsonl, .json or .parquet files in {path} (found: {', '.join(found) or 'nothing'}).")
            raise ValueError(msg)
    else:
        if not _builder(path):
            msg = (f"Don't know how to read {path.name!r}: use a .txt file (documents separated by blank "
                   "lines), .jsonl/.json (a 'text' field per record), .parquet (a 'text' column), or a folder.")
            raise ValueError(msg)
        usable = [path]
    # an empty file holds no documents, and `datasets` fails on it with a message that
    # names nothing ("An error occurred while generating the dataset")
    usable = [p for p in usable if p.stat().st_size > 0]
    if not usable:
        msg = (f"{path} is empty (no documents): --dataset needs text, e.g. a .txt file with documents "
               "separated by blank lines.")
        raise ValueError(msg)
    try:
        import datasets
    except ImportError as e:
        msg = "Reading local files needs the `datasets` package: pip install datasets"
        raise ImportError(msg) from e
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    cache = str(_kit_cache() / "hf_datasets")
    parts = []
    for builder in ("text", "json", "parquet"):
        group = [str(p) for p in usable if _builder(p) == builder]
        if not group:
            continue
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=cache, **kwargs)
        except Exception as e:  # a malformed file: say which group and why, not a 40-line trace
            msg = f"Could not read {', '.join(Path(g).name for g in group[:5])} as {builder}: {e}"
            raise ValueError(msg) from e
        _need_text_column(ds.column_names, ", ".join(Path(g).name for g in group[:5]))
        parts.append(ds.select_columns(["text"]))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    fallback = None
    if not any(True for _ in _Texts(ds, keep="val")):
        # Tiny corpus: the rule picked nothing. Pin the smallest-hash document instead.
        texts = list(_Texts(ds))
        if len(texts) < 2:
            msg = (f"{path} holds {len(texts)} non-empty document(s); at least 2 are needed "
                   "(one for validation). A .txt file is split into documents at blank lines.")
            raise ValueError(msg)
        fallback = min(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode()).digest())
    rule = HASH_RULE + ("" if fallback is None else "; none matched, so the smallest-hash document")
    info = {"path": str(path.resolve()), "files": [str(p.relative_to(path)) if path.is_dir() else p.name
                                                   for p in usable][:1000], "n_files": len(usable)}
    if limit is not None:
        info["limit"] = limit
    return Corpus(str(path), _Texts(ds, keep="train", fallback_val=fallback),
                  _Texts(ds, keep="val", fallback_val=fallback), rule, info)


# ----------------------------------------------------------------------------- public


def load_corpus(dataset: str = "builtin", *, limit: int | None = None) -> Corpus:
    """Open a source and split it into train and val documents.

    Parameters
    ----------
    dataset : str
        ``"builtin"`` (offline, shipped), ``"tinystories"`` / ``"tinystories-clean"`` /
        ``"hf:OWNER/NAME"`` (Hugging Face Hub), ``"tinystories:PATH"`` (a local copy of
        the Hub dataset; ``AUTORESEARCH_TINYSTORIES=PATH`` does the same for
        ``"tinystories"``), or a path to a .txt / .jsonl / .json / .parquet file or a
        folder of them.
    limit : int, optional
        Read at most this many documents from each of the source's splits (the builtin
        file and local files count as one split), in source order, before the val rule.

    Returns
    -------
    Corpus
        With re-iterable ``train`` and ``val`` documents and the split rule.

    Raises
    ------
    FileNotFoundError
        A path that does not exist.
    ValueError
        An unknown file type, a missing ``text`` column, or too few documents.
    ConnectionError
        A Hub dataset while offline (within ~5 s), naming ``--dataset builtin``.
    """
    if limit is not None and int(limit) < 1:
        msg = f"limit must be a positive number of documents, got {limit}."
        raise ValueError(msg)
    name = str(dataset).strip()
    if name == "builtin":
        return _builtin(limit)
    if name in HF_ALIASES:
        local = os.environ.get(TINYSTORIES_ENV, "").strip() if name == "tinystories" else ""
        return _hf(name, HF_ALIASES[name], limit, Path(local).expanduser() if local else None)
    alias, sep, local = name.partition(":")
    if sep and alias in HF_ALIASES and local:   # tinystories:PATH, a local copy of the Hub dataset
        return _hf(alias, HF_ALIASES[alias], limit, Path(local).expanduser())
    if name.startswith("hf:"):
        return _hf(name, name[3:], limit)
    return _local(Path(name).expanduser(), limit)


def load_documents(dataset: str = "builtin", *, split: str | None = None, limit: int | None = None) -> list[str]:
    """The documents of a source as a list of strings.

    Parameters
    ----------
    dataset : str
        See `load_corpus`.
    split : {"train", "val", None}
        One split, or None for all documents (train first, then val).
    limit : int, optional
        See `load_corpus`.

    Returns
    -------
    list[str]
        Non-empty documents. For large Hub datasets prefer `load_corpus`, whose splits
        stream from disk instead of holding every document in memory.
    """
    if split not in (None, "train", "val"):
        msg = f"split must be 'train', 'val' or None, got {split!r}."
        raise ValueError(msg)
    corpus = load_corpus(dataset, limit=limit)
    if split == "train":
        return list(corpus.train)
    if split == "val":
        return list(corpus.val)
    return list(corpus.train) + list(corpus.val)


def text_sha256(corpus: Corpus) -> tuple[str, dict]:
    """sha256 of the corpus text (train documents, then val, each ended by a NUL byte),
    and counts: ``{"train_docs", "val_docs", "train_bytes", "val_bytes"}``."""
    h = hashlib.sha256()
    counts = {}
    for name, docs in (("train", corpus.train), ("val", corpus.val)):
        h.update(f"<{name}>\0".encode())
        n = nbytes = 0
        for doc in docs:
            b = doc.encode("utf-8")
            h.update(b)
            h.update(b"\0")
            n += 1
            nbytes += len(b)
        counts[f"{name}_docs"], counts[f"{name}_bytes"] = n, nbytes
    return h.hexdigest(), counts


__all__ = ["BUILTIN_FILE", "Corpus", "HF_ALIASES", "TINYSTORIES_ENV", "load_corpus", "load_documents", "text_sha256",
           "tinystories_available"]
