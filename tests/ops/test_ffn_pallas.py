"""Fused relu^2 FFN kernels (interpret mode on the CPU) against `relu2_ffn` and a float64 NumPy
formula, forward and gradients, with and without biases; the `ffn` dispatch; a lowering of the
kernels to Triton IR for CUDA; and a smoke run of the kernel benchmark.

T, D and F are not multiples of their blocks (16, 32, 32; the D contraction in 16s), so every grid
has several blocks and every edge is masked."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.ffn import IMPLEMENTATIONS, FfnConfig, default_implementation, ffn, fused_relu2_ffn, relu2_ffn
from testutils import rel_l2

ROOT = Path(__file__).resolve().parents[2]
T, D, F = 40, 48, 80
BLOCKS = FfnConfig(block_t=16, block_f=32, block_d=32, block_k=16)
GRAD_NAMES = ("dx", "dw_up", "dw_down", "db_up", "db_down")


def inputs(dtype, seed=0, biases=True):
    """(x, w_up, w_down[, b_up, b_down]) and a cotangent dy."""
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (T, D), jnp.float32).astype(dtype)
    w_up = (jax.random.normal(k[1], (D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    w_down = (jax.random.normal(k[2], (F, D), jnp.float32) / np.sqrt(F)).astype(dtype)
    dy = jax.random.normal(k[3], (T, D), jnp.float32).astype(dtype)
    # biases of the size of the pre-activations: they move about half the units across 0
    b_up, b_down = (jax.random.normal(kk, (n,), jnp.float32).astype(dtype) for kk, n in ((k[4], F), (k[5], D)))
    return ((x, w_up, w_down, b_up, b_down) if biases else (x, w_up, w_down)), dy


def np_ffn_and_grads(dy, x, w_up, w_down, b_up=None, b_down=None):
    """y = relu(x Wu + bu)^2 Wd + bd; dh = 2 relu(h) (dy Wd^T); dx = dh Wu^T; dWu = x^T dh;
    dWd = a^T dy; dbu = sum_t dh; dbd = sum_t dy. Gradients in argument order, biases if given."""
    x, w_up, w_down, dy = (np.asarray(a, np.float64) for a in (x, w_up, w_down, dy))
    h = x @ w_up + (0 if b_up is None else np.asarray(b_up, np.float64))
    a = np.maximum(h, 0) ** 2
    dh = 2 * np.maximum(h, 0) * (dy @ w_down.T)
    y = a @ w_down + (0 if b_down is None else np.asarray(b_down, np.float64))
    grads = (dh @ w_up.T, x.T @ dh, a.T @ dy) + (() if b_up is None else (dh.sum(0), dy.sum(0)))
    return y, grads


@jax.jit
def pallas_fwd(*args):
    return fused_relu2_ffn(*args, config=BLOCKS)


def vjp_of(fn):
    @jax.jit
    def grads(dy, *args):
        return jax.vjp(fn, *args)[1](dy)
    return grads


pallas_grads = vjp_of(lambda *a: fused_relu2_ffn(*a, config=BLOCKS))
reference_grads = vjp_of(relu2_ffn)


@pytest.mark.parametrize("biases", [False, True])
def test_forward_and_gradients_fp32(biases):
    args, dy = inputs(jnp.float32, biases=biases)
    y_np, grads_np = np_ffn_and_grads(dy, *args)
    y = pallas_fwd(*args)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(relu2_ffn(*args)), rtol=1e-5, atol=1e-5)
    for name, g, g_ref, g_np in zip(GRAD_NAMES, pallas_grads(dy, *args), reference_grads(dy, *args), grads_np,
                                    strict=False):
        np.testing.assert_allclose(np.asarray(g), g_np, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5, err_msg=name)
    assert len(pallas_grads(dy, *args)) == len(grads_np) == len(args)


@pytest.mark.parametrize("biases", [False, True])
def test_bf16_against_fp32_oracles(biases):
    args, dy = inputs(jnp.bfloat16, seed=1, biases=biases)
    y_np, grads_np = np_ffn_and_grads(dy, *args)  # float64 on the same bf16-rounded inputs
    y = pallas_fwd(*args)
    assert y.dtype == jnp.bfloat16
    # Rounding points, each at most 2^-9 relative: the activation a (bf16 before the down
    # projection, as in relu2_ffn) and the output; for gradients also dh (bf16 operand of two dots)
    # and the bf16 result. 2^-7 bounds the sum of three such errors; rms errors are far smaller.
    assert rel_l2(y, y_np) < 2 ** -7
    # the reference rounds at the same points, only the fp32 summation order differs
    assert rel_l2(y, relu2_ffn(*args)) < 2 ** -8
    grads = pallas_grads(dy, *args)
    assert len(grads) == len(grads_np) == len(args)
    for name, g, g_ref, g_np in zip(GRAD_NAMES, grads, reference_grads(dy, *args), grads_np, strict=False):
        assert g.dtype == jnp.bfloat16, name
        assert rel_l2(g, g_np) < 2 ** -7, name
        assert rel_l2(g, g_ref) < 2 ** -7, name


def test_dispatch_leading_dims_biases_and_errors():
    """`ffn(implementation="pallas")` runs the kernel, biases included (it used to fall back to
    the XLA path when given biases): its gradients are the kernel's, compared with NumPy."""
    (x, w_up, w_down, b_up, b_down), dy = inputs(jnp.float32, seed=2)
    xb = x.reshape(2, 20, D)
    y = ffn(xb, w_up, w_down, implementation="pallas")
    assert y.shape == xb.shape
    np.testing.assert_allclose(np.asarray(y).reshape(T, D), np_ffn_and_grads(dy, x, w_up, w_down)[0],
                               rtol=1e-5, atol=1e-5)
    assert IMPLEMENTATIONS == ("xla", "pallas") and default_implementation() in IMPLEMENTATIONS
    np.testing.assert_allclose(np.asarray(ffn(xb, w_up, w_down)), np.asarray(y), rtol=1e-5, atol=1e-5)
    biased = (xb, w_up, w_down, b_up, b_down)
    y_np, grads_np = np_ffn_and_grads(dy, x, w_up, w_down, b_up, b_down)
    y, vjp = jax.vjp(lambda *a: ffn(*a, implementation="pallas"), *biased)
    np.testing.assert_allclose(np.asarray(y).reshape(T, D), y_np, rtol=1e-5, atol=1e-5)
    # compiled on an H200 the default tiles' fp32 sums put one of 3840 entries 1.2e-5 off: a wider atol
    # there only; interpreted on the CPU the 1e-5 of the other fp32 checks holds
    atol = 3e-5 if jax.default_backend() == "gpu" else 1e-5
    for name, g, g_np in zip(GRAD_NAMES, vjp(dy.reshape(xb.shape)), grads_np, strict=True):
        np.testing.assert_allclose(np.asarray(g).reshape(g_np.shape), g_np, rtol=1e-5, atol=atol, err_msg=name)
    # the kernel ran: its custom_vjp calls the Pallas backward kernels, which the XLA path has none of
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: ffn(*a, implementation="pallas").sum(), argnums=3))(*biased))
    assert "relu2_ffn_dw" in jaxpr and "relu2_ffn_fwd" in jaxpr
    with pytest.raises(ValueError, match=r"implementation must be None or one of \('xla', 'pallas'\); got 'triton'"):
        ffn(x, w_up, w_down, implementation="triton")
    with pytest.raises(ValueError, match="w_down"):
        ffn(x, w_up, w_down[:, :-1])
    with pytest.raises(ValueError, match="b_up"):
        ffn(x, w_up, w_down, b_up=b_up[:-1])
    with pytest.raises(ValueError, match="b_down"):
        fused_relu2_ffn(x, w_up, w_down, b_down=b_down[:-1])
    with pytest.raises(ValueError, match="block_f must be a power of 2 >= 16"):
        FfnConfig(block_f=48)
    with pytest.raises(ValueError, match="num_warps must be an int >= 1"):
        FfnConfig(num_warps=0)


