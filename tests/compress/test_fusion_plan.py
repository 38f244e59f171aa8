"""Fusion plans against their characterisations on random patterns and matrices: FFN runs against the
unique partition whose pieces are within the threshold and cannot take the next FFN layer; block windows
against the lexicographically best of every maximal set of non-overlapping windows, found by enumeration."""

import itertools

import numpy as np
import pytest

from nemojax.compress.fusion import block_windows, ffn_runs
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, MoESpec, from_pattern

SPECS = dict(mamba=MambaSpec(num_heads=2, head_dim=8, n_groups=1, state_size=8), mlp=MLPSpec(8),
             attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=8),
             moe=MoESpec(num_experts=4, top_k=2, intermediate_size=8))


def config(pattern):
    return from_pattern(pattern, vocab_size=8, hidden_size=8, **SPECS)


def random_case(rng, n, symbols="--E.M*", ties=True):
    """A pattern and an upper-triangular M: quarters (many ties) or a skewed continuum (where ranking by
    the maximum and by the sum disagree most)."""
    pattern = "".join(rng.choice(list(symbols), n))
    M = np.triu(rng.integers(0, 4, (n, n)) / 4 if ties else rng.random((n, n)) ** 3, 1)
    M[np.tril_indices(n)] = np.nan
    return pattern, M


def segments_of(pattern):
    """FFN layer indices of each stretch between other mixers, read off the pattern's symbols."""
    out = [[]]
    for k, c in enumerate(pattern):
        if c in "-E":
            out[-1].append(k)
        elif c != ".":
            out.append([])
    return [s for s in out if s]


def check_runs(pattern, M, threshold, leave_out_last, runs):
    ffn = [k for k, c in enumerate(pattern) if c in "-E"]
    assert runs == sorted(runs)
    covered = []
    for start, stop in runs:
        members = [k for k in ffn if start <= k < stop]
        assert pattern[start] in "-E" and pattern[stop - 1] in "-E" and len(members) >= 2
        assert set(pattern[start:stop]) <= set("-E.")  # nothing but FFN and no-op layers inside
        assert all(M[a, b] <= threshold for a, b in itertools.combinations(members, 2))
        covered += members
    assert len(covered) == len(set(covered))
    for segment in segments_of(pattern):
        if leave_out_last:
            assert segment[-1] not in covered
            segment = segment[:-1]
        # the runs and the uncovered FFN layers as singletons partition the segment into consecutive
        # pieces; the greedy cut is the one partition where no piece could take the next piece's first layer
        pieces = []
        for k in segment:
            run = next((r for r in runs if r[0] <= k < r[1]), None)
            if run is None or k == run[0]:
                pieces.append([k])
            else:
                assert pieces and pieces[-1][0] == run[0], (pattern, runs, k)
                pieces[-1].append(k)
        for piece, following in zip(pieces, pieces[1:]):
            assert any(not M[a, following[0]] <= threshold for a in piece), (pattern, runs, piece, following)
    return covered


@pytest.mark.parametrize("seed", range(40))
def test_ffn_runs_are_the_greedy_cut(seed):
    rng = np.random.default_rng(seed)
    pattern, M = random_case(rng, int(rng.integers(4, 14)), ties=seed % 2 == 0)
    threshold = float(rng.choice([0.0, 0.25, 0.5, 0.75]))
    for leave_out_last in (True, False):
        runs = ffn_runs(config(pattern), M, threshold=threshold, leave_out_last=leave_out_last)
        check_runs(pattern, M, threshold, leave_out_last, runs)


