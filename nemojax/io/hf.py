"""HF NemotronH checkpoints <-> nemojax `HybridLM`, both directions.

Canonical tensor names are those transformers' NemotronH writes (`model.` prefix, stacked 3-D
expert tensors, MTP under `mtp.layers.{i}`). On load we also accept the original NVIDIA hub
layout: `backbone.` prefix, `embedding.weight`, and per-expert `experts.{j}.up_proj.weight`.
Loading goes shard by shard into an abstract (`nnx.eval_shape`) model, so peak host memory
stays near one copy of the weights.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file
from tqdm.auto import tqdm

from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec
from nemojax.nn.model import HybridLM

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its HF name, where it lives in the NNX state, and how it is laid out."""

    name: str
    path: tuple
    layout: str  # "copy" | "t" (2-D transpose) | "conv" ([C,1,K] <-> [K,C]) | "experts" (swap last two axes)

    def to_nnx(self, t):
        if self.layout == "t":
            return t.T
        if self.layout == "conv":
            return t[:, 0, :].T
        if self.layout == "experts":
            return jnp.swapaxes(t, -1, -2)
        return t

    def to_hf(self, a):
        if self.layout == "conv":
            return a.T[:, None, :]
        return self.to_nnx(a)  # the other layouts are involutions

    def hf_shape(self, nnx_shape):
        if self.layout == "t":
            return nnx_shape[::-1]
        if self.layout == "conv":
            return (nnx_shape[1], 1, nnx_shape[0])
        if self.layout == "experts":
            return (*nnx_shape[:-2], nnx_shape[-1], nnx_shape[-2])
        return tuple(nnx_shape)


def _linear(name, path, bias):
    out = [Entry(f"{name}.weight", (*path, "kernel"), "t")]
    return out + ([Entry(f"{name}.bias", (*path, "bias"), "copy")] if bias else [])


def _block_entries(spec, hf: str, path: tuple) -> list[Entry]:
    m, p = f"{hf}.mixer", (*path, "mixer")
    out = [Entry(f"{hf}.norm.weight", (*path, "norm", "weight"), "copy")]
    if isinstance(spec, MambaSpec):
        out += _linear(f"{m}.in_proj", (*p, "in_proj"), spec.proj_bias)
        out.append(Entry(f"{m}.conv1d.weight", (*p, "conv_weight"), "conv"))
        if spec.conv_bias:
            out.append(Entry(f"{m}.conv1d.bias", (*p, "conv_bias"), "copy"))
        out += [Entry(f"{m}.{n}", (*p, n), "copy") for n in ("dt_bias", "A_log", "D")]
        out.append(Entry(f"{m}.norm.weight", (*p, "norm_weight"), "copy"))
        out += _linear(f"{m}.out_proj", (*p, "out_proj"), spec.proj_bias)
    elif isinstance(spec, AttentionSpec):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += _linear(f"{m}.{n}", (*p, n), False)
    elif isinstance(spec, MLPSpec):
        out += _linear(f"{m}.up_proj", (*p, "up_proj"), spec.bias)
        out += _linear(f"{m}.down_proj", (*p, "down_proj"), spec.bias)
    elif isinstance(spec, MoESpec):
        out += [
            Entry(f"{m}.gate.weight", (*p, "gate_weight"), "t"),
            Entry(f"{m}.gate.e_score_correction_bias", (*p, "e_score_correction_bias"), "copy"),
            Entry(f"{m}.experts.up_proj", (*p, "up_proj"), "experts"),
            Entry(f"{m}.experts.down_proj", (*p, "down_proj"), "experts"),
        ]
        if spec.shared_intermediate_size:
            for n in ("up_proj", "down_proj"):
                out += _linear(f"{m}.shared_experts.{n}", (*p, "shared_experts", n), spec.bias)
        if spec.latent_size:
            for n in ("fc1_latent_proj", "fc2_latent_proj"):
                out += _linear(f"{m}.{n}", (*p, n), spec.bias)
    return out