def test_kernels_lower_to_triton_for_cuda(triton_modules):
    """Forward, dx and dW kernels (with biases: dW then also writes db_up) at the default blocks
    and bf16, lowered (not run) for an H100; each Triton module passes MLIR's verifier (the fixture)."""
    sds = jax.ShapeDtypeStruct
    fn = lambda *a: jnp.sum(fused_relu2_ffn(*a, config=FfnConfig(interpret=False)).astype(jnp.float32))
    text = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4))).trace(
        sds((200, 256), jnp.bfloat16), sds((256, 672), jnp.bfloat16), sds((672, 256), jnp.bfloat16),
        sds((672,), jnp.bfloat16), sds((256,), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "gpu$xla.gpu.triton" in line]
    assert len(kernels) == 3
    for name in ("relu2_ffn_fwd", "relu2_ffn_dx", "relu2_ffn_dw"):
        assert any(f'name = "{name}"' in line for line in kernels), name
    assert len(triton_modules) == 3


def test_kernel_benchmark_quick_smoke(tmp_path):
    """kernels.py --quick for this file's kernels and gmm (the Pallas SSD's interpret-mode compile
    alone takes longer than this smoke test may; the SSD kernel has its own tests). It runs whatever
    the machine's load (~15 s at load 8 on 2 cores); the timeout only catches a hang."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/kernels.py"), "--quick",
                           "--only", "gmm,ffn", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("INTERPRET mode" in proc.stdout) == (jax.default_backend() != "gpu")
    cases = json.loads(out.read_text())["cases"]
    assert {(c["op"], c["mode"]) for c in cases} == {(op, mode) for op in ("gmm_up", "ffn")
                                                     for mode in ("fwd", "fwd+bwd")}
    for c in cases:  # the benchmark's own check of kernel against baseline, bf16 inputs
        assert max(c.get("rel_err_vs_xla", c.get("rel_err_vs_ragged_dot")).values()) < 1e-2