def test_ffn_runs_worked_example():
    # segments {1, 2, 4} (no-op 3 inside) and {6, 7, 8}; a low matrix fuses everything it may
    cfg, M = config("M--.-*---"), np.zeros((9, 9))
    assert ffn_runs(cfg, M, threshold=0.1) == [(1, 3), (6, 8)]
    assert ffn_runs(cfg, M, threshold=0.1, leave_out_last=False) == [(1, 5), (6, 9)]
    M[1, 4] = 0.2  # layer 4 depends on 1: the run breaks before it, leaving 4 alone
    assert ffn_runs(cfg, M, threshold=0.1, leave_out_last=False) == [(1, 3), (6, 9)]
    M[6, 7] = np.nan  # undefined counts as dependent
    assert ffn_runs(cfg, M, threshold=0.1, leave_out_last=False) == [(1, 3), (7, 9)]
    assert ffn_runs(cfg, M, threshold=0.2, leave_out_last=False) == [(1, 5), (7, 9)]


def key(M, start, size):
    deps = [M[a, b] for a in range(start, start + size) for b in range(a + 1, start + size)]
    return (max(deps), sum(deps), start)


def best_by_enumeration(pattern, M, size):
    """Among every maximal set of pairwise disjoint allowed windows, the one whose keys, sorted, are
    lexicographically smallest (what the greedy must return, in that order)."""
    starts = [s for s in range(len(pattern) - size + 1) if "." not in pattern[s:s + size]
              and all(np.isfinite(M[a, b]) for a in range(s, s + size) for b in range(a + 1, s + size))]
    best = None
    for r in range(len(starts) + 1):
        for subset in itertools.combinations(starts, r):
            if any(abs(a - b) < size for a, b in itertools.combinations(subset, 2)):
                continue
            if any(all(abs(s - t) >= size for t in subset) for s in starts if s not in subset):
                continue  # not maximal
            keys = sorted(key(M, s, size) for s in subset)
            best = keys if best is None or keys < best else best
    return [(k[2], k[2] + size) for k in best]


@pytest.mark.parametrize("seed", range(30))
def test_block_windows_match_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    pattern, M = random_case(rng, int(rng.integers(4, 12)), symbols="M*-E-M.", ties=seed % 2 == 0)
    if rng.random() < 0.3:
        M[tuple(rng.integers(0, len(pattern), 2))] = np.nan  # an undefined entry rules its windows out
    cfg = config(pattern)
    for size in (2, 3, 4):
        expected = best_by_enumeration(pattern, M, size)
        assert block_windows(cfg, M, size=size) == expected
        for count in (1, 2):
            assert block_windows(cfg, M, size=size, count=count) == expected[:count]


def test_block_windows_skip_no_ops_and_break_ties_by_sum_then_position():
    cfg = config("M-*-.M*")
    M = np.full((7, 7), np.nan)
    M[np.triu_indices(7, 1)] = 0.5
    M[0, 2] = 0.1  # window (0, 3): max 0.5, smaller sum than (1, 4)
    assert block_windows(cfg, M, size=3) == [(0, 3)]  # every other 3-window overlaps it or holds the no-op
    assert block_windows(cfg, M, size=2) == [(0, 2), (2, 4), (5, 7)]  # equal keys: leftmost first


@pytest.mark.parametrize("call, match", [
    (lambda cfg, M: ffn_runs(cfg, M, threshold=-0.1), "threshold must be a finite number >= 0"),
    (lambda cfg, M: ffn_runs(cfg, M, threshold=float("nan")), "threshold must be a finite number >= 0"),
    (lambda cfg, M: ffn_runs(cfg, M, threshold="0.1"), "threshold must be a finite number >= 0"),
    (lambda cfg, M: ffn_runs(cfg, M[:3], threshold=0.1), r"M must be the \[L, L\] = \[4, 4\]"),
    (lambda cfg, M: ffn_runs(cfg.layers, M, threshold=0.1), "cfg must be a ModelConfig"),
    (lambda cfg, M: block_windows(cfg, M, size=1), "size must be an int >= 2"),
    (lambda cfg, M: block_windows(cfg, M, size=2.0), "size must be an int >= 2"),
    (lambda cfg, M: block_windows(cfg, M, size=2, count=0), "count must be None"),
    (lambda cfg, M: block_windows(cfg, M[None], size=2), r"M must be the \[L, L\]"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(config("M--*"), np.zeros((4, 4)))
