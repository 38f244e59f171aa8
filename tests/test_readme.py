"""Every fenced code block of README.md runs: python blocks are executed as written (in a fresh
directory, so the files they write land in tmp_path); bash blocks are checked command by command:
each `nemojax ...` command goes through the real CLI parser (subcommand, flags and their values)
without running the command, `pip install` extras must exist in pyproject.toml, and `pytest` paths
must exist. The 2-minute main job itself is not run here."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from nemojax import cli

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BLOCKS = [(m.group(1), m.group(2), ROOT.joinpath("README.md").read_text()[:m.start()].count("\n") + 1)
          for m in FENCE.finditer(ROOT.joinpath("README.md").read_text())]


def block_ids(kind):
    return [f"line{line}" for k, _, line in BLOCKS if k == kind]


def test_readme_blocks_are_python_or_bash():
    kinds = [k for k, _, _ in BLOCKS]
    assert set(kinds) <= {"python", "bash"}, f"a README block this test cannot check: {kinds}"
    assert "python" in kinds and "bash" in kinds


@pytest.mark.parametrize("code", [c for k, c, _ in BLOCKS if k == "python"], ids=block_ids("python"))
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def commands(script: str) -> list[list[str]]:
    """The simple commands of a bash snippet: continuation lines joined, comments dropped, split at
    `&&`, leading VAR=value assignments removed."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            cmd, words = words[:cut], words[cut + 1:]
            while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
                cmd = cmd[1:]
            if cmd:
                out.append(cmd)
    return out


def check_nemojax(argv, monkeypatch):
    called = []
    for name in ("info", "train", "eval", "generate", "puzzle", "fuse"):
        monkeypatch.setattr(cli, f"cmd_{name}", lambda args, name=name: called.append(name) or 0)
    try:
        assert cli.main(argv) == 0
    except SystemExit as exit_:  # argparse's way of rejecting a subcommand, flag or value
        pytest.fail(f"`nemojax {shlex.join(argv)}` does not parse (exit {exit_.code})")
    assert called == [argv[0]]


def check_pip(argv):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert argv[:2] == ["install", "-e"], argv
    spec = re.fullmatch(r"\.(?:\[([\w,]+)\])?", argv[2])
    assert spec, argv
    for extra in filter(None, (spec.group(1) or "").split(",")):
        assert extra in extras, f"pip extra {extra!r} is not in pyproject.toml ({sorted(extras)})"


@pytest.mark.parametrize("script", [c for k, c, _ in BLOCKS if k == "bash"], ids=block_ids("bash"))
def test_bash_block_commands_exist(script, monkeypatch):
    cmds = commands(script)
    assert cmds
    for cmd in cmds:
        program, args = cmd[0], cmd[1:]
        if program == "srun":  # SLURM's launcher: each task runs the command that follows
            program, args = args[0], args[1:]
        if program == "nemojax":
            check_nemojax(args, monkeypatch)
        elif program == "pip":
            check_pip(args)
        elif program == "pytest":
            for path in (a for a in args if not a.startswith("-") and "/" in a):
                assert (ROOT / path).exists(), path
        elif (program, *args[:2]) == ("python3", "-m", "venv") or program == ".":
            pass  # the venv lines every install block shares
        else:
            pytest.fail(f"README command {shlex.join(cmd)!r}: this test does not know how to check {program!r}")


def test_commands_are_split_like_bash():
    assert commands('A=1 B="x y" \\\n  nemojax train --steps 3 && pytest -q  # comment\n. .venv/bin/activate') == [
        ["nemojax", "train", "--steps", "3"], ["pytest", "-q"], [".", ".venv/bin/activate"]]


def test_the_cli_check_rejects_what_the_parser_rejects(monkeypatch):
    for argv in (["train", "--no-such-flag"], ["no-such-command"], ["train", "--steps", "many"]):
        with pytest.raises(pytest.fail.Exception, match="does not parse"):
            check_nemojax(argv, monkeypatch)
