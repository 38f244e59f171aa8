"""Datasets: determinism, brute-force oracles that solve every synthetic task from its inputs alone,
tokenizer round trips, packing, splits, and clear errors on bad files."""

import json

import numpy as np
import pytest

from nemojax import data
from nemojax.data import IGNORE

SYNTHETIC = {"mqar": dict(num_kv_pairs=6), "induction": {}, "selective_copy": dict(num_tokens=5)}


@pytest.mark.parametrize("name", [*SYNTHETIC, "text"])
def test_batches_are_pure_functions_of_seed_and_step(name):
    opts = SYNTHETIC.get(name, {})
    a = data.make_dataset(name, seq_len=48, batch_size=4, seed=1, **opts)
    b = data.make_dataset(name, seq_len=48, batch_size=4, seed=1, **opts)
    later_first = b.batch(7)  # call order must not matter
    for k in ("inputs", "targets"):
        np.testing.assert_array_equal(a.batch(7)[k], later_first[k])
        assert a.batch(7)[k].dtype == np.int32 and a.batch(7)[k].shape == (4, 48)
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    c = data.make_dataset(name, seq_len=48, batch_size=4, seed=2, **opts)
    assert not np.array_equal(a.batch(7)["inputs"], c.batch(7)["inputs"])
    assert np.all(a.batch(3)["inputs"] < a.vocab_size)


def mqar_oracle(inputs, half):
    """Answer every key that appears a second time with the value that followed it the first time."""
    pred = np.full(len(inputs), IGNORE)
    seen = {}
    for t, tok in enumerate(inputs[:-1]):
        if 0 < tok < half:
            if tok in seen:
                pred[t] = seen[tok]
            else:
                seen[tok] = inputs[t + 1]
    return pred


def induction_oracle(inputs, trigger):
    pred = np.full(len(inputs), IGNORE)
    first = int(np.flatnonzero(inputs == trigger)[0])
    pred[-1] = inputs[first + 1]
    return pred


def copy_oracle(inputs):
    pred = np.full(len(inputs), IGNORE)
    sep = int(np.flatnonzero(inputs == 1)[0])
    tokens = inputs[:sep][inputs[:sep] > 1]
    pred[sep:] = tokens[: len(inputs) - sep]
    return pred


@pytest.mark.parametrize("seq_len", [24, 64])
def test_synthetic_tasks_are_solved_exactly_by_their_oracles(seq_len):
    mq = data.make_dataset("mqar", seq_len=seq_len, batch_size=8, num_kv_pairs=6, vocab_size=64)
    ind = data.make_dataset("induction", seq_len=seq_len, batch_size=8)
    cp = data.make_dataset("selective_copy", seq_len=seq_len, batch_size=8, num_tokens=5)
    for step in range(3):
        for ds, oracle, n_scored in ((mq, lambda x: mqar_oracle(x, 32), 6),
                                     (ind, lambda x: induction_oracle(x, ind.vocab_size - 1), 1),
                                     (cp, copy_oracle, 5)):
            b = ds.batch(step)
            for x, t in zip(b["inputs"], b["targets"]):
                np.testing.assert_array_equal(oracle(x)[: len(t)], t)
                assert np.sum(t != IGNORE) == n_scored


