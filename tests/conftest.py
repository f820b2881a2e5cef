"""Shared fixtures. Every test is offline: the HF libraries are told so up front."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A new Lab reruns its baseline twice to measure noise; tests that count experiments were
# written before that default and opt out here. The noise default has its own tests
# (test_lab.py: they unset this).
os.environ.setdefault("AUTORESEARCH_NOISE_RUNS", "0")

import numpy as np
import pytest

from autoresearch_kit.data.shards import bytes_encoding, write_prepared

ROOT = Path(__file__).resolve().parents[1]

# Knobs of the real train.py set so a run takes seconds on a CPU: one block, width 32,
# 2 heads. Only the values change, whatever they are in train.py today.
TINY_KNOBS = {"CPU_DEPTH": "1", "CPU_SEQ_LEN": "32", "CPU_BATCH_SIZE": "4", "ASPECT_RATIO": "32", "HEAD_DIM": "16"}


def tiny_train_source() -> str:
    """The repository's train.py with TINY_KNOBS set (trailing comments kept).

    A plain function, not a fixture: test files and the scripts they start import it
    (`from conftest import tiny_train_source`; pytest puts tests/ on sys.path).
    """
    src = (ROOT / "train.py").read_text()
    for name, value in TINY_KNOBS.items():
        src, n = re.subn(rf"^{name} = [^#\n]*?(\s*#|$)", rf"{name} = {value}\1", src, count=1, flags=re.M)
        assert n == 1, f"train.py no longer sets {name}: update TINY_KNOBS in tests/conftest.py"
    return src


_WORDS = ("the of and to in that he shall unto for his a i lord they be is him not them it with all "
          "thou thy was which my me said but ye their have will thee from as are when this out were "
          "upon man by you israel king son up there hath then people came had house into on her").split()


def _fake_docs(n_docs: int, rng: np.random.Generator) -> list[str]:
    docs = []
    for _ in range(n_docs):
        words = rng.choice(_WORDS, size=int(rng.integers(40, 120)), p=None)
        docs.append(" ".join(words).capitalize() + ".")
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared dataset (bytes tokenizer) written straight in the shard format.

    Independent of the corpus pipeline, so harness/runner tests don't depend on it.
    """
    d = tmp_path_factory.mktemp("data") / "tiny-bytes"
    enc = bytes_encoding()
    rng = np.random.default_rng(0)
    bos = enc.encode_single_token("<|bos|>")

    def stream(docs):
        out = []
        for doc in docs:
            out.append(bos)
            out.extend(enc.encode_ordinary(doc))
        return np.array(out, dtype=np.uint16)

    write_prepared(d, encoding=enc, train=stream(_fake_docs(400, rng)), val=stream(_fake_docs(60, rng)),
                   source={"dataset": "fake", "note": "test fixture"}, tokenizer_info={"kind": "bytes"})
    return d


@pytest.fixture()
def kit_env(tiny_data, tmp_path, monkeypatch):
    """Environment for running train.py on the tiny data: CPU, small eval, private cache."""
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tiny_data))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    return tiny_data
