"""Shared fixtures. Every test is offline: the HF libraries are told so up front."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from autoresearch_kit.data.shards import bytes_encoding, write_prepared

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
