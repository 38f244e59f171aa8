"""One entry per layer kind: what a spec builds and how its parameters are treated.

A `LayerKind` maps a spec class to its mixer module, its checkpoint tensors and, per parameter,
its sharding, weight-decay and precision rule (`ParamRule`). The model, the checkpoint I/O, the
sharding rules, the optimizer's decay mask, the bf16 compute cast and the parameter counts all
read this table, so a new layer kind is one entry here (plus its spec in `nemojax.config`).

Every mixer has the same interface: `mixer(x, cache=None, pos=0) -> (y, cache)` with `pos` the
number of tokens already in `cache`, and `mixer.init_cache(batch, max_len, *, dtype, ssm_dtype)`
(None for mixers without state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import jax

from nemojax.config import (AttentionSpec, LayerSpec, LinearSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, NoOpSpec,
                            ParallelSpec)
from nemojax.io.tensors import Entry, linear_entries
from nemojax.nn.attention import Attention
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import LinearMixer
from nemojax.nn.mamba import Mamba2Mixer

SHARD_KINDS = ("fsdp", "expert", "replicated")


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is treated.

    shard: "fsdp" (a matrix: its largest dim that the mesh's fsdp axis divides is split over it),
      "expert" (routed experts [E, a, b]: E over the "expert" axis, then fsdp as for a matrix) or
      "replicated" (vectors and tiny filters: every device reads them whole at every step);
    decay: AdamW weight decay applies;
    fp32: stays in fp32 when the model computes in bf16 (norms, the router, SSM dynamics);
    routed: a routed-expert tensor, of which a token touches top_k / num_experts.
    """

    shard: str
    decay: bool = True
    fp32: bool = False
    routed: bool = False

    def __post_init__(self):
        if self.shard not in SHARD_KINDS:
            raise ValueError(f"ParamRule.shard must be one of {SHARD_KINDS}; got {self.shard!r}")


MATRIX = ParamRule("fsdp")
VECTOR = ParamRule("replicated", decay=False)  # biases
NORM = ParamRule("replicated", decay=False, fp32=True)
# Mamba's continuous-time parameters: decaying A_log, D or dt_bias towards 0 changes the dynamics
# (A -> -1, no skip, dt -> softplus(0)) rather than regularising.
SSM = ParamRule("replicated", decay=False, fp32=True)


def _linear(name: str) -> dict[str, ParamRule]:
    return {f"{name}/kernel": MATRIX, f"{name}/bias": VECTOR}


@dataclass(frozen=True)
class LayerKind:
    """spec: the spec class; build(spec, cfg, *, std, out_std, dtype, rngs) -> mixer module, or None for
    a layer without one; tensors(spec, name, path) -> the mixer's checkpoint entries, with `name` the
    checkpoint prefix ("model.layers.3.mixer") and `path` the NNX path (("layers", 3, "mixer"));
    params: mixer-relative "/"-joined parameter path -> rule; norm: whether a pre-norm reads the input."""

    spec: type
    build: Callable
    tensors: Callable[[LayerSpec, str, tuple], list[Entry]]
    params: Mapping[str, ParamRule]
    norm: bool = True


def _mamba_tensors(s: MambaSpec, m: str, p: tuple) -> list[Entry]:
    out = linear_entries(f"{m}.in_proj", (*p, "in_proj"), s.proj_bias)
    out.append(Entry(f"{m}.conv1d.weight", (*p, "conv_weight"), "conv"))
    if s.conv_bias:
        out.append(Entry(f"{m}.conv1d.bias", (*p, "conv_bias"), "copy"))
    out += [Entry(f"{m}.{n}", (*p, n), "copy") for n in ("dt_bias", "A_log", "D")]
    out.append(Entry(f"{m}.norm.weight", (*p, "norm_weight"), "copy"))
    return out + linear_entries(f"{m}.out_proj", (*p, "out_proj"), s.proj_bias)


