"""Low-precision training of a linear layer: the three matmuls of y = x W, each on its own quantised
operands, as the FP8 and NVFP4 recipes run them (simulated with quantise-dequantise, accumulating in fp32).

    forward (Fprop):        y  = Q_a(x)          @ Q_w(W)           contraction over the input features
    input gradient (Dgrad): dx = Q_g(dy)         @ Q_w(W)^T         contraction over the output features
    weight gradient (Wgrad): dW = Q_a(H x)^T     @ Q_g(H dy)        contraction over the tokens

Blocks run along each GEMM's contraction axis (1 x 16 for NVFP4 activations and gradients); with
`weight_blocks_2d` the weight is quantised once in 16 x 16 tiles, so Fprop and Dgrad see the same
quantised W (otherwise Dgrad quantises it again along the output features). H is a random 16 x 16
Hadamard transform along the tokens (Wgrad only): H^T H = I leaves dW unchanged before quantisation.
Gradients take stochastic rounding with `stochastic_rounding`; weights and activations round to nearest.

The routed experts run the same three matmuls as one grouped GEMM over all experts
(`grouped_quantized_matmul`), each expert's weight and rows quantised as tensors of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from nemojax.quant.formats import FORMATS, MXFP4_BLOCK, NVFP4_BLOCK, quantize, quantize_groups
from nemojax.quant.hadamard import hadamard_transform, random_hadamard


@dataclass(frozen=True)
class Precision:
    """How a linear layer's matmuls are quantised. A format is one of `nemojax.quant.FORMATS`, or None:
    that operand is used as it is (the identity quantiser; e.g. gradients=None keeps them unquantised).

    weights: W in Fprop and Dgrad. activations: x in Fprop and Wgrad. gradients: dy in Dgrad and Wgrad.
    weight_blocks_2d: W quantised once in square tiles (axis=(-2, -1)), the same in Fprop and Dgrad.
    hadamard: the random Hadamard transform on both Wgrad operands along the tokens.
    stochastic_rounding: gradients rounded stochastically (nearest otherwise).
    The last two need a `key` in `quantized_matmul` (see `needs_key`)."""

    weights: str | None = None
    activations: str | None = None
    gradients: str | None = None
    weight_blocks_2d: bool = False
    hadamard: bool = False
    stochastic_rounding: bool = False

    def __post_init__(self):
        for name in ("weights", "activations", "gradients"):
            fmt = getattr(self, name)
            if fmt is not None and fmt not in FORMATS:
                raise ValueError(f"Precision.{name} must be None or one of {FORMATS}; got {fmt!r}")

    @property
    def needs_key(self) -> bool:
        return self.hadamard or (self.stochastic_rounding and self.gradients is not None)

    @property
    def row_alignment(self) -> int:
        """Rows a grouped GEMM's layout gives each expert, in multiples of: the block the Wgrad operands
        are quantised in down the tokens (and the Hadamard size), so no block straddles two experts."""
        return MXFP4_BLOCK if "mxfp4" in (self.activations, self.gradients) else NVFP4_BLOCK


# The recipes of `nemojax train --precision` (None: no quantisation, the matmuls run in the compute dtype).
RECIPES: dict[str, Precision | None] = {
    "bf16": None,
    # Per-tensor current scaling with E4M3 forward operands and E5M2 gradients (Transformer Engine's
    # "hybrid" FP8 format).
    "fp8": Precision("fp8_e4m3", "fp8_e4m3", "fp8_e5m2"),
    # "Pretraining LLMs with NVFP4" (arXiv 2509.25149; research notes moe_puzzle_fusion.md §2.4): NVFP4
    # everywhere, 16x16 weight tiles, RHT on the Wgrad inputs, stochastic rounding on gradients.
    "nvfp4": Precision("nvfp4", "nvfp4", "nvfp4", weight_blocks_2d=True, hadamard=True, stochastic_rounding=True),
}
# The parts of a recipe `nemojax train --precision-disable` can switch off (the NVFP4 ablations).
SWITCHES = ("weight_blocks_2d", "hadamard", "stochastic_rounding")


def recipe(name: str, disable=()) -> Precision | None:
    """RECIPES[name] with the parts named in `disable` (of SWITCHES, each on in that recipe) off."""
    if name not in RECIPES:
        raise ValueError(f"precision must be one of {tuple(RECIPES)}; got {name!r}")
    base = RECIPES[name]
    on = () if base is None else tuple(s for s in SWITCHES if getattr(base, s))
    for part in disable:
        if part not in on:
            raise ValueError(f"precision_disable: {part!r} is not a part of the {name} recipe that can be switched "
                             f"off; allowed: {on}")
    return base if not disable else replace(base, **{part: False for part in disable})


def default_high_precision_layers(name: str, num_layers: int) -> tuple[int, int]:
    """(first, last): how many of the first and last layers recipe `name` keeps unquantised.

    fp8: the first and the last layer, Megatron's `first_last_layers_bf16` (on by default for
      Nemotron-H; research notes moe_puzzle_fusion.md §1.1) with one layer at each end.
    nvfp4: the NVFP4 paper's 12B run kept about 16% of its linear layers in BF16, the first few and
      mostly the final ones, possibly the first 2 and the last 8 of its 62 layers (notes §2.4); here
      those fractions of this model's depth, rounded up, so a small model keeps at least one each.
    bf16: none (nothing is quantised)."""
    if name not in RECIPES:
        raise ValueError(f"precision must be one of {tuple(RECIPES)}; got {name!r}")
    if name == "fp8":
        return 1, 1
    if name == "nvfp4":
        return math.ceil(2 * num_layers / 62), math.ceil(8 * num_layers / 62)
    return 0, 0


def _quantize(x, fmt, axis, rounding="nearest", key=None, groups=None):
    if fmt is None:
        return x
    if groups is None:
        return quantize(x, fmt, axis=axis, rounding=rounding, key=key)
    return quantize_groups(x, fmt, groups, axis=axis, rounding=rounding, key=key)


def _matmul(a, b):
    """The plain layer matmul: [..., K] @ [K, N] accumulated in fp32 (what `nn.layers.dense` runs)."""
    return jnp.einsum("...i,io->...o", a, b, preferred_element_type=jnp.float32)


def _weight(w, p: Precision, gemm: str):
    """W as Fprop ("fprop": blocks along the input features) or Dgrad ("dgrad": along the output
    features) reads it; with 2D blocks both read the same tiles. A stack of experts' weights [E, K, N]:
    each expert's is a tensor of its own (its own per-tensor scale)."""
    if p.weights is None:
        return w
    q = partial(quantize, fmt=p.weights, axis=(-2, -1) if p.weight_blocks_2d else {"fprop": -2, "dgrad": -1}[gemm])
    return q(w) if w.ndim == 2 else jax.vmap(q)(w)