def test_mqar_layout():
    n, L = 6, 64
    ds = data.make_dataset("mqar", seq_len=L, batch_size=64, num_kv_pairs=n, vocab_size=64)
    b = ds.batch(0)
    for x, t in zip(b["inputs"], b["targets"]):
        keys, values = x[0:2 * n:2], x[1:2 * n:2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < 32 <= values.min() and values.max() < 64
        q = np.flatnonzero(t != IGNORE)
        assert q.min() >= 2 * n and sorted(x[q]) == sorted(keys)  # every key queried once, after the context
        assert np.all(x[q[q + 1 < L] + 1] == 0)  # the answer is never revealed after its query
        assert np.count_nonzero(x[2 * n:]) == n  # the query region holds only the queried keys


def test_mqar_query_spacing_follows_the_power_law():
    # Query slots are drawn with p(slot) ~ slot^(power_a - 1): power_a -> 0 crowds them next to the
    # context, power_a = 1 spreads them uniformly.
    def slot_counts(power_a):
        ds = data.make_dataset("mqar", seq_len=64, batch_size=400, num_kv_pairs=4, vocab_size=64, power_a=power_a)
        q = np.flatnonzero(ds.batch(0)["targets"].ravel() != IGNORE) % 64
        return np.bincount((q - 8) // 2, minlength=28).reshape(4, 7).sum(1)  # per quarter of the 28 slots

    crowded, uniform = slot_counts(0.01), slot_counts(1.0)
    assert crowded[0] > 4 * crowded[-1]
    assert uniform.max() < 1.25 * uniform.min()


def test_induction_trigger_appears_exactly_twice():
    ds = data.make_dataset("induction", seq_len=40, batch_size=16)
    x = ds.batch(0)["inputs"]
    assert np.all(np.sum(x == ds.vocab_size - 1, axis=1) == 2)


@pytest.mark.parametrize("name,opts,field", [
    ("mqar", dict(num_kv_pairs=20), "seq_len"), ("mqar", dict(num_kv_pairs=4, vocab_size=8), "vocab_size"),
    ("selective_copy", dict(num_tokens=40), "seq_len"), ("mqar", dict(bogus=1), "unknown option.*bogus.*allowed: num_kv_pairs, vocab_size, power_a"),
    ("text", dict(path="x.txt"), "unknown option.*path"),
    ("nope", {}, "unknown dataset")])
def test_bad_options_name_the_field(name, opts, field):
    with pytest.raises(ValueError, match=field):
        data.make_dataset(name, seq_len=32, batch_size=2, **opts)


def test_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    s = "Mamba-2 ∘ attention: naïve Grüße, 日本語 🐍"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode(s).max() < tok.vocab_size == 256


def test_packing_reproduces_the_document_stream(tmp_path):
    docs = [f"document {i}: " + "abc" * i for i in range(40)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    ds = data.make_dataset("file", path=str(f), seq_len=16, batch_size=4, val_fraction=0.1)
    stream = b"".join(d.encode() + b"\0" for d in docs)
    train_bytes = stream[: int(len(stream) * 0.9)]
    # windows 0..n-1 in order tile the training stream (each overlaps the next by one token)
    tiled = np.concatenate([ds.window(w)[:-1] for w in range(ds.n_windows)])
    assert bytes(tiled.astype(np.uint8)) == train_bytes[: len(tiled)]
    # one epoch of batches visits every window exactly once
    ids = np.concatenate([ds.window_ids(s) for s in range(ds.n_windows // 4)])
    assert len(set(ids.tolist())) == len(ids)
    b = ds.batch(0)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    val = data.make_dataset("file", path=str(f), seq_len=16, batch_size=2, val_fraction=0.1, split="validation")
    assert bytes(val.stream.astype(np.uint8)) == stream[int(len(stream) * 0.9):]


def test_builtin_corpus_splits_are_disjoint():
    tr = data.make_dataset("text", seq_len=64, batch_size=2)
    va = data.make_dataset("text", seq_len=64, batch_size=2, split="validation")
    assert len(tr.stream) > 300_000 and len(va.stream) > 10_000
    stream = b"".join(d.encode() + b"\0" for d in data.builtin_documents())
    assert bytes(np.concatenate([tr.stream, va.stream]).astype(np.uint8)) == stream  # head | tail, no overlap


@pytest.mark.parametrize("content,name,match", [
    (None, "missing.txt", "does not exist"),
    (b"", "empty.txt", "empty"),
    (b"ok \xff\xfe bad", "bad.txt", "not UTF-8.*offset 3"),
    (b'{"text": "a"}\n{"text": broken\n', "bad.jsonl", "line 2: not valid JSON"),
    (b'{"text": "a"}\n{"body": "b"}\n', "nokey.jsonl", "line 2: no 'text' field"),
    (b'{"text": "a"}\n["text"]\n', "list.jsonl", "line 2: no 'text' field"),
    (b'{"text": "a"}\n\n{"text": "\xc3("}\n', "latin.jsonl", "line 3: not UTF-8.*offset 10"),
    (b'\n  \n', "blank.jsonl", "no documents"),
    (b"a,b\n", "table.csv", "unsupported file type '.csv'"),
    (b"short", "short.txt", "fewer than seq_len"),
])
def test_bad_files_raise_clear_errors(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.make_dataset("file", path=str(path), seq_len=32, batch_size=2)
