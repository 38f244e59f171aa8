"""The notebooks in colab/. CI runs `CI_COMMAND`, which executes every notebook there at its small setting
(`test_notebook_runs`, marker `notebooks`, needs the `notebooks` extra). The default suite checks that
this command selects each notebook in colab/ (so a new one cannot be forgotten), that each notebook's
first cell installs nemojax when it is missing and reads the small-setting switch, that each is
committed with the outputs of a run, and that its text states no number its outputs do not show."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CI_COMMAND = "pytest -q -m notebooks --dist load tests/test_notebooks.py"  # --dist load: notebooks in parallel
SMALL_SWITCH = "NEMOJAX_NOTEBOOK_SMALL"


def cells(path: Path, kind: str) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    """Every cell runs without raising, at the small setting, from the notebook's own folder."""
    import nbclient
    import nbformat

    monkeypatch.setenv(SMALL_SWITCH, "1")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()


def test_ci_and_readme_run_every_notebook():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert 'pip install -e ".[test,notebooks]"' in ci and CI_COMMAND in ci
    assert ci.index('pip install -e ".[test,notebooks]"') < ci.index(CI_COMMAND)
    assert CI_COMMAND in (ROOT / "README.md").read_text()
    # what the command selects, collected by pytest itself (marker, addopts and parametrisation included)
    argv = shlex.split(CI_COMMAND)[1:]
    out = subprocess.run([sys.executable, "-m", "pytest", *argv, "--collect-only", "-n", "0", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True)
    collected = set(re.findall(r"test_notebook_runs\[(\w+)\]", out.stdout))
    assert NOTEBOOKS and collected == {p.stem for p in NOTEBOOKS}, out.stdout + out.stderr


def run_first_cell(path: Path, cwd: Path, env: dict, monkeypatch, tmp_path, installed: bool = True) -> dict:
    """Executes the notebook's first code cell in `cwd` with `env`; records pip calls instead of making
    them, and pretends nemojax is missing when `installed` is False."""
    import importlib.util

    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pip_calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: pip_calls.append(argv))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nemojax" and not installed else real_find_spec(name, *a))
    scope = {"__name__": "notebook"}
    exec(compile(source(cells(path, "code")[0]), str(path), "exec"), scope)
    return {"pip": pip_calls, **scope}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_cell_installs_nemojax_and_reads_the_small_switch(path, monkeypatch, tmp_path):
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    run = run_first_cell(path, ROOT / "colab", {SMALL_SWITCH: None, "NEMOJAX_SOURCE": None}, monkeypatch, tmp_path)
    assert run["SMALL"] is False and run["CHECKOUT"] == ROOT and run["pip"] == []
    assert run_first_cell(path, tmp_path, {SMALL_SWITCH: "1"}, monkeypatch, tmp_path)["SMALL"] is True
    with pytest.raises(ValueError, match=SMALL_SWITCH):
        run_first_cell(path, tmp_path, {SMALL_SWITCH: "yes"}, monkeypatch, tmp_path)
    # nemojax missing: the checkout around the notebook, else NEMOJAX_SOURCE, else an error naming it
    env = {SMALL_SWITCH: "1", "NEMOJAX_SOURCE": None}
    assert run_first_cell(path, ROOT / "colab", env, monkeypatch, tmp_path, installed=False)["pip"] == [
        pip + ["-e", str(ROOT)]]
    assert run_first_cell(path, tmp_path, {**env, "NEMOJAX_SOURCE": "git+https://example.org/nemojax"}, monkeypatch,
                          tmp_path, installed=False)["pip"] == [pip + ["git+https://example.org/nemojax"]]
    with pytest.raises(RuntimeError, match="NEMOJAX_SOURCE"):
        run_first_cell(path, tmp_path, env, monkeypatch, tmp_path, installed=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_the_outputs_of_a_run(path):
    code = cells(path, "code")
    assert all(isinstance(c["execution_count"], int) for c in code), "a cell was not executed"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "not run top to bottom"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    # a plot that did not reach the notebook (e.g. a library switched matplotlib's backend under it)
    blank = [source(c).splitlines()[0] for c in code if "plt.show()" in source(c)
             and not any("image/png" in o.get("data", {}) for o in c["outputs"])]
    assert not blank, f"cells that show a plot but have no image output: {blank}"


NUMBER = re.compile(r"(?<![\w.^/\-])\d+(?:\.\d+)?(?![\w])")


def output_text(path: Path) -> str:
    parts = []
    for c in cells(path, "code"):
        for o in c["outputs"]:
            parts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def prose_numbers(markdown: str) -> list[str]:
    """Numbers in the text, leaving out code spans, LaTeX math, parts of names (Mamba-2, fp32, S^2) and
    the numbering of sections and lists."""
    prose = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", " ", markdown, flags=re.S)
    prose = re.sub(r"^(#+ +)?\d+\. ", " ", prose, flags=re.M)
    return NUMBER.findall(prose)


def test_prose_numbers_are_found_and_names_are_not():
    assert prose_numbers("## 2. Loss\n1. loss 1.34 after 300 steps, 2% (`lr=3e-3`, $e^{-2}$), Mamba-2, fp32, S^2") == [
        "1.34", "300", "2"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_text_states_no_number_the_outputs_do_not_show(path):
    shown = set(NUMBER.findall(output_text(path)))
    typed = {x for c in cells(path, "markdown") for x in prose_numbers(source(c))}
    assert typed <= shown, f"numbers in the text of {path.name} that no output shows: {sorted(typed - shown)}"
