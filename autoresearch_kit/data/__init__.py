"""Data: corpora (built-in, TinyStories, local files), the tokenizer, token shards.

Kept light on import (the training child imports `autoresearch_kit.data.shards`):
`datasets` and `rustbpe` are imported only inside the functions that need them.
"""

from __future__ import annotations

from autoresearch_kit.data.corpus import load_corpus, load_documents
from autoresearch_kit.data.shards import PreparedData, bytes_encoding, write_prepared


def prepare(*args, **kwargs):
    """Prepare a dataset: corpus -> tokenizer -> shards. See autoresearch_kit.data.prepare."""
    from autoresearch_kit.data.prepare import prepare as _prepare

    return _prepare(*args, **kwargs)


__all__ = ["PreparedData", "bytes_encoding", "load_corpus", "load_documents", "prepare", "write_prepared"]
