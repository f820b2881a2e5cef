"""Rebuild the shipped built-in corpus from the World English Bible (public domain).

The kit ships `autoresearch_kit/data/builtin/web.jsonl.xz`: one JSON line per chapter of
the World English Bible with Deuterocanon (SWORD module `engWEB2015eb`), cleaned to plain
prose: no verse numbers or "Genesis 1:1:" references, no footnotes, no Strong's numbers,
no module or license lines. Psalm titles, Hebrew letter headings (Psalm 119) and speaker
labels (Song of Solomon) are canonical text in this edition and are kept as lines.

Needs the Debian packages of the SWORD library and the text:

    apt-get install sword-text-web diatheke
    python scripts/build_corpus.py                 # rewrites the shipped file
    python scripts/build_corpus.py --out /tmp/web.jsonl.xz --check

Each line: {"id": "Gen.1", "book": "Genesis", "osis": "Gen", "chapter": 1,
            "index": 0, "split": "train" | "val", "text": "..."}

The validation split is pinned here, once, by a rule on the canonical order: chapter
`index % 10 == 0` (Genesis 1, Genesis 11, ..., about 10% of the chapters, spread over every
part of the corpus) is "val", everything else "train". The rule lives in VAL_RULE below and
is copied into every prepared manifest with the list of val ids.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import lzma
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODULE = "engWEB2015eb"
OUT = Path(__file__).resolve().parents[1] / "autoresearch_kit" / "data" / "builtin" / "web.jsonl.xz"
VAL_EVERY = 10
VAL_RULE = f"chapter index (0-based, canonical order) % {VAL_EVERY} == 0 -> val"

# Canonical order of the module's versification (NRSVA): Old Testament, the deuterocanon
# as the WEB prints it, New Testament. PrAzar/Sus/Bel are empty in this module (the WEB
# keeps them in "Daniel (Greek)", which NRSVA has no slot for); empty books are skipped.
BOOKS = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov "
    "Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal "
    "Tob Jdt EsthGr Wis Sir Bar PrAzar Sus Bel 1Macc 2Macc 1Esd PrMan AddPs 3Macc 2Esd 4Macc "
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm "
    "Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()

_NOTE = "\x00"  # stands where a footnote was, until we know whether it separated two words
_RE_BOOK_END = re.compile(r'<div[^>]*\beID="[^"]*"[^>]*type="book"[^>]*/>|<div[^>]*type="glossary"')
_RE_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
_RE_HEADING = re.compile(r"<(title|speaker)\b[^>]*>(.*?)</\1>", re.S)
# Tags that end a visual line: poetry lines, line groups, paragraph breaks, list items.
_RE_BREAK = re.compile(r'<(?:l|lg|lb)\b[^>]*/>|<div\b[^>]*type="x-p"[^>]*/>|</item>')
_RE_TAG = re.compile(r"<[^>]+>")


def _diatheke(*args: str) -> str:
    out = subprocess.run(["diatheke", "-b", MODULE, *args], capture_output=True, text=True, check=True)
    # diatheke closes every answer with a "(engWEB2015eb)" line: the module name, not text.
    return re.sub(rf"\n?\({MODULE}\)\s*$", "", out.stdout)


def _book_name(osis: str) -> str | None:
    """The display name diatheke prints in its verse markers ("I Samuel 1:1: ...")."""
    first = _diatheke("-f", "plain", "-k", f"{osis} 1:1")
    m = re.search(r"^\s*(.+?) 1:1: ?(.*)", first, re.M)
    if not m or not m.group(2).strip():
        return None  # an empty book of the versification (see BOOKS)
    return m.group(1)


def _clean(markup: str) -> str:
    """OSIS markup of a stretch of verses -> plain lines of prose/poetry."""
    s = _RE_NOTE.sub(_NOTE, markup)
    s = _RE_HEADING.sub(lambda m: "\n" + m.group(2) + "\n", s)
    s = _RE_BREAK.sub("\n", s)
    s = _RE_TAG.sub("", s)
    s = html.unescape(s)
    # A footnote's anchor often sits between two words with the space dropped
    # ("God<note/>created"): it becomes a space, unless a space or punctuation is already there.
    s = re.sub(_NOTE + r"+(?=[\s.,;:!?’”)\]]|$)", "", s)
    s = re.sub(r"(?<=\s)" + _NOTE + "+", "", s)
    s = s.replace(_NOTE, " ")
    s = re.sub(r"[ \t\u00a0]+", " ", s)
    lines = (line.strip() for line in s.split("\n"))
    return "\n".join(line for line in lines if line)


def book_chapters(osis: str) -> list[dict]:
    """Chapters of one book as {"book", "osis", "chapter", "text"} dicts."""
    name = _book_name(osis)
    if name is None:
        return []
    raw = _diatheke("-o", "fh", "-k", osis)
    cut = _RE_BOOK_END.search(raw)  # the last verse of Revelation carries the whole glossary
    if cut:
        raw = raw[: cut.start()]
    marker = re.compile(re.escape(name) + r" (\d+):(\d+): ")
    chapters: dict[int, list[str]] = {}
    current = None
    for line in raw.split("\n"):
        m = marker.search(line)
        if m:
            current = int(m.group(1))
            # Markup before the marker (a psalm title, a speaker) opens this verse.
            piece = line[: m.start()] + " " + line[m.end():]
        else:
            piece = line
        if current is None:
            if _clean(piece):
                msg = f"{osis}: text before the first verse: {piece[:80]!r}"
                raise RuntimeError(msg)
            continue
        chapters.setdefault(current, []).append(piece)
    out = []
    for ch, pieces in sorted(chapters.items()):
        text = _clean(" ".join(pieces))
        if text:
            out.append({"book": name, "osis": osis, "chapter": ch, "text": text})
    return out


def _problems(text: str) -> list[str]:
    """What must never be in the shipped text (the tests check the same)."""
    checks = {
        "verse reference": r"\b\d+:\d+: ",
        "footnote": r"\[\d+:\d+ ",
        "markup": r"<[a-zA-Z/][^>]*>",
        "module name": MODULE,
        "control character": r"[\x00-\x08\x0b-\x1f]",
    }
    return [f"{what}: {m.group(0)!r}" for what, pat in checks.items() if (m := re.search(pat, text))]


def build(out: Path = OUT) -> dict:
    """Extract, clean, split and write the corpus; returns a summary."""
    if shutil.which("diatheke") is None:
        msg = "diatheke not found: apt-get install sword-text-web diatheke"
        raise SystemExit(msg)
    t0 = time.time()
    docs = []
    for osis in BOOKS:
        chapters = book_chapters(osis)
        print(f"{osis:7s} {len(chapters):4d} chapters", file=sys.stderr)
        docs.extend(chapters)
    for i, d in enumerate(docs):
        d["id"] = f"{d['osis']}.{d['chapter']}"
        d["index"] = i
        d["split"] = "val" if i % VAL_EVERY == 0 else "train"
        bad = _problems(d["text"])
        if bad:
            msg = f"{d['id']}: {bad}"
            raise RuntimeError(msg)
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids), "duplicate chapter ids"
    keys = ("id", "book", "osis", "chapter", "index", "split", "text")
    payload = "".join(json.dumps({k: d[k] for k in keys}, ensure_ascii=False) + "\n" for d in docs).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # preset 9 | EXTREME: the file ships in the wheel, so every kilobyte is paid by every install.
    tmp.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(out)
    text_bytes = sum(len(d["text"].encode()) for d in docs)
    return {
        "file": str(out), "file_bytes": out.stat().st_size, "documents": len(docs),
        "val_documents": sum(d["split"] == "val" for d in docs), "text_bytes": text_bytes,
        "jsonl_sha256": hashlib.sha256(payload).hexdigest(), "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    p.add_argument("--check", action="store_true", help="also print a sample of the cleaned text")
    args = p.parse_args(argv)
    summary = build(args.out)
    print(json.dumps(summary, indent=2))
    if args.check:
        with lzma.open(args.out, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in (0, 600, 1200):
                    d = json.loads(line)
                    print(f"--- {d['id']} ({d['split']})\n{d['text'][:600]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
