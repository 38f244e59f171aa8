"""HF NemotronH checkpoints <-> nemojax `HybridLM`, both directions.

Canonical tensor names are those transformers' NemotronH writes (`model.` prefix, stacked 3-D
expert tensors, MTP under `mtp.layers.{i}`). On load we also accept the original NVIDIA hub
layout: `backbone.` prefix, `embedding.weight`, and per-expert `experts.{j}.up_proj.weight`.
Loading goes shard by shard into an abstract (`nnx.eval_shape`) model, so peak host memory
stays near one copy of the weights.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file
from tqdm.auto import tqdm

from nemojax.config import ModelConfig
from nemojax.io.hf_config import hf_incompatibility, read_hf_config
from nemojax.io.tensors import Entry
from nemojax.nn.model import HybridLM
from nemojax.nn.registry import block_entries
from nemojax.quant.kv_cache import SCALE_SUFFIXES, checkpoint_scales, scales_from_checkpoint, set_kv_scales

CONFIG_NAME = "config.json"  # HF NemotronH's, written when the model fits it
NATIVE_CONFIG_NAME = "nemojax_config.json"  # lossless, written for every model
INDEX_NAME = "model.safetensors.index.json"


def checkpoint_entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of an HF NemotronH checkpoint for `cfg`, in canonical (transformers) names."""
    out = [Entry("model.embeddings.weight", ("embeddings",), "copy"),
           Entry("model.norm_f.weight", ("norm_f", "weight"), "copy")]
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), "t"))
    for i, spec in enumerate(cfg.layers):
        out += block_entries(spec, f"model.layers.{i}", ("layers", i))
    n = len(cfg.mtp_layers)
    for d in range(cfg.mtp_depth):
        first, last = f"mtp.layers.{d * n}", f"mtp.layers.{d * n + n - 1}"
        out += [Entry(f"{first}.enorm.weight", ("mtp", d, "enorm", "weight"), "copy"),
                Entry(f"{first}.hnorm.weight", ("mtp", d, "hnorm", "weight"), "copy"),
                Entry(f"{first}.eh_proj.weight", ("mtp", d, "eh_proj", "kernel"), "t"),
                Entry(f"{last}.final_layernorm.weight", ("mtp", d, "final_layernorm", "weight"), "copy")]
        for j, spec in enumerate(cfg.mtp_layers):
            out += block_entries(spec, f"mtp.layers.{d * n + j}", ("mtp", d, "blocks", j))
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


def load_config(path) -> ModelConfig:
    """The config of a checkpoint directory: the native `nemojax_config.json` when present (lossless,
    any model), else HF NemotronH's `config.json`."""
    path = Path(path)
    if (path / NATIVE_CONFIG_NAME).exists():
        return ModelConfig.load(path / NATIVE_CONFIG_NAME)
    if (path / CONFIG_NAME).exists():
        try:
            return ModelConfig.from_hf(read_hf_config(path / CONFIG_NAME))
        except ValueError as e:
            raise ValueError(f"{path / CONFIG_NAME}: {e}") from None
    raise FileNotFoundError(f"{path} has neither {NATIVE_CONFIG_NAME} nor {CONFIG_NAME}: expected a nemojax or HF "
                            "NemotronH checkpoint directory")


def _read_tensor(f, raw: str, shard: Path):
    try:
        return f.get_tensor(raw)
    except Exception as e:  # safetensors raises its own error types, without the file's name
        raise ValueError(f"{shard}: cannot read tensor {raw!r} ({e}); the file may be truncated or damaged") from None


def load_pretrained(path, dtype=jnp.float32, config: ModelConfig | None = None, progress: bool = True) -> HybridLM:
    """Load a checkpoint directory (see `load_config`; safetensors, single or sharded) as a HybridLM.

    Parameters are cast to `dtype`, except the router correction bias, which stays fp32. FP8 KV-cache
    scales (`<attention>.k_scale` / `.v_scale`, see `nemojax.quant.kv_cache`) are attached when present.
    Raises ValueError naming the tensor when one is missing, unexpected, wrongly shaped or not
    floating point, and the file when one cannot be read; warns naming tensors that hold inf or nan.
    """
    path = Path(path)
    cfg = config or load_config(path)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype))
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    entries = {e.name: e for e in checkpoint_entries(cfg)}
    loaded: dict[tuple, jax.Array] = {}
    pending_experts: dict[str, dict[int, jax.Array]] = {}  # per-expert tensors waiting to be stacked
    kv_scales: dict[str, jax.Array] = {}

    def place(entry: Entry, tensor, source_name: str):
        target = flat_abstract[entry.path]
        want = entry.hf_shape(target.get_value().shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor {source_name!r} has shape {tuple(tensor.shape)}; expected {want}")
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise ValueError(f"tensor {source_name!r} has dtype {tensor.dtype}; expected a floating-point tensor")
        if not bool(jnp.all(jnp.isfinite(tensor))):
            warnings.warn(f"tensor {source_name!r} holds non-finite values (inf or nan)", stacklevel=3)
        loaded[entry.path] = jnp.asarray(entry.to_nnx(tensor), dtype=target.get_value().dtype)

    shards = _shards(path)
    for shard in tqdm(shards, desc=f"loading {path.name}", disable=not progress or len(shards) < 2):
        try:
            opened = safe_open(shard, framework="flax")
        except Exception as e:  # safetensors' header errors do not name the file
            raise ValueError(f"{shard}: not a readable safetensors file ({e})") from None
        with opened as f:
            for raw in f.keys():
                name = canonical_name(raw)
                per_expert = _PER_EXPERT.match(name)
                if per_expert:
                    stacked = f"{per_expert[1]}.{per_expert[3]}"
                    if stacked in entries:
                        pending_experts.setdefault(stacked, {})[int(per_expert[2])] = _read_tensor(f, raw, shard)
                        continue
                if name in entries:
                    place(entries[name], _read_tensor(f, raw, shard), raw)
                elif name.endswith(SCALE_SUFFIXES):
                    kv_scales[name] = _read_tensor(f, raw, shard)
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
    model = nnx.merge(graphdef, state)
    set_kv_scales(model, scales_from_checkpoint(model, entries.values(), kv_scales))
    return model


def save_pretrained(model: HybridLM, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write `model` as a checkpoint directory: safetensors in NemotronH's tensor names, the native
    config (`nemojax_config.json`) and, when the model fits NemotronH's config, HF's `config.json`,
    so that transformers loads it unchanged; calibrated FP8 KV-cache scales as `<attention>.k_scale` /
    `.v_scale` fp32 scalars."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    cfg.save(path / NATIVE_CONFIG_NAME)
    if hf_incompatibility(cfg) is None:
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

    entries = checkpoint_entries(cfg)
    weights = ((e.name, e.to_hf(flat[e.path].get_value())) for e in entries)  # one at a time, as they are written
    for name, tensor in itertools.chain(weights, checkpoint_scales(model, entries).items()):
        tensor = jnp.asarray(tensor)
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
    flush()
    if len(shard_files) == 1:
        (path / shard_files[0]).rename(path / "model.safetensors")
    else:
        total = sum((path / f).stat().st_size for f in shard_files)
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
