"""The Pallas SSD kernels (interpret mode on the CPU) against the sequential recurrence, forward
and gradients; their Triton lowering (exported for a GPU from this CPU machine)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops import ssd
from nemojax.ops.ssd import SsdConfig, pallas_ssd, reference

# Small power-of-two blocks so every grid has several p-, n- and p*n-blocks. Compiled on a GPU the
# tiles must be >= 16 (Triton's dot; p and n are zero-padded up to 16 there): the defaults.
BLOCKS = SsdConfig(block_p=4, block_n=8, block_pn=32) if jax.default_backend() != "gpu" else SsdConfig()
CHUNK = 16
ARGNAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")

# l = 37 with chunk 16 (chunk edges at 16 and 32, tail padded): boundaries mid-chunk (5, 17, 20),
# on a chunk edge (16, 32), a length-1 sequence (at 16), a row that ends on a length-1 sequence,
# and ids that do not start at 0.
SEQ_37 = {
    "mid_and_edges": np.array([[0] * 5 + [1] * 11 + [2] + [3] * 3 + [4] * 17,
                               [7] * 16 + [9] * 16 + [11] * 5]),
    "last_is_one_token": np.array([[0] * 36 + [1],
                                   [0] * 32 + [1] * 4 + [2]]),
}


def make(b=2, l=37, h=4, g=2, p=8, n=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 9)
    return dict(
        x=jax.random.normal(k[0], (b, l, h, p)),
        dt=jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 1.0),
        A=-jnp.exp(jax.random.normal(k[2], (h,))),
        B=jax.random.normal(k[3], (b, l, g, n)),
        C=jax.random.normal(k[4], (b, l, g, n)),
        D=jax.random.normal(k[5], (h,)),
        initial_state=jax.random.normal(k[6], (b, h, p, n)),
    ), (jax.random.normal(k[7], (b, l, h, p)), jax.random.normal(k[8], (b, h, p, n)))


def loss_and_outputs(fn, weights, args, seq_idx):
    """A random linear loss of (y, final_state): its gradient sends random cotangents to both."""
    y, final = fn(*args, seq_idx=seq_idx)
    return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(final * weights[1]), (y, final)


def _pallas(x, dt, A, B, C, D, initial_state, seq_idx):
    return pallas_ssd.ssd_pallas(x, dt, A, B, C, CHUNK, D, initial_state, seq_idx, config=BLOCKS)


def _sequential(x, dt, A, B, C, D, initial_state, seq_idx):
    return reference.ssd_sequential(x, dt, A, B, C, D, initial_state, seq_idx)


@functools.cache
def grad_fn(impl, use_d, use_s0):
    """jit(value_and_grad) over all seven inputs; D / initial_state = None when switched off."""
    fn = {"pallas": _pallas, "sequential": _sequential}[impl]

    def f(args, weights, seq_idx):
        args = dict(args, D=args["D"] if use_d else None, initial_state=args["initial_state"] if use_s0 else None)
        return loss_and_outputs(fn, weights, [args[k] for k in ARGNAMES], seq_idx)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def check(args, weights, seq_idx, use_d, use_s0, tol_y, tol_grad, ref_args=None):
    (_, (y, final)), grads = grad_fn("pallas", use_d, use_s0)(args, weights, seq_idx)
    (_, (y_ref, final_ref)), grads_ref = grad_fn("sequential", use_d, use_s0)(ref_args or args, weights, seq_idx)
    assert y.dtype == args["x"].dtype and final.dtype == jnp.float32
    assert rel(y, y_ref) < tol_y and rel(final, final_ref) < tol_y
    used = [k for k in ARGNAMES if (k != "D" or use_d) and (k != "initial_state" or use_s0)]
    for k in used:
        assert grads[k].dtype == args[k].dtype, k
        assert rel(grads[k], grads_ref[k]) < tol_grad, (k, rel(grads[k], grads_ref[k]))
    return y, final


@pytest.mark.parametrize("pattern", sorted(SEQ_37))
def test_packed_fp32_matches_sequential_and_chunked(pattern):
    args, weights = make()
    seq_idx = jnp.asarray(SEQ_37[pattern])
    y, final = check(args, weights, seq_idx, True, True, 1e-5, 1e-5)
    y_chunked, final_chunked = jax.jit(reference.ssd_chunked, static_argnums=5)(
        *[args[k] for k in ARGNAMES[:5]], CHUNK, args["D"], args["initial_state"], seq_idx)
    assert rel(y, y_chunked) < 1e-5 and rel(final, final_chunked) < 1e-5


def test_fp32_no_options_odd_shapes():
    """l a multiple of the chunk, no D / initial_state / seq_idx; p = 6 and n = 12 are zero-padded
    to powers of two and r = h / g = 3 heads per group (a non-power-of-two head block)."""
    args, weights = make(l=32, h=6, g=2, p=6, n=12, seed=1)
    check(args, weights, None, False, False, 1e-5, 1e-5)


def test_bf16_tracks_fp32_reference():
    """bf16 x, B, C (dt, A, D, initial_state fp32). The reference runs in fp32 on the same
    bf16-rounded values, so the difference is the kernels' bf16 roundings: y stored in bf16
    (2^-9 relative) and bf16 dot operands (decay-weighted CB, x * weights, states: 2^-9 each)
    accumulated in fp32 over a chunk, i.e. a few 2^-9 of max|y|; 1.5e-2 is 3x
    the observed <= 5e-3. The same holds for gradients (dx, dB, dC come back in bf16)."""
    args, weights = make(l=70, seed=2)
    bf = {k: v.astype(jnp.bfloat16) if k in ("x", "B", "C") else v for k, v in args.items()}
    ref = {k: v.astype(jnp.float32) for k, v in bf.items()}
    seq_idx = jnp.asarray(np.array([[0] * 20 + [1] * 50, [0] * 48 + [1] * 22]))
    check(bf, weights, seq_idx, True, True, 1.5e-2, 1.5e-2, ref_args=ref)


def test_gradients_match_central_differences():
    """Directional derivatives of the Pallas path's own loss (fp32 central differences, in
    directions scaled to each input) against its custom_vjp; reuses the compiled value_and_grad.
    The loss is ~64, so fp32 rounding puts ~1e-3 of noise on a difference quotient at eps = 3e-2
    (observed <= 2e-3, truncation on A ~2e-4 relative): a 0.5% check. The tight gradient checks are
    the 1e-5 match with the sequential oracle above and the float64 finite differences in
    test_ssd.py, which cover every implementation."""
    args, weights = make()
    seq_idx = jnp.asarray(SEQ_37["mid_and_edges"])
    f = grad_fn("pallas", True, True)
    (_, _), grads = f(args, weights, seq_idx)
    rng = np.random.default_rng(0)
    eps = 3e-2
    for k in ARGNAMES:
        direction = rng.standard_normal(args[k].shape).astype(np.float32) * 0.1 * np.abs(np.asarray(args[k])).mean()
        (plus, _), _ = f(dict(args, **{k: args[k] + eps * direction}), weights, seq_idx)
        (minus, _), _ = f(dict(args, **{k: args[k] - eps * direction}), weights, seq_idx)
        fd = (float(plus) - float(minus)) / (2 * eps)
        analytic = float(jnp.sum(grads[k] * direction))
        assert abs(analytic - fd) <= 5e-3 * max(1.0, abs(fd)), (k, analytic, fd)


def test_public_api():
    args, _ = make(l=37)
    seq_idx = jnp.asarray(SEQ_37["mid_and_edges"])
    pos = [args[k] for k in ARGNAMES[:5]]
    y, final = ssd.ssd(*pos, chunk_size=CHUNK, D=args["D"], initial_state=args["initial_state"],
                       implementation="pallas", seq_idx=seq_idx)
    y_ref, final_ref = ssd.ssd(*pos, D=args["D"], initial_state=args["initial_state"],
                               implementation="sequential", seq_idx=seq_idx)
    assert rel(y, y_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    y_only = ssd.ssd(*pos, chunk_size=CHUNK, D=args["D"], initial_state=args["initial_state"],
                     return_final_state=False, implementation="pallas", seq_idx=seq_idx)
    np.testing.assert_array_equal(y_only, y)


@pytest.mark.parametrize("change,needle", [
    (dict(seq_idx=jnp.zeros((2, 36), jnp.int32)), "seq_idx must be"),
    (dict(seq_idx=jnp.zeros((2, 37), jnp.float32)), "seq_idx must be"),
    (dict(chunk_size=24), "chunk_size must be a power of two"),
    (dict(chunk_size=0), "chunk_size must be > 0"),
])
def test_bad_input_is_named(change, needle):
    args, _ = make()
    kw = {k: args[k] for k in ARGNAMES[:5]} | dict(implementation="pallas", chunk_size=CHUNK) | change
    with pytest.raises(ValueError, match=needle):
        ssd.ssd(**kw)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="block_n must be a power of 2 >= 1; got 12"):
        SsdConfig(block_n=12)
    with pytest.raises(ValueError, match="num_stages must be an int >= 1"):
        SsdConfig(num_stages=0)


def test_gpu_limits_are_checked_when_not_interpreting():
    args, _ = make()
    with pytest.raises(ValueError, match=">= 16"):
        pallas_ssd.ssd_pallas(*[args[k] for k in ARGNAMES[:5]], CHUNK,
                              config=SsdConfig(block_p=4, interpret=False))


# ---- Triton lowering, from the CPU ----------------------------------------------------------------

ADDPTR = re.compile(r"tt\.addptr .* : (?:tensor<[0-9x]+x)?!tt\.ptr<(\w+)>>?, (?:tensor<[0-9x]+x)?(i\d+)")


@pytest.mark.parametrize("b,l,h,g,p,n,chunk,big", [
    # Nemotron-H-like heads at l = 2^22: x, y, dy, dx hold 2^35 elements and B, C 2^32 bf16
    # (8 GiB), so their pointer offsets must be 64-bit.
    (1, 2 ** 22, 128, 8, 64, 128, 128, True),
    # odd sizes: r = 3 heads per group, 5 chunks, p and n padded, l not a multiple of the chunk
    (2, 70, 6, 2, 48, 100, 16, False),
    # head dim and state below Triton's 16-wide dot: zero-padded to 16 on a GPU
    (1, 40, 4, 2, 8, 8, 16, False),
])
def test_kernels_lower_to_triton_with_64bit_offsets(triton_modules, b, l, h, g, p, n, chunk, big):
    """Export forward + backward for a CUDA target (abstract shapes, nothing allocated): every
    kernel passes the Triton lowering's checks (power-of-two tiles, no reverse cumsum, loops),
    and pointers into arrays above 2^32 bytes get int64 offsets."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    shapes = [((b, l, h, p), bf16), ((b, l, h), f32), ((h,), f32), ((b, l, g, n), bf16), ((b, l, g, n), bf16),
              ((h,), f32), ((b, h, p, n), f32), ((b, l), jnp.int32)]

    def f(x, dt, A, B, C, D, s0, seq_idx):
        def loss(*a):
            y, final = pallas_ssd.ssd_pallas(*a[:5], chunk, a[5], a[6], seq_idx,
                                                  config=SsdConfig(interpret=False))
            return jnp.sum(y.astype(f32)) + jnp.sum(final), y
        return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)(x, dt, A, B, C, D, s0)

    jax.export.export(jax.jit(f), platforms=["cuda"],
                      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
                      )(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    names = {re.search(r"tt\.func public @(\w+)", m).group(1) for m in triton_modules}
    assert names == {"ssd_cb", "ssd_chunk_state", "ssd_state_pass", "ssd_chunk_scan", "ssd_state_pass_bwd",
                     "ssd_dcb", "ssd_dbc", "ssd_dx"}, names
    offsets = [ADDPTR.search(line).groups() for m in triton_modules for line in m.splitlines() if "tt.addptr" in line]
    bf16_offsets = {bits for dtype, bits in offsets if dtype == "bf16"}
    assert bf16_offsets == ({"i64"} if big else {"i32"}), bf16_offsets
