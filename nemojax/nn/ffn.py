"""Feed-forward mixers: the dense relu^2 MLP ('-') and the sigmoid-routed MoE ('E')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import MLPSpec, MoESpec
from nemojax.nn.layers import KEEP, CorrectionBias, Linear, Stateless
from nemojax.ops.ffn import ffn
from nemojax.ops.ffn.reference import relu2
from nemojax.ops.moe import (IMPLEMENTATIONS, moe_ffn, route, router_z_loss, routing_stats, seq_aux_loss,
                             update_correction_bias)
from nemojax.ops.moe.expert_parallel import moe_ffn_expert_parallel


class MLP(Stateless, nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, std: float, out_std: float, dtype,
                 rngs: nnx.Rngs):
        self.up_proj = Linear(hidden, intermediate, bias=bias, std=std, dtype=dtype, rngs=rngs)
        self.implementation: str | None = None  # `ops.ffn.ffn`'s switch: None | "xla" | "pallas"
        self.down_proj = Linear(intermediate, hidden, bias=bias, std=out_std, dtype=dtype, rngs=rngs)

    @classmethod
    def from_spec(cls, spec: MLPSpec, hidden: int, **kw) -> "MLP":
        return cls(hidden, spec.intermediate_size, bias=spec.bias, **kw)

    def __call__(self, x, cache=None, pos=0):
        up, down = self.up_proj, self.down_proj
        if up.precision is not None:  # low-precision training: each projection quantises its own matmuls
            if self.implementation == "pallas":
                raise ValueError("MLP: the fused 'pallas' FFN never materialises the up projection, so it cannot "
                                 "quantise the down projection's input; use implementation None or 'xla' with a "
                                 "precision recipe")
            return down(relu2(up.fp32(x)).astype(x.dtype)), cache  # relu2_ffn's steps, through the layers
        y = ffn(x, up.kernel[...], down.kernel[...], None if up.bias is None else up.bias[...],
                None if down.bias is None else down.bias[...], implementation=self.implementation)
        return y, cache


class MoE(Stateless, nnx.Module):
    """y = fc2_latent(sum_k w_k expert_k(fc1_latent(x))) + shared(x).

    The router and the shared expert read the full-width x; with `latent_size` set (LatentMoE)
    the routed experts live entirely in the latent width between the two projections.

    Training attributes, set after construction (`configure_moe`): `implementation` and
    `capacity_factor` (see `moe_ffn`; the shared expert always applies), `expert_mesh`, a mesh whose
    "expert" axis splits the routed experts (`moe_ffn_expert_parallel`: all-to-all dispatch over the
    mesh instead of a compiler-partitioned `moe_ffn`), and `collect_stats`, which
    makes each call append {"counts", "load", "dropped_fraction", "aux_loss" (unscaled seq aux loss,
    one sequence per row of a [B, L, D] input, a [T, D] input is one sequence), "z_loss"} to the
    `moe_stats` Intermediate that `pop_moe_stats` reads and removes.
    """

    def __init__(self, spec: MoESpec, hidden: int, *, std: float, out_std: float, dtype, rngs: nnx.Rngs,
                 implementation: str | None = None):
        self.spec, self.implementation = spec, implementation
        self.capacity_factor: float | None = None  # None: dropless
        self.expert_mesh = None  # a jax.sharding.Mesh with an "expert" axis: expert parallelism
        self.collect_stats = False  # training: record per-layer routing stats (see `pop_moe_stats`)
        # low-precision training of the routed experts' GEMMs, as `Linear` has (`configure_precision`)
        self.precision = None
        self.rounding_key = None
        e, f = spec.num_experts, spec.intermediate_size
        d_in = spec.latent_size or hidden
        self.gate_weight = nnx.Param(std * jax.random.normal(rngs.params(), (hidden, e), dtype))
        self.correction_bias = CorrectionBias(jnp.zeros((e,), jnp.float32))
        self.up_proj = nnx.Param(std * jax.random.normal(rngs.params(), (e, d_in, f), dtype))
        self.down_proj = nnx.Param(out_std * jax.random.normal(rngs.params(), (e, f, d_in), dtype))
        lat = spec.latent_size
        self.fc1_latent_proj = Linear(hidden, lat, bias=spec.bias, std=std, dtype=dtype, rngs=rngs) if lat else None
        self.fc2_latent_proj = (Linear(lat, hidden, bias=spec.bias, std=out_std, dtype=dtype, rngs=rngs)
                                if lat else None)
        self.shared_experts = (MLP(hidden, spec.shared_intermediate_size, bias=spec.bias, std=std, out_std=out_std,
                                   dtype=dtype, rngs=rngs) if spec.shared_intermediate_size else None)

    def router_logits(self, x_TD):
        return jnp.dot(x_TD.astype(jnp.float32), self.gate_weight[...].astype(jnp.float32))

    def segment_bounds(self) -> list[tuple[int, int, int]]:
        """(first expert, end, top_k) of each routing segment: one, all experts, unless `spec.segments`."""
        s, lo, out = self.spec, 0, []
        for e, k in s.segments or ((s.num_experts, s.top_k),):
            out.append((lo, lo + e, k))
            lo += e
        return out

    def route(self, logits):
        """(weights [T, K], indices [T, K]): `ops.moe.route` on each segment, expert indices made global."""
        s, bias = self.spec, self.correction_bias[...]
        parts = [route(logits[:, lo:hi], bias[lo:hi], top_k=k, n_group=s.n_group, topk_group=s.topk_group,
                       norm_topk_prob=s.norm_topk_prob, routed_scaling_factor=s.routed_scaling_factor)
                 for lo, hi, k in self.segment_bounds()]
        return (jnp.concatenate([w for w, _ in parts], axis=-1),
                jnp.concatenate([i + lo for (_, i), (lo, _, _) in zip(parts, self.segment_bounds())], axis=-1))

    def __call__(self, x, cache=None, pos=0):
        s = self.spec
        x_TD = x.reshape(-1, x.shape[-1])
        logits = self.router_logits(x_TD)
        weights, indices = self.route(logits)
        h = x_TD if self.fc1_latent_proj is None else self.fc1_latent_proj(x_TD)
        if self.expert_mesh is None:
            out = moe_ffn(h, weights, indices, self.up_proj[...], self.down_proj[...],
                          implementation=self.implementation, capacity_factor=self.capacity_factor,
                          return_stats=self.collect_stats, precision=self.precision, rounding_key=self.rounding_key)
        elif self.precision is not None:
            raise ValueError("MoE: quantised expert GEMMs (a precision recipe) do not run under expert parallelism; "
                             "train without an expert mesh axis or in bf16")
        else:
            out = moe_ffn_expert_parallel(h, weights, indices, self.up_proj[...], self.down_proj[...],
                                          mesh=self.expert_mesh, capacity_factor=self.capacity_factor,
                                          implementation=self.implementation, return_dropped=self.collect_stats)
            if self.collect_stats:
                out = (out[0], routing_stats(indices, s.num_experts, out[1]))
        if self.collect_stats:
            y, stats = out
            seqs = x.shape[0] if x.ndim == 3 else 1  # [T, D] input: one sequence
            stats["aux_loss"] = jnp.mean(jnp.stack([seq_aux_loss(logits[:, lo:hi].reshape(seqs, -1, hi - lo), k)
                                                    for lo, hi, k in self.segment_bounds()]))
            stats["z_loss"] = router_z_loss(logits)
            # What Module.sow does outside nnx.capture (deprecated there): append this call's stats to an
            # Intermediate, which `pop_moe_stats` reads and deletes.
            calls = self.moe_stats.get_value() if hasattr(self, "moe_stats") else ()
            self.moe_stats = nnx.Intermediate(calls + (stats,))
        else:
            y = out
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)[0]
        return y.reshape(x.shape), cache


def _moe_modules(model: nnx.Module):
    for path, m in nnx.iter_modules(model):
        if isinstance(m, MoE):
            yield ".".join(map(str, path)), m


def configure_moe(model: nnx.Module, *, implementation=KEEP, capacity_factor=KEEP, collect_stats=KEEP,
                  expert_mesh=KEEP) -> None:
    """Sets, on every MoE layer (main layers and MTP), the dispatch `implementation` (see `moe_ffn`;
    None: the backend's default), `capacity_factor` (None: dropless), `expert_mesh` (None, or a mesh
    with an "expert" axis of size > 1: expert parallelism; the experts and the B * L tokens of a
    call must divide evenly over it) and `collect_stats`. An argument not given leaves that setting
    as it is.

    Collect stats for training only: sowing mutates the module, which generation's decode loop (a
    `lax.scan` over a model merged outside it) does not allow; `generate` runs on an
    `inference_copy`, which has collection off."""
    if implementation not in (KEEP, None) and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"configure_moe: implementation must be None or one of {tuple(IMPLEMENTATIONS)}; "
                         f"got {implementation!r}")
    if capacity_factor not in (KEEP, None) and not capacity_factor > 0:
        raise ValueError(f"configure_moe: capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
    if expert_mesh not in (KEEP, None) and expert_mesh.shape.get("expert", 1) <= 1:
        raise ValueError(f"configure_moe: expert_mesh must have an 'expert' axis of size > 1; got "
                         f"{dict(expert_mesh.shape)}")
    if collect_stats not in (KEEP, True, False):
        raise ValueError(f"configure_moe: collect_stats must be True or False; got {collect_stats!r}")
    settings = {"implementation": implementation, "capacity_factor": capacity_factor, "expert_mesh": expert_mesh,
                "collect_stats": collect_stats}
    for _, m in _moe_modules(model):
        for name, value in settings.items():
            if value is not KEEP:
                setattr(m, name, value)


def inference_copy(model: nnx.Module) -> nnx.Module:
    """A copy of `model` that shares its arrays, with every MoE layer dropless, on one device's
    dispatch (no expert mesh) and not collecting stats: what generation's decode loop needs. The
    original keeps its training setup. `model` itself when it already is set up so (a copy costs
    a graph split and merge, ~15 ms on a small model: a tenth of a short generation)."""
    if all(m.capacity_factor is None and m.expert_mesh is None and not m.collect_stats
           for _, m in _moe_modules(model)):
        return model
    copy = nnx.merge(*nnx.split(model))
    for _, m in _moe_modules(copy):
        m.capacity_factor, m.expert_mesh, m.collect_stats = None, None, False
    return copy


def pop_moe_stats(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """{"layers.1.mixer": {"counts" [E], "load" [E], "dropped_fraction", "aux_loss", "z_loss"}, ...} for every MoE
    layer that sowed stats, removed from the model so they never reach a checkpoint. A layer called
    several times since the last pop reports the mean over its calls. {} when nothing was sown."""
    out = {}
    for path, m in _moe_modules(model):
        if hasattr(m, "moe_stats"):
            calls = m.moe_stats.get_value()
            out[path] = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *calls)
            del m.moe_stats
    return out


def update_correction_biases(model: nnx.Module, stats: dict[str, dict[str, jax.Array]], rate: float) -> None:
    """Aux-loss-free balancing, in place: for each layer in `stats` (from `pop_moe_stats`), its
    correction_bias += rate * sign(mean(counts) - counts) (= sign(mean(load) - load), without
    fp32 rounding at the mean). Layers may have different expert counts."""
    for path, m in _moe_modules(model):
        if path in stats:
            m.correction_bias[...] = update_correction_bias(m.correction_bias[...],
                                                                    stats[path]["counts"], rate)
