"""Write a small local stand-in for the Hugging Face dataset roneneldan/TinyStories.

    python scripts/make_tinystories_fixture.py /tmp/tinystories          # ~3.5 MB, in seconds
    python scripts/make_tinystories_fixture.py /tmp/ts --train 600 --validation 40
    AUTORESEARCH_TINYSTORIES=/tmp/tinystories python prepare.py --dataset tinystories
    python prepare.py --dataset tinystories:/tmp/tinystories             # the same

The real dataset cannot be downloaded where the tests run (no network), so the tests read
this instead, through the kit's real TinyStories code path (`datasets.load_dataset` on a
folder laid out as the Hub repository). It has the Hub repository's shape:

    README.md                                  dataset card: YAML `dataset_info` (one string
                                               column `text`) and `configs` (data_files per split)
    data/train-0000{0,1}-of-00002.parquet      split `train`, column `text` (parquet, as on the Hub)
    data/validation-00000-of-00001.parquet     split `validation`
    TinyStories-train.txt, TinyStories-valid.txt
                                               the same stories as plain text, each followed by a
                                               `<|endoftext|>` line, as the Hub repository also
                                               ships; the configs make `datasets` ignore them

The stories are generated from templates (seeded, so the same arguments give the same
bytes): short children's stories in the style of TinyStories ("Once upon a time, there
was a little girl named Lily..."), a few hundred to ~1,500 characters each, some with
curly quotes and dialogue, and two empty rows in train (the real dataset has a few). It
is a fixture for the code path, not a corpus to learn from.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max", "Anna", "Tim", "Lucy", "Sam", "Zoe", "Jack", "Emma", "Leo",
         "Sara", "Bob", "Kitty", "Spot", "Molly", "Jake"]
KINDS = ["little girl", "little boy", "small dog", "kind cat", "happy bird", "curious bunny", "brave mouse",
         "big bear", "friendly frog", "shy duck"]
THINGS = ["ball", "kite", "toy car", "red box", "shiny rock", "blue hat", "teddy bear", "book", "cake", "flower",
          "balloon", "boat", "drum", "cup", "crayon"]
PLACES = ["park", "garden", "forest", "beach", "kitchen", "school", "farm", "river", "hill", "backyard"]
FEELINGS = ["happy", "sad", "scared", "excited", "proud", "tired", "surprised", "angry", "curious", "calm"]
ADJ = ["big", "small", "pretty", "soft", "shiny", "old", "funny", "bright", "little", "warm"]
VERBS = ["play", "run", "jump", "dance", "look", "share", "build", "swim", "sing", "climb"]
MORALS = ["sharing is good", "it is good to be kind", "friends help each other", "it is okay to ask for help",
          "being careful is important", "trying again makes you strong", "telling the truth is best"]
OPENINGS = ["Once upon a time, there was a {kind} named {name}.", "One day, a {kind} named {name} went to the {place}.",
            "{name} was a {kind} who lived near the {place}.", "There once was a {adj} {kind} called {name}."]


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    fill = {"name": name, "friend": friend, "kind": rng.choice(KINDS), "place": rng.choice(PLACES),
            "thing": rng.choice(THINGS), "adj": rng.choice(ADJ), "feel": rng.choice(FEELINGS),
            "verb": rng.choice(VERBS), "moral": rng.choice(MORALS), "thing2": rng.choice(THINGS)}
    q_open, q_close = ("\u201c", "\u201d") if rng.random() < 0.2 else ('"', '"')
    apos = "\u2019" if q_open == "\u201c" else "'"
    parts = [rng.choice(OPENINGS).format(**fill),
             "{name} loved to {verb} with {pronoun} {adj} {thing}.".format(pronoun=rng.choice(["his", "her"]), **fill)]
    for _ in range(rng.randint(3, 9)):
        parts.append(rng.choice([
            "One day, {name} saw {friend} at the {place}. {friend} looked {feel}.",
            "{name} said, {qo}Do you want to {verb} with me?{qc} {friend} smiled and said, {qo}Yes, please!{qc}",
            "They found a {adj} {thing2} under a tree. It was very {adj}.",
            "Then the wind blew hard and the {thing} flew away. {name} felt {feel}.",
            "{friend} said, {qo}Don{a}t worry, I will help you.{qc} Together they looked all over the {place}.",
            "Mom came and gave them some {thing2}. They were so {feel}.",
            "The sun was warm and the sky was blue. They wanted to {verb} all day.",
            "{name} tried to {verb}, but it was hard. {name} tried again and again.",
        ]).format(qo=q_open, qc=q_close, a=apos, **fill))
        fill["feel"], fill["thing2"], fill["verb"] = rng.choice(FEELINGS), rng.choice(THINGS), rng.choice(VERBS)
    parts.append(rng.choice([
        "In the end, {name} and {friend} became best friends. They learned that {moral}.",
        "From that day on, {name} always took good care of the {thing}.",
        "They went home and had a big hug. {name} was very happy.",
        "{name} learned that {moral}. The end.",
    ]).format(**fill))
    paragraphs, cur = [], []
    for p in parts:  # a blank line between paragraphs now and then, as in the real stories
        cur.append(p)
        if rng.random() < 0.3:
            paragraphs.append(" ".join(cur))
            cur = []
    if cur:
        paragraphs.append(" ".join(cur))
    return "\n\n".join(paragraphs)


def stories(n: int, seed: int) -> list[str]:
    """`n` generated stories (deterministic for a given seed)."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def _card(n_train: int, n_val: int, train_bytes: int, val_bytes: int) -> str:
    """The dataset card: the Hub's YAML header (dataset_info + configs), then a note."""
    return f"""---
license: cdla-sharing-1.0
task_categories:
- text-generation
language:
- en
dataset_info:
  features:
  - name: text
    dtype: string
  splits:
  - name: train
    num_bytes: {train_bytes}
    num_examples: {n_train}
  - name: validation
    num_bytes: {val_bytes}
    num_examples: {n_val}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---

A local test fixture shaped like roneneldan/TinyStories (generated by
autoresearch_kit's scripts/make_tinystories_fixture.py; not the real stories).
"""


