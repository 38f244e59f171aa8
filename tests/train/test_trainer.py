"""The training loop: bit-exact resume after an interruption, the weight-decay mask, bf16 compute
against fp32, and the CLI end to end (train -> eval -> generate)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.cli import main
from nemojax.train import TrainConfig, loop
from nemojax.train.step import default_loss_fn, objective
from nemojax.train.optimizer import decays
from testutils import compile_cache, interrupt_at


@pytest.fixture(scope="module", autouse=True)
def compiled_once(tmp_path_factory):
    """The interrupted run loads the straight run's programs from this cache instead of compiling them
    again (the resumed run compiles its own: the arrays it restores carry a sharding, which its programs
    record)."""
    with compile_cache(tmp_path_factory.mktemp("compile_cache")):
        yield


def tiny_config(tmp_path, name, **kw):
    base = dict(preset="tiny-latent-mtp", data="text", seq_len=32, batch_size=2, steps=6, warmup_steps=2,
                save_every=3, eval_every=3, eval_batches=1, log_every=1, sample_tokens=0,
                out_dir=str(tmp_path / name), router_z_loss_coef=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _leaves(state):
    return jax.tree.leaves(jax.tree.map(np.asarray, state))


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path):
    straight = tiny_config(tmp_path, "straight")
    s1 = loop.train(straight, quiet=True)
    assert s1["step"] == 6 and s1["interrupted"] is None
    with pytest.raises(ValueError, match="already holds checkpoints"):
        loop.train(straight.replace(resume=False), quiet=True)
    with pytest.raises(ValueError, match="seq_len"):
        loop.train(straight.replace(seq_len=16), quiet=True)

    resumed = tiny_config(tmp_path, "resumed")
    with interrupt_at(2):  # SIGINT while the batch of step 3 (0-based 2) is drawn
        s2 = loop.train(resumed, quiet=True)
    assert s2["interrupted"] == "SIGINT" and s2["step"] == 3  # the step in flight completes, then saves
    s3 = loop.train(resumed, quiet=True)
    assert s3["step"] == 6

    _, m1, r1 = loop.load_run(straight.out_dir)
    _, m2, r2 = loop.load_run(resumed.out_dir)
    assert r1["step"] == r2["step"] == 6
    for a, b in zip(_leaves(nnx.state(m1)), _leaves(nnx.state(m2)), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit, correction biases included
    bias = nnx.state(m1, nj.nn.layers.CorrectionBias)
    assert any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(bias)), "correction biases never moved"
    # metrics are not duplicated by the resume and every step is logged once
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # step 0: the untrained model's eval
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 0


def test_weight_decay_mask():
    model = nj.HybridLM(nj.presets.get("tiny-latent-mtp"), rngs=nnx.Rngs(0))
    names = {jax.tree_util.keystr(path[:-1], simple=True, separator="."): decays(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    no_decay = {n for n, d in names.items() if not d}
    expected = ({f"layers.0.mixer.{n}" for n in ("A_log", "D", "conv_bias", "dt_bias", "norm_weight")}
                | {f"layers.{i}.norm.weight" for i in range(4)} | {f"mtp.0.blocks.{i}.norm.weight" for i in range(2)}
                | {f"mtp.0.{n}.weight" for n in ("enorm", "hnorm", "final_layernorm")} | {"norm_f.weight"})
    assert no_decay == expected
    assert "layers.0.mixer.in_proj.kernel" not in no_decay and "embeddings" not in no_decay


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)


def test_default_warmup_is_a_tenth_of_the_steps():
    assert [TrainConfig(steps=s).warmup_steps for s in (5, 300, 2000)] == [0, 30, 200]
    assert TrainConfig(steps=5, warmup_steps=2).warmup_steps == 2


def test_bf16_compute_tracks_fp32():
    tc = TrainConfig(preset="tiny-moe", seq_len=32, batch_size=2)
    model = loop.build_model(tc, 256)
    graphdef, _, state = loop.init_state(tc, model)
    batch = jax.tree.map(jnp.asarray, loop.make_dataset(tc).batch(0))

    def grads(dtype):
        fn = jax.jit(jax.value_and_grad(lambda p: objective(
            graphdef, tc.replace(compute_dtype=dtype), default_loss_fn(tc), p, state["rest"], batch), has_aux=True))

        def at(params):
            (loss, _), g = fn(params)
            return float(loss), np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
        return at

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    # measured: bf16 moves the loss by 6e-5 relative and keeps the gradient's cosine at 0.9999; another
    # init (the bounds must tell models apart) moves the loss by 7e-3, its gradient's cosine is ~0
    fp32 = grads("float32")
    l32, g32 = fp32(state["params"])
    l16, g16 = grads("bfloat16")(state["params"])
    assert abs(l16 - l32) < 1e-3 * l32
    assert cos(g16, g32) > 0.98
    other = loop.init_state(tc, loop.build_model(tc.replace(seed=tc.seed + 1), 256))[2]
    l_other, g_other = fp32(other["params"])
    assert abs(l_other - l32) > 1e-3 * l32 and cos(g_other, g32) < 0.98
    # master weights stay fp32: the gradient w.r.t. the fp32 params is fp32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


def test_cli_train_eval_generate(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--preset", "tiny-hybrid", "--steps", "4", "--seq-len", "32",
               "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "5", "--out-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "sample" in text
    for f in ("train_config.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (out / f).exists(), f
    assert main(["eval", "--checkpoint", str(out), "--batches", "1"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # sampled with the settings of the run's own sample
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    # greedy through an FP8 K/V cache calibrated on the run's text, against the model's own cache
    greedy = ["generate", "--checkpoint", str(out), "--prompt", "The ", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main(greedy + ["--kv-cache-dtype", "fp8", "--calibration-batches", "1"]) == 0
    assert capsys.readouterr().out == plain  # 5 greedy tokens of a barely trained model: E4M3 K/V agree
    for flags, needle in ((["--draft", "mtp"], "mtp_depth"), (["--num-draft", "2"], "--num-draft"),
                          (["--calibration-batches", "2"], "--calibration-batches")):
        with pytest.raises(SystemExit):
            main(greedy + flags)
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--compute-dtype", "float16", "--out-dir", str(tmp_path / "bad")])
    assert "compute_dtype" in capsys.readouterr().err


def test_moe_implementation_is_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match=r"moe_implementation must be None or one of \('dense'"):
        TrainConfig(moe_implementation="megablox")
