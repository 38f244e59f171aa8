"""Replace-one-layer scores and per-layer costs of Puzzle candidates.

Scores (`replace_one_scores`): the parent with one layer replaced by a candidate, run on held-out
batches against the parent itself: KL(parent || child) of the next-token distributions (the search's
default objective), the child's LM loss and next-token accuracy, and the cosine distance of the final
hidden state (after the final norm: what the LM head reads). Only the candidate's layer and the ones
after it are recomputed: the parent's residual stream entering every layer is computed once per batch.

Costs (`candidate_costs`): per candidate layer its parameters (pre-norm included), memory (weights plus
the KV cache or SSM state at a batch size and sequence length), latency measured on this backend for
prefill and decode, and an analytic roofline time on a named GPU, so that a search run on a laptop can
target a GPU.

Candidates follow the puzzle contract: `{f"{layer}:{name}": (layer, spec, module_or_None)}`.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nemojax.config import AttentionSpec, LinearSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, NoOpSpec
from nemojax.data.base import IGNORE
from nemojax.generate import generate
from nemojax.nn.model import Block
from nemojax.train.losses import cosine_distance, cross_entropy, kd_kl

# Vendors' datasheet numbers (SXM parts): dense BF16 tensor-core FLOP/s (without 2:4 sparsity) and HBM
# bandwidth in bytes/s. H100 SXM5 80 GB: 989 TFLOP/s, 3.35 TB/s; H200 SXM 141 GB: 989 TFLOP/s, 4.8 TB/s;
# A100 SXM 80 GB: 312 TFLOP/s, 2.0 TB/s (2,039 GB/s).
GPUS = {
    "H100": {"flops": 989e12, "bandwidth": 3.35e12},
    "H200": {"flops": 989e12, "bandwidth": 4.8e12},
    "A100": {"flops": 312e12, "bandwidth": 2.0e12},
}
PHASES = ("prefill", "decode")
SCORE_NAMES = ("kl", "lm_loss", "accuracy", "cosine")
FORMAT, FORMAT_VERSION = "nemojax.puzzle.scores", 1


# ------------------------------------------------------------------------------------------ checks
def _check_candidates(parent, candidates: dict) -> None:
    if not isinstance(candidates, dict):
        raise ValueError(f"candidates must be a dict {{'layer:name': (layer, spec, module)}}; "
                         f"got {type(candidates).__name__}")
    n = len(parent.layers)
    for key, entry in candidates.items():
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise ValueError(f"candidate {key!r}: expected (layer, spec, module_or_None); got {entry!r}")
        layer = entry[0]
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise ValueError(f"candidate {key!r}: layer must be an int in [0, {n}); got {layer!r}")
        if not (isinstance(key, str) and key.startswith(f"{layer}:") and len(key) > len(f"{layer}:")):
            raise ValueError(f"candidate {key!r}: its key must be '{layer}:<name>' (layer {layer})")


def _check_batches(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"batches must be a non-empty list of {{'inputs', 'targets'}} dicts; got {batches!r}")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, dict) or not {"inputs", "targets"} <= set(b):
            raise ValueError(f"batches[{i}] must be a dict with 'inputs' and 'targets'; got {b!r}")
        x, t = np.asarray(b["inputs"]), np.asarray(b["targets"])
        for name, a in (("inputs", x), ("targets", t)):
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"batches[{i}]['{name}'] must be an int array [batch, length]; got {a.dtype} "
                                 f"{a.shape}")
        if x.shape != t.shape:
            raise ValueError(f"batches[{i}]: inputs {x.shape} and targets {t.shape} differ in shape")
        out.append((x.astype(np.int32), t.astype(np.int32)))
    return out


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def candidate_block(parent, layer: int, spec, module) -> Block:
    """The Block that `replace_layers` puts at `layer` for this candidate (checked like any surgery)."""
    return parent.replace_layers({layer: (spec, module)}).layers[layer]


# ------------------------------------------------------------------------------------------ scores
# One compiled executable per block structure (graphdef and shapes), whatever layer it sits at, so
# candidates of one shape share it and so do the parent's layers of one kind. Running a candidate that is
# the parent's own block through the same executable reproduces the parent's stream bit for bit.
@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply_block(graphdef, state, x, act_dtype):
    return nnx.merge(graphdef, state)(x, None, 0, act_dtype)[0]


@functools.partial(jax.jit, static_argnums=0)
def _head(graphdef, state, x):
    """Logits and the final hidden state after the final norm, from the residual stream after the last layer."""
    model = nnx.merge(graphdef, state)
    h = model.norm_f(x)
    return model.logits(h), h


@jax.jit
def _score_sums(logits, h, ref_logits, ref_h, targets):
    """Per-batch sums over the scored positions: [n, KL, CE, correct, cosine distance]."""
    mask = targets != IGNORE
    n = jnp.sum(mask).astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) & mask).astype(jnp.float32)
    return jnp.stack([n, kd_kl(logits, ref_logits, mask) * n, cross_entropy(logits, targets)[0] * n, correct,
                      cosine_distance(h, ref_h, mask) * n])


def _stream_input(parent, inputs):
    """The residual stream entering layer 0 (`HybridLM.layer_states(...)[0]`), without running the layers."""
    emb = parent.embed(inputs)
    return emb.astype(jnp.float32) if parent.cfg.residual_in_fp32 else emb


def _means(sums: list) -> dict[str, float]:
    n, kl, ce, correct, cos = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    if n == 0:
        raise ValueError("batches: no scored position (every target is IGNORE)")
    return {"kl": float(kl / n), "lm_loss": float(ce / n), "accuracy": float(correct / n), "cosine": float(cos / n),
            "tokens": int(n)}


def replace_one_scores(parent, candidates: dict, batches, *, progress: bool = True) -> dict[str, dict]:
    """Replace-one-layer quality of every candidate on held-out `batches` ([{"inputs", "targets"}], int
    [B, L], targets IGNORE where not scored).

    Returns {key: {"kl", "lm_loss", "accuracy", "cosine", "tokens"}}, means over the scored positions of
    KL(parent || child) of the next-token distributions, the child's cross entropy and argmax accuracy
    against the targets, and 1 - cos(h_child, h_parent) of the final hidden state after the final norm.
    The row "parent" is the parent itself (KL 0; its own loss and accuracy). A candidate that is the
    parent's own layer scores KL exactly 0.
    """
    _check_candidates(parent, candidates)
    data = _check_batches(batches)
    act_dtype = jnp.dtype(parent.dtype)
    blocks = [nnx.split(b) for b in parent.layers]
    head = nnx.split(parent)
    refs = []  # per batch: the parent's stream entering each layer and after the last, its logits, hidden
    for inputs, targets in data:
        states = [_stream_input(parent, jnp.asarray(inputs))]
        for graphdef, state in blocks:
            states.append(_apply_block(graphdef, state, states[-1], act_dtype))
        logits, h = _head(*head, states[-1])
        refs.append((states, logits, h, jnp.asarray(targets)))
    out = {"parent": _means([_score_sums(lg, h, lg, h, t) for _, lg, h, t in refs])}
    for key, (layer, spec, module) in tqdm(candidates.items(), desc="replace-one scores", disable=not progress):
        graphdef, state = nnx.split(candidate_block(parent, layer, spec, module))
        sums = []
        for states, ref_logits, ref_h, targets in refs:
            x = _apply_block(graphdef, state, states[layer], act_dtype)
            for g, s in blocks[layer + 1:]:
                x = _apply_block(g, s, x, act_dtype)
            logits, h = _head(*head, x)
            sums.append(_score_sums(logits, h, ref_logits, ref_h, targets))
        out[key] = _means(sums)
    return out


@nnx.jit
def _whole(model, inputs):
    h = model.norm_f(model.layer_states(inputs)[-1])
    return model.logits(h), h


def compare(parent, child, batches) -> dict[str, float]:
    """The whole `child` against `parent` on `batches`: the same means as `replace_one_scores` (KL(parent
    || child), the child's LM loss and accuracy, cosine distance of the final hidden state), for a child
    that may differ from the parent in every layer."""
    data = _check_batches(batches)
    sums = []
    for inputs, targets in data:
        ref_logits, ref_h = _whole(parent, jnp.asarray(inputs))
        logits, h = _whole(child, jnp.asarray(inputs))
        sums.append(_score_sums(logits, h, ref_logits, ref_h, jnp.asarray(targets)))
    return _means(sums)


def _encode(v):
    """JSON has no NaN or infinity: non-finite floats are written as the strings 'nan', 'inf', '-inf'."""
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else str(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _decode(v):
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def save_scores(path, scores: dict, costs: dict, meta: dict) -> None:
    """Writes scores, costs and `meta` (what produced them) as one JSON file, atomically."""
    for name, v in (("scores", scores), ("costs", costs), ("meta", meta)):
        if not isinstance(v, dict):
            raise ValueError(f"save_scores: {name} must be a dict; got {type(v).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "scores": scores, "costs": costs}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_encode(body), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def load_scores(path) -> tuple[dict, dict, dict]:
    """(scores, costs, meta) from a file written by `save_scores`."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Puzzle scores file (format {FORMAT!r} expected)")
    if body.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: scores file version {body.get('version')!r}; this nemojax reads {FORMAT_VERSION}")
    body = _decode(body)
    return body["scores"], body["costs"], body["meta"]


