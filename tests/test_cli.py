"""The `nemojax` command and `generate` on bad input: each is refused with a message naming the field,
through the parser's usual `nemojax CMD: error:` line; help text says every default once."""

import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.cli import main
from nemojax.train import TrainConfig, loop


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    loop.train(TrainConfig(preset="tiny-hybrid", seq_len=32, batch_size=2, steps=2, warmup_steps=1, eval_batches=2,
                           sample_tokens=0, out_dir=str(out)), quiet=True)
    return out


def test_eval_uses_the_runs_batches_and_counts_tokens(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # the run's eval_batches (2), as in training; text data score every target token
    assert "2 x 2 x 32" in out and f"{2 * 2 * 32} tokens scored" in out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(run_dir), "--batches", "0"])
    assert e.value.code == 2 and "--batches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(run_dir), "--step", "7"])
    assert re.search(r"nemojax eval: error: no checkpoint of step 7 .*available steps: \[2\]", capsys.readouterr().err)


def test_generate_top_p_and_top_k_checks(run_dir, capsys):
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "The ", "--max-new-tokens", "3",
                 "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(run_dir), "--prompt", "The ", "--top-k", "100000"])
    assert re.search(r"nemojax generate: error: top_k must be .*vocab_size=\d+\]; got 100000", capsys.readouterr().err)


def test_generate_refuses_what_it_would_ignore():
    model = nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0))
    tokens = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        nj.generate(model, tokens, 2, temperature=math.nan, key=jax.random.key(0))
    for kw in ({"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="temperature 0 is greedy"):
            nj.generate(model, tokens, 2, temperature=0.0, **kw)
    with pytest.raises(ValueError, match=r"top_k must be None or in \[1, vocab_size="):
        nj.generate(model, tokens, 2, temperature=1.0, top_k=model.cfg.vocab_size + 1, key=jax.random.key(0))


def test_data_options_without_equals_goes_through_the_parser(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data-options", "KEY", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "nemojax train: error: --data-options: expected KEY=VALUE, got 'KEY'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "make_dataset", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["train", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 130
    assert capsys.readouterr().err == "nemojax train: interrupted\n"


@pytest.mark.parametrize("command", ["train", "eval", "generate", "fuse"])
def test_help_says_each_default_once_and_every_option_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one per option: flag line, then indented help
    assert len(entries) > 3
    for entry in entries:
        flag, _, help_ = entry.partition("  ")
        assert entry.count("(default") <= 1, entry
        if not flag.startswith("-h"):
            assert re.sub(r"\(default[^)]*\)", "", help_).strip(), f"{flag} has no help"
