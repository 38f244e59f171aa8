"""Parity with transformers' NemotronH through committed golden outputs (no torch needed).
Regenerate with `python tests/fixtures/make_golden.py` (needs the `parity` extra)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import nemojax as nj

FIXTURES = Path(__file__).parent.parent / "fixtures"
NAMES = ["dense_hybrid", "nano_moe", "super_latent"]


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    d = FIXTURES / request.param
    if not (d / "golden.npz").exists():
        pytest.skip(f"fixture {d} missing: run tests/fixtures/make_golden.py")
    return nj.load_pretrained(d, dtype=jnp.float32, progress=False), np.load(d / "golden.npz")


def test_logits_match_transformers(fixture):
    model, gold = fixture
    logits = np.asarray(model(jnp.asarray(gold["tokens"])))
    assert np.abs(gold["logits"]).std() > 0.5  # the fixture is not degenerate
    assert np.max(np.abs(logits - gold["logits"])) / np.max(np.abs(gold["logits"])) < 2e-4


def test_greedy_continuation_matches_transformers(fixture):
    model, gold = fixture
    out = nj.generate(model, jnp.asarray(gold["tokens"]), max_new_tokens=gold["greedy"].shape[1] - 19)
    np.testing.assert_array_equal(np.asarray(out), gold["greedy"])