def _gradient(g, p: Precision, axis, key, groups=None):
    rounding = "stochastic" if p.stochastic_rounding and p.gradients is not None else "nearest"
    return _quantize(g, p.gradients, axis, rounding, key if rounding == "stochastic" else None, groups)


@dataclass(frozen=True)
class GroupedGemm:
    """A grouped GEMM on its row layout, as a routed-experts dispatch runs it: rows [R, K] in consecutive
    groups of group_sizes[e] rows, expert e's rows times its weight w[e].

    dot(a [R, K], b [E, K, N], group_sizes) -> fp32 [R, N], rows past sum(group_sizes) 0;
    wgrad(a [R, K], g [R, N], group_sizes) -> fp32 [E, K, N], expert e's a^T g over its rows.
    Both take operands of one dtype."""

    dot: Callable
    wgrad: Callable


def _dot(a, b, groups, gemm: GroupedGemm | None):
    return _matmul(a, b) if gemm is None else gemm.dot(a, b, groups)


def _qmatmul_fwd(x, w, key, groups, p, gemm):
    w_f = _weight(w, p, "fprop")
    y = _dot(_quantize(x, p.activations, -1, groups=groups), w_f, groups, gemm)
    # 2D blocks: Dgrad reads the forward's quantised weight, kept rather than quantised again
    return y, (x, w, w_f if p.weight_blocks_2d else None, key, groups)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _qmatmul(x, w, key, groups, p: Precision, gemm: GroupedGemm | None):
    return _qmatmul_fwd(x, w, key, groups, p, gemm)[0]


