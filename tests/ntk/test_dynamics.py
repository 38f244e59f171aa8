import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import ntk



def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (3, 7)), "w2": jax.random.normal(k2, (7,))}


def test_empirical_ntk_equals_explicit_jacobian_gram():
    X = jax.random.normal(jax.random.key(1), (5, 3))
    Z = jax.random.normal(jax.random.key(2), (4, 3))
    jac = lambda A: jnp.concatenate([j.reshape(len(A), -1) for j in jax.tree.leaves(  # noqa: E731
        jax.vmap(jax.grad(mlp), in_axes=(None, 0))(params(), A))], 1)
    np.testing.assert_allclose(ntk.empirical_ntk(mlp, params(), X, Z), jac(X) @ jac(Z).T, rtol=1e-10)


def test_empirical_ntk_of_an_nnx_module():
    class Net(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(3, 7, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(7, 1, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    net = Net()
    X = jax.random.normal(jax.random.key(3), (4, 3))
    w1, b1, w2, b2 = net.a.kernel[...], net.a.bias[...], net.b.kernel[...][:, 0], net.b.bias[...][0]
    f = lambda p, x: jnp.tanh(x @ p[0] + p[1]) @ p[2] + p[3]  # noqa: E731
    np.testing.assert_allclose(ntk.empirical_ntk_nnx(net, X), ntk.empirical_ntk(f, (w1, b1, w2, b2), X), rtol=1e-10)


def test_gd_residuals_match_iterated_gradient_descent():
    A = jax.random.normal(jax.random.key(4), (6, 6))
    K = A @ A.T / 6
    y = jax.random.normal(jax.random.key(5), (6,))
    lr = 1.0 / float(jnp.max(jnp.linalg.eigvalsh(K)))
    lam, coef = ntk.gd_residuals(K, y, lr, [0, 5, 20])
    r, seen = y, {}
    for t in range(21):
        seen[t] = r
        r = r - lr * K @ r
    V = jnp.linalg.eigh(K)[1][:, ::-1]
    for i, t in enumerate([0, 5, 20]):
        np.testing.assert_allclose(jnp.abs(coef[i]), jnp.abs(V.T @ seen[t]), rtol=1e-8, atol=1e-12)
    steps = ntk.iterations_to_fit(lam[-1], lr, tol=0.5)
    assert float((1 - lr * lam[-1]) ** steps) == pytest.approx(0.5)


def test_preconditioner_flattens_the_top_of_the_spectrum():
    A = jax.random.normal(jax.random.key(6), (8, 8))
    K = A @ A.T
    lam = np.sort(np.linalg.eigvalsh(np.asarray(K)))[::-1]
    S = ntk.pgd_preconditioner(K, 3)
    got = np.sort(np.real(np.linalg.eigvals(np.asarray(K @ S))))[::-1]
    np.testing.assert_allclose(got, np.r_[[lam[3]] * 4, lam[4:]], rtol=1e-8)
    np.testing.assert_allclose(ntk.msk(K, lambda v: v), K, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="k must be in"):
        ntk.pgd_preconditioner(K, 8)
