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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import AttentionSpec, LinearSpec, MambaSpec, MLPSpec, MoESpec
from nemojax.nn.attention import Attention
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import Linear, LinearMixer
from nemojax.nn.mamba import Mamba2Mixer


def _indices(keep, n: int, what: str) -> np.ndarray:
    idx = np.asarray(keep)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what}: keep must be a non-empty 1-D int array of indices; got {keep!r}")
    if (idx < 0).any() or (idx >= n).any() or np.unique(idx).size != idx.size:
        raise ValueError(f"{what}: keep must hold distinct indices in [0, {n}); got {idx.tolist()}")
    return np.sort(idx)


def _shell(make):
    """The module `make()` builds, its parameters shapes only: `_copy_from` fills every one (no random
    initialisation to compute, which costs more than the copies on a CPU)."""
    return nnx.eval_shape(make)


def _copy_from(module, values: dict) -> None:
    """Sets the named parameters ("up_proj.kernel") of a `_shell` module; every parameter must then hold
    an array."""
    for name, value in values.items():
        target = module
        *path, leaf = name.split(".")
        for p in path:
            target = getattr(target, p)
        var = getattr(target, leaf)
        want = var.get_value()
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{name}: expected shape {want.shape}; got {value.shape}")
        var.set_value(jnp.asarray(value, want.dtype))
    missing = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(module))
               if isinstance(v, jax.ShapeDtypeStruct)]
    assert not missing, f"parameters left unset: {missing}"


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
    probe.out_proj = _shell(lambda: Linear(s.d_inner, s.d_inner, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    _copy_from(probe, {"out_proj.kernel": jnp.eye(s.d_inner, dtype=dtype)})
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
    child = _shell(lambda: MLP(mlp.up_proj.kernel.shape[0], idx.size, bias=bias, std=1.0, out_std=1.0, dtype=dtype,
                               rngs=nnx.Rngs(0)))
    child.implementation = mlp.implementation
    values = {"up_proj.kernel": mlp.up_proj.kernel[...][:, idx], "down_proj.kernel": mlp.down_proj.kernel[...][idx]}
    if bias:
        values.update({"up_proj.bias": mlp.up_proj.bias[...][idx], "down_proj.bias": mlp.down_proj.bias[...]})
    _copy_from(child, values)
    return spec, child


def prune_mamba_heads(mamba: Mamba2Mixer, keep) -> tuple[MambaSpec, Mamba2Mixer]:
    """The Mamba mixer restricted to heads `keep`, the same number from each B/C group it keeps from (so
    each kept head still reads its group's B and C; a group with no kept head goes). Each head's scan is independent of the others; the gated
    RMSNorm after it normalises over the kept heads of a group, so the result equals the parent with the
    other heads' output projections zeroed exactly when every group is one head (n_groups = num_heads)."""
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
    child = _shell(lambda: Mamba2Mixer(spec, hidden, eps=mamba.eps, std=1.0, out_std=1.0,
                                       dtype=mamba.in_proj.kernel[...].dtype, rngs=nnx.Rngs(0)))
    child.implementation = mamba.implementation
    values = {"in_proj.kernel": mamba.in_proj.kernel[...][:, proj_columns],
              "conv_weight": mamba.conv_weight[...][:, conv_channels],
              "dt_bias": mamba.dt_bias[...][idx], "A_log": mamba.A_log[...][idx], "D": mamba.D[...][idx],
              "norm_weight": mamba.norm_weight[...][channels], "out_proj.kernel": mamba.out_proj.kernel[...][channels]}
    if s.conv_bias:
        values["conv_bias"] = mamba.conv_bias[...][conv_channels]
    if s.proj_bias:
        values.update({"in_proj.bias": mamba.in_proj.bias[...][proj_columns], "out_proj.bias": mamba.out_proj.bias[...]})
    _copy_from(child, values)
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
    child = _shell(lambda: Attention(spec, hidden, std=1.0, out_std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    child.implementation = attention.implementation

    def pooled(kernel):  # [D, Hkv * Dh] -> [D, num_kv_heads * Dh], groups of consecutive heads averaged
        k = kernel.astype(jnp.float32).reshape(hidden, num_kv_heads, s.num_kv_heads // num_kv_heads, s.head_dim)
        return jnp.mean(k, axis=2).reshape(hidden, num_kv_heads * s.head_dim).astype(kernel.dtype)

    _copy_from(child, {"q_proj.kernel": attention.q_proj.kernel[...], "o_proj.kernel": attention.o_proj.kernel[...],
                       "k_proj.kernel": pooled(attention.k_proj.kernel[...]),
                       "v_proj.kernel": pooled(attention.v_proj.kernel[...])})
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
    child = _shell(lambda: LinearMixer(spec, hidden, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    _copy_from(child, {"linear.kernel": w.astype(dtype)})
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
    child = _shell(lambda: MoE(spec, hidden, std=1.0, out_std=1.0, dtype=moe.gate_weight[...].dtype, rngs=nnx.Rngs(0)))
    for name in ("implementation", "capacity_factor", "expert_mesh", "collect_stats"):
        setattr(child, name, getattr(moe, name))
    for name in ("shared_experts", "fc1_latent_proj", "fc2_latent_proj"):
        setattr(child, name, None if getattr(moe, name) is None else nnx.clone(getattr(moe, name)))
    _copy_from(child, {"gate_weight": moe.gate_weight[...][:, idx], "correction_bias": moe.correction_bias[...][idx],
                       "up_proj": moe.up_proj[...][idx], "down_proj": moe.down_proj[...][idx]})
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
    child = _shell(lambda: LinearMixer(LinearSpec(bias=bias), d, std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))
    values = {"linear.kernel": jnp.asarray(solution[:d], dtype)}
    if bias:
        values["linear.bias"] = jnp.asarray(solution[d], dtype)
    _copy_from(child, values)
    return LinearSpec(bias=bias), child