# ------------------------------------------------------------------------------ parameters and memory
@functools.lru_cache(maxsize=None)
def _shape_block(spec, hidden: int, dtype) -> Block:
    cfg = ModelConfig(vocab_size=1, hidden_size=hidden, layers=(spec,))
    return nnx.eval_shape(lambda: Block(spec, cfg, out_std=1.0, dtype=dtype, rngs=nnx.Rngs(0)))


def params(spec, hidden: int) -> int:
    """Parameters of one layer of this spec: its mixer and its pre-norm (from shapes, nothing built)."""
    state = nnx.state(_shape_block(spec, hidden, jnp.dtype(jnp.float32)), nnx.Param)
    return sum(math.prod(v.shape) for v in jax.tree.leaves(state))


def weight_bytes(spec, hidden: int, *, dtype) -> int:
    """Bytes of every variable of one layer built in `dtype` (the MoE correction bias stays fp32)."""
    state = nnx.state(_shape_block(spec, hidden, jnp.dtype(dtype)), nnx.Variable)
    return sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in jax.tree.leaves(state))


def cache_bytes(spec, hidden: int, *, batch: int, seq_len: int, dtype, ssm_dtype=jnp.float32) -> int:
    """Decode-state bytes of one layer at `batch` sequences of `seq_len` tokens: K and V of every KV head
    over the tokens a query can see (a sliding window needs only its last `window` tokens), or Mamba's
    SSM state (in `ssm_dtype`) and the conv's last conv_kernel - 1 inputs; 0 for stateless layers."""
    _check_positive(batch=batch, seq_len=seq_len)
    item = jnp.dtype(dtype).itemsize
    if isinstance(spec, AttentionSpec):
        seen = seq_len if spec.sliding_window is None else min(seq_len, spec.sliding_window)
        return 2 * batch * spec.num_kv_heads * spec.head_dim * seen * item
    if isinstance(spec, MambaSpec):
        ssm = batch * spec.num_heads * spec.head_dim * spec.state_size * jnp.dtype(ssm_dtype).itemsize
        return ssm + batch * (spec.conv_kernel - 1) * spec.conv_dim * item
    return 0


