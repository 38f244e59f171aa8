"""How much memory a training run needs, estimated from shapes before anything is allocated, against
how much the machine has.

The estimate is a lower bound: the train state (fp32 master weights, AdamW moments, correction biases;
exact, from `jax.eval_shape`), one fp32 gradient per parameter, the bf16 compute copy when there is
one, and the activations that every layer certainly keeps for the backward pass (its input, [B, L, D]
in the compute dtype, plus the fp32 logits and their gradient, [B, L, V] each). What a mixer keeps
inside itself comes on top.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from nemojax.config import ModelConfig
from nemojax.train.config import TrainConfig

GiB = 2**30


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(tc: TrainConfig, model_config: ModelConfig, state_like, mesh=None) -> dict:
    """Bytes per device, by part, and their total. `state_like` is the train state's shape tree (from
    `jax.eval_shape`). On a mesh the state splits over "fsdp" x "expert" (an estimate: matrices that
    no axis divides stay whole) and the activations over the whole batch split."""
    shape = dict(mesh.shape) if mesh is not None else {}
    n_devices = math.prod(shape.values()) if shape else 1
    state_split = shape.get("fsdp", 1) * shape.get("expert", 1)
    params = _nbytes(state_like["params"])
    compute_bytes = np.dtype(tc.compute_dtype).itemsize
    tokens = tc.batch_size * tc.seq_len
    parts = {
        "train state (weights, optimizer, correction biases)": _nbytes(state_like) / state_split,
        "gradients": params / state_split,
        "compute copy of the weights": params // 4 * compute_bytes / state_split if compute_bytes < 4 else 0,
        "layer inputs and logits": tokens * (len(model_config.layers) * model_config.hidden_size * compute_bytes
                                             + 2 * model_config.vocab_size * 4) / n_devices,
    }
    return {"parts": parts, "per_device": sum(parts.values()), "n_devices": n_devices}


def available() -> tuple[float, str]:
    """(bytes per device, what that is). CPU devices share the host's physical memory, so there it is
    divided by the number of devices; accelerators report their own limit."""
    devices = jax.devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices] if devices[0].platform != "cpu" else []
    if limits and all(limits):
        return float(min(limits)), f"{min(limits) / GiB:.1f} GiB per {devices[0].device_kind}"
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host / len(devices), f"{host / GiB:.1f} GiB of host memory for {len(devices)} device(s)"


def check(est: dict, avail: tuple[float, str]) -> None:
    """Refuses (ValueError) when the estimate exceeds what is available."""
    have, where = avail
    if est["per_device"] > have:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in est["parts"].items() if v)
        raise ValueError(f"the run needs at least {est['per_device'] / GiB:.1f} GiB per device ({parts} GiB) but "
                         f"the machine has {where}; use a smaller preset, --batch-size or --seq-len, a mesh with "
                         "fsdp, or --skip-memory-check to try anyway")