def write_fixture(out: str | Path, n_train: int = 4000, n_val: int = 150, seed: int = 0) -> Path:
    """Write the fixture folder (see the module docstring) and return its path.

    Parameters
    ----------
    out : path
        Folder to create (existing files of the same names are overwritten).
    n_train, n_val : int
        Stories in the train and validation splits (train also gets two empty rows).
    seed : int
        Seed of the story generator.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n_train < 2 or n_val < 1:
        msg = f"need at least 2 train and 1 validation stories, got {n_train} and {n_val}"
        raise ValueError(msg)
    out = Path(out).expanduser()
    (out / "data").mkdir(parents=True, exist_ok=True)
    train = stories(n_train, seed)
    val = stories(n_val, seed + 1)
    train[len(train) // 3:len(train) // 3] = [""]           # the real train split has a few empty rows
    train[2 * len(train) // 3:2 * len(train) // 3] = [""]
    half = len(train) // 2
    shards = {"data/train-00000-of-00002.parquet": train[:half], "data/train-00001-of-00002.parquet": train[half:],
              "data/validation-00000-of-00001.parquet": val}
    for name, rows in shards.items():
        pq.write_table(pa.table({"text": pa.array(rows, type=pa.string())}), out / name)
    for name, rows in (("TinyStories-train.txt", train), ("TinyStories-valid.txt", val)):
        (out / name).write_text("".join(f"{t}\n<|endoftext|>\n" for t in rows), encoding="utf-8")
    nbytes = [sum(len(t.encode()) for t in rows) for rows in (train, val)]
    (out / "README.md").write_text(_card(len(train), len(val), *nbytes), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a local fixture shaped like roneneldan/TinyStories.")
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--train", type=int, default=4000, help="train stories (default 4000, ~2.5 MB of text)")
    parser.add_argument("--validation", type=int, default=150, help="validation stories (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_fixture(args.out, args.train, args.validation, args.seed)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"path": str(out), "train": args.train, "validation": args.validation,
                      "bytes_on_disk": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
