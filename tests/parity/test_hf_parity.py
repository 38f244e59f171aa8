"""Live parity against transformers' NemotronH (PyTorch, CPU): `pytest -m parity tests/parity`."""

import jax.numpy as jnp
import numpy as np
import pytest

import nemojax as nj
from testutils import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from fixtures.make_golden import CONFIGS, build_hf_model, golden_outputs  # noqa: E402 (needs torch)

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_hf_model(request.param, seed=11)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, nj.load_pretrained(d, progress=False), d


@pytest.mark.parametrize("length", [5, 8, 27])  # below, at, and across chunk boundaries (chunk 8)
def test_logits(pair, length):
    hf, model, _ = pair
    tokens = np.random.default_rng(length).integers(0, 128, (2, length)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert rel_err(model(jnp.asarray(tokens)), ref) < 2e-4


def test_greedy_continuation(pair):
    hf, model, _ = pair
    tokens = np.random.default_rng(1).integers(0, 128, (2, 13)).astype(np.int32)
    _, greedy = golden_outputs(hf, tokens)
    np.testing.assert_array_equal(np.asarray(nj.generate(model, jnp.asarray(tokens), greedy.shape[1] - 13)), greedy)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, model, _ = pair
    nj.save_pretrained(model, tmp_path)
    reloaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = torch.as_tensor(np.random.default_rng(2).integers(0, 128, (2, 17)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy(), rtol=0, atol=1e-5)
