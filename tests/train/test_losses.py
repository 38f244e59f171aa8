"""Losses against direct NumPy formulas written position by position."""

import jax
import numpy as np
import pytest

from nemojax.train import losses
from nemojax.train.losses import IGNORE


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, targets):
    lp = np_log_softmax(logits)
    vals = [-lp[b, t, targets[b, t]] for b in range(targets.shape[0]) for t in range(targets.shape[1])
            if targets[b, t] != IGNORE]
    return np.mean(vals), len(vals)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    targets[0, :3] = IGNORE
    targets[2, -1] = IGNORE
    return logits, targets


def test_cross_entropy_ignores_positions(batch):
    logits, targets = batch
    loss, n = losses.cross_entropy(logits, targets)
    ref, n_ref = np_ce(logits, targets)
    assert int(n) == n_ref
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_mtp_loss_matches_shifted_targets(batch):
    logits, targets = batch
    rng = np.random.default_rng(1)
    mtp = [rng.normal(size=logits.shape).astype(np.float32) for _ in range(2)]
    lam = 0.3
    ref = 0.0
    for k, lg in enumerate(mtp, start=1):  # depth k at position t predicts targets[t + k]
        vals = [-np_log_softmax(lg)[b, t, targets[b, t + k]] for b in range(3) for t in range(7 - k)
                if targets[b, t + k] != IGNORE]
        ref += np.mean(vals)
    np.testing.assert_allclose(float(losses.mtp_loss(mtp, targets, lam)), lam / 2 * ref, rtol=1e-5)
    assert float(losses.mtp_loss([], targets, lam)) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_kl(batch, temperature):
    student, _ = batch
    teacher = np.random.default_rng(2).normal(size=student.shape).astype(np.float32)
    mask = np.random.default_rng(3).integers(0, 2, size=student.shape[:2])
    p = np.exp(np_log_softmax(teacher / temperature))
    kl = (p * (np_log_softmax(teacher / temperature) - np_log_softmax(student / temperature))).sum(-1)
    ref = temperature ** 2 * (kl * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(losses.kd_kl(student, teacher, mask, temperature)), ref, rtol=1e-5)
    assert abs(float(losses.kd_kl(teacher, teacher, temperature=temperature))) < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_kl(student, teacher, temperature=0.0)


def test_hidden_state_losses():
    rng = np.random.default_rng(4)
    hs, ht = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    cos = [(1 - hs[b, t] @ ht[b, t] / np.linalg.norm(hs[b, t]) / np.linalg.norm(ht[b, t]))
           for b in range(2) for t in range(5) if mask[b, t]]
    np.testing.assert_allclose(float(losses.cosine_distance(hs, ht, mask)), np.mean(cos), rtol=1e-5)
    num = sum(np.sum((hs[b, t] - ht[b, t]) ** 2) for b in range(2) for t in range(5) if mask[b, t])
    den = sum(np.sum(ht[b, t] ** 2) for b in range(2) for t in range(5) if mask[b, t])
    np.testing.assert_allclose(float(losses.normalized_mse(hs, ht, mask)), num / den, rtol=1e-5)
    np.testing.assert_allclose(float(losses.normalized_mse(np.zeros_like(ht), ht)), 1.0, rtol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_onehot(batch):
    logits, targets = batch
    g = jax.grad(lambda z: losses.cross_entropy(z, targets)[0])(logits)
    p = np.exp(np_log_softmax(logits))
    mask = targets != IGNORE
    onehot = np.eye(11)[np.where(mask, targets, 0)]
    np.testing.assert_allclose(np.asarray(g), (p - onehot) * mask[..., None] / mask.sum(), atol=1e-6)
