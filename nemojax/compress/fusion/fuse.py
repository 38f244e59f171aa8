"""FFN Fusion and full-block parallelisation as model surgery.

`fuse` turns a run of FFN layers into one layer that reads the run's input once:
    x + sum_t FFN_t(norm(x))
(exact by weight concatenation: up-projections stacked along the intermediate dimension,
down-projections concatenated, so the wide FFN is one fused-FFN call). `parallelize` puts any
consecutive layers side by side on one input as a `ParallelSpec`, each keeping its own pre-norm.

Both keep the model's layer count: the new layer takes the run's first index and the other layers
of the run become no-ops (which cost nothing), so layer indices, dependency matrices and plans made
before a surgery still name the same layers after it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from nemojax.compress.modules import copy_into, host, shell
from nemojax.config import LayerSpec, MLPSpec, MoESpec, NoOpSpec, ParallelSpec
from nemojax.nn.model import Block, HybridLM, residual_std

NORMS = ("last", "fold")
FFN_KINDS = ("mlp", "moe")
# MoE fields that must agree for layers to share one router and one expert stack.
MOE_SHARED = ("intermediate_size", "latent_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
              "bias")


class _Part(NamedTuple):
    """One FFN of a run: its layer, spec, pre-norm weight and mixer."""

    layer: int
    spec: LayerSpec
    gamma: np.ndarray
    mixer: object


def _check_range(model, start, stop) -> None:
    if not isinstance(model, HybridLM):
        raise ValueError(f"model must be a nemojax HybridLM; got {type(model).__name__}")
    n = len(model.layers)
    for name, v in (("start", start), ("stop", stop)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int layer index; got {v!r}")
    if not 0 <= start < stop <= n:
        raise ValueError(f"need 0 <= start < stop <= {n} (the model's layers); got start={start}, stop={stop}")


def _blocks(model, start, stop):
    """(layer, block) for the layers of [start, stop) that are not no-ops; a parallel layer's branches
    count as blocks of their own."""
    for i in range(start, stop):
        block = model.layers[i]
        if block.spec.kind == "noop":
            continue
        if block.spec.kind == "parallel":
            yield from ((i, b) for b in block.mixer.branches)
        else:
            yield i, block


def _ffn_parts(model, start, stop) -> list[_Part]:
    parts = []
    for i, block in _blocks(model, start, stop):
        if block.spec.kind not in FFN_KINDS:
            raise ValueError(f"fuse: layer {i} is a {block.spec.kind} layer; only MLP and MoE layers (with no-op "
                             "layers between them) fuse into one FFN; fusion.parallelize runs any layers side by side")
        parts.append(_Part(i, block.spec, host(block.norm.weight).astype(np.float32), block.mixer))
    if len(parts) < 2:
        raise ValueError(f"fuse: layers [{start}, {stop}) hold {len(parts)} FFN layer(s); a fused run needs at least 2")
    return parts


def _scaled(w: np.ndarray, gamma, axis: int) -> np.ndarray:
    """`w` with its input dimension (`axis`) scaled by gamma: folds a pre-norm weight into a projection."""
    if gamma is None:
        return w
    shape = [1] * w.ndim
    shape[axis] = gamma.size
    return (w.astype(np.float32) * gamma.reshape(shape)).astype(w.dtype)


def _fused_mlp(parts: list[_Part], fold: bool, prefix: str = "") -> tuple[MLPSpec, dict]:
    """The wide MLP computing sum_t MLP_t (each on its own folded input when `fold`): up kernels [D, F_t]
    side by side, down kernels [F_t, D] stacked, up biases concatenated, down biases summed."""
    bias = any(p.spec.bias for p in parts)
    ups, downs, up_b, down_b = [], [], [], 0
    for p in parts:
        up, down = p.mixer.up_proj, p.mixer.down_proj
        ups.append(_scaled(host(up.kernel), p.gamma if fold else None, 0))
        downs.append(host(down.kernel))
        if bias:
            width = up.kernel.shape[1]
            up_b.append(host(up.bias) if up.bias is not None else np.zeros(width, ups[-1].dtype))
            down_b = down_b + (host(down.bias) if down.bias is not None else 0)
    spec = MLPSpec(intermediate_size=sum(u.shape[1] for u in ups), bias=bias)
    values = {f"{prefix}up_proj.kernel": np.concatenate(ups, 1), f"{prefix}down_proj.kernel": np.concatenate(downs, 0)}
    if bias:
        values |= {f"{prefix}up_proj.bias": np.concatenate(up_b),
                   f"{prefix}down_proj.bias": np.broadcast_to(down_b, downs[0].shape[1:]).copy()}
    return spec, values


def _fused_moe(parts: list[_Part], fold: bool) -> tuple[MoESpec, dict]:
    """One MoE whose experts are the union of the run's, routed in segments (each original layer's top-k
    among its own experts, with its own correction bias), and whose shared expert is their shared
    experts fused as one wide MLP."""
    first = parts[0]
    for p in parts:
        if p.spec.latent_size is not None:
            raise ValueError(f"fuse: layer {p.layer} is a LatentMoE layer (its experts live in their own latent "
                             "space, so they cannot join another layer's expert stack); use fusion.parallelize")
        for f in MOE_SHARED:
            if getattr(p.spec, f) != getattr(first.spec, f):
                raise ValueError(f"fuse: MoE layers {first.layer} and {p.layer} differ in {f} ({getattr(first.spec, f)!r}"
                                 f" vs {getattr(p.spec, f)!r}); only MoE layers that agree on {', '.join(MOE_SHARED)} "
                                 "share one router; use fusion.parallelize")
    segments = tuple(seg for p in parts for seg in (p.spec.segments or ((p.spec.num_experts, p.spec.top_k),)))
    shared = [_Part(p.layer, MLPSpec(p.spec.shared_intermediate_size, p.spec.bias), p.gamma, p.mixer.shared_experts)
              for p in parts if p.spec.shared_intermediate_size]
    values = {
        "gate_weight": np.concatenate([_scaled(host(p.mixer.gate_weight), p.gamma if fold else None, 0)
                                       for p in parts], 1),
        "correction_bias": np.concatenate([host(p.mixer.correction_bias) for p in parts]),
        "up_proj": np.concatenate([_scaled(host(p.mixer.up_proj), p.gamma if fold else None, 1) for p in parts]),
        "down_proj": np.concatenate([host(p.mixer.down_proj) for p in parts]),
    }
    shared_size = 0
    if shared:
        shared_spec, shared_values = _fused_mlp(shared, fold, "shared_experts.")
        shared_size = shared_spec.intermediate_size
        values |= shared_values
    spec = MoESpec(num_experts=sum(e for e, _ in segments), top_k=sum(k for _, k in segments),
                   intermediate_size=first.spec.intermediate_size, shared_intermediate_size=shared_size,
                   n_group=first.spec.n_group, topk_group=first.spec.topk_group,
                   norm_topk_prob=first.spec.norm_topk_prob, routed_scaling_factor=first.spec.routed_scaling_factor,
                   bias=first.spec.bias, segments=segments)
    return spec, values


def _block_shell(model: HybridLM, spec: LayerSpec) -> Block:
    cfg = model.cfg.replace_layers({0: spec})
    return shell(lambda: Block(spec, cfg, out_std=residual_std(cfg), dtype=model.dtype, rngs=nnx.Rngs(0)))


def _replace_run(model: HybridLM, start: int, stop: int, block: Block) -> HybridLM:
    changes = {i: (NoOpSpec(), None) for i in range(start + 1, stop)}
    changes[start] = (block.spec, block)
    return model.replace_layers(changes)


def fuse(model: HybridLM, start: int, stop: int, norm: str = "last") -> HybridLM:
    """A new model whose layers [start, stop), FFN layers (MLP, MoE, or parallel layers of them) with
    no-op layers between them, are one layer computing x + sum_t FFN_t(norm(x)) (x the run's input).

    norm="last": every FFN reads the RMS norm with the last FFN's weight (FFN Fusion's form);
    norm="fold": each FFN keeps its own norm weight, folded into its input projections (and router), so
    the layer computes x + sum_t FFN_t(norm_t(x)) exactly.
    MLPs become one MLP of the summed width; MoE layers one MoE whose experts are the union, each layer's
    top-k routed among its own experts; MLPs and MoEs together a `ParallelSpec` of those two. Other
    layers are an error naming the layer. The model passed in is left as it is."""
    _check_range(model, start, stop)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    parts = _ffn_parts(model, start, stop)
    fold = norm == "fold"
    gamma = np.ones_like(parts[-1].gamma) if fold else parts[-1].gamma
    groups = [[p for p in parts if p.spec.kind == k] for k in FFN_KINDS]
    built = [(_fused_mlp if k == "mlp" else _fused_moe)(g, fold) for k, g in zip(FFN_KINDS, groups) if g]
    if len(built) == 1:
        spec, values = built[0]
        values = {"norm.weight": gamma, **{f"mixer.{k}": v for k, v in values.items()}}
    else:
        spec = ParallelSpec(tuple(s for s, _ in built))
        values = {f"mixer.branches.{b}.{k}": v for b, (_, vals) in enumerate(built)
                  for k, v in {"norm.weight": gamma, **{f"mixer.{n}": a for n, a in vals.items()}}.items()}
    block = _block_shell(model, spec)
    copy_into(block, values)
    # The fused op keeps the kernel choice (`configure_kernels`) of the layers it replaces.
    chosen = {type(m): m.implementation for p in parts for _, m in nnx.iter_modules(p.mixer)
              if hasattr(m, "implementation")}
    for _, m in nnx.iter_modules(block):
        if type(m) in chosen:
            m.implementation = chosen[type(m)]
    return _replace_run(model, start, stop, block)


def parallelize(model: HybridLM, start: int, stop: int) -> HybridLM:
    """A new model whose layers [start, stop) (any kinds; no-op layers skipped, a parallel layer's branches
    taken as they are) run side by side on the run's input: x + sum_b mixer_b(norm_b(x)), each branch
    keeping its own pre-norm, weights and decode cache (full-block parallelisation)."""
    _check_range(model, start, stop)
    blocks = list(_blocks(model, start, stop))
    if len(blocks) < 2:
        raise ValueError(f"parallelize: layers [{start}, {stop}) hold {len(blocks)} layer(s) that are not no-ops; "
                         "need at least 2")
    block = _block_shell(model, ParallelSpec(tuple(b.spec for _, b in blocks)))
    block.mixer.branches = nnx.List([nnx.clone(b) for _, b in blocks])
    return _replace_run(model, start, stop, block)
