"""Which layers depend on which: FFN Fusion's dependency matrix, its heatmap, and the residual statistics
that explain where fusion is harmless.

Layer j's residual contribution is h_j(x) = f_j(x) - x, with f_j the whole block (pre-norm and residual
included). `dependency_matrix` measures, for i < j, how much h_j turns when layer i is removed (replaced
by the identity) and everything after it recomputed; a low M[i, j] says layer j barely reads what layer
i writes, so the two could read the same input (fused or run in parallel) at little cost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from nemojax.compress.puzzle.score import _stream_input
from nemojax.train.losses import cosine_distance

# optax's cosine epsilon is a floor on the squared norm: a contribution of norm below 1e-4 is divided by
# 1e-4 instead, so a (near) zero contribution has cosine ~0 against anything rather than 0/0.
COS_EPS = 1e-8
STATS = ("cos_dist_x_fx", "rel_norm", "cos_h_x")


# ------------------------------------------------------------------------------------------ checks
def _check_inputs(batches) -> list[np.ndarray]:
    """Token arrays from `batches`: int arrays [B, S], Puzzle's {"inputs", "targets"} dicts or (inputs,
    targets) pairs; only the inputs are read (every position counts)."""
    if isinstance(batches, (np.ndarray, jax.Array)):
        raise ValueError("batches must be an iterable of token arrays [batch, length], not one array; "
                         "wrap a single batch in a list")
    out = []
    for k, b in enumerate(batches):
        if isinstance(b, dict):
            if "inputs" not in b:
                raise ValueError(f"batches[{k}]: a dict batch needs 'inputs'; got keys {sorted(b)}")
            b = b["inputs"]
        elif isinstance(b, tuple):
            if len(b) != 2:
                raise ValueError(f"batches[{k}]: a tuple batch must be (inputs, targets); got {len(b)} items")
            b = b[0]
        a = np.asarray(b)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) or a.size == 0:
            raise ValueError(f"batches[{k}] must be a non-empty int array of tokens [batch, length]; got "
                             f"{a.dtype} {a.shape}")
        out.append(a.astype(np.int32))
    if not out:
        raise ValueError("batches must hold at least one batch of tokens")
    return out


def _check_range(layers, n: int) -> tuple[int, int]:
    if layers is None:
        return 0, n
    ok = (isinstance(layers, (tuple, list)) and len(layers) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in layers))
    if not ok or not 0 <= layers[0] < layers[1] <= n:
        raise ValueError(f"layers must be None or a (start, stop) pair of ints with 0 <= start < stop <= {n}; "
                         f"got {layers!r}")
    return int(layers[0]), int(layers[1])


def _noops(model) -> np.ndarray:
    return np.array([spec.kind == "noop" for spec in model.cfg.layers])


# ------------------------------------------------------------------------------------ dependency
def _contributions(model, inputs, keep, measured):
    """The contributions h_j = f_j(x_j) - x_j (fp32, [J, B, S, D]) of the layers j in `measured` (static
    indices), with layer k applied where keep[k] and replaced by the identity elsewhere."""
    x = _stream_input(model, inputs)
    out = []
    for k, block in enumerate(model.layers):
        y = block(x, None, 0, model.dtype)[0]
        if k in measured:
            out.append(y.astype(jnp.float32) - x.astype(jnp.float32))
        x = jnp.where(keep[k], y, x)
    return jnp.stack(out)


# Static graphdef and measured layers, traced keep mask: one executable serves every removed layer.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _reference(graphdef, state, inputs, keep, measured):
    return _contributions(nnx.merge(graphdef, state), inputs, keep, measured)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _distances(graphdef, state, inputs, keep, measured, ref):
    """Per measured layer, the mean over tokens of 1 - cos(h_j with `keep`, h_j of the intact model)."""
    h = _contributions(nnx.merge(graphdef, state), inputs, keep, measured)
    return jax.vmap(lambda a, b: cosine_distance(a, b, eps=COS_EPS))(h, ref)


def dependency_matrix(model, batches, *, layers=None, progress: bool = True) -> np.ndarray:
    """FFN Fusion's dependency matrix [L, L] (float64): for i < j, M[i, j] is the mean over every token of
    `batches` of the cosine distance 1 - cos(h_j, h_j^{-i}) between layer j's residual contribution
    h_j = f_j(x) - x in the intact model and in the model with layer i removed (the identity), the whole
    model rerun so that layer j's input lacks layer i's contribution and whatever followed from it.

    batches: an iterable of int token arrays [B, S] (or Puzzle's {"inputs", "targets"} dicts, or (inputs,
    targets) pairs, of which only the inputs are read). layers: a (start, stop) range of layers to measure
    (both i and j inside it); None for all. NaN where M is undefined: i >= j, layer i or j a no-op, or
    either outside `layers`. Cosines use a norm floor of 1e-4 (`COS_EPS` on the squared norm), so a token
    whose contribution is ~0 counts as distance ~1, not 0/0.

    Cost: per batch, one intact forward plus one per removed layer, the removed-layer runs all through one
    compiled function (a traced mask of the layers kept); the intact contributions of the measured layers
    stay on the device meanwhile (fp32, [layers, B, S, D]), which bounds the batch size.
    """
    data = _check_inputs(batches)
    n = len(model.layers)
    start, stop = _check_range(layers, n)
    noop = _noops(model)
    measured = tuple(j for j in range(start, stop) if not noop[j])
    removed = [i for i in measured if i < measured[-1]] if measured else []
    M = np.full((n, n), np.nan)
    if not removed:
        return M
    graphdef, state = nnx.split(model)
    sums = np.zeros((n, len(measured)))
    tokens = 0
    with tqdm(total=len(data) * len(removed), desc="dependency matrix", disable=not progress) as bar:
        for inputs in data:
            inputs = jnp.asarray(inputs)
            ref = _reference(graphdef, state, inputs, jnp.ones(n, bool), measured)
            for i in removed:
                d = _distances(graphdef, state, inputs, jnp.arange(n) != i, measured, ref)
                sums[i] += np.asarray(d, np.float64) * inputs.size
                bar.update()
            tokens += inputs.size
    for i in removed:
        for col, j in enumerate(measured):
            if j > i:
                M[i, j] = sums[i, col] / tokens
    return M


def plot_dependency(M, path=None, *, pattern: str | None = None, title: str | None = None,
                    floor: float = 1e-4):
    """Heatmap of a dependency matrix on a log colour scale (values below `floor` drawn at `floor`, so
    exact zeros show; NaN cells blank): rows the removed layer i, columns the affected layer j, each
    labelled with its index and, given `pattern` (`cfg.pattern`), its layer symbol. Returns the
    matplotlib Figure and writes it as PNG to `path` when given."""
    # a Figure without pyplot: no backend switch under the caller (a notebook's inline plots keep working)
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    M = np.asarray(M, np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"M must be a square [L, L] matrix; got shape {M.shape}")
    n = M.shape[0]
    if pattern is not None and (not isinstance(pattern, str) or len(pattern) != n):
        raise ValueError(f"pattern must be None or a string of {n} layer symbols (cfg.pattern); got {pattern!r}")
    if not (isinstance(floor, (int, float)) and np.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a finite float > 0; got {floor!r}")
    shown = np.ma.masked_invalid(np.maximum(M, floor))
    top = float(shown.max()) if shown.count() else floor
    fig = Figure(figsize=(1.6 + 0.28 * n, 1.0 + 0.26 * n))
    ax = fig.subplots()
    image = ax.imshow(shown, cmap=colormaps["viridis"].with_extremes(bad="white"),
                      norm=LogNorm(vmin=floor, vmax=max(top, 10 * floor)), interpolation="nearest")
    labels = [f"{k}{'' if pattern is None else ' ' + pattern[k]}" for k in range(n)]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set(xlabel="layer j", ylabel="removed layer i", title=title or "dependency M[i, j]")
    fig.colorbar(image, ax=ax, label="1 - cos(h_j, h_j without i)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ------------------------------------------------------------------------------------ statistics
@nnx.jit
def _stat_means(model, inputs):
    """[L, 3] means over tokens of (1 - cos(x, f(x)), |h| / |x|, cos(h, x)) per layer, h = f(x) - x."""
    states = model.layer_states(inputs)
    rows = []
    for x, fx in zip(states[:-1], states[1:]):
        x, fx = x.astype(jnp.float32), fx.astype(jnp.float32)
        h = fx - x
        norm_x = jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1), COS_EPS))
        rows.append(jnp.stack([
            jnp.mean(optax.losses.cosine_distance(fx, x, epsilon=COS_EPS)),
            jnp.mean(jnp.linalg.norm(h, axis=-1) / norm_x),
            jnp.mean(optax.losses.cosine_similarity(h, x, epsilon=COS_EPS)),
        ]))
    return jnp.stack(rows)


def residual_stats(model, batches) -> dict[str, np.ndarray]:
    """FFN Fusion's explanatory statistics per layer (arrays of length L, means over every token of
    `batches`, accepted as by `dependency_matrix`), with x the residual stream entering the layer, f(x)
    the stream after it and h = f(x) - x: "cos_dist_x_fx" = 1 - cos(x, f(x)), "rel_norm" = |h| / |x|
    (the layer's alpha in the NTK alpha-order law) and "cos_h_x" = cos(h, x). NaN for no-op layers.
    Norms have the floor of `dependency_matrix`."""
    data = _check_inputs(batches)
    sums, tokens = 0.0, 0
    for inputs in data:
        sums = sums + np.asarray(_stat_means(model, jnp.asarray(inputs)), np.float64) * inputs.size
        tokens += inputs.size
    means = sums / tokens
    means[_noops(model)] = np.nan
    return {name: means[:, k] for k, name in enumerate(STATS)}
