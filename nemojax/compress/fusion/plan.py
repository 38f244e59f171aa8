"""What to fuse, read off a dependency matrix (`dependency_matrix`): runs of FFN layers for FFN Fusion and
fixed-size windows of whole layers for full-block parallelisation. Pure functions of the config and M.

A pair with an undefined dependency (NaN in M, e.g. outside the range it was measured on) counts as
dependent: it is never fused.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from nemojax.compress.fusion.fuse import FFN_KINDS
from nemojax.config import ModelConfig

# Layers that a window of full-block parallelisation may not hold: nothing to run, or already parallel.
UNWINDOWED_KINDS = ("noop", "parallel")


def _check(cfg, M) -> np.ndarray:
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig; got {type(cfg).__name__}")
    M = np.asarray(M, np.float64)
    n = len(cfg.layers)
    if M.shape != (n, n):
        raise ValueError(f"M must be the [L, L] = [{n}, {n}] dependency matrix of cfg's layers; got shape {M.shape}")
    return M


def _segments(cfg: ModelConfig) -> list[list[int]]:
    """The FFN layers of each stretch free of other mixers (no-op layers neither count nor break one)."""
    out, current = [], []
    for k, spec in enumerate(cfg.layers):
        if spec.kind in FFN_KINDS:
            current.append(k)
        elif spec.kind != "noop":
            out.append(current)
            current = []
    out.append(current)
    return [s for s in out if s]


def ffn_runs(cfg: ModelConfig, M, *, threshold: float, leave_out_last: bool = True) -> list[tuple[int, int]]:
    """FFN Fusion candidates: (start, stop) layer ranges, sorted, each a run of >= 2 FFN layers (MLP or
    MoE) whose pairwise dependencies M[a, b] (a < b, both FFN layers of the run) are all <= `threshold`.

    The FFN layers between two other mixers (attention, Mamba, linear, parallel; no-op layers are skipped
    over) form a segment; with `leave_out_last` its last FFN layer is left out (FFN Fusion finds the last
    FFN of an attention-free stretch sensitive). Each segment is then cut greedily, left to right: a run
    takes the next FFN layer while that layer's dependency on every layer already in the run is within
    the threshold, else a new run starts there. start is the run's first FFN layer, stop one past its
    last, so no-op layers inside a run are inside its range.
    """
    M = _check(cfg, M)
    if not isinstance(threshold, Real) or isinstance(threshold, bool) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (a cosine distance); got {threshold!r}")
    runs = []
    for segment in _segments(cfg):
        if leave_out_last:
            segment = segment[:-1]
        run: list[int] = []
        for b in segment:
            if run and not all(M[a, b] <= threshold for a in run):  # NaN compares False: dependent
                runs.append(run)
                run = []
            run.append(b)
        runs.append(run)
    return sorted((r[0], r[-1] + 1) for r in runs if len(r) >= 2)


def block_windows(cfg: ModelConfig, M, *, size: int, count: int | None = None) -> list[tuple[int, int]]:
    """Full-block parallelisation candidates: windows of `size` consecutive layers (none a no-op or an
    already parallel layer, and every dependency among them defined), chosen greedily as in FFN Fusion:
    the window whose dependency sub-matrix (upper triangle, M[a, b] for a < b inside it) has the smallest
    maximum, ties broken by the smallest sum, then by position; windows overlapping it are dropped, and
    so on until `count` windows are chosen (None: until none is left; fewer when fewer fit). Returns
    (start, stop) ranges in the order chosen, best first."""
    M = _check(cfg, M)
    if not isinstance(size, int) or isinstance(size, bool) or size < 2:
        raise ValueError(f"size must be an int >= 2 (layers per window); got {size!r}")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError(f"count must be None (as many as fit) or an int >= 1; got {count!r}")
    n = len(cfg.layers)
    ranked = []
    for start in range(n - size + 1):
        if any(cfg.layers[k].kind in UNWINDOWED_KINDS for k in range(start, start + size)):
            continue
        deps = M[start:start + size, start:start + size][np.triu_indices(size, 1)]
        if np.all(np.isfinite(deps)):
            ranked.append((deps.max(), deps.sum(), start))
    chosen: list[tuple[int, int]] = []
    for _, _, start in sorted(ranked):
        if count is not None and len(chosen) == count:
            break
        if all(start + size <= a or b <= start for a, b in chosen):
            chosen.append((start, start + size))
    return chosen