def _attention_tensors(s: AttentionSpec, m: str, p: tuple) -> list[Entry]:
    return [e for n in ("q_proj", "k_proj", "v_proj", "o_proj") for e in linear_entries(f"{m}.{n}", (*p, n), False)]


def _mlp_tensors(s: MLPSpec, m: str, p: tuple) -> list[Entry]:
    return [e for n in ("up_proj", "down_proj") for e in linear_entries(f"{m}.{n}", (*p, n), s.bias)]


def _moe_tensors(s: MoESpec, m: str, p: tuple) -> list[Entry]:
    out = [Entry(f"{m}.gate.weight", (*p, "gate_weight"), "t"),
           Entry(f"{m}.gate.e_score_correction_bias", (*p, "correction_bias"), "copy"),
           Entry(f"{m}.experts.up_proj", (*p, "up_proj"), "experts"),
           Entry(f"{m}.experts.down_proj", (*p, "down_proj"), "experts")]
    if s.shared_intermediate_size:
        out += _mlp_tensors(MLPSpec(s.shared_intermediate_size, s.bias), f"{m}.shared_experts",
                            (*p, "shared_experts"))
    if s.latent_size:
        for n in ("fc1_latent_proj", "fc2_latent_proj"):
            out += linear_entries(f"{m}.{n}", (*p, n), s.bias)
    return out


def _parallel_mixer(spec, cfg, *, std, out_std, dtype, rngs):
    from nemojax.nn.model import ParallelMixer  # a parallel layer is made of Blocks, which build from this table

    return ParallelMixer(spec, cfg, out_std=out_std, dtype=dtype, rngs=rngs)


def _parallel_tensors(s: ParallelSpec, m: str, p: tuple) -> list[Entry]:
    return [e for b, spec in enumerate(s.branches) for e in block_entries(spec, f"{m}.branches.{b}", (*p, "branches", b))]


KINDS: dict[type, LayerKind] = {k.spec: k for k in (
    LayerKind(
        MambaSpec,
        lambda s, cfg, **kw: Mamba2Mixer(s, cfg.hidden_size, eps=cfg.norm_eps, **kw),
        _mamba_tensors,
        {**_linear("in_proj"), "conv_weight": ParamRule("replicated"), "conv_bias": VECTOR, "dt_bias": SSM,
         "A_log": SSM, "D": SSM, "norm_weight": NORM, **_linear("out_proj")}),
    LayerKind(
        AttentionSpec,
        lambda s, cfg, **kw: Attention(s, cfg.hidden_size, **kw),
        _attention_tensors,
        {k: v for n in ("q_proj", "k_proj", "v_proj", "o_proj") for k, v in _linear(n).items()}),
    LayerKind(
        MLPSpec,
        lambda s, cfg, **kw: MLP.from_spec(s, cfg.hidden_size, **kw),
        _mlp_tensors,
        {**_linear("up_proj"), **_linear("down_proj")}),
    LayerKind(
        MoESpec,
        lambda s, cfg, **kw: MoE(s, cfg.hidden_size, **kw),
        _moe_tensors,
        {"gate_weight": ParamRule("fsdp", fp32=True), "correction_bias": VECTOR,
         "up_proj": ParamRule("expert", routed=True), "down_proj": ParamRule("expert", routed=True),
         **_linear("shared_experts/up_proj"), **_linear("shared_experts/down_proj"),
         **_linear("fc1_latent_proj"), **_linear("fc2_latent_proj")}),
    LayerKind(
        LinearSpec,
        lambda s, cfg, *, std, out_std, dtype, rngs: LinearMixer(s, cfg.hidden_size, std=out_std, dtype=dtype,
                                                                 rngs=rngs),
        lambda s, m, p: linear_entries(f"{m}.linear", (*p, "linear"), s.bias),
        _linear("linear")),
    LayerKind(NoOpSpec, lambda s, cfg, **kw: None, lambda s, m, p: [], {}, norm=False),
    # Branch parameters follow their own kind's rules (`param_rule` reads the path inside the branch).
    LayerKind(ParallelSpec, lambda s, cfg, **kw: _parallel_mixer(s, cfg, **kw), _parallel_tensors, {}, norm=False),
)}


