"""The standard-library corpus (`--data stdlib`): the files it holds against an independent walk of the
stdlib directory, a split by whole files that is disjoint, covering, deterministic and of the asked size,
batches drawn from their own split's files, and bad options named."""

import platform
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from nemojax import data
from nemojax.data.text import STDLIB_EXCLUDED_DIRS, PackedText, held_out_by_hash, stdlib_documents
from nemojax.train import TrainConfig
from nemojax.train.loop import make_dataset


def expected_corpus() -> dict[str, bytes]:
    """Relative path -> bytes of every UTF-8, NUL-free .py file under the stdlib outside the excluded
    directories, found with rglob (the loader prunes an os.walk instead)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & set(STDLIB_EXCLUDED_DIRS) or not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if b"\0" not in raw:
            found[rel.as_posix()] = raw
    return found


@pytest.fixture(scope="module")
def corpus():
    return expected_corpus()


@pytest.fixture(scope="module")
def splits():
    kw = dict(seq_len=64, batch_size=4, seed=3)
    return data.make_dataset("stdlib", **kw), data.make_dataset("stdlib", split="validation", **kw)


def packed(corpus, files) -> bytes:
    return b"".join(corpus[f] + b"\0" for f in sorted(files))


def test_splits_are_disjoint_by_file_and_cover_the_corpus(corpus, splits):
    train, val = splits
    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(corpus)
    assert len(corpus) > 300 and not any(f.startswith(("test/", "idlelib/idle_test/")) for f in corpus)
    # each split's stream is its own files, whole, in path order
    assert bytes(train.stream.astype(np.uint8)) == packed(corpus, train.files)
    assert bytes(val.stream.astype(np.uint8)) == packed(corpus, val.files)
    assert train.corpus == val.corpus == {
        "python_version": platform.python_version(), "files": len(corpus),
        "bytes": sum(map(len, corpus.values())), "validation_files": len(val.files),
        "validation_bytes": sum(len(corpus[f]) for f in val.files)}


def test_batches_come_from_their_own_split(corpus, splits):
    for ds in splits:
        text = packed(corpus, ds.files)
        for step in (0, 5, ds.n_windows // ds.batch_size + 1):  # the last one is in the second epoch
            b = ds.batch(step)
            np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
            for row_in, row_t in zip(b["inputs"], b["targets"]):
                window = bytes(np.concatenate([row_in, row_t[-1:]]).astype(np.uint8))
                assert window in text


def test_split_is_deterministic(splits):
    train, val = splits
    stdlib_documents.cache_clear()  # read the files again
    again = data.make_dataset("stdlib", seq_len=64, batch_size=4, seed=3, split="validation")
    assert again.files == val.files
    np.testing.assert_array_equal(again.batch(2)["inputs"], val.batch(2)["inputs"])
    other_seed = data.make_dataset("stdlib", seq_len=64, batch_size=4, seed=4)
    assert other_seed.files == train.files  # the seed orders the windows, not the split


@pytest.mark.parametrize("val_fraction", [0.02, 0.1])
def test_validation_holds_the_asked_fraction_of_bytes(corpus, val_fraction):
    val = data.make_dataset("stdlib", seq_len=64, batch_size=4, split="validation", val_fraction=val_fraction)
    sizes = [len(corpus[f]) for f in val.files]
    target = val_fraction * sum(map(len, corpus.values()))
    assert sum(sizes) >= target > sum(sizes) - max(sizes)  # no file more than needed
    smaller = data.make_dataset("stdlib", seq_len=64, batch_size=4, split="validation", val_fraction=0.01)
    assert set(smaller.files) < set(val.files)


def test_held_out_sets_are_nested_and_just_reach_the_fraction():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        names = [f"doc{i}_{rng.integers(10**6)}.py" for i in range(n)]
        sets = []
        for frac in sorted(rng.uniform(0.01, 0.99, 4)):
            sizes = rng.integers(1, 1000, n)
            held = held_out_by_hash(names, sizes, frac)
            assert sizes[held].sum() >= frac * sizes.sum() > sizes[held].sum() - sizes[held].max()
            sets.append(set(np.flatnonzero(held)))
        # a document's place in the order depends on its name only: every two sets are nested
        assert all(a <= b or b <= a for a in sets for b in sets)


def test_trainer_evaluates_on_the_held_out_files(splits):
    tc = TrainConfig(data="stdlib", seq_len=64, batch_size=4, seed=3)
    assert make_dataset(tc, "validation").files == splits[1].files
    assert make_dataset(tc).files == splits[0].files


@pytest.mark.parametrize("opts,match", [
    (dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\)"),
    (dict(val_fraction=1.5), r"val_fraction must be in \(0, 1\)"),
    (dict(split="test"), "split must be one of"),
    (dict(path="x.txt"), "unknown option.*path.*allowed: split, val_fraction"),
    (dict(seq_len=400_000, split="validation"), "stdlib corpus .validation split.*fewer than seq_len"),
])
def test_bad_options_name_the_field(opts, match):
    kw = dict(seq_len=64, batch_size=2) | opts
    with pytest.raises(ValueError, match=match):
        data.make_dataset("stdlib", **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(held_out=[True, False], val_fraction=0.1), "val_fraction.*or held_out.*not both"),
    (dict(held_out=[True]), r"held_out must be one bool per document \(2\)"),
    (dict(held_out=[1, 0]), "held_out must be one bool per document"),
    (dict(held_out=[True, True]), r"train split\): no documents"),
])
def test_packed_text_held_out_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PackedText(["abc" * 20, "def" * 20], seq_len=8, batch_size=2, **kw)


def test_packed_text_held_out_splits_by_document():
    docs = [f"document {i} " * (i + 3) for i in range(6)]
    held = np.array([False, True, False, False, True, False])
    val = PackedText(docs, held_out=held, split="validation", seq_len=8, batch_size=2)
    train = PackedText(docs, held_out=held, seq_len=8, batch_size=2)
    assert bytes(val.stream.astype(np.uint8)) == b"".join(docs[i].encode() + b"\0" for i in (1, 4))
    assert bytes(train.stream.astype(np.uint8)) == b"".join(docs[i].encode() + b"\0" for i in (0, 2, 3, 5))