def memory(spec, hidden: int, *, batch: int, seq_len: int, dtype, ssm_dtype=jnp.float32) -> int:
    """Bytes one layer holds while decoding: its weights plus its KV cache or SSM state."""
    return weight_bytes(spec, hidden, dtype=dtype) + cache_bytes(spec, hidden, batch=batch, seq_len=seq_len,
                                                                 dtype=dtype, ssm_dtype=ssm_dtype)


# ---------------------------------------------------------------------------------------- roofline
def _causal_keys(seq_len: int, window: int | None) -> int:
    """Sum over the positions of a causal sequence of the keys each query sees."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def flops_bytes(spec, hidden: int, *, batch: int, seq_len: int, dtype, phase: str,
                ssm_dtype=jnp.float32) -> tuple[int, int]:
    """(matmul FLOPs, HBM bytes) of one layer: prefill = `batch` sequences of `seq_len` tokens from an
    empty state; decode = one new token per sequence after `seq_len - 1` cached ones.

    FLOPs count the matrix products (2 per multiply-add) and leave out elementwise work (norms,
    activations, softmax, gating), which the byte count bounds instead. Bytes: the layer's weights read
    once (MoE: the routed experts that the step's tokens touch, min(E, tokens * top_k) of them), the
    layer's input read and output written, and its decode state read and written (the KV cache of a
    prefill is written once; its re-reads inside a fused attention kernel are not counted).

    Attention counts the causal score and value products (a sliding window caps the keys per query).
    Mamba counts its projections, the depthwise conv and, for prefill, SSD's chunked form with chunk Q:
    per chunk C B^T [Q, Q] per group, the masked [Q, Q] by X product and the chunk-state B^T X per head,
    and the states' contribution C s per head (the causal halving inside a chunk is ignored, an
    overestimate of at most 2x on that term); for decode one recurrence step (update and readout).
    """
    _check_positive(batch=batch, seq_len=seq_len)
    _check_choice("phase", phase, PHASES)
    item, d = jnp.dtype(dtype).itemsize, hidden
    t = batch * seq_len if phase == "prefill" else batch
    weights = weight_bytes(spec, hidden, dtype=dtype)
    io = 2 * t * d * item
    if isinstance(spec, NoOpSpec):
        return 0, 0
    if isinstance(spec, LinearSpec):
        return 2 * t * d * d, weights + io
    if isinstance(spec, MLPSpec):
        return 4 * t * d * spec.intermediate_size, weights + io
    if isinstance(spec, AttentionSpec):
        hq, hkv, dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
        proj = 2 * t * d * dh * (2 * hq + 2 * hkv)
        kv_token = 2 * hkv * dh * item  # K and V of one token
        if phase == "prefill":
            keys = batch * _causal_keys(seq_len, spec.sliding_window)
            state = t * kv_token
        else:
            keys = batch * (seq_len if spec.sliding_window is None else min(seq_len, spec.sliding_window))
            state = keys * kv_token + t * kv_token
        return proj + 4 * hq * dh * keys, weights + io + state
    if isinstance(spec, MambaSpec):
        h, p, n, g, k = spec.num_heads, spec.head_dim, spec.state_size, spec.n_groups, spec.conv_kernel
        proj = 2 * t * d * (spec.d_inner + spec.conv_dim + h) + 2 * t * spec.d_inner * d
        conv = 2 * t * spec.conv_dim * k
        ssm_state = batch * h * p * n * jnp.dtype(ssm_dtype).itemsize
        conv_state = batch * (k - 1) * spec.conv_dim * item
        if phase == "prefill":
            q = min(spec.chunk_size, seq_len)
            scan = 2 * t * q * n * g + 2 * t * q * p * h + 2 * (2 * t * n * p * h)
            return proj + conv + scan, weights + io + ssm_state + conv_state
        return proj + conv + 2 * (2 * t * h * p * n), weights + io + 2 * (ssm_state + conv_state)
    if isinstance(spec, MoESpec):
        din = spec.latent_size or d
        flops = 2 * t * d * spec.num_experts + spec.top_k * 4 * t * din * spec.intermediate_size
        flops += 4 * t * d * spec.shared_intermediate_size + (4 * t * d * din if spec.latent_size else 0)
        expert = 2 * din * spec.intermediate_size * jnp.dtype(dtype).itemsize
        untouched = spec.num_experts - min(spec.num_experts, t * spec.top_k)
        return flops, weights - untouched * expert + io
    raise ValueError(f"flops_bytes: no cost model for {type(spec).__name__}")


def roofline(spec, hidden: int, *, batch: int, seq_len: int, dtype, gpu: str = "H100", phase: str = "prefill",
             ssm_dtype=jnp.float32) -> float:
    """Seconds for one layer on `gpu` at its roofline: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), with
    `flops_bytes`'s counts and the 16-bit tensor-core peak of `GPUS` (whatever `dtype`: it sets the bytes)."""
    _check_choice("gpu", gpu, GPUS)
    flops, nbytes = flops_bytes(spec, hidden, batch=batch, seq_len=seq_len, dtype=dtype, phase=phase,
                                ssm_dtype=ssm_dtype)
    return max(flops / GPUS[gpu]["flops"], nbytes / GPUS[gpu]["bandwidth"])


