"""Helpers shared by the Triton-style Pallas kernels (ops/ssd, ops/moe, ops/ffn): the launch-config
base class (backend choice, compiler parameters, tile checks) and masked 2-D tile loads/stores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Launch options every kernel takes; each kernel subclasses it with its tile sizes (`block_*`
    fields, checked on construction). Frozen, so hashable: a static argument of jit and of the
    kernels' custom_vjp. interpret=None: interpret unless on a GPU, where Triton compiles the kernel
    (`resolved()` fixes it at call time, so a config built on import follows the backend)."""
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool | None = None

    # Triton tiles are powers of 2 and tl.dot needs every dimension >= 16; a kernel whose tiles
    # are zero-padded up to 16 on a GPU (ssd) lowers this and checks the GPU limit itself.
    min_block = 16

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("block_") and (
                    not isinstance(value, int) or value < self.min_block or value & (value - 1)):
                raise ValueError(f"{type(self).__name__}: {field.name} must be a power of 2 >= {self.min_block}; "
                                 f"got {value!r}")
        for name in ("num_warps", "num_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an int >= 1; got {getattr(self, name)!r}")

    def resolved(self):
        interpret = jax.default_backend() != "gpu" if self.interpret is None else bool(self.interpret)
        return dataclasses.replace(self, interpret=interpret)

    def pallas_call(self, kernel, **kwargs):
        """`pl.pallas_call` in interpret mode or for Triton (its CompilerParams select the Triton
        lowering over Mosaic GPU); call it on a `resolved()` config."""
        params = None if self.interpret else pltriton.CompilerParams(num_warps=self.num_warps,
                                                                     num_stages=self.num_stages)
        return pl.pallas_call(kernel, interpret=self.interpret, compiler_params=params, **kwargs)


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
