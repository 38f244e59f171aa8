"""Language-modelling data: two built-in corpora that ship with every Python, so no download on any
machine (its help text, and its standard library's source code), and the user's own .txt / .jsonl
files, byte-tokenized and packed.

Packing: documents are concatenated, each followed by the end-of-document byte, and the stream is cut
into non-overlapping windows of seq_len + 1 tokens (inputs and targets share all but one token). Each
epoch visits every window once in an order drawn from (seed, epoch), so `batch(step)` is a pure
function of (seed, step). The validation split is either the last `val_fraction` of the stream or,
given `held_out`, whole documents (so no document is seen in both splits).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from nemojax.data.base import Dataset
from nemojax.data.tokenizer import ByteTokenizer

SPLITS = ("train", "validation")
FILE_TYPES = (".txt", ".jsonl")


def builtin_documents() -> list[str]:
    """Python's own pydoc topics (English technical prose: 466 KB on Python 3.11, 493 KB on 3.12, 512 KB on
    3.13), sorted by topic name. Fixed for a given Python version, so runs compare within one version."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# Directories of the standard library that are not its own library source: test suites (their data
# files include deliberately broken and non-UTF-8 code), installed third-party packages, and pydoc_data
# (the `text` corpus, stored as one big Python string literal).
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data")


@functools.cache
def stdlib_documents() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of the standard library's .py files, sorted by path: 732 files, 11.4 MB on
    Python 3.11 (3.12 and 3.13 ship other files; runs compare within one Python version). Directories named
    in STDLIB_EXCLUDED_DIRS are skipped, and so is any file that is not UTF-8 or holds a NUL byte (the
    end-of-document id). Cached: read once per process."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            try:
                text = Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if "\0" not in text:
                found.append((Path(path).relative_to(root).as_posix(), text))
    if not found:
        raise ValueError(f"data 'stdlib': no .py files under {root} (a Python without its standard library source?)")
    return tuple(sorted(found))


def held_out_by_hash(names, sizes, val_fraction: float) -> np.ndarray:
    """Which documents form the validation split: documents in the order of a hash of their name, taken
    until they hold `val_fraction` of the bytes. A document's place depends on its name alone, so the
    split does not move when other documents change, and a larger fraction only adds documents."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    sizes = np.asarray(sizes, np.int64)
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    before = np.cumsum(sizes[order]) - sizes[order]  # bytes taken before each document in hash order
    held = np.zeros(len(names), bool)
    held[np.asarray(order)[before < val_fraction * sizes.sum()]] = True
    return held


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (invalid byte {raw[e.start]:#04x} at byte offset {e.start})") from None


def _read_txt(path: Path) -> list[str]:
    return [_decode(path.read_bytes(), str(path))]


def _read_jsonl(path: Path, text_key: str) -> list[str]:
    docs = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = _decode(raw, f"{path}, line {i}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_key not in record:
            raise ValueError(f"{path}, line {i}: no {text_key!r} field (set text_key= to the field holding the text)")
        if not isinstance(record[text_key], str):
            raise ValueError(f"{path}, line {i}: field {text_key!r} must be a string; got "
                             f"{type(record[text_key]).__name__}")
        docs.append(record[text_key])
    return docs


def file_documents(path, text_key: str = "text") -> list[str]:
    """Documents of a .txt file (the whole file), a .jsonl file (one per line, field `text_key`), or a
    directory of such files (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    files = sorted(f for f in path.iterdir() if f.suffix in FILE_TYPES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"data path {path}: no {' or '.join(FILE_TYPES)} files in the directory")
    docs = []
    for f in files:
        if f.suffix not in FILE_TYPES:
            raise ValueError(f"data path {f}: unsupported file type {f.suffix!r}; use {' or '.join(FILE_TYPES)}")
        if f.stat().st_size == 0:
            raise ValueError(f"data path {f}: the file is empty")
        found = _read_txt(f) if f.suffix == ".txt" else _read_jsonl(f, text_key)
        if not found:
            raise ValueError(f"data path {f}: no documents (only blank lines)")
        docs += found
    return docs


class PackedText(Dataset):
    """`documents` packed into one stream. The validation split is the last `val_fraction` of the
    stream (default 0.05), or, when `held_out` (one bool per document) is given instead, the held-out
    documents, whole and in their order; the training split is the rest."""

    def __init__(self, documents: list[str], *, split: str = "train", val_fraction: float | None = None,
                 held_out=None, source: str = "text", **kw):
        super().__init__(**kw)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        if held_out is not None:
            if val_fraction is not None:
                raise ValueError(f"{source}: give val_fraction (split the stream's tail) or held_out (split by "
                                 f"document), not both")
            held_out = np.asarray(held_out)
            if held_out.dtype != bool or held_out.shape != (len(documents),):
                raise ValueError(f"{source}: held_out must be one bool per document ({len(documents)}); got "
                                 f"dtype {held_out.dtype}, shape {held_out.shape}")
            documents = [d for d, h in zip(documents, held_out) if h == (split == "validation")]
            if not documents:
                raise ValueError(f"{source} ({split} split): no documents")
        eod = np.array([self.tokenizer.eod_id], np.int32)
        stream = np.concatenate([np.concatenate([self.tokenizer.encode(d), eod]) for d in documents])
        if held_out is None:
            val_fraction = 0.05 if val_fraction is None else val_fraction
            if not 0 < val_fraction < 1:
                raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
            cut = int(len(stream) * (1 - val_fraction))
            stream = stream[:cut] if split == "train" else stream[cut:]
        self.stream = stream
        self.n_windows = (len(self.stream) - 1) // self.seq_len
        if self.n_windows < 1:
            raise ValueError(f"{source} ({split} split): {len(self.stream)} tokens, fewer than seq_len + 1 = "
                             f"{self.seq_len + 1}; use a shorter seq_len or more text")

    def window(self, w: int) -> np.ndarray:
        """Window w of the packed stream: tokens [w L, (w + 1) L] (L + 1 of them)."""
        return self.stream[w * self.seq_len: (w + 1) * self.seq_len + 1]

    def window_ids(self, step: int) -> np.ndarray:
        """Which windows batch `step` holds: example i of the run is window perm_epoch[i % n_windows]."""
        self.rng(step)  # validates step
        idx = step * self.batch_size + np.arange(self.batch_size)
        epochs = idx // self.n_windows
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e), 1]).permutation(self.n_windows)
            out[epochs == e] = perm[idx[epochs == e] % self.n_windows]
        return out

    def examples(self, step, rows):
        w = np.stack([self.window(i) for i in self.window_ids(step)[rows]])
        return {"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32)}


class StdlibText(PackedText):
    """The standard library's source (`stdlib_documents`), packed; the validation split is whole files,
    `val_fraction` of the bytes picked by `held_out_by_hash`. `files` names this split's files and
    `corpus` records what the split was drawn from (the corpus differs by Python version)."""

    def __init__(self, *, split: str = "train", val_fraction: float = 0.02, **kw):
        names, texts = zip(*stdlib_documents())
        sizes = [len(t.encode("utf-8")) for t in texts]
        held = held_out_by_hash(names, sizes, val_fraction)
        super().__init__(list(texts), split=split, held_out=held, source="stdlib corpus", **kw)
        self.files = [n for n, h in zip(names, held) if h == (split == "validation")]
        self.corpus = {"python_version": python_version(), "files": len(names), "bytes": int(sum(sizes)),
                       "validation_files": int(held.sum()),
                       "validation_bytes": int(sum(s for s, h in zip(sizes, held) if h))}
