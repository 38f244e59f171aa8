"""Model configuration: one frozen spec per layer, validation, and the native JSON format.

Every layer carries its own spec, so heterogeneous models (Puzzle children, FFN-fused blocks,
per-layer expert counts, no-op and linear layers) are ordinary configs. Specs are frozen
dataclasses: hashable, usable as static arguments to `jax.jit`.

`ModelConfig.to_json` / `from_json` is the lossless native format (one kind-tagged entry per
layer); the HF NemotronH `config.json` mapping, which only describes uniform layers of each kind,
lives in `nemojax.io.hf_config` (`ModelConfig.from_hf` / `to_hf` call it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

INF = float("inf")
# Normal-initialisation standard deviation of embeddings, LM head and every projection (HF's
# `initializer_range`); residual-branch output projections get it / sqrt(2 * layers).
INIT_STD = 0.02


def _check_positive(obj, where: str, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{where}.{n} must be a positive int; got {v!r}")


@dataclass(frozen=True)
class MambaSpec:
    """Mamba-2 mixer: in_proj -> [z | xBC | dt], causal conv on xBC, SSD, gated group RMSNorm."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int = 4
    chunk_size: int = 128
    conv_bias: bool = True
    proj_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, INF)
    kind: ClassVar[str] = "mamba"
    symbol: ClassVar[str] = "M"

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size

    def check(self, where: str) -> None:
        _check_positive(self, where, "num_heads", "head_dim", "n_groups", "state_size", "conv_kernel", "chunk_size")
        if self.num_heads % self.n_groups:
            raise ValueError(f"{where}: mamba num_heads={self.num_heads} must be divisible by n_groups={self.n_groups}")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"{where}: dt_limit must satisfy 0 <= lo < hi; got {self.dt_limit}")


@dataclass(frozen=True)
class AttentionSpec:
    """Causal GQA without positional embedding (NemotronH attention is NoPE)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    kind: ClassVar[str] = "attention"
    symbol: ClassVar[str] = "*"

    def check(self, where: str) -> None:
        _check_positive(self, where, "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}: attention num_heads={self.num_heads} must be divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"{where}: sliding_window must be None or a positive int; got {self.sliding_window!r}")


@dataclass(frozen=True)
class MLPSpec:
    """Non-gated squared-ReLU FFN: down(relu(up(x))^2)."""

    intermediate_size: int
    bias: bool = False
    kind: ClassVar[str] = "mlp"
    symbol: ClassVar[str] = "-"

    def check(self, where: str) -> None:
        _check_positive(self, where, "intermediate_size")


@dataclass(frozen=True)
class MoESpec:
    """Sigmoid-routed MoE with relu^2 experts, optional shared expert and LatentMoE projections."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int = 0  # 0: no shared expert
    latent_size: int | None = None  # LatentMoE: experts live in this width
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias: bool = False
    # Routing segments ((num_experts, top_k), ...): consecutive expert ranges each routed on their own
    # (top-k, normalisation and scaling within the range), as in an FFN-fused run of MoE layers whose
    # experts are the union. () routes all experts together.
    segments: tuple[tuple[int, int], ...] = ()
    kind: ClassVar[str] = "moe"
    symbol: ClassVar[str] = "E"

    def check(self, where: str) -> None:
        _check_positive(self, where, "num_experts", "top_k", "intermediate_size", "n_group", "topk_group")
        if self.num_experts % self.n_group:
            raise ValueError(f"{where}: num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"{where}: topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"{where}: top_k={self.top_k} exceeds the experts reachable in "
                             f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group}")
        if self.shared_intermediate_size < 0:
            raise ValueError(f"{where}: shared_intermediate_size must be >= 0; got {self.shared_intermediate_size}")
        if self.latent_size is not None and self.latent_size <= 0:
            raise ValueError(f"{where}: latent_size must be None or > 0; got {self.latent_size}")
        if self.segments:
            if self.n_group != 1 or self.topk_group != 1:
                raise ValueError(f"{where}: segments need n_group == topk_group == 1; got {self.n_group}, "
                                 f"{self.topk_group}")
            bad = [seg for seg in self.segments if not 0 < seg[1] <= seg[0]]
            if bad:
                raise ValueError(f"{where}: each of segments must be (num_experts, top_k) with 0 < top_k <= "
                                 f"num_experts; got {bad}")
            if tuple(map(sum, zip(*self.segments))) != (self.num_experts, self.top_k):
                raise ValueError(f"{where}: segments {self.segments} must add up to num_experts={self.num_experts} "
                                 f"and top_k={self.top_k}")


@dataclass(frozen=True)
class NoOpSpec:
    """A layer that adds nothing: x -> x (no norm, no parameters, no cache)."""

    kind: ClassVar[str] = "noop"
    symbol: ClassVar[str] = "."

    def check(self, where: str) -> None:
        pass


