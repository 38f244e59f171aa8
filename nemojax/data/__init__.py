"""Datasets for training: synthetic recall/copy tasks and packed byte-level text.

`make_dataset(name, seq_len=, batch_size=, seed=, **options)` returns an object with `vocab_size`,
`tokenizer` (None for synthetic tasks) and `batch(step) -> {"inputs", "targets"}` (int32 [B, L],
targets IGNORE where unscored), a pure function of (seed, step)."""

import inspect

from nemojax.data.base import IGNORE, Dataset
from nemojax.data.synthetic import MQAR, InductionHeads, SelectiveCopy
from nemojax.data.text import PackedText, StdlibText, builtin_documents, file_documents, stdlib_documents
from nemojax.data.tokenizer import ByteTokenizer

DATASETS = ("text", "stdlib", "file", "mqar", "induction", "selective_copy")
_SYNTHETIC = {"mqar": MQAR, "induction": InductionHeads, "selective_copy": SelectiveCopy}
_TEXT_OPTIONS = ("split", "val_fraction")


def options_of(name: str) -> tuple[str, ...]:
    """The options `make_dataset(name, ...)` accepts beyond seq_len, batch_size and seed."""
    if name in _SYNTHETIC:
        params = inspect.signature(_SYNTHETIC[name].__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
    if name in ("text", "stdlib"):
        return _TEXT_OPTIONS
    if name == "file":
        return ("path", "text_key", *_TEXT_OPTIONS)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def make_dataset(name: str, *, seq_len: int, batch_size: int, seed: int = 0, **options) -> Dataset:
    """A dataset by name (see DATASETS; `options_of(name)` lists its options): mqar (num_kv_pairs,
    vocab_size, power_a), induction (vocab_size), selective_copy (num_tokens, vocab_size), text (split,
    val_fraction), stdlib (split, val_fraction: of the bytes, as whole files; default 0.02), file (path,
    text_key, split, val_fraction)."""
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"data {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)
    if name in _SYNTHETIC:
        return _SYNTHETIC[name](**common, **options)
    if name == "text":
        return PackedText(builtin_documents(), source="built-in corpus", **common, **options)
    if name == "stdlib":
        return StdlibText(**common, **options)
    if "path" not in options:
        raise ValueError("data 'file' needs a path (a .txt or .jsonl file, or a directory of them)")
    path = options.pop("path")
    docs = file_documents(path, options.pop("text_key", "text"))
    return PackedText(docs, source=str(path), **common, **options)


__all__ = ["DATASETS", "IGNORE", "MQAR", "ByteTokenizer", "Dataset", "InductionHeads", "PackedText",
           "SelectiveCopy", "StdlibText", "builtin_documents", "file_documents", "make_dataset",
           "options_of", "stdlib_documents"]
