"""Helpers shared by the Triton-style Pallas kernels (ops/ssd, ops/moe, ops/ffn): backend choice,
compiler parameters, block checks and masked 2-D tile loads/stores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def resolve_interpret(interpret: bool | None) -> bool:
    """interpret=None: interpret everywhere except on a GPU, where the Triton kernel is compiled."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def compiler_params(interpret: bool, num_warps: int, num_stages: int):
    # Triton CompilerParams is also what selects the Triton lowering over Mosaic GPU.
    return None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_blocks(who: str, **blocks: int) -> None:
    for name, b in blocks.items():
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{who}: {name} must be a power of 2 >= 16 (Triton tiles are powers of 2 "
                             f"and tl.dot needs every dimension >= 16); got {b!r}")


def _tile_mask(shape, row_mask, col_mask):
    """[rows, cols] mask from optional per-row / per-column masks (None: statically all true)."""
    parts = [m for m in (None if row_mask is None else row_mask[:, None],
                         None if col_mask is None else col_mask[None, :]) if m is not None]
    if not parts:
        return None
    mask = parts[0] if len(parts) == 1 else parts[0] & parts[1]
    return jnp.broadcast_to(mask, shape)


def load_tile(ref, idx, row_mask=None, col_mask=None):
    """ref[idx] (idx ends in two pl.ds slices) as a 2-D tile; masked-out entries read 0.

    Off-edge entries must be masked: on a GPU they are out of bounds, and in interpret mode they
    read NaN, which a 0 in the other operand of a dot would not cancel.
    """
    shape = (idx[-2].size, idx[-1].size)
    mask = _tile_mask(shape, row_mask, col_mask)
    return pltriton.load(ref.at[idx], mask=mask, other=None if mask is None else 0.0)


def store_tile(ref, idx, val, row_mask=None, col_mask=None):
    pltriton.store(ref.at[idx], val.astype(ref.dtype), mask=_tile_mask(val.shape, row_mask, col_mask))


def edge_mask(start, block: int, limit: int):
    """Positions start..start+block that are < limit, or None when every tile fits (block | limit)."""
    return None if limit % block == 0 else start + jnp.arange(block) < limit


def dot(a, b, *, trans_a=False, trans_b=False):
    """Tile product with fp32 accumulation (bf16 operands run on the tensor cores)."""
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b)
