"""Tests of the data layer: built-in corpus, sources, tokenizer, prepare, prepare.py.

    python -m pytest tests/test_data.py -x -q

Offline (conftest sets HF_*_OFFLINE). The full built-in prepare runs once, through the
real `python prepare.py` in a subprocess with a private AUTORESEARCH_CACHE; everything
else uses `limit=` and small vocabularies so the file stays within ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoresearch_kit import config
from autoresearch_kit.data import corpus as corpus_mod
from autoresearch_kit.data.corpus import BUILTIN_FILE, load_corpus, load_documents
from autoresearch_kit.data.prepare import prepare, unigram_bpb
from autoresearch_kit.data.shards import BOS, PreparedData, bytes_encoding, token_byte_lengths
from autoresearch_kit.data.tokenizer import parse_vocab_size, train_bpe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builtin_docs():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def prepared_builtin(tmp_path_factory):
    """`python prepare.py --vocab-size 4096` as a user runs it, into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("AUTORESEARCH_DATA", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, "prepare.py", "--vocab-size", "4096"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {"cache": cache, "dir": cache / "data" / "builtin-bpe4096", "stdout": out.stdout,
            "seconds": time.time() - t0}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_big_enough_and_ships_small(builtin_docs):
    text_bytes = sum(len(d.encode()) for d in list(builtin_docs.train) + list(builtin_docs.val))
    assert text_bytes >= 4_000_000
    assert BUILTIN_FILE.stat().st_size <= 2_000_000
    assert len(builtin_docs.train) + len(builtin_docs.val) > 1000  # one document per chapter


def test_builtin_text_has_no_references_footnotes_or_boilerplate(builtin_docs):
    text = "\n".join(list(builtin_docs.train) + list(builtin_docs.val))
    for pattern in (r"\b\d+:\d+:", r"\[\d+:\d+ ", r"<[a-zA-Z/][^>]*>", r"strong:[GH]\d", r"engWEB",
                    r"World English Bible", r"Public Domain", r"eBible", r"\(engWEB2015eb\)", r"  ", r"\x00"):
        m = re.search(pattern, text)
        assert m is None, f"{pattern!r} found: {text[max(0, m.start() - 60):m.end() + 60]!r}"
    # Footnote anchors sat between words with no space ("God<note/>created"): they became spaces.
    gen1 = load_documents("builtin", split="val", limit=1)[0]
    assert gen1.startswith("In the beginning, God created the heavens and the earth. The earth was formless")
    # The last chapter ends with the last verse, not with the module's glossary.
    with lzma.open(BUILTIN_FILE, "rt", encoding="utf-8") as f:
        last = json.loads(f.readlines()[-1])
    assert last["id"] == "Rev.22" and last["text"].endswith("be with all the saints. Amen.")


def test_builtin_val_split_is_pinned_and_disjoint(builtin_docs):
    assert builtin_docs.val_ids[:3] == ["Gen.1", "Gen.11", "Gen.21"]
    with lzma.open(BUILTIN_FILE, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    assert [r["id"] for r in recs if r["index"] % 10 == 0] == builtin_docs.val_ids
    assert not set(builtin_docs.train) & set(builtin_docs.val)
    assert 0.08 < len(builtin_docs.val) / len(recs) < 0.12
    assert load_documents("builtin", split="val") == list(builtin_docs.val)


# ----------------------------------------------------------------------------- prepare


def test_prepare_py_builds_builtin(prepared_builtin):
    d = prepared_builtin["dir"]
    data = PreparedData.open(d)
    assert data.verify() == []
    assert data.vocab_size == 4096 and data.bos_id == 4095
    src = data.manifest["source"]
    assert src["dataset"] == "builtin" and len(src["sha256"]) == 64 and "% 10 == 0" in src["split_rule"]
    assert src["val_ids"][:2] == ["Gen.1", "Gen.11"] and len(src["val_ids"]) == src["val_docs"]
    s = data.manifest["splits"]
    # Every document starts with BOS; token bytes add up to the text's UTF-8 bytes exactly.
    assert data.train[0] == data.bos_id and data.val[0] == data.bos_id
    assert s["train"]["docs"] == src["train_docs"] and s["val"]["docs"] == src["val_docs"]
    assert s["train"]["bytes"] == src["train_bytes"] and s["val"]["bytes"] == src["val_bytes"]
    assert s["train"]["tokens"] > 900_000 and s["val"]["tokens"] > 2**16  # the CPU eval fits in val
    assert 1.0 < data.manifest["baselines"]["unigram_bpb"] < 4.0
    # It is now what train.py and the runner find by default.
    assert (prepared_builtin["cache"] / "data" / "LATEST").read_text().strip() == "builtin-bpe4096"
    assert "prepared" in prepared_builtin["stdout"] and "unigram baseline" in prepared_builtin["stdout"]


def test_prepared_val_is_the_pinned_documents(prepared_builtin, builtin_docs):
    data = PreparedData.open(prepared_builtin["dir"])
    enc = data.tokenizer
    val = np.asarray(data.val)
    docs = np.split(val, np.flatnonzero(val == data.bos_id)[1:])
    assert len(docs) == len(builtin_docs.val)
    assert enc.decode(docs[0][1:].tolist()) == builtin_docs.val[0]
    assert enc.decode(docs[-1][1:].tolist()) == builtin_docs.val[-1]


def test_prepare_is_idempotent_and_force_rebuilds(cache, capsys):
    d = prepare("builtin", vocab_size=512, limit=120)
    capsys.readouterr()
    mtime = (d / "train.bin").stat().st_mtime_ns
    assert prepare("builtin", vocab_size=512, limit=120) == d
    out = capsys.readouterr().out
    assert f"reusing prepared data in {d}" in out and "train tokens" in out
    assert (d / "train.bin").stat().st_mtime_ns == mtime
    prepare("builtin", vocab_size=512, limit=120, force=True)
    out = capsys.readouterr().out
    assert "reusing" not in out and "prepared" in out
    assert (d / "train.bin").stat().st_mtime_ns != mtime
    # Another vocabulary is another directory, and becomes the latest.
    d2 = prepare("builtin", vocab_size="bytes", limit=120, progress=False)
    assert d2 != d and config.data_dir() == d2


def test_val_is_stable_across_prepares_and_a_tampered_shard_is_rebuilt(cache, tmp_path):
    a = PreparedData.open(prepare("builtin", vocab_size=400, limit=150, data_dir=tmp_path / "a", progress=False))
    b = PreparedData.open(prepare("builtin", vocab_size=400, limit=150, data_dir=tmp_path / "b", progress=False))
    assert a.manifest["splits"]["val"]["sha256"] == b.manifest["splits"]["val"]["sha256"]
    assert a.manifest["source"]["val_ids"] == b.manifest["source"]["val_ids"]
    assert a.manifest["source"]["val_ids"] == load_corpus("builtin").val_ids[:15]
    # A changed shard fails verification, and prepare rebuilds instead of reusing it.
    with open(a.path / "val.bin", "r+b") as f:
        f.write(b"\x01\x00")
    assert PreparedData.open(a.path).verify() == ["val.bin"]
    prepare("builtin", vocab_size=400, limit=150, data_dir=tmp_path / "a", progress=False)
    assert PreparedData.open(a.path).verify() == []


def test_bytes_tokenizer_prepare(cache):
    data = PreparedData.open(prepare("builtin", vocab_size="bytes", limit=30, progress=False))
    assert data.vocab_size == 257 and data.bos_id == 256
    s = data.manifest["splits"]["val"]
    assert s["tokens"] == s["bytes"] + s["docs"]  # one token per byte, plus a BOS per document
    assert int(data.token_bytes.sum()) == 256


def test_unigram_bpb_of_a_uniform_source_is_log2_of_its_alphabet():
    token_bytes = np.array([1, 1, 1, 1, 0], dtype=np.int32)  # four 1-byte tokens + BOS
    train = np.tile(np.arange(4), 1000)
    val = np.array([4, 0, 1, 2, 3, 4, 3, 2])
    assert unigram_bpb(train, val, token_bytes) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_counts_bytes(prepared_builtin):
    enc = PreparedData.open(prepared_builtin["dir"]).tokenizer
    tb = token_byte_lengths(enc)
    text = "In the beginning… “Café” naïve 東京 🙂 3.14159, Hebrew אֱלֹהִים\n\tend"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert enc.encode(BOS, allowed_special="all") == [enc.n_vocab - 1]
    # Tokens that hold part of a multi-byte character (’ is e2 80 99) count their own bytes,
    # not the 3 bytes of the U+FFFD that decoding them to str would give.
    partial = [i for i in range(enc.n_vocab - 1) if not _utf8_ok(enc.decode_single_token_bytes(i))]
    assert partial, "expected tokens that split a multi-byte character"
    for i in partial[:50]:
        assert tb[i] == len(enc.decode_single_token_bytes(i)) != len(enc.decode([i]).encode())


def _utf8_ok(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_train_bpe_small_vocab_and_bos_last():
    docs = load_documents("builtin", split="train", limit=40)
    enc = train_bpe(docs, 300)
    assert enc.n_vocab == 300 and enc.encode_single_token(BOS) == 299
    assert enc.decode(enc.encode_ordinary(docs[0])) == docs[0]
    b = bytes_encoding()
    assert b.n_vocab == 257 and list(b.encode_ordinary("é")) == [0xC3, 0xA9]
    assert token_byte_lengths(b)[[0xC3, 0xA9, 256]].tolist() == [1, 1, 0]


def test_parse_vocab_size():
    assert parse_vocab_size("bytes") == "bytes" and parse_vocab_size("8192") == 8192
    for bad in ("12", "lots", 70000):
        with pytest.raises(ValueError, match="--vocab-size"):
            parse_vocab_size(bad)


# ----------------------------------------------------------------------------- local files


def _doc(i: int) -> str:
    words = "the cat sat on a mat and then it ran to the big red house where a dog lived".split()
    return f"Story {i}. " + " ".join(words[(i * 7 + k) % len(words)] for k in range(25)) + "."


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    import pandas as pd

    d = tmp_path_factory.mktemp("local")
    (d / "a.txt").write_text("\n\n".join(_doc(i) for i in range(60)) + "\n\n\n\n")
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": _doc(100 + i), "id": i}) for i in range(60)) + "\n")
    pd.DataFrame({"text": [_doc(200 + i) for i in range(60)]}).to_parquet(d / "c.parquet")
    pd.DataFrame({"body": ["x"] * 3, "title": ["y"] * 3}).to_parquet(d / "bad.parquet")
    (d / "folder" / "sub").mkdir(parents=True)
    shutil.copy(d / "a.txt", d / "folder" / "a.txt")
    shutil.copy(d / "b.jsonl", d / "folder" / "sub" / "b.jsonl")
    (d / "folder" / "notes.rst").write_text("ignored: not a known text format")
    return d


@pytest.mark.parametrize("name, n", [("a.txt", 60), ("b.jsonl", 60), ("c.parquet", 60), ("folder", 120)])
def test_local_sources(cache, local_files, name, n):
    c = load_corpus(str(local_files / name))
    train, val = list(c.train), list(c.val)
    assert len(train) + len(val) == n and val and not set(train) & set(val)
    assert all(corpus_mod._hash_is_val(t) for t in val) and "sha256" in c.split_rule
    assert list(c.train) == train  # re-iterable, same order
    if name == "a.txt":  # blank-line runs separate documents; surrounding newlines are stripped
        assert sorted(train + val) == sorted(_doc(i) for i in range(60))


def test_prepare_a_local_folder(cache, local_files):
    d = prepare(str(local_files / "folder"), vocab_size=300, progress=False)
    data = PreparedData.open(d)
    assert data.manifest["source"]["n_files"] == 2 and data.manifest["source"]["train_docs"] > 100
    assert d.parent == cache / "data" and d.name.startswith("folder_") and config.data_dir() == d


def test_local_source_errors(cache, local_files):
    with pytest.raises(ValueError, match=r"no 'text' column \(found: body, title\)"):
        load_corpus(str(local_files / "bad.parquet"))
    with pytest.raises(ValueError, match="Don't know how to read 'notes.rst'"):
        load_corpus(str(local_files / "folder" / "notes.rst"))
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        load_corpus(str(local_files / "missing.txt"))
    # Too few documents for the hash rule to pick any: the smallest-hash one is val.
    two = local_files / "two.jsonl"
    two.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    c = load_corpus(str(two))
    assert len(list(c.train)) == 1 and len(list(c.val)) == 1 and "smallest-hash" in c.split_rule
    one = local_files / "one.jsonl"
    one.write_text(json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_corpus(str(one))
    # an empty file: `datasets` alone says only "An error occurred while generating the dataset"
    empty = local_files / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_corpus(str(empty))


def test_a_folder_with_an_empty_file_reads_the_others(cache, local_files, tmp_path):
    shutil.copytree(local_files / "folder", tmp_path / "folder")
    (tmp_path / "folder" / "empty.txt").write_text("")
    c = load_corpus(str(tmp_path / "folder"))
    assert len(list(c.train)) + len(list(c.val)) == 120


def test_prepare_says_when_the_corpus_gives_fewer_ids_than_asked(cache, tmp_path, capsys):
    # one short sentence repeated: rustbpe runs out of pairs to merge long before 2000 ids
    (tmp_path / "small.txt").write_text("\n\n".join(f"the cat sat on the mat {i % 3}" for i in range(40)))
    d = prepare(str(tmp_path / "small.txt"), vocab_size=2000)
    n = PreparedData.open(d).vocab_size
    assert n < 2000
    assert f"the corpus only supports {n} of the 2000 asked for" in capsys.readouterr().out


def test_tokenizer_never_sees_validation_text(cache, tmp_path):
    """A word repeated only in a val document must not become a token of its own."""
    val_doc = next(t for t in (f"zqxvj {'zqxvj ' * 400}{i}" for i in range(10_000)) if corpus_mod._hash_is_val(t))
    train_docs = [_doc(i) for i in range(200) if not corpus_mod._hash_is_val(_doc(i))]
    path = tmp_path / "leak.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*train_docs, val_doc]))
    data = PreparedData.open(prepare(str(path), vocab_size=320, progress=False))
    assert data.manifest["source"]["val_docs"] == 1
    assert len(data.tokenizer.encode_ordinary(" zqxvj")) >= 4  # leaked, it would be 1 token


def test_hub_style_dataset_uses_its_own_validation_split(cache, tmp_path):
    """`hf:DIR` goes through the Hugging Face path; a local folder with train/validation
    files stands in for a Hub repository (offline)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text("".join(json.dumps({"text": f"train story {i}"}) + "\n" for i in range(40)))
    (repo / "validation.jsonl").write_text("".join(json.dumps({"text": f"val story {i}"}) + "\n" for i in range(6)))
    c = load_corpus(f"hf:{repo}")
    assert list(c.val) == [f"val story {i}" for i in range(6)] and len(list(c.train)) == 40
    assert "own 'validation' split" in c.split_rule
    c = load_corpus(f"hf:{repo}", limit=5)  # streamed: reads only the first rows of each split
    assert list(c.train) == [f"train story {i}" for i in range(5)] and len(list(c.val)) == 5


# ----------------------------------------------------------------------------- Hugging Face offline


def test_tinystories_offline_fails_fast_with_alternatives(cache):
    t0 = time.time()
    with pytest.raises(ConnectionError, match="--dataset builtin"):
        load_corpus("tinystories")
    assert time.time() - t0 < 5


def test_tinystories_unreachable_hub_fails_fast(cache, monkeypatch):
    """No offline variables, and a network that hangs: the probe gives up in ~3 s."""
    import socket

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
    t0 = time.time()
    with pytest.raises(ConnectionError, match="--dataset builtin"):
        load_corpus("tinystories")
    assert time.time() - t0 < 5


# ----------------------------------------------------------------------------- command line


def test_prepare_py_user_errors_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "prepare.py", "--dataset", str(tmp_path / "nope.txt"), "--vocab-size", "512"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "No such file or folder" in out.stderr and "Traceback" not in out.stderr


def test_data_prepare_stays_callable_after_the_module_is_imported(cache):
    import autoresearch_kit
    import autoresearch_kit.data.prepare  # noqa: F401  (shadows the package attribute)
    from autoresearch_kit.data import prepare as p

    d = p("builtin", vocab_size="bytes", limit=20, progress=False)
    assert autoresearch_kit.prepare("builtin", vocab_size="bytes", limit=20, progress=False) == d


# ----------------------------------------------------------------------------- TinyStories (local fixture)


@pytest.fixture(scope="module")
def tinystories_copy(tmp_path_factory):
    """A local copy shaped like roneneldan/TinyStories, written by the repository's script."""
    out = tmp_path_factory.mktemp("hub") / "TinyStories"
    res = subprocess.run([sys.executable, "scripts/make_tinystories_fixture.py", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def test_tinystories_fixture_has_the_hub_layout(tinystories_copy):
    import pyarrow.parquet as pq

    files = sorted(str(p.relative_to(tinystories_copy)) for p in tinystories_copy.rglob("*") if p.is_file())
    assert files == ["README.md", "TinyStories-train.txt", "TinyStories-valid.txt",
                     "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                     "data/validation-00000-of-00001.parquet"]
    size = sum(p.stat().st_size for p in tinystories_copy.rglob("*") if p.is_file())
    assert 1e6 < size < 8e6  # a few MB
    for f in tinystories_copy.glob("data/*.parquet"):
        assert pq.read_schema(f).names == ["text"] and str(pq.read_schema(f).field("text").type) == "string"
    card = (tinystories_copy / "README.md").read_text()
    assert "path: data/train-*" in card and "path: data/validation-*" in card and "- name: text" in card


def _parquet_texts(folder: Path, split: str) -> list[str]:
    import pyarrow.parquet as pq

    return [t for f in sorted(folder.glob(f"data/{split}-*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]


def test_tinystories_local_copy_goes_through_the_hub_code_path(cache, tinystories_copy, monkeypatch):
    """`tinystories` with AUTORESEARCH_TINYSTORIES, and `tinystories:PATH`: the dataset's
    own splits (the .txt decoys the card's configs exclude are not read), empty rows dropped."""
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES", str(tinystories_copy))
    c = load_corpus("tinystories")
    train, val = list(c.train), list(c.val)
    raw_train = _parquet_texts(tinystories_copy, "train")
    assert val == _parquet_texts(tinystories_copy, "validation")
    assert train == [t for t in raw_train if t.strip()] and len(train) == len(raw_train) - 2
    assert c.split_rule == "roneneldan/TinyStories: its own 'validation' split"
    assert c.info["hub"] == "roneneldan/TinyStories" and c.info["local_copy"] == str(tinystories_copy.resolve())
    assert not any("<|endoftext|>" in t for t in train + val)
    monkeypatch.delenv("AUTORESEARCH_TINYSTORIES")
    c2 = load_corpus(f"tinystories:{tinystories_copy}")
    assert list(c2.val) == val and list(c2.train) == train
    c3 = load_corpus(f"tinystories:{tinystories_copy}", limit=7)  # streamed from the parquet files
    assert list(c3.train) == train[:7] and list(c3.val) == val[:7]


def test_tinystories_local_copy_that_does_not_exist_names_the_script(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="make_tinystories_fixture.py"):
        load_corpus("tinystories")


def test_tinystories_download_offline_names_the_local_copy_option(cache, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_TINYSTORIES", raising=False)
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r"tinystories:PATH.*AUTORESEARCH_TINYSTORIES"):
        load_corpus("tinystories")
    assert time.time() - t0 < 5


def test_tinystories_available_is_fast_and_respects_offline(tmp_path, monkeypatch, tinystories_copy):
    from autoresearch_kit.data.corpus import tinystories_available

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("AUTORESEARCH_TINYSTORIES", raising=False)
    import socket

    def no_network(*a, **k):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.time()
    ok, why = tinystories_available()
    assert not ok and "HF_DATASETS_OFFLINE" in why and time.time() - t0 < 1
    (tmp_path / "hf" / "roneneldan___tiny_stories").mkdir(parents=True)  # a copy downloaded before
    ok, why = tinystories_available()
    assert ok and "Hugging Face cache" in why
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES", str(tinystories_copy))
    assert tinystories_available() == (True, f"the local copy in {tinystories_copy} (AUTORESEARCH_TINYSTORIES)")
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES", str(tmp_path / "missing"))
    assert tinystories_available()[0] is False


def test_prepare_on_cuda_defaults_to_tinystories_and_says_so(cache, tinystories_copy, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cuda")
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES", str(tinystories_copy))
    d = prepare(vocab_size=512)
    out = capsys.readouterr()
    assert "preparing TinyStories by default, from the local copy" in out.out and "warning" not in out.err
    assert d == cache / "data" / "tinystories-bpe512"
    data = PreparedData.open(d)
    src = data.manifest["source"]
    assert src["hub"] == "roneneldan/TinyStories" and src["val_split"] == "validation"
    assert src["val_docs"] == len(_parquet_texts(tinystories_copy, "validation"))
    assert data.manifest["splits"]["train"]["tokens"] > 400_000  # the few-MB fixture, all of it
    assert (cache / "data" / "LATEST").read_text().strip() == "tinystories-bpe512"


def test_prepare_on_cuda_without_tinystories_warns_and_uses_builtin(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cuda")
    monkeypatch.delenv("AUTORESEARCH_TINYSTORIES", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-cache"))
    t0 = time.time()
    d = prepare(vocab_size="bytes", limit=20)
    err = capsys.readouterr().err
    assert d.name.startswith("builtin") and PreparedData.open(d).manifest["source"]["dataset"] == "builtin"
    assert "warning: CUDA, but TinyStories cannot be read" in err and "tinystories:PATH" in err
    assert time.time() - t0 < 30


def test_prepare_on_cpu_defaults_to_builtin_quietly(cache, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    d = prepare(vocab_size="bytes", limit=20)
    assert d.name == "builtin-limit20-bytes" and "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- manifest hash, epochs


def test_manifest_hash_is_stable_across_re_prepares_and_tells_data_apart(cache, tmp_path):
    from autoresearch_kit.data.prepare import describe_data, manifest_hash

    a = prepare("builtin", vocab_size=300, limit=40, progress=False)
    h = manifest_hash(a)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    manifest = json.loads((a / "manifest.json").read_text())
    prepare("builtin", vocab_size=300, limit=40, progress=False, force=True)  # rebuilt: new timestamps
    assert json.loads((a / "manifest.json").read_text())["created"] and manifest_hash(a) == h
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    assert manifest_hash(moved) == h
    other_vocab = prepare("builtin", vocab_size=320, limit=40, progress=False)
    other_text = prepare("builtin", vocab_size=300, limit=41, progress=False)
    assert len({h, manifest_hash(other_vocab), manifest_hash(other_text)}) == 3
    tampered = json.loads((moved / "manifest.json").read_text())
    tampered["splits"]["val"]["sha256"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(tampered))
    assert manifest_hash(moved) != h and manifest["source"]["sha256"] == tampered["source"]["sha256"]
    assert describe_data(a).startswith("builtin limit 40, bpe300")
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        manifest_hash(tmp_path / "nothing")


def test_training_epochs_warns_past_three_passes(tiny_data):
    from autoresearch_kit.data.prepare import EPOCHS_WARN, training_epochs

    n = PreparedData.open(tiny_data).manifest["splits"]["train"]["tokens"]
    assert training_epochs(tiny_data, 0) == (0.0, None)
    epochs, warning = training_epochs(tiny_data, 2 * n)
    assert epochs == pytest.approx(2.0) and warning is None
    assert training_epochs(tiny_data, EPOCHS_WARN * n)[1] is None       # 3 passes: still fine
    epochs, warning = training_epochs(tiny_data, 170 * n)
    assert epochs == pytest.approx(170.0) and "170.0 times" in warning and "tinystories" in warning
    with pytest.raises(ValueError, match="non-negative"):
        training_epochs(tiny_data, -1)
