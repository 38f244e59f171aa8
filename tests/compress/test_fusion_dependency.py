"""The dependency matrix against a model built so that some layers cannot see others (zero there) and
against brute force: the model actually rebuilt with a layer replaced by a no-op, its layers' residual
contributions and their cosines computed in float64 NumPy. The residual statistics against NumPy on
`layer_states`."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.colors import LogNorm

import nemojax as nj
from nemojax.compress.fusion import dependency_matrix, plot_dependency, residual_stats
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, NoOpSpec, from_pattern

VOCAB = 64


def tokens(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, s) for s in shapes]


@pytest.fixture(scope="module")
def hybrid():
    """Mamba, MLP, no-op, attention, MLP; init_std large enough that every layer moves the stream."""
    cfg = from_pattern("M-.*-", vocab_size=VOCAB, hidden_size=32, init_std=0.3, mlp=MLPSpec(64),
                       mamba=MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=8, chunk_size=8),
                       attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16))
    return nj.HybridLM(cfg, rngs=nnx.Rngs(0))


def states64(model, inputs):
    return [np.asarray(s, np.float64) for s in model.layer_states(jnp.asarray(inputs))]


def cos64(a, b):
    with np.errstate(invalid="ignore"):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def brute_force(model, batches):
    """M from L + 1 separately built models: per token, 1 - cos of h_j = x_{j+1} - x_j in the intact
    model and in the model with layer i a no-op; mean over every token of every batch."""
    n = len(model.layers)
    noop = [s.kind == "noop" for s in model.cfg.layers]
    ref = [states64(model, b) for b in batches]
    M = np.full((n, n), np.nan)
    for i in range(n):
        if noop[i]:
            continue
        removed = model.replace_layers({i: (NoOpSpec(), None)})
        got = [states64(removed, b) for b in batches]
        for j in range(i + 1, n):
            if not noop[j]:
                d = [1 - cos64(r[j + 1] - r[j], g[j + 1] - g[j]).ravel() for r, g in zip(ref, got)]
                M[i, j] = np.concatenate(d).mean()
    return M


def test_matrix_equals_brute_force(hybrid):
    batches = tokens((2, 8), (2, 8))
    M = dependency_matrix(hybrid, batches, progress=False)
    ref = brute_force(hybrid, batches)
    np.testing.assert_array_equal(np.isnan(M), np.isnan(ref))
    assert np.isnan(M[2]).all() and np.isnan(M[:, 2]).all()  # the no-op layer
    np.testing.assert_allclose(M, ref, rtol=1e-4, atol=1e-6)
    assert np.nanmin(ref) > 1e-4  # a random model: every defined entry depends


def test_batch_forms_token_weighting_and_range(hybrid):
    inputs, small = tokens((2, 8), (1, 8))
    targets = np.zeros_like(inputs)
    M = dependency_matrix(hybrid, [inputs], progress=False)
    for form in ({"inputs": inputs, "targets": targets}, (inputs, targets)):
        np.testing.assert_array_equal(dependency_matrix(hybrid, [form], progress=False), M)
    both = dependency_matrix(hybrid, [inputs, small], progress=False)  # a mean over tokens, not over batches
    np.testing.assert_allclose(both, (16 * M + 8 * dependency_matrix(hybrid, [small], progress=False)) / 24,
                               rtol=1e-12)
    sub = dependency_matrix(hybrid, iter([inputs]), layers=(1, 4), progress=False)
    inside = np.zeros_like(M, bool)
    inside[1:4, 1:4] = True
    assert np.isnan(sub[~inside]).all()
    np.testing.assert_allclose(sub[inside], M[inside], rtol=1e-5, atol=1e-7)


def test_zero_where_a_layer_cannot_see_another():
    """relu^2 MLPs without bias are positively homogeneous (degree 2), so the pre-norm's per-token scale does
    not turn their output. Layer 0 writes only into the coordinates S; layer 1 reads none of S and writes
    only into S; layer 2 reads none of S. Removing layer 0 or 1 then changes only S and the scale of what
    layers 1 and 2 read: M[0, 1] = M[0, 2] = M[1, 2] = 0. Layer 3 reads everything: positive."""
    cfg = from_pattern("----", vocab_size=VOCAB, hidden_size=16, init_std=0.3, mlp=MLPSpec(32))
    model = nj.HybridLM(cfg, rngs=nnx.Rngs(1))
    S, rest = slice(0, 8), slice(8, 16)
    for k in (0, 1):
        model.layers[k].mixer.down_proj.kernel[:, rest] = 0.0
    for k in (1, 2):
        model.layers[k].mixer.up_proj.kernel[S, :] = 0.0
    M = dependency_matrix(model, tokens((2, 8)), progress=False)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert M[i, j] < 1e-6, (i, j, M[i, j])
    for i in range(3):
        assert M[i, 3] > 1e-3, (i, M[i, 3])


def test_residual_stats_equal_numpy(hybrid):
    batches = tokens((2, 8), (1, 8), seed=3)
    got = residual_stats(hybrid, batches)
    per_token = {"cos_dist_x_fx": [], "rel_norm": [], "cos_h_x": []}
    for b in batches:  # the no-op layer's h = 0 makes its cosines 0/0: set to NaN below
        s = states64(hybrid, b)
        per_token["cos_dist_x_fx"].append(np.stack([1 - cos64(x, fx).ravel() for x, fx in zip(s, s[1:])]))
        per_token["rel_norm"].append(np.stack([(np.linalg.norm(fx - x, axis=-1) / np.linalg.norm(x, axis=-1)).ravel()
                                               for x, fx in zip(s, s[1:])]))
        per_token["cos_h_x"].append(np.stack([cos64(fx - x, x).ravel() for x, fx in zip(s, s[1:])]))
    assert set(got) == set(per_token)
    for name, rows in per_token.items():
        ref = np.concatenate(rows, axis=1).mean(axis=1)
        ref[2] = np.nan  # the no-op layer
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-6, err_msg=name)


def test_plot_is_a_log_heatmap_with_blank_nans(hybrid, tmp_path):
    M = np.array([[np.nan, 0.0, 0.5], [np.nan, np.nan, 2e-3], [np.nan] * 3])
    path = tmp_path / "dependency.png"
    fig = plot_dependency(M, path, pattern="M-*", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = fig.axes[0].images[0]
    assert isinstance(image.norm, LogNorm) and image.norm.vmin == 1e-4
    shown = image.get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.isnan(M))
    np.testing.assert_array_equal(shown.compressed(), [1e-4, 0.5, 2e-3])  # the zero drawn at the floor
    assert [t.get_text()[-1] for t in fig.axes[0].get_xticklabels()] == list("M-*")
    with pytest.raises(ValueError, match="pattern must be"):
        plot_dependency(M, pattern="M-")
    with pytest.raises(ValueError, match="square"):
        plot_dependency(M[:2])


@pytest.mark.parametrize("batches, match", [([], "at least one batch"),
                                            ([np.zeros((2, 3))], "int array of tokens"),
                                            ([np.zeros(3, int)], "int array of tokens"),
                                            ([{"targets": np.zeros((1, 2), int)}], "needs 'inputs'"),
                                            (np.zeros((2, 3), int), "not one array")])
def test_bad_batches(hybrid, batches, match):
    with pytest.raises(ValueError, match=match):
        dependency_matrix(hybrid, batches, progress=False)
    with pytest.raises(ValueError, match=match):
        residual_stats(hybrid, batches)


@pytest.mark.parametrize("layers", [(3, 2), (0, 6), (-1, 2), (0,), (0.0, 2)])
def test_bad_layer_range(hybrid, layers):
    with pytest.raises(ValueError, match=r"layers must be None or a \(start, stop\)"):
        dependency_matrix(hybrid, tokens((1, 4)), layers=layers, progress=False)
