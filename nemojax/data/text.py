"""Language-modelling data: the built-in corpus (the help text that ships with every Python, so no
download on any machine) and the user's own .txt / .jsonl files, byte-tokenized and packed.

Packing: documents are concatenated, each followed by the end-of-document byte, and the stream is cut
into non-overlapping windows of seq_len + 1 tokens (inputs and targets share all but one token). Each
epoch visits every window once in an order drawn from (seed, epoch), so `batch(step)` is a pure
function of (seed, step). The last `val_fraction` of the stream is the validation split.
"""

from __future__ import annotations

import json
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
    def __init__(self, documents: list[str], *, split: str = "train", val_fraction: float = 0.05,
                 source: str = "text", **kw):
        super().__init__(**kw)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        eod = np.array([self.tokenizer.eod_id], np.int32)
        stream = np.concatenate([np.concatenate([self.tokenizer.encode(d), eod]) for d in documents])
        cut = int(len(stream) * (1 - val_fraction))
        self.stream = stream[:cut] if split == "train" else stream[cut:]
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

    def batch(self, step):
        w = np.stack([self.window(i) for i in self.window_ids(step)])
        return {"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32)}
