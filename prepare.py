"""Prepare the data train.py learns from: corpus -> tokenizer -> token shards, once.

    python prepare.py                          # built-in corpus (offline), default vocabulary
    python prepare.py --vocab-size bytes       # byte-level tokenizer (257 ids)
    python prepare.py --dataset tinystories    # TinyStories from Hugging Face (online once)
    python prepare.py --dataset my_texts/      # your own .txt / .jsonl / .parquet files
    python prepare.py --help

The result lands in the cache (AUTORESEARCH_CACHE, default ~/.cache/autoresearch_kit) and is
recorded as the latest, so `python train.py` and the lab use it without flags. Running it
again with the same corpus and settings reuses what is there; --force rebuilds. This
script is a thin wrapper over `autoresearch_kit.data.prepare` (also `autoresearch prepare`).
"""

from autoresearch_kit.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