@dataclass(frozen=True)
class LinearSpec:
    """A mixer that is one d -> d linear map of the normed input: x + W norm(x) (+ b)."""

    bias: bool = False
    kind: ClassVar[str] = "linear"
    symbol: ClassVar[str] = "L"

    def check(self, where: str) -> None:
        pass


@dataclass(frozen=True)
class ParallelSpec:
    """Layers run side by side on one input, their outputs summed: x + sum_b mixer_b(norm_b(x)).

    Each branch keeps its own pre-norm, parameters and decode cache. This is how full-block
    parallelisation and fused runs of mixed layer kinds are stored."""

    branches: tuple[LayerSpec, ...]
    kind: ClassVar[str] = "parallel"
    symbol: ClassVar[str] = "P"

    def check(self, where: str) -> None:
        if not isinstance(self.branches, tuple) or len(self.branches) < 2:
            raise ValueError(f"{where}.branches must be a tuple of at least 2 layer specs; got {self.branches!r}")
        allowed = tuple(s for s in SPEC_TYPES if s not in (NoOpSpec, ParallelSpec))
        for b, spec in enumerate(self.branches):
            if not isinstance(spec, allowed):
                raise ValueError(f"{where}.branches[{b}]: expected one of {', '.join(s.__name__ for s in allowed)}; "
                                 f"got {type(spec).__name__}")
            spec.check(f"{where}.branches[{b}]")


LayerSpec = Union[MambaSpec, AttentionSpec, MLPSpec, MoESpec, NoOpSpec, LinearSpec, ParallelSpec]
SPEC_TYPES: tuple[type, ...] = typing.get_args(LayerSpec)
SPEC_BY_KIND: dict[str, type] = {s.kind: s for s in SPEC_TYPES}
SPEC_BY_SYMBOL: dict[str, type] = {s.symbol: s for s in SPEC_TYPES}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Multi-token prediction: `mtp_depth` modules, each running the block pattern `mtp_layers`.
    mtp_layers: tuple[LayerSpec, ...] = ()
    mtp_depth: int = 0
    ssm_cache_dtype: str = "float32"
    # Residual stream kept in fp32 between blocks (NVIDIA's original NemotronH option; transformers 5.x
    # reads the field but ignores it).
    residual_in_fp32: bool = False
    init_std: float = INIT_STD
    name: str = ""
    # HF config fields without effect on the math, kept so `to_hf` round-trips them.
    hf_extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        _check_positive(self, "ModelConfig", "vocab_size", "hidden_size")
        if not self.layers:
            raise ValueError("ModelConfig.layers must hold at least one LayerSpec")
        for where, specs in (("layers", self.layers), ("mtp_layers", self.mtp_layers)):
            if not isinstance(specs, tuple):
                raise ValueError(f"ModelConfig.{where} must be a tuple of layer specs; got {type(specs).__name__}")
            for i, spec in enumerate(specs):
                if not isinstance(spec, SPEC_TYPES):
                    raise ValueError(f"{where}[{i}]: expected one of {', '.join(s.__name__ for s in SPEC_TYPES)}; "
                                     f"got {type(spec).__name__}")
                spec.check(f"{where}[{i}]")
        if self.mtp_depth < 0 or (self.mtp_depth > 0 and not self.mtp_layers):
            raise ValueError(f"mtp_depth={self.mtp_depth} needs a non-empty mtp_layers pattern (and must be >= 0)")
        if self.ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ssm_cache_dtype must be one of float32, bfloat16, float16; got {self.ssm_cache_dtype!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0; got {self.init_std}")

    @property
    def pattern(self) -> str:
        return "".join(s.symbol for s in self.layers)

    @property
    def mtp_pattern(self) -> str:
        return "".join(s.symbol for s in self.mtp_layers)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def replace_layers(self, new: dict[int, LayerSpec]) -> "ModelConfig":
        """This config with `layers[i]` replaced by `new[i]` (indices checked)."""
        bad = [i for i in new if not isinstance(i, int) or not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"replace_layers: layer indices {bad} out of range [0, {len(self.layers)})")
        return self.replace(layers=tuple(new.get(i, s) for i, s in enumerate(self.layers)))

    # ------------------------------------------------------------------ native JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict: every field, each layer as {"kind": ..., its fields}; lossless."""
        out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("layers", "mtp_layers"):
                out[f.name] = [spec_to_dict(s) for s in v]
            elif f.name == "hf_extra":
                out[f.name] = dict(v)
            else:
                out[f.name] = _encode(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ModelConfig dict must be a JSON object; got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a native nemojax model config (format={d.get('format')!r}, expected {FORMAT!r}); "
                             "an HF NemotronH config.json loads with ModelConfig.from_hf")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"model config version {d.get('version')!r} is not supported (this nemojax reads "
                             f"version {FORMAT_VERSION})")
        body = {k: v for k, v in d.items() if k not in ("format", "version")}
        _reject_unknown(body, {f.name for f in dataclasses.fields(cls)}, "ModelConfig")
        kw: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for name, v in body.items():
            if name in ("layers", "mtp_layers"):
                if not isinstance(v, list):
                    raise ValueError(f"ModelConfig.{name} must be a list of layer entries; got {type(v).__name__}")
                kw[name] = tuple(spec_from_dict(e, f"{name}[{i}]") for i, e in enumerate(v))
            elif name == "hf_extra":
                kw[name] = tuple(sorted(v.items()))
            else:
                kw[name] = _decode(hints[name], v, f"ModelConfig.{name}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kw]
        if missing:
            raise ValueError(f"ModelConfig is missing required field(s) {missing}")
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "ModelConfig":
        """A config file: native JSON, or an HF NemotronH config.json (told apart by `format`)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d) if isinstance(d, dict) and "format" in d else cls.from_hf(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ HF mapping (nemojax.io.hf_config)
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> "ModelConfig":
        """Build from an HF NemotronH `config.json` (dict, file, or checkpoint directory)."""
        from nemojax.io.hf_config import from_hf

        return from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """An HF NemotronH config dict that transformers loads into the same model; raises when the
        model does not fit NemotronH's config (layers of one kind that differ, no-op or linear layers)."""
        from nemojax.io.hf_config import to_hf

        return to_hf(self)


FORMAT = "nemojax.ModelConfig"
FORMAT_VERSION = 1


def spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    if isinstance(spec, ParallelSpec):
        return {"kind": spec.kind, "branches": [spec_to_dict(b) for b in spec.branches]}
    return {"kind": spec.kind, **{f.name: _encode(getattr(spec, f.name)) for f in dataclasses.fields(spec)}}


def spec_from_dict(d: Any, where: str) -> LayerSpec:
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"{where}: a layer entry must be an object with a 'kind'; got {d!r}")
    kind = d["kind"]
    if kind not in SPEC_BY_KIND:
        raise ValueError(f"{where}: unknown layer kind {kind!r}; allowed: {', '.join(SPEC_BY_KIND)}")
    cls = SPEC_BY_KIND[kind]
    body = {k: v for k, v in d.items() if k != "kind"}
    _reject_unknown(body, {f.name for f in dataclasses.fields(cls)}, f"{where} ({kind})")
    if cls is ParallelSpec:
        branches = body.get("branches")
        if not isinstance(branches, list):
            raise ValueError(f"{where}.branches must be a list of layer entries; got {branches!r}")
        return ParallelSpec(tuple(spec_from_dict(e, f"{where}.branches[{b}]") for b, e in enumerate(branches)))
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _decode(hints[k], v, f"{where}.{k}") for k, v in body.items()})
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where} ({kind}): {e}") from None


