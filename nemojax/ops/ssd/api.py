"""SSD dispatch: validation and the `implementation=` switch."""

from __future__ import annotations


import jax.numpy as jnp

from nemojax.ops.registry import lookup
from nemojax.ops.ssd import pallas_ssd, reference


def _sequential(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
    del chunk_size  # the recurrence has no chunks
    return reference.ssd_sequential(x, dt, A, B, C, D, initial_state, seq_idx)


# name -> function(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx) -> (y, final_state);
# a new kernel is one more entry
_BY_NAME = {"xla": reference.ssd_chunked, "pallas": pallas_ssd.ssd_pallas, "sequential": _sequential}
IMPLEMENTATIONS = tuple(_BY_NAME)


def default_implementation(backend: str | None = None) -> str:
    """What `implementation=None` runs on `backend` (None: jax's default): "xla" on every backend.
    On a CPU "pallas" only runs in interpret mode, and on a GPU the Pallas kernels stay opt-in
    until they are measured faster there (experiments/benchmarks/kernels.py, recorded in
    experiments/benchmarks/RESULTS.md)."""
    del backend  # one answer for all backends until a GPU measurement gives another
    return "xla"


def _check(x, dt, A, B, C, D, initial_state, seq_idx):
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [b, l, h, p]; got shape {x.shape}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd: dt must be [b, l, h] = {(b, l, h)}; got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be [h] = {(h,)}; got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or h % B.shape[2] or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must be [b, l, g, n] with h % g == 0 (b={b}, l={l}, h={h}); "
                         f"got B {B.shape}, C {C.shape}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd: D must be [h] = {(h,)} or None; got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"ssd: initial_state must be [b, h, p, n] = {(b, h, p, B.shape[3])}; "
                         f"got {initial_state.shape}")
    if seq_idx is not None and (seq_idx.shape != (b, l) or not jnp.issubdtype(seq_idx.dtype, jnp.integer)):
        raise ValueError(f"ssd: seq_idx must be an integer array [b, l] = {(b, l)} or None; "
                         f"got {seq_idx.dtype} {seq_idx.shape}")


def ssd(x, dt, A, B, C, chunk_size=128, D=None, initial_state=None, return_final_state=True,
        implementation=None, seq_idx=None):
    """Mamba-2 SSD over a whole sequence; returns (y in x's dtype, final_state fp32 [b,h,p,n]),
    or y alone with `return_final_state=False`.
    implementation: None (`default_implementation()`) | "xla" | "pallas" (chunk_size a power of
    two; interpret mode on a CPU) | "sequential". seq_idx [b, l] ints: packed sequences; the state
    resets wherever seq_idx changes along a row (initial_state feeds the first sequence, the final
    state is the last's)."""
    fn = lookup("ssd", _BY_NAME, implementation, default_implementation)
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    if chunk_size <= 0:
        raise ValueError(f"ssd: chunk_size must be > 0; got {chunk_size}")
    y, final = fn(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y


def ssd_step(state, x, dt, A, B, C, D=None):
    """One decode step: (y [b,h,p] in x's dtype, new_state fp32 [b,h,p,n])."""
    y, state = reference.ssd_step(state, x, dt, A, B, C, D)
    return y.astype(x.dtype), state


__all__ = ["IMPLEMENTATIONS", "default_implementation", "ssd", "ssd_step"]
