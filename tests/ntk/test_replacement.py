import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import ntk



def test_residual_ntk_is_zonal_on_the_sphere():
    x = np.random.default_rng(0).standard_normal((6, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    K = ntk.resnet_ntk(jnp.asarray(x), depth=3, alpha=0.6, replace={1: "linear"})
    np.testing.assert_allclose(K, ntk.resnet_ntk_dot(jnp.asarray(x @ x.T), depth=3, alpha=0.6, replace={1: "linear"}),
                               rtol=1e-8)  # sqrt(1 - t^2) amplifies rounding near t = 1


def test_spectra_obey_the_sum_rule_and_removal_lowers_every_eigenvalue():
    rows = ntk.replacement_effects(depth=3, alpha=0.5, d=3, kmax=6, n_quad=3000)
    assert {(r["block"], r["op"]) for r in rows} == {(0, "remove"), (0, "linear"), (0, "fuse"), (1, "remove"),
                                                     (1, "linear"), (1, "fuse"), (2, "remove"), (2, "linear")}
    full = ntk.zonal_spectrum(lambda t: np.asarray(ntk.resnet_ntk_dot(jnp.asarray(t), depth=3, alpha=0.5)), 3, 400,
                              n_quad=20000)
    total = np.sum(full * [ntk.multiplicity(3, k) for k in range(401)])
    assert total == pytest.approx(float(ntk.resnet_ntk_dot(jnp.asarray(1.0), depth=3, alpha=0.5)), rel=5e-3)
    # removing a block removes positive-definite terms from the kernel: every mu_k drops
    for r in rows:
        if r["op"] == "remove":
            assert np.all(r["spectrum_change"] < 0) and r["kernel_change"] > 0