def _reject_unknown(body: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")


def _encode(v):
    """JSON has no infinities: non-finite floats are written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    return v


def _decode(hint, v, where: str):
    """A JSON value checked against (and converted to) a field's type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _decode(hint, v, where)
    if origin is tuple and args[-1:] == (Ellipsis,):
        if not isinstance(v, list):
            raise ValueError(f"{where}: expected a list; got {v!r}")
        return tuple(_decode(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    if origin is tuple:
        if not isinstance(v, list) or len(v) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values; got {v!r}")
        return tuple(_decode(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if hint is float:
        if isinstance(v, str) and v in ("inf", "-inf", "nan"):
            return float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif hint is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    elif hint in (bool, str) and isinstance(v, hint):
        return v
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}; got {v!r}")


def from_pattern(pattern: str, *, vocab_size: int, hidden_size: int, mamba: MambaSpec | None = None,
                 attention: AttentionSpec | None = None, mlp: MLPSpec | None = None, moe: MoESpec | None = None,
                 mtp_pattern: str = "", mtp_depth: int = 0, **kw) -> ModelConfig:
    """A config whose layers follow `pattern` (M, *, -, E, and . for no-op), one shared spec per kind."""
    spec_of = {"M": mamba, "*": attention, "-": mlp, "E": moe, ".": NoOpSpec()}
    layers = []
    for i, c in enumerate(pattern + mtp_pattern):
        if c not in spec_of:
            raise ValueError(f"pattern symbol {c!r} at {i} is unknown; allowed: {', '.join(spec_of)}")
        if spec_of[c] is None:
            raise ValueError(f"pattern uses {c!r} but no {SPEC_BY_SYMBOL[c].__name__} was given")
        layers.append(spec_of[c])
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, layers=tuple(layers[: len(pattern)]),
                       mtp_layers=tuple(layers[len(pattern):]), mtp_depth=mtp_depth, **kw)