def block_entries(spec: LayerSpec, name: str, path: tuple) -> list[Entry]:
    """The checkpoint entries of one block: its pre-norm (if any) and its mixer's tensors."""
    kind = kind_of(spec)
    norm = [Entry(f"{name}.norm.weight", (*path, "norm", "weight"), "copy")] if kind.norm else []
    return norm + kind.tensors(spec, f"{name}.mixer", (*path, "mixer"))

# Parameters outside the mixers, by their last one or two path names.
MODEL_PARAMS: dict[str, ParamRule] = {
    "embeddings": MATRIX, "lm_head": MATRIX, "norm/weight": NORM, "norm_f/weight": NORM,
    # multi-token prediction
    "enorm/weight": NORM, "hnorm/weight": NORM, "eh_proj/kernel": MATRIX, "final_layernorm/weight": NORM,
}


def _mixer_params() -> dict[str, ParamRule]:
    table: dict[str, ParamRule] = {}
    for kind in KINDS.values():
        for name, rule in kind.params.items():
            if table.setdefault(name, rule) != rule:
                raise ValueError(f"layer kinds disagree on the rule of mixer parameter {name!r}")
    return table


MIXER_PARAMS = _mixer_params()


def kind_of(spec: LayerSpec) -> LayerKind:
    try:
        return KINDS[type(spec)]
    except KeyError:
        raise ValueError(f"no layer kind registered for {type(spec).__name__}; known: "
                         f"{', '.join(k.__name__ for k in KINDS)}") from None


def build_mixer(spec: LayerSpec, cfg: ModelConfig, *, out_std: float, dtype, rngs):
    return kind_of(spec).build(spec, cfg, std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)


def rule_at(key_path) -> ParamRule:
    """The rule of the parameter at a jax key path into an nnx.State (a trailing `.value` is ignored)."""
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
        key_path = key_path[:-1]
    return param_rule(jax.tree_util.keystr(tuple(key_path), simple=True, separator="/").split("/"))


def param_rule(names: Sequence[str]) -> ParamRule:
    """The rule of the parameter at this path (its names, e.g. ("layers", "3", "mixer", "in_proj", "kernel"))."""
    names = [str(n) for n in names]
    inner = [k for k in range(len(names) - 1) if names[k] == "branches" and names[k + 1].isdigit()]
    if inner:  # a parallel layer's branch is a block of its own
        names = names[inner[-1] + 2:]
    if "mixer" in names:
        last = len(names) - 1 - names[::-1].index("mixer")
        key, table = "/".join(names[last + 1:]), MIXER_PARAMS
    else:
        key = next((k for k in ("/".join(names[-2:]), names[-1]) if k in MODEL_PARAMS), "/".join(names))
        table = MODEL_PARAMS
    if key not in table:
        raise ValueError(f"no parameter rule for {'/'.join(names)!r}; declare {key!r} in its layer kind's params "
                         "(nemojax/nn/registry.py)")
    return table[key]


def spec_at(spec: LayerSpec, path: Sequence) -> LayerSpec:
    """The spec of the block that holds the parameter at `path` (relative to the layer `spec` belongs
    to): a parallel layer's branch spec for paths inside a branch, else `spec`."""
    path = [str(n) for n in path]
    while isinstance(spec, ParallelSpec) and path[:2] == ["mixer", "branches"] and len(path) > 2:
        spec, path = spec.branches[int(path[2])], path[3:]
    return spec


__all__ = ["KINDS", "LayerKind", "ParamRule", "block_entries", "build_mixer", "kind_of", "param_rule", "rule_at", "spec_at"]
