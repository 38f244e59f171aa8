"""Datasets for training: synthetic recall/copy tasks and packed byte-level text.

`make_dataset(name, seq_len=, batch_size=, seed=, **options)` returns an object with `vocab_size`,
`tokenizer` (None for synthetic tasks) and `batch(step) -> {"inputs", "targets"}` (int32 [B, L],
targets IGNORE where unscored), a pure function of (seed, step)."""

from nemojax.data.base import IGNORE, Dataset
from nemojax.data.synthetic import MQAR, InductionHeads, SelectiveCopy
from nemojax.data.text import PackedText, builtin_documents, file_documents
from nemojax.data.tokenizer import ByteTokenizer

DATASETS = ("text", "file", "mqar", "induction", "selective_copy")
_SYNTHETIC = {"mqar": MQAR, "induction": InductionHeads, "selective_copy": SelectiveCopy}


def make_dataset(name: str, *, seq_len: int, batch_size: int, seed: int = 0, **options) -> Dataset:
    """A dataset by name (see DATASETS). Options: mqar (num_kv_pairs, vocab_size, power_a), induction
    (vocab_size), selective_copy (num_tokens, vocab_size), text (split, val_fraction), file (path,
    text_key, split, val_fraction)."""
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)
    try:
        if name in _SYNTHETIC:
            return _SYNTHETIC[name](**common, **options)
        if name == "text":
            return PackedText(builtin_documents(), source="built-in corpus", **common, **options)
        if name == "file":
            if "path" not in options:
                raise ValueError("data 'file' needs a path (--data-path FILE.txt|FILE.jsonl|DIR)")
            path = options.pop("path")
            docs = file_documents(path, options.pop("text_key", "text"))
            return PackedText(docs, source=str(path), **common, **options)
    except TypeError as e:  # an option the dataset does not take
        raise ValueError(f"data {name!r}: {e}") from None
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "IGNORE", "MQAR", "ByteTokenizer", "Dataset", "InductionHeads", "PackedText",
           "SelectiveCopy", "builtin_documents", "file_documents", "make_dataset"]
