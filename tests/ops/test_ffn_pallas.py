"""Fused relu^2 FFN kernels (interpret mode on the CPU) against `relu2_ffn` and a float64 NumPy
formula, forward and gradients; the `ffn` dispatch; a lowering of the kernels to Triton IR for
CUDA; and a smoke run of the kernel benchmark.

T, D and F are not multiples of their blocks (16, 32, 32; the D contraction in 16s), so every grid
has several blocks and every edge is masked."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.ffn import IMPLEMENTATIONS, ffn, fused_relu2_ffn, relu2_ffn

ROOT = Path(__file__).resolve().parents[2]
T, D, F = 40, 48, 80
BLOCKS = dict(block_t=16, block_f=32, block_d=32, block_k=16)


def inputs(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (T, D), jnp.float32).astype(dtype)
    w_up = (jax.random.normal(k[1], (D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    w_down = (jax.random.normal(k[2], (F, D), jnp.float32) / np.sqrt(F)).astype(dtype)
    dy = jax.random.normal(k[3], (T, D), jnp.float32).astype(dtype)
    return x, w_up, w_down, dy


def np_ffn_and_grads(x, w_up, w_down, dy):
    """y = relu(x Wu)^2 Wd; dh = 2 relu(h) (dy Wd^T); dx = dh Wu^T; dWu = x^T dh; dWd = a^T dy."""
    x, w_up, w_down, dy = (np.asarray(a, np.float64) for a in (x, w_up, w_down, dy))
    h = x @ w_up
    a = np.maximum(h, 0) ** 2
    dh = 2 * np.maximum(h, 0) * (dy @ w_down.T)
    return a @ w_down, (dh @ w_up.T, x.T @ dh, a.T @ dy)


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(a))
    return np.linalg.norm(a - ref) / np.linalg.norm(ref)


@jax.jit
def pallas_fwd(x, w_up, w_down):
    return fused_relu2_ffn(x, w_up, w_down, **BLOCKS)


def vjp_of(fn):
    @jax.jit
    def grads(x, w_up, w_down, dy):
        return jax.vjp(fn, x, w_up, w_down)[1](dy)
    return grads


pallas_grads = vjp_of(lambda x, a, b: fused_relu2_ffn(x, a, b, **BLOCKS))
reference_grads = vjp_of(relu2_ffn)


def test_forward_and_gradients_fp32():
    x, w_up, w_down, dy = inputs(jnp.float32)
    y_np, grads_np = np_ffn_and_grads(x, w_up, w_down, dy)
    y = pallas_fwd(x, w_up, w_down)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(relu2_ffn(x, w_up, w_down)), rtol=1e-5, atol=1e-5)
    for name, g, g_ref, g_np in zip(("dx", "dw_up", "dw_down"), pallas_grads(x, w_up, w_down, dy),
                                    reference_grads(x, w_up, w_down, dy), grads_np):
        np.testing.assert_allclose(np.asarray(g), g_np, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5, err_msg=name)


def test_bf16_against_fp32_oracles():
    x, w_up, w_down, dy = inputs(jnp.bfloat16, seed=1)
    y_np, grads_np = np_ffn_and_grads(x, w_up, w_down, dy)  # float64 on the same bf16-rounded inputs
    y = pallas_fwd(x, w_up, w_down)
    assert y.dtype == jnp.bfloat16
    # Rounding points, each at most 2^-9 relative: the activation a (bf16 before the down
    # projection, as in relu2_ffn) and the output; for gradients also dh (bf16 operand of two dots)
    # and the bf16 result. 2^-7 bounds the sum of three such errors; rms errors are far smaller.
    assert rel_err(y, y_np) < 2 ** -7
    # the reference rounds at the same points, only the fp32 summation order differs
    assert rel_err(y, relu2_ffn(x, w_up, w_down)) < 2 ** -8
    for name, g, g_ref, g_np in zip(("dx", "dw_up", "dw_down"), pallas_grads(x, w_up, w_down, dy),
                                    reference_grads(x, w_up, w_down, dy), grads_np):
        assert g.dtype == jnp.bfloat16, name
        assert rel_err(g, g_np) < 2 ** -7, name
        assert rel_err(g, g_ref) < 2 ** -7, name


def test_dispatch_leading_dims_biases_and_errors():
    x, w_up, w_down, _ = inputs(jnp.float32, seed=2)
    xb = x.reshape(2, 20, D)
    y = ffn(xb, w_up, w_down, implementation="pallas")
    assert y.shape == xb.shape
    np.testing.assert_allclose(np.asarray(y).reshape(T, D), np_ffn_and_grads(x, w_up, w_down, x)[0],
                               rtol=1e-5, atol=1e-5)
    assert IMPLEMENTATIONS == ("xla", "pallas")
    np.testing.assert_allclose(np.asarray(ffn(xb, w_up, w_down)), np.asarray(y), rtol=1e-5, atol=1e-5)
    b_up, b_down = jnp.linspace(-1, 1, F), jnp.linspace(0, 1, D)
    h = np.maximum(np.asarray(x, np.float64) @ np.asarray(w_up) + np.asarray(b_up), 0) ** 2
    biased = h @ np.asarray(w_down) + np.asarray(b_down)
    np.testing.assert_allclose(np.asarray(ffn(x, w_up, w_down, b_up, b_down, implementation="pallas")),
                               biased, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        ffn(x, w_up, w_down, implementation="triton")
    with pytest.raises(ValueError, match="w_down"):
        ffn(x, w_up, w_down[:, :-1])
    with pytest.raises(ValueError, match="b_up"):
        ffn(x, w_up, w_down, b_up=b_up[:-1])
    with pytest.raises(ValueError, match="block_f must be a power of 2 >= 16"):
        fused_relu2_ffn(x, w_up, w_down, block_f=48)


def test_kernels_lower_to_triton_for_cuda():
    """Forward, dx and dW kernels at the default blocks and bf16, lowered (not run) for an H100."""
    sds = jax.ShapeDtypeStruct
    fn = lambda x, a, b: jnp.sum(fused_relu2_ffn(x, a, b, interpret=False).astype(jnp.float32))
    text = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).trace(
        sds((200, 256), jnp.bfloat16), sds((256, 672), jnp.bfloat16), sds((672, 256), jnp.bfloat16)
    ).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "gpu$xla.gpu.triton" in line]
    assert len(kernels) == 3
    for name in ("relu2_ffn_fwd", "relu2_ffn_dx", "relu2_ffn_dw"):
        assert any(f'name = "{name}"' in line for line in kernels), name


def test_kernel_benchmark_quick_smoke(tmp_path):
    """kernels.py --quick for this file's kernels and gmm (the Pallas SSD's interpret-mode compile
    alone takes longer than this smoke test may; the SSD kernel has its own tests)."""
    out = tmp_path / "kernels.json"
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/kernels.py"), "--quick",
                               "--only", "gmm,ffn", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip(f"kernels.py --quick took over {time.monotonic() - t0:.0f} s (machine loaded)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INTERPRET mode" in proc.stdout
    cases = json.loads(out.read_text())["cases"]
    assert {(c["op"], c["mode"]) for c in cases} == {(op, mode) for op in ("gmm_up", "ffn")
                                                     for mode in ("fwd", "fwd+bwd")}
    for c in cases:  # the benchmark's own check of kernel against baseline, bf16 inputs
        assert max(c.get("rel_err_vs_xla", c.get("rel_err_vs_ragged_dot")).values()) < 1e-2