def _qmatmul_bwd(p, gemm, residuals, g):
    x, w, w_f, key, groups = residuals
    if p.needs_key and key is None:
        raise ValueError("quantized_matmul: the backward of this precision (stochastic rounding or the Hadamard "
                         "transform) needs a key; in training, nemojax.quant.training.set_rounding_keys gives every "
                         "layer one")
    k_dgrad, k_wgrad, k_hadamard = jax.random.split(key, 3) if key is not None else (None,) * 3
    w_d = _weight(w, p, "dgrad") if w_f is None else w_f
    g_d = _gradient(g, p, -1, k_dgrad, groups)
    # Each gradient is the transpose of the plain matmul on that GEMM's quantised operands, so with
    # identity quantisers it is exactly what autodiff of `_matmul` gives.
    if gemm is None:
        dx, = jax.linear_transpose(lambda a: _matmul(a, w_d), x)(g_d)
    else:  # each expert's rows times its transposed weight, on the same layout
        dx = gemm.dot(g_d, jnp.swapaxes(w_d, 1, 2).astype(g_d.dtype), groups).astype(x.dtype)
    # Wgrad contracts over every token: flatten them onto axis 0, the axis its blocks run along.
    x_t, g_t = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if p.hadamard:  # zero tokens padded to whole Hadamard blocks add nothing to x^T g
        pad = ((0, -x_t.shape[0] % NVFP4_BLOCK), (0, 0))
        h = random_hadamard(k_hadamard, NVFP4_BLOCK)
        x_t, g_t = (hadamard_transform(jnp.pad(t.astype(jnp.float32), pad), h, axis=0) for t in (x_t, g_t))
    x_w = _quantize(x_t, p.activations, 0, groups=groups)
    g_w = _gradient(g_t, p, 0, k_wgrad, groups)
    if gemm is not None:
        return dx, gemm.wgrad(x_w.astype(g_w.dtype), g_w, groups).astype(w.dtype), None, None
    if not p.hadamard:  # back to x's shape: the same contraction autodiff of `_matmul` runs
        x_w, g_w = x_w.reshape(x.shape), g_w.reshape(g.shape)
    dw, = jax.linear_transpose(lambda b: _matmul(x_w, b), w)(g_w)
    return dx, dw, None, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def quantized_matmul(x, w, precision: Precision, key=None):
    """x [..., K] @ w [K, N] -> fp32 [..., N] with each of the three matmuls (this forward and the two
    gradients of the backward) on operands quantised per `precision` (module doc), accumulating in fp32.
    Quantised operands keep their input's dtype (a bf16 operand holds the dequantised value rounded once
    to bf16); the Hadamard-transformed Wgrad operands are fp32. x and w share a dtype, as in `dense`.

    key: a jax PRNG key, which the backward needs when `precision.needs_key` (stochastic rounding, the
    random Hadamard signs; differentiating without one raises); the forward is deterministic. The backward
    uses jax.random.split(key, 3) as the keys of Dgrad's and Wgrad's gradient rounding and of the Hadamard
    signs (`random_hadamard`), in that order. Gradients: dx in x's dtype, dw in w's."""
    _check_precision("quantized_matmul", precision)
    if x.shape[-1] != w.shape[0] or w.ndim != 2:
        raise ValueError(f"quantized_matmul: x [..., K] and w [K, N] needed; got x {x.shape}, w {w.shape}")
    return _qmatmul(x, w, key if precision.needs_key else None, None, precision, None)


def grouped_quantized_matmul(x, w, group_sizes, precision: Precision, key=None, *, gemm: GroupedGemm):
    """The routed experts' GEMM out[r] = x[r] @ w[e] for the rows r of expert e, x [R, K] holding the
    experts' rows in consecutive groups (group_sizes [E] rows each; rows past their sum belong to no
    expert and give 0), w [E, K, N] -> fp32 [R, N], run by `gemm` on the dispatch's layout. Each of the
    three matmuls quantises its operands as `quantized_matmul` does, with every expert's rows and weight
    tensors of their own (per-expert per-tensor scales; an expert's Wgrad blocks and Hadamard blocks run
    down its own rows only), so expert e computes what quantized_matmul(x_e, w[e], precision, key) does
    on its rows x_e. One key for all experts: the same Hadamard matrix for each, and the stochastic
    rounding draws over the whole [R, .] operand.

    Every group size must be a multiple of `precision.row_alignment` (the layout pads each expert's rows
    with zero rows to whole blocks: zeros change no scale and add nothing to a product), R too."""
    _check_precision("grouped_quantized_matmul", precision)
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_quantized_matmul: x [R, K], w [E, K, N] and group_sizes [E] needed; got x "
                         f"{x.shape}, w {w.shape}, group_sizes {group_sizes.shape}")
    if x.shape[0] % precision.row_alignment:
        raise ValueError(f"grouped_quantized_matmul: rows R={x.shape[0]} must be a multiple of "
                         f"row_alignment={precision.row_alignment}")
    return _qmatmul(x, w, key if precision.needs_key else None, group_sizes, precision, gemm)


def _check_precision(op: str, precision) -> None:
    if not isinstance(precision, Precision):
        raise ValueError(f"{op}: precision must be a Precision; got {precision!r}")
