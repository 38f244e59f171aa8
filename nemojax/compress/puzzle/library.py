"""Block-library candidates initialised from a parent layer: an MLP narrowed to a subset of its
channels, a Mamba mixer that keeps a subset of its heads, attention with mean-pooled K/V heads, a
sliding window or only its value and output projections, an MoE layer that keeps a subset of its
experts, routes to fewer of them or has a narrower shared expert, and the least-squares linear
replacement of any layer.

Each function takes the parent layer's mixer and returns (spec, mixer) for
`HybridLM.replace_layers({i: (spec, mixer)})`, which keeps the parent layer's pre-norm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.compress import experts
from nemojax.compress.modules import copy_into, host, shell
from nemojax.config import (SPEC_BY_KIND, SPEC_TYPES, AttentionSpec, LayerSpec, LinearSpec, MambaSpec, MLPSpec,
                            MoESpec, NoOpSpec, spec_from_dict, spec_to_dict)
from nemojax.nn.attention import Attention
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import Linear, LinearMixer
from nemojax.nn.mamba import Mamba2Mixer
from nemojax.nn.model import HybridLM


def _indices(keep, n: int, what: str) -> np.ndarray:
    idx = np.asarray(keep)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what}: keep must be a non-empty 1-D int array of indices; got {keep!r}")
    if (idx < 0).any() or (idx >= n).any() or np.unique(idx).size != idx.size:
        raise ValueError(f"{what}: keep must hold distinct indices in [0, {n}); got {idx.tolist()}")
    return np.sort(idx)


def mlp_channel_contribution(mlp: MLP, x) -> np.ndarray:
    """Per intermediate channel: mean |relu(x W_up + b)^2| over the tokens of `x` [..., D] times the
    norm of the channel's row of W_down (its contribution to the output, ranked to prune)."""
    h = x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ mlp.up_proj.kernel[...].astype(jnp.float32)
    if mlp.up_proj.bias is not None:
        h = h + mlp.up_proj.bias[...].astype(jnp.float32)
    act = jnp.mean(jnp.abs(jnp.square(jnp.maximum(h, 0.0))), axis=0)
    return np.asarray(act * jnp.linalg.norm(mlp.down_proj.kernel[...].astype(jnp.float32), axis=1))


