"""Low-precision training of a model: which layers' linear matmuls run quantised (`configure_precision`)
and the per-step keys of the quantised backward.

Quantised: every `Linear` inside the chosen layers (Mamba in/out projections, attention q/k/v/o, the
dense MLP and the MoE shared expert, LatentMoE's latent projections, linear mixers) and the routed
experts' two GEMMs of every MoE layer among them (each expert's weight and tokens quantised as tensors of
their own, `grouped_quantized_matmul`). Left in the compute dtype: the router, norms, softmax, the SSD
scan and convolution, embeddings, LM head and the MTP layers.
"""

from __future__ import annotations

import jax
from flax import nnx

from nemojax.nn.ffn import MoE
from nemojax.nn.layers import Linear
from nemojax.quant.linear import Precision

# A stream tag for the rounding keys, so they never coincide with the init keys of the same seed
# (nnx.Rngs folds small counters into the seed's key).
_ROUNDING_STREAM = 0x51A7_0F4B


def _quantisable(module):
    """The modules whose matmuls a recipe quantises, in order: linear layers and MoE layers (routed experts)."""
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, (Linear, MoE))]


def configure_precision(model, recipe: Precision | None, *, first: int = 0, last: int = 0) -> tuple[int, ...]:
    """Runs the linear and routed-expert matmuls of `model.layers[first:L - last]` per `recipe` (a
    `Precision`; None: all unquantised) and leaves the first `first` and last `last` layers, and
    everything listed in the module doc, unquantised. Returns the indices of the quantised layers. A
    recipe that would quantise no layer (first + last >= L) is an error: it would be accepted and then
    ignored."""
    if recipe is not None and not isinstance(recipe, Precision):
        raise ValueError(f"configure_precision: recipe must be a Precision or None; got {recipe!r}")
    n = len(model.layers)
    for name, value in (("first", first), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"configure_precision: {name} must be an int >= 0; got {value!r}")
    if recipe is not None and first + last >= n:
        raise ValueError(f"high_precision_layers first={first},last={last} keeps all {n} layers unquantised; "
                         f"lower them (first + last < {n})")
    quantised = tuple(i for i in range(n) if recipe is not None and first <= i < n - last)
    for i, block in enumerate(model.layers):
        for m in _quantisable(block):
            m.precision = recipe if i in quantised else None
            m.rounding_key = None
    return quantised


def rounding_key(seed: int, step):
    """The key of a training step's quantisation randomness: a function of (seed, step) alone, so a
    resumed run draws the same stochastic roundings and Hadamard signs as a straight one. An "rbg" key
    (XLA's RngBitGenerator draws the bits): stochastic rounding draws one number per element of every
    gradient it rounds, and threefry's bit generator makes each such draw several times slower to compile
    on the CPU. Its bits are fixed for a backend, which is all a resume needs."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl="rbg"), _ROUNDING_STREAM), step)


def set_rounding_keys(model, key) -> None:
    """Gives each quantised linear or MoE layer whose recipe needs randomness its own key folded from `key`
    (in layer order). Call it on the model a step differentiates, once per step."""
    layers = [m for m in _quantisable(model) if m.precision is not None and m.precision.needs_key]
    for i, m in enumerate(layers):
        m.rounding_key = nnx.data(jax.random.fold_in(key, i))  # an array on an attribute the module made static