def checkpoint_entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of an HF NemotronH checkpoint for `cfg`, in canonical (transformers) names."""
    out = [Entry("model.embeddings.weight", ("embeddings",), "copy"),
           Entry("model.norm_f.weight", ("norm_f", "weight"), "copy")]
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), "t"))
    for i, spec in enumerate(cfg.layers):
        out += _block_entries(spec, f"model.layers.{i}", ("layers", i))
    n = len(cfg.mtp_layers)
    for d in range(cfg.mtp_depth):
        first, last = f"mtp.layers.{d * n}", f"mtp.layers.{d * n + n - 1}"
        out += [Entry(f"{first}.enorm.weight", ("mtp", d, "enorm", "weight"), "copy"),
                Entry(f"{first}.hnorm.weight", ("mtp", d, "hnorm", "weight"), "copy"),
                Entry(f"{first}.eh_proj.weight", ("mtp", d, "eh_proj", "kernel"), "t"),
                Entry(f"{last}.final_layernorm.weight", ("mtp", d, "final_layernorm", "weight"), "copy")]
        for j, spec in enumerate(cfg.mtp_layers):
            out += _block_entries(spec, f"mtp.layers.{d * n + j}", ("mtp", d, "blocks", j))
    return out


_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def canonical_name(name: str) -> str:
    """Map the NVIDIA hub spellings onto transformers' names."""
    if name.startswith("backbone."):
        name = "model." + name[len("backbone."):]
    if name == "model.embedding.weight":
        name = "model.embeddings.weight"
    return name


def _shards(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files (and no {INDEX_NAME}) in {path}")
    return files


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> HybridLM:
    """The model's structure, shapes and dtypes without allocating any weight."""
    return nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def load_pretrained(path, dtype=jnp.float32, config: ModelConfig | None = None, progress: bool = True) -> HybridLM:
    """Load an HF NemotronH directory (config.json + safetensors, single or sharded) as a HybridLM.

    Parameters are cast to `dtype`, except the router correction bias, which stays fp32.
    Raises ValueError naming the tensor when one is missing, unexpected, or wrongly shaped.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: expected an HF NemotronH checkpoint directory")
    cfg = config or ModelConfig.from_hf(path / CONFIG_NAME)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype))
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    entries = {e.name: e for e in checkpoint_entries(cfg)}
    loaded: dict[tuple, jax.Array] = {}
    pending_experts: dict[str, dict[int, jax.Array]] = {}  # per-expert tensors waiting to be stacked

    def place(entry: Entry, tensor, source_name: str):
        target = flat_abstract[entry.path]
        want = entry.hf_shape(target.get_value().shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor {source_name!r} has shape {tuple(tensor.shape)}; expected {want}")
        loaded[entry.path] = jnp.asarray(entry.to_nnx(tensor), dtype=target.get_value().dtype)

    shards = _shards(path)
    for shard in tqdm(shards, desc=f"loading {path.name}", disable=not progress or len(shards) < 2):
        with safe_open(shard, framework="flax") as f:
            for raw in f.keys():
                name = canonical_name(raw)
                per_expert = _PER_EXPERT.match(name)
                if per_expert:
                    stacked = f"{per_expert[1]}.{per_expert[3]}"
                    if stacked in entries:
                        pending_experts.setdefault(stacked, {})[int(per_expert[2])] = f.get_tensor(raw)
                        continue
                if name in entries:
                    place(entries[name], f.get_tensor(raw), raw)
                elif name.startswith("mtp.") and cfg.mtp_depth == 0:
                    warnings.warn(f"ignoring {raw!r}: the config has num_nextn_predict_layers=0", stacklevel=2)
                else:
                    raise ValueError(f"unexpected tensor {raw!r} in {shard.name}: no such parameter for this config")
        for stacked, parts in list(pending_experts.items()):
            n = flat_abstract[entries[stacked].path].get_value().shape[0]
            if len(parts) == n:
                if sorted(parts) != list(range(n)):
                    raise ValueError(f"{stacked}: expert indices {sorted(parts)} are not 0..{n - 1}")
                place(entries[stacked], jnp.stack([parts[j] for j in range(n)]), f"{stacked}.{{0..{n - 1}}}")
                del pending_experts[stacked]
    for stacked, parts in pending_experts.items():
        n = flat_abstract[entries[stacked].path].get_value().shape[0]
        missing = sorted(set(range(n)) - set(parts))
        raise ValueError(f"{stacked}: missing experts {missing[:8]}{'...' if len(missing) > 8 else ''} of {n}")
    missing = [e.name for e in entries.values() if e.path not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:10]}")
    state = nnx.from_flat_state([(p, v.replace(loaded[p])) for p, v in flat_abstract.items()])
    return nnx.merge(graphdef, state)


def save_pretrained(model: HybridLM, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write `model` as an HF NemotronH directory that transformers loads unchanged."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = jnp.dtype(model.dtype).name
    (path / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, default=str))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    weight_map, shard, shard_bytes, shard_files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard_files.append(name)
            shard, shard_bytes = {}, 0

    for entry in checkpoint_entries(cfg):
        tensor = jnp.asarray(entry.to_hf(flat[entry.path].get_value()))
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[entry.name] = tensor
        shard_bytes += tensor.nbytes
    flush()
    if len(shard_files) == 1:
        (path / shard_files[0]).rename(path / "model.safetensors")
    else:
        total = sum((path / f).stat().st_size for f in shard_files)
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