def mamba_head_contribution(mamba: Mamba2Mixer, x) -> np.ndarray:
    """Per head h: the mean over the tokens of x [..., D] of ||y_h W_out[h]||, the norm of the head's
    term in the mixer's output (y_h: its channels after the gated norm, W_out[h]: their out_proj rows).

    Chosen over ||y_h|| * ||W_out[h]||, an upper bound that ignores the directions y_h takes, because
    it is exactly what the output loses when the head is silenced (its out_proj rows zeroed). Measured
    in the parent: with several heads per norm group, dropping a head also renormalises the others."""
    s = mamba.spec
    probe = nnx.clone(mamba)  # the same mixer, returning its pre-out_proj activations y [..., d_inner]
    dtype = mamba.out_proj.kernel[...].dtype
    probe.out_proj = shell(lambda: Linear(s.d_inner, s.d_inner, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    copy_into(probe, {"out_proj.kernel": jnp.eye(s.d_inner, dtype=dtype)})
    y = np.asarray(nnx.jit(lambda m, x: m(x)[0])(probe, x), np.float64).reshape(-1, s.num_heads, s.head_dim)
    w = np.asarray(mamba.out_proj.kernel[...], np.float64).reshape(s.num_heads, s.head_dim, -1)
    gram = np.einsum("hpd,hqd->hpq", w, w)  # ||y_h W_h||^2 = y_h (W_h W_h^T) y_h^T, without the [T, H, D] terms
    squared = np.einsum("thp,hpq,thq->th", y, gram, y)
    return np.sqrt(np.maximum(squared, 0.0)).mean(0)


def mamba_keep_heads(contribution, spec: MambaSpec, n: int) -> np.ndarray | None:
    """The `n` heads of largest summed contribution among the sets `prune_mamba_heads` accepts: k heads
    from each of m groups, m * k = n (for each k, every group's best k heads, the m best groups by
    their sum; then the best k). Sorted head indices, or None when no such set exists."""
    c = np.asarray(contribution, np.float64)
    per_group = spec.num_heads // spec.n_groups
    if c.shape != (spec.num_heads,) or not 1 <= n <= spec.num_heads:
        raise ValueError(f"mamba_keep_heads: need a contribution per head ({spec.num_heads}) and 1 <= n <= "
                         f"{spec.num_heads}; got shape {c.shape}, n={n}")
    c = c.reshape(spec.n_groups, per_group)
    order = np.argsort(-c, axis=1, kind="stable")
    best, keep = -np.inf, None
    for k in range(1, per_group + 1):
        if n % k or n // k > spec.n_groups:
            continue
        sums = np.take_along_axis(c, order[:, :k], axis=1).sum(1)
        groups = np.argsort(-sums, kind="stable")[: n // k]
        if sums[groups].sum() > best:
            best, keep = sums[groups].sum(), (groups[:, None] * per_group + order[groups, :k]).ravel()
    return None if keep is None else np.sort(keep)


def prune_mlp(mlp: MLP, keep) -> tuple[MLPSpec, MLP]:
    """The MLP restricted to intermediate channels `keep` (all of them: the same function)."""
    width = mlp.up_proj.kernel.shape[1]
    idx = _indices(keep, width, "prune_mlp")
    bias = mlp.up_proj.bias is not None
    spec = MLPSpec(intermediate_size=int(idx.size), bias=bias)
    dtype = mlp.up_proj.kernel[...].dtype
    child = shell(lambda: MLP(mlp.up_proj.kernel.shape[0], idx.size, bias=bias, std=1.0, out_std=1.0, dtype=dtype,
                               rngs=nnx.Rngs(0)))
    child.implementation = mlp.implementation
    values = {"up_proj.kernel": host(mlp.up_proj.kernel)[:, idx], "down_proj.kernel": host(mlp.down_proj.kernel)[idx]}
    if bias:
        values.update({"up_proj.bias": host(mlp.up_proj.bias)[idx], "down_proj.bias": mlp.down_proj.bias[...]})
    copy_into(child, values)
    return spec, child


def prune_mamba_heads(mamba: Mamba2Mixer, keep) -> tuple[MambaSpec, Mamba2Mixer]:
    """The Mamba mixer restricted to heads `keep`, the same number from each B/C group it keeps from (so
    each kept head still reads its group's B and C; a group with no kept head goes). Each head's scan is
    independent of the others; the gated RMSNorm after it normalises over the kept heads of a group, so
    the result equals the parent with the other heads' output projections zeroed exactly when every
    group is one head (n_groups = num_heads). `mamba_keep_heads` picks such a set."""
    s = mamba.spec
    idx = _indices(keep, s.num_heads, "prune_mamba_heads")
    per_group = s.num_heads // s.n_groups
    counts = np.bincount(idx // per_group, minlength=s.n_groups)
    groups = np.flatnonzero(counts)  # a group none of whose heads is kept goes, with its B and C
    if len(set(counts[groups].tolist())) != 1:
        raise ValueError(f"prune_mamba_heads: keep must take the same number of heads from each of the "
                         f"{s.n_groups} groups (of {per_group} heads) it keeps; got {counts.tolist()} per group")
    spec = dataclasses.replace(s, num_heads=int(idx.size), n_groups=int(groups.size))
    p, d_inner, n, gn = s.head_dim, s.d_inner, s.state_size, s.n_groups * s.state_size
    channels = (idx[:, None] * p + np.arange(p)).ravel()  # the kept heads' channels within d_inner
    b = (groups[:, None] * n + np.arange(n)).ravel()
    bc = d_inner + np.concatenate([b, gn + b])  # the kept groups' B and C within xBC
    conv_channels = np.concatenate([channels, bc])
    proj_columns = np.concatenate([channels, d_inner + conv_channels, d_inner + s.conv_dim + idx])
    hidden = mamba.in_proj.kernel.shape[0]
    child = shell(lambda: Mamba2Mixer(spec, hidden, eps=mamba.eps, std=1.0, out_std=1.0,
                                       dtype=mamba.in_proj.kernel[...].dtype, rngs=nnx.Rngs(0)))
    child.implementation = mamba.implementation
    values = {"in_proj.kernel": host(mamba.in_proj.kernel)[:, proj_columns],
              "conv_weight": host(mamba.conv_weight)[:, conv_channels],
              "dt_bias": host(mamba.dt_bias)[idx], "A_log": host(mamba.A_log)[idx], "D": host(mamba.D)[idx],
              "norm_weight": host(mamba.norm_weight)[channels],
              "out_proj.kernel": host(mamba.out_proj.kernel)[channels]}
    if s.conv_bias:
        values["conv_bias"] = host(mamba.conv_bias)[conv_channels]
    if s.proj_bias:
        values.update({"in_proj.bias": host(mamba.in_proj.bias)[proj_columns],
                       "out_proj.bias": mamba.out_proj.bias[...]})
    copy_into(child, values)
    return spec, child


def pool_kv_heads(attention: Attention, num_kv_heads: int) -> tuple[AttentionSpec, Attention]:
    """Attention with `num_kv_heads` K/V heads, each the mean of the parent's K and V projections over
    the group of parent heads it replaces (query head i still reads the group that held its old head)."""
    s = attention.spec
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or s.num_kv_heads % num_kv_heads:
        raise ValueError(f"pool_kv_heads: num_kv_heads must be a positive divisor of the parent's "
                         f"{s.num_kv_heads}; got {num_kv_heads!r}")
    spec = dataclasses.replace(s, num_kv_heads=num_kv_heads)
    dtype = attention.q_proj.kernel[...].dtype
    hidden = attention.q_proj.kernel.shape[0]
    child = shell(lambda: Attention(spec, hidden, std=1.0, out_std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    child.implementation = attention.implementation

    def pooled(kernel):  # [D, Hkv * Dh] -> [D, num_kv_heads * Dh], groups of consecutive heads averaged in fp32
        k = np.asarray(host(kernel), np.float32).reshape(hidden, num_kv_heads, s.num_kv_heads // num_kv_heads,
                                                          s.head_dim)
        return k.mean(axis=2).reshape(hidden, num_kv_heads * s.head_dim)

    copy_into(child, {"q_proj.kernel": attention.q_proj.kernel[...], "o_proj.kernel": attention.o_proj.kernel[...],
                       "k_proj.kernel": pooled(attention.k_proj.kernel),
                       "v_proj.kernel": pooled(attention.v_proj.kernel)})
    return spec, child


def sliding_window(attention: Attention, window: int) -> tuple[AttentionSpec, Attention]:
    """The same attention weights with each query attending only to the `window` most recent keys
    (itself included): a KV cache of `window` slots' worth of context instead of the whole sequence."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window: window must be a positive int; got {window!r}")
    spec = dataclasses.replace(attention.spec, sliding_window=window)
    child = nnx.clone(attention)
    child.spec = spec
    return spec, child


def attention_as_linear(attention: Attention) -> tuple[LinearSpec, LinearMixer]:
    """Attention in which every token attends only to itself, as one linear map: its softmax weight is
    1, so query head h outputs x W_v[g(h)] (g(h) = h // (num_heads / num_kv_heads), its KV group) and
    the layer is x (W_v expanded to the query heads) W_o."""
    s = attention.spec
    hidden = attention.v_proj.kernel.shape[0]
    dtype = attention.v_proj.kernel[...].dtype
    w_v = attention.v_proj.kernel[...].astype(jnp.float32).reshape(hidden, s.num_kv_heads, s.head_dim)
    w_v = jnp.repeat(w_v, s.num_heads // s.num_kv_heads, axis=1).reshape(hidden, s.num_heads * s.head_dim)
    w = jnp.matmul(w_v, attention.o_proj.kernel[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    spec = LinearSpec(bias=False)
    child = shell(lambda: LinearMixer(spec, hidden, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    copy_into(child, {"linear.kernel": w.astype(dtype)})
    return spec, child


def keep_experts(moe: MoE, keep) -> tuple[MoESpec, MoE]:
    """The MoE layer with only the routed experts `keep` (router columns, correction biases and expert
    weights selected; shared expert and latent projections unchanged): it routes as the parent does
    with the other experts excluded from selection. top_k is capped at the experts kept."""
    s = moe.spec
    if s.n_group != 1:
        raise ValueError(f"keep_experts: group-limited routing (n_group={s.n_group}) is not supported; removing "
                         "experts would change the group scores")
    idx = _indices(keep, s.num_experts, "keep_experts")
    spec = dataclasses.replace(s, num_experts=int(idx.size), top_k=min(s.top_k, int(idx.size)))
    hidden = moe.gate_weight.shape[0]
    child = shell(lambda: MoE(spec, hidden, std=1.0, out_std=1.0, dtype=moe.gate_weight[...].dtype, rngs=nnx.Rngs(0)))
    for name in ("implementation", "capacity_factor", "expert_mesh", "collect_stats"):
        setattr(child, name, getattr(moe, name))
    for name in ("shared_experts", "fc1_latent_proj", "fc2_latent_proj"):
        setattr(child, name, None if getattr(moe, name) is None else nnx.clone(getattr(moe, name)))
    copy_into(child, {"gate_weight": host(moe.gate_weight)[:, idx],
                       "correction_bias": host(moe.correction_bias)[idx],
                       "up_proj": host(moe.up_proj)[idx], "down_proj": host(moe.down_proj)[idx]})
    return spec, child


def moe_top_k(moe: MoE, top_k: int) -> tuple[MoESpec, MoE]:
    """The same MoE layer routing each token to its `top_k` best experts (weights renormalised over
    those when the parent normalises them)."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"moe_top_k: top_k must be a positive int; got {top_k!r}")
    spec = dataclasses.replace(moe.spec, top_k=top_k)
    spec.check("moe_top_k")
    child = nnx.clone(moe)
    child.spec = spec
    return spec, child


def prune_shared_expert(moe: MoE, keep) -> tuple[MoESpec, MoE]:
    """The MoE layer with its shared expert restricted to intermediate channels `keep` (`prune_mlp`);
    router and routed experts unchanged."""
    if moe.shared_experts is None:
        raise ValueError("prune_shared_expert: the MoE layer has no shared expert (shared_intermediate_size=0)")
    _, shared = prune_mlp(moe.shared_experts, keep)
    spec = dataclasses.replace(moe.spec, shared_intermediate_size=shared.up_proj.kernel.shape[1])
    child = nnx.clone(moe)
    child.spec, child.shared_experts = spec, shared
    return spec, child


def fit_linear(block, x, *, bias: bool = True) -> tuple[LinearSpec, LinearMixer]:
    """The linear layer that best replaces `block` on its own inputs x [..., D]: W, b minimising
    ||norm(x) W + b - (block(x) - x)||^2 over the tokens (least squares in float64). The returned
    mixer goes under the parent layer's pre-norm, as `replace_layers` puts it."""
    if block.norm is None:
        raise ValueError("fit_linear: the block has no mixer to replace (a no-op layer)")
    d = x.shape[-1]
    inputs = np.asarray(block.norm(x), np.float64).reshape(-1, d)
    targets = np.asarray(block(x)[0] - x, np.float64).reshape(-1, d)
    if bias:
        inputs = np.concatenate([inputs, np.ones((inputs.shape[0], 1))], axis=1)
    solution = np.linalg.lstsq(inputs, targets, rcond=None)[0]
    dtype = block.norm.weight[...].dtype
    child = shell(lambda: LinearMixer(LinearSpec(bias=bias), d, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    values = {"linear.kernel": jnp.asarray(solution[:d], dtype)}
    if bias:
        values["linear.bias"] = jnp.asarray(solution[d], dtype)
    copy_into(child, values)
    return LinearSpec(bias=bias), child


# --------------------------------------------------------------------------------------- the library table
LIBRARY_FORMAT = "nemojax.PuzzleLibrary"
LIBRARY_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One option for parent layer `layer`: its spec and the recipe that rebuilds its module from the
    parent (`materialize`). `recipe["op"]` names the construction (a key of `RECIPES`); its other
    fields are plain JSON values (kept index lists, counts)."""

    layer: int
    name: str
    spec: LayerSpec
    recipe: dict

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.name}"


class Recipe(NamedTuple):
    parents: tuple[str, ...] | None  # the parent layer kinds it applies to (None: any)
    makes: str | None  # the kind of spec it makes (None: the parent layer's kind)
    fields: tuple[str, ...]  # its fields besides "op"
    build: Callable | None  # (parent mixer, recipe) -> (spec, mixer); None: built in `_construct`


MIXER_KINDS = tuple(kind for kind in SPEC_BY_KIND if kind != "noop")
RECIPES = {
    "parent": Recipe(None, None, (), None),
    "noop": Recipe(None, "noop", (), None),
    "linear_fit": Recipe(MIXER_KINDS, "linear", (), None),  # needs the layer's inputs
    "linear_vo": Recipe(("attention",), "linear", (), lambda m, r: attention_as_linear(m)),
    "mlp_channels": Recipe(("mlp",), None, ("keep",), lambda m, r: prune_mlp(m, r["keep"])),
    "mamba_heads": Recipe(("mamba",), None, ("keep",), lambda m, r: prune_mamba_heads(m, r["keep"])),
    "kv_heads": Recipe(("attention",), None, ("num_kv_heads",), lambda m, r: pool_kv_heads(m, r["num_kv_heads"])),
    "window": Recipe(("attention",), None, ("window",), lambda m, r: sliding_window(m, r["window"])),
    "experts": Recipe(("moe",), None, ("keep",), lambda m, r: keep_experts(m, r["keep"])),
    "top_k": Recipe(("moe",), None, ("top_k",), lambda m, r: moe_top_k(m, r["top_k"])),
    "shared_channels": Recipe(("moe",), None, ("keep",), lambda m, r: prune_shared_expert(m, r["keep"])),
}


def _where(c: Candidate) -> str:
    return f"library candidate {c.key!r} (layer {c.layer})"


def _check_entry(c: Candidate) -> Recipe:
    """What can be checked without the parent: types, the recipe's op and fields, the spec's kind
    where the op fixes it."""
    if not isinstance(c.layer, int) or isinstance(c.layer, bool) or c.layer < 0:
        raise ValueError(f"{_where(c)}: layer must be a non-negative int; got {c.layer!r}")
    if not isinstance(c.name, str) or not c.name or ":" in c.name:
        raise ValueError(f"{_where(c)}: name must be a non-empty string without ':'; got {c.name!r}")
    if not isinstance(c.spec, SPEC_TYPES):
        raise ValueError(f"{_where(c)}: spec must be a layer spec; got {type(c.spec).__name__}")
    op = c.recipe.get("op") if isinstance(c.recipe, dict) else None
    if not isinstance(op, str) or op not in RECIPES:
        raise ValueError(f"{_where(c)}: recipe must be a dict whose 'op' is one of {', '.join(RECIPES)}; "
                         f"got {c.recipe!r}")
    recipe = RECIPES[op]
    if set(c.recipe) != {"op", *recipe.fields}:
        raise ValueError(f"{_where(c)}: a {op!r} recipe has the fields {['op', *recipe.fields]}; "
                         f"got {sorted(c.recipe)}")
    if recipe.makes is not None and c.spec.kind != recipe.makes:
        raise ValueError(f"{_where(c)}: a {op!r} recipe makes a {recipe.makes!r} layer, but the spec is {c.spec!r}")
    return recipe


def _resolve(parent: HybridLM, c: Candidate) -> None:
    """`_check_entry`, and that the candidate fits the parent: its layer exists, the op applies to
    that layer's kind, and the spec has the kind the op makes from it."""
    recipe = _check_entry(c)
    n = len(parent.layers)
    if c.layer >= n:
        raise ValueError(f"{_where(c)}: layer {c.layer} is out of range for a parent of {n} layers")
    kind = parent.cfg.layers[c.layer].kind
    op = c.recipe["op"]
    if recipe.parents is not None and kind not in recipe.parents:
        raise ValueError(f"{_where(c)}: a {op!r} recipe applies to {', '.join(recipe.parents)} layers; "
                         f"parent layer {c.layer} is {kind!r}")
    if recipe.makes is None and c.spec.kind != kind:
        raise ValueError(f"{_where(c)}: a {op!r} recipe on parent layer {c.layer} makes a {kind!r} layer, "
                         f"but the spec is {c.spec!r}")


def _construct(parent: HybridLM, layer: int, recipe: dict, layer_input,
               bias: bool) -> tuple[LayerSpec, nnx.Module | None]:
    block = parent.layers[layer]
    op = recipe["op"]
    if op == "parent":
        return block.spec, None if block.mixer is None else nnx.clone(block.mixer)
    if op == "noop":
        return NoOpSpec(), None
    if op == "linear_fit":
        if layer_input is None:
            raise ValueError("a least-squares linear fit needs the layer's inputs: pass layer_input="
                             f"parent.layer_states(tokens)[{layer}]")
        if layer_input.shape[-1] != parent.cfg.hidden_size:
            raise ValueError(f"layer_input must be [..., {parent.cfg.hidden_size}]; got {layer_input.shape}")
        return fit_linear(block, layer_input, bias=bias)
    return RECIPES[op].build(block.mixer, recipe)


def materialize(parent: HybridLM, candidate: Candidate, layer_input=None) -> tuple[int, LayerSpec, nnx.Module | None]:
    """(layer, spec, module_or_None) for `parent.replace_layers({layer: (spec, module)})`, rebuilt from
    the parent by the candidate's recipe. `layer_input` [..., D], the parent's residual stream entering
    the layer (`parent.layer_states(tokens)[layer]`), is needed by a least-squares linear fit only.
    ValueError naming the candidate when it does not fit the parent."""
    c = candidate
    _resolve(parent, c)
    try:
        spec, module = _construct(parent, c.layer, c.recipe, layer_input, getattr(c.spec, "bias", True))
    except ValueError as e:
        raise ValueError(f"{_where(c)}: {e}") from None
    if spec != c.spec:
        raise ValueError(f"{_where(c)}: its recipe builds {spec!r} from the parent, but the entry's spec is {c.spec!r}")
    return c.layer, spec, module


def _percent_counts(percents, n: int) -> list[tuple[str, int]]:
    """(label, count) per percentage of n, count = round(n * p / 100) but at least 1; counts of n (the
    parent) and repeated counts dropped. label: the percentage rounded half up (87.5 -> "88")."""
    out, seen = [], {n}
    for p in percents:
        count = max(1, int(math.floor(n * p / 100 + 0.5)))
        if count not in seen and count < n:
            seen.add(count)
            out.append((str(int(math.floor(p + 0.5))), count))
    return out


DEFAULT_OPTIONS = {
    "mlp_widths": (100, 87.5, 75, 50, 25, 10),  # % of the MLP's intermediate channels
    "mamba_heads": (100, 75, 50),  # % of the Mamba heads (where prune_mamba_heads can keep that many)
    "attn_kv_heads": (100, 50, 25, 0),  # % of the KV heads, at least one (0: a single KV head); divisors only
    "attn_windows": (50, 25, 12.5),  # % of train_length
    "train_length": None,  # the sequence length the parent trains on (None: the calibration tokens')
    "moe_experts": (100, 75, 50, 25),  # % of the routed experts kept (none under group-limited routing)
    "moe_scorers": tuple(experts.SCORERS),  # how experts are ranked (both: two candidates per count)
    "moe_top_k": (50,),  # % of the parent's top_k
    "moe_shared": (50,),  # % of the shared expert's intermediate channels
    "linear": True,
    "noop": True,
}


def _options(options) -> dict:
    options = {} if options is None else dict(options)
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"build_library: unknown option(s) {unknown}; allowed: {sorted(DEFAULT_OPTIONS)}")
    out = {**DEFAULT_OPTIONS, **options}
    for name, value in out.items():
        if name in ("linear", "noop"):
            ok = isinstance(value, bool)
        elif name == "train_length":
            ok = value is None or (isinstance(value, int) and value > 0)
        elif name == "moe_scorers":
            ok = isinstance(value, (tuple, list)) and all(v in experts.SCORERS for v in value)
        else:
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in value)
        if not ok:
            raise ValueError(f"build_library: option {name!r} must be like {DEFAULT_OPTIONS[name]!r} "
                             f"(percentages in [0, 100]; scorers from {tuple(experts.SCORERS)}); got {value!r}")
    return out


def _rank(contribution, n: int) -> list[int]:
    """The n entries of largest contribution, as sorted indices."""
    return sorted(int(i) for i in np.argsort(-np.asarray(contribution), kind="stable")[:n])


def _layer_options(mixer, spec, h, opts, train_length) -> list[tuple[str, dict]]:
    """(name, recipe) of every compressed option of one parent mixer, given its inputs h."""
    out = []
    if spec.kind == "mlp":
        widths = _percent_counts(opts["mlp_widths"], spec.intermediate_size)
        contribution = mlp_channel_contribution(mixer, h) if widths else None
        out += [(f"mlp_w{p}", {"op": "mlp_channels", "keep": _rank(contribution, n)}) for p, n in widths]
    elif spec.kind == "mamba":
        counts = _percent_counts(opts["mamba_heads"], spec.num_heads)
        contribution = mamba_head_contribution(mixer, h) if counts else None
        for p, n in counts:
            keep = mamba_keep_heads(contribution, spec, n)
            if keep is not None:
                out.append((f"mamba_h{p}", {"op": "mamba_heads", "keep": keep.tolist()}))
    elif spec.kind == "attention":
        out += [(f"attn_kv{n}", {"op": "kv_heads", "num_kv_heads": n})
                for _, n in _percent_counts(opts["attn_kv_heads"], spec.num_kv_heads) if spec.num_kv_heads % n == 0]
        windows = dict.fromkeys(max(1, int(math.floor(train_length * p / 100 + 0.5))) for p in opts["attn_windows"])
        longest = min(train_length, spec.sliding_window or train_length)  # a window at least this long changes nothing
        out += [(f"attn_win{w}", {"op": "window", "window": w}) for w in windows if w < longest]
    elif spec.kind == "moe":
        counts = _percent_counts(opts["moe_experts"], spec.num_experts)
        if spec.n_group == 1 and counts:  # keep_experts cannot prune group-limited routing
            for scorer in opts["moe_scorers"]:
                ranking = experts.rank_experts(mixer, h, scorer)
                out += [(f"moe_e{p}_{scorer}", {"op": "experts", "keep": sorted(int(e) for e in ranking[:n])})
                        for p, n in counts]
        out += [(f"moe_top{k}", {"op": "top_k", "top_k": k}) for _, k in _percent_counts(opts["moe_top_k"], spec.top_k)]
        widths = _percent_counts(opts["moe_shared"], spec.shared_intermediate_size)
        contribution = mlp_channel_contribution(mixer.shared_experts, h) if widths else None
        out += [(f"moe_shared{p}", {"op": "shared_channels", "keep": _rank(contribution, n)}) for p, n in widths]
    return out


def build_library(parent: HybridLM, tokens, *, kinds=None, layers=None, options=None) -> list[Candidate]:
    """Every candidate for every parent layer, initialised from the parent: `parent` once per layer,
    then its compressed options (`DEFAULT_OPTIONS`, which `options` overrides by name), a linear
    replacement and a no-op. The rankings (MLP and shared-expert channels, Mamba heads, MoE experts
    by each scorer) come from one run of the parent on the calibration `tokens` [B, T]; candidates
    record what they keep, so `materialize` rebuilds each without the tokens (but for a linear fit).
    Options that keep everything are the `parent` candidate; equal recipes appear once.
    `kinds` / `layers`: as in `restrict` (rankings are computed only where needed)."""
    opts = _options(options)
    train_length = opts["train_length"] or int(tokens.shape[1])
    kinds, layers = _restriction(kinds, layers, range(len(parent.layers)))
    states = nnx.jit(lambda m, t: m.layer_states(t))(parent, tokens)
    out = []
    for i, block in enumerate(parent.layers):
        spec = block.spec
        out.append(Candidate(i, "parent", spec, {"op": "parent"}))
        if i not in layers or block.mixer is None:
            continue
        named = []
        if spec.kind in kinds:  # compressed options keep the parent's kind
            named += _layer_options(block.mixer, spec, block.norm(states[i]).astype(parent.dtype), opts, train_length)
        if opts["linear"] and spec.kind != "linear" and "linear" in kinds:
            named.append(("linear", {"op": "linear_vo" if spec.kind == "attention" else "linear_fit"}))
        if opts["noop"] and "noop" in kinds:
            named.append(("noop", {"op": "noop"}))
        seen = []
        for name, recipe in named:
            if recipe not in seen:
                seen.append(recipe)
                made = LinearSpec(bias=True) if recipe["op"] == "linear_fit" else _construct(
                    parent, i, recipe, None, True)[0]
                out.append(Candidate(i, name, made, recipe))
    return out


def _restriction(kinds, layers, present) -> tuple[set[str], set[int]]:
    present = sorted(set(present))
    if kinds is None:
        kinds = set(SPEC_BY_KIND)
    elif isinstance(kinds, str) or not set(kinds) <= set(SPEC_BY_KIND):
        raise ValueError(f"kinds must be a collection of layer kinds from {', '.join(SPEC_BY_KIND)}; got {kinds!r}")
    if layers is None:
        layers = set(present)
    elif isinstance(layers, (str, int)) or not set(layers) <= set(present):
        raise ValueError(f"layers must be a collection of layer indices from {present}; got {layers!r}")
    return set(kinds), set(layers)


def restrict(candidates, kinds=None, layers=None) -> list[Candidate]:
    """The candidates whose spec kind is in `kinds` and whose layer is in `layers` (None: all), plus
    every layer's `parent` candidate, so a restricted library is still a search space (e.g.
    kinds={"noop"}: each layer keeps or drops its block; layers={3, 5}: only those layers change)."""
    kinds, layers = _restriction(kinds, layers, (c.layer for c in candidates))
    return [c for c in candidates if c.name == "parent" or (c.layer in layers and c.spec.kind in kinds)]


def _duplicates(candidates) -> None:
    keys = [c.key for c in candidates]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"library candidates {repeated} appear more than once")


def save_library(path, candidates, meta: dict) -> None:
    """Writes the library as JSON (format nemojax.PuzzleLibrary, version 1): `meta` (any JSON object:
    parent, calibration, options...) and one entry per candidate, its spec encoded as a ModelConfig
    layer. Written to a temporary file and renamed, so an interrupted save leaves the old file."""
    if not isinstance(meta, dict):
        raise ValueError(f"save_library: meta must be a dict; got {type(meta).__name__}")
    for c in candidates:
        _check_entry(c)
    _duplicates(candidates)
    entries = [{"layer": c.layer, "name": c.name, "spec": spec_to_dict(c.spec), "recipe": c.recipe} for c in candidates]
    try:
        text = json.dumps({"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION, "meta": meta, "candidates": entries},
                          indent=1)
    except TypeError as e:
        raise ValueError(f"save_library: meta and every recipe must hold plain JSON values ({e})") from None
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def load_library(path, parent: HybridLM | None = None) -> tuple[list[Candidate], dict]:
    """(candidates, meta) from `save_library`'s file. Each entry is checked on its own (spec, recipe
    fields, the kind the recipe makes) and, with `parent`, against it: every candidate but the linear
    fits (which need the layer's inputs) is rebuilt and must give its spec. ValueError naming the
    entry (layer and key) otherwise."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != LIBRARY_FORMAT or d.get("version") != LIBRARY_VERSION:
        raise ValueError(f"{path}: not a Puzzle library (expected format {LIBRARY_FORMAT!r}, "
                         f"version {LIBRARY_VERSION})")
    if not isinstance(d.get("candidates"), list) or not isinstance(d.get("meta"), dict):
        raise ValueError(f"{path}: a library holds a 'candidates' list and a 'meta' object")
    candidates = []
    for n, e in enumerate(d["candidates"]):
        if not isinstance(e, dict) or set(e) != {"layer", "name", "spec", "recipe"}:
            raise ValueError(f"{path}: candidate entry {n} must have the fields layer, name, spec, recipe; got {e!r}")
        where = f"{path}: library candidate '{e['layer']}:{e['name']}' (layer {e['layer']})"
        c = Candidate(e["layer"], e["name"], spec_from_dict(e["spec"], where), e["recipe"])
        if parent is None:
            _check_entry(c)
        elif c.recipe.get("op") == "linear_fit":
            _resolve(parent, c)
        else:
            materialize(parent, c)
        candidates.append(c)
    _duplicates(candidates)
    return candidates, d["meta"]