# ----------------------------------------------------------------------------------------- latency
# A block's one call per step is a few kernels; for small layers at decode, dispatching one jitted call
# costs more than the step itself, so the timed function runs STEPS calls in a compiled loop (as
# generation's decode loop does), each step's output feeding the next so none is skipped. The cache is
# donated so that its update happens in place, as in that loop.
_STEPS = {"prefill": 2, "decode": 16}


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(5,))
def _run_steps(graphdef, weights, rest, x, pos, cache, steps):
    block = nnx.merge(graphdef, weights, rest)

    def body(carry, _):
        y, c = block(*carry, pos)
        return (y, c), None

    return jax.lax.scan(body, (x, cache), None, length=steps)[0]


def latency(block: Block, hidden: int, *, batch: int, seq_len: int, dtype, ssm_dtype=jnp.float32,
            repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Measured seconds of one call of `block` alone on the current backend, its parameters cast to `dtype`:
    "prefill" ([batch, seq_len] tokens into an empty cache of seq_len) and "decode" (one token per
    sequence at position seq_len - 1). The median of `repeats` timed runs after a compiling one."""
    _check_positive(batch=batch, seq_len=seq_len, repeats=repeats)
    graphdef, weights, rest = nnx.split(block, nnx.Param, ...)
    weights = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, weights)
    out = {}
    for phase in PHASES:
        length, pos = (seq_len, 0) if phase == "prefill" else (1, seq_len - 1)
        x = jax.random.normal(jax.random.key(seed), (batch, length, hidden), dtype)
        cache = block.init_cache(batch, seq_len, dtype=jnp.dtype(dtype), ssm_dtype=jnp.dtype(ssm_dtype))
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            y, cache = _run_steps(graphdef, weights, rest, x, jnp.int32(pos), cache, _STEPS[phase])
            jax.block_until_ready((y, cache))
            if i:  # the first run compiles
                times.append((time.perf_counter() - start) / _STEPS[phase])
        out[phase] = statistics.median(times)
    return out


# ------------------------------------------------------------------------------------------- costs
def candidate_costs(parent, candidates: dict, *, batch: int, seq_len: int, dtype, measure: bool = True,
                    gpu: str = "H100", repeats: int = 5, progress: bool = True) -> dict[str, dict]:
    """Costs of every candidate layer and of every parent layer (keys f"{i}:parent", unless `candidates`
    has them): {"params", "memory" (bytes at `batch` x `seq_len` in `dtype`), "experts" (routed experts;
    0 for other kinds), "prefill_roofline", "decode_roofline" (seconds on `gpu`) and, with `measure`,
    "prefill_latency", "decode_latency" (seconds on this backend, `latency`; 0 for a no-op)}. Layers of
    one spec are timed once (their cost does not depend on the weights' values, MoE routing imbalance
    aside)."""
    _check_candidates(parent, candidates)
    _check_positive(batch=batch, seq_len=seq_len)
    _check_choice("gpu", gpu, GPUS)
    hidden, ssm_dtype = parent.cfg.hidden_size, jnp.dtype(parent.cfg.ssm_cache_dtype)
    rows = {f"{i}:parent": (i, spec, parent.layers[i]) for i, spec in enumerate(parent.cfg.layers)}
    rows = {k: v for k, v in rows.items() if k not in candidates} | dict(candidates)
    kw = dict(batch=batch, seq_len=seq_len, dtype=dtype, ssm_dtype=ssm_dtype)
    timed: dict = {}
    out = {}
    for key, (layer, spec, module) in tqdm(rows.items(), desc="candidate costs", disable=not progress):
        row = {"params": params(spec, hidden), "memory": memory(spec, hidden, **kw),
               "experts": spec.num_experts if isinstance(spec, MoESpec) else 0}
        for phase in PHASES:
            row[f"{phase}_roofline"] = roofline(spec, hidden, gpu=gpu, phase=phase, **kw)
        if measure:
            if spec not in timed:  # a no-op runs no code: timing it would time the loop around it
                timed[spec] = (dict.fromkeys(PHASES, 0.0) if isinstance(spec, NoOpSpec)
                               else latency(candidate_block(parent, layer, spec, module), hidden, repeats=repeats,
                                            **kw))
            row |= {f"{phase}_latency": timed[spec][phase] for phase in PHASES}
        out[key] = row
    return out


def model_latency(models: dict, tokens, *, new: int, rounds: int = 3) -> dict:
    """Per model: median seconds of a prefill of the prompts `tokens` (int [batch, prompt]; `generate` of
    one token) and of one decode step ((generate of 1 + new tokens - generate of 1) / new), through
    `nemojax.generate`, which compiles prefill and its lax.scan decode loop into one program, as a server
    would run them. Give distinct prompts (held-out text): identical rows route every row of an MoE layer
    to the same experts, which a batch of real requests does not. Each model is timed once per round,
    rounds interleaved so that the machine's drift falls on all alike; also the spread (max / min over
    rounds) and every round's times ("prefill_rounds", "decode_rounds"). A decode step is a difference
    of two timings: take `new` large enough that the decode steps, not the prefill's noise, make up most
    of the longer run."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or not tokens.size:
        raise ValueError(f"tokens: int [batch, prompt] prompts; got shape {tokens.shape}")
    _check_positive(new=new, rounds=rounds)

    def timed(model, n):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(model, tokens, max_new_tokens=n))
        return time.perf_counter() - t0

    times = {name: {"prefill": [], "decode": []} for name in models}
    for r in range(rounds + 1):  # round 0 compiles
        for name, model in models.items():
            one, many = timed(model, 1), timed(model, 1 + new)
            if r:
                times[name]["prefill"].append(one)
                times[name]["decode"].append((many - one) / new)
    return {name: {phase: statistics.median(v) for phase, v in t.items()}
            | {f"{phase}_spread": max(v) / min(v) for phase, v in t.items()}
            | {f"{phase}_rounds": v for phase, v in t.items()} for name, t in times.items()}
