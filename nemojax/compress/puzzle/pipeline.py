"""The Puzzle pipeline as stages over one directory (`nemojax puzzle <stage> DIR`):

    library   DIR/library/library.json   candidates per parent layer, with the rankings they keep
    bld       DIR/bld/                   blockwise local distillation of the candidates
    score     DIR/scores/scores.json     replace-one-layer scores and per-layer costs (+ scores.png)
    search    DIR/search/<name>.json     the MIP's choice under named budgets (+ the baselines')
    assemble  DIR/child/<name>/          the chosen child as a checkpoint directory
    distill   DIR/distill/<name>/        global distillation of the child from the parent (a train run)

`DIR/puzzle.json` names the parent run (a `nemojax train` directory) and records every stage's settings;
each stage reads what the stages before it wrote. Every stage can be re-run: BLD and distillation resume
where they stopped, the others are cheap and rewrite their outputs. Held-out batches come from the
parent run's validation split, calibration and BLD tokens from its training split.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nemojax.compress.puzzle import baselines, bld, library, score
from nemojax.compress.stages import StageDirectory
from nemojax.compress.puzzle.assemble import assemble_from_dirs
from nemojax.compress.puzzle.distill import distill
from nemojax.compress.puzzle.search import BUDGETS, Options, search, tabulate
from nemojax.config import ModelConfig
from nemojax.io.hf import load_pretrained
from nemojax.train.loop import load_run, make_dataset

STAGES = ("library", "bld", "score", "search", "assemble", "distill")
STATE = "puzzle.json"
DIRECTORY = StageDirectory(STATE, "nemojax puzzle", "a Puzzle directory", "library")
BASELINES = {"greedy": baselines.greedy, "max_params": baselines.max_params, "noop_only": baselines.noop_only,
             "uniform": baselines.uniform}


def load_parent(directory):
    """(TrainConfig, parent model) of a Puzzle directory."""
    tc, parent, _ = load_run(DIRECTORY.parent(directory))
    return tc, parent


def calibration_tokens(tc, batches: int) -> np.ndarray:
    """int32 [batches * B, T]: the first `batches` batches of the parent's training split."""
    ds = make_dataset(tc)
    return np.concatenate([ds.batch(i)["inputs"] for i in range(batches)])


def heldout_batches(tc, batches: int, first: int = 0) -> list[dict]:
    """Batches `first` .. `first` + `batches` - 1 of the parent's validation split."""
    ds = make_dataset(tc, "validation")
    return [ds.batch(first + i) for i in range(batches)]


def heldout_prompts(tc, rows: int, length: int, first: int = 0) -> np.ndarray:
    """int32 [rows, length]: the first `length` tokens of the validation split's rows from batch `first`
    on (distinct texts, as a batch of real requests is: an MoE layer routes them apart)."""
    if not 0 < length <= tc.seq_len:
        raise ValueError(f"length: between 1 and the sequence length {tc.seq_len}; got {length}")
    ds, found = make_dataset(tc, "validation"), []
    while sum(len(b) for b in found) < rows:
        found.append(np.asarray(ds.batch(first + len(found))["inputs"]))
    return np.concatenate(found)[:rows, :length]


def run_library(directory, parent_run=None, *, kinds=None, layers=None, calibration_batches: int = 4,
                options=None) -> Path:
    """Writes DIR/library/library.json (`library.build_library` on `calibration_batches` training batches)."""
    directory = Path(directory)
    if parent_run is not None:
        parent_run = str(Path(parent_run).resolve())
        if (directory / STATE).exists() and DIRECTORY.parent(directory) != parent_run:
            raise ValueError(f"{directory} belongs to the parent {DIRECTORY.parent(directory)}; use another directory")
        load_run(parent_run)  # a clear error now rather than after writing anything
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / STATE).exists():
            (directory / STATE).write_text(json.dumps({"parent": parent_run}, indent=2) + "\n")
    tc, parent = load_parent(directory)
    tokens = calibration_tokens(tc, calibration_batches)
    candidates = library.build_library(parent, tokens, kinds=kinds, layers=layers,
                                       options={"train_length": tc.seq_len, **(options or {})})
    settings = {"kinds": None if kinds is None else sorted(kinds), "layers": None if layers is None else sorted(layers),
                "calibration_batches": calibration_batches, "options": options or {}}
    path = directory / "library" / "library.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    library.save_library(path, candidates, {"parent": DIRECTORY.parent(directory), **settings})
    DIRECTORY.record(directory, "library", settings)
    return path


def _candidates(directory, tc, parent, *, trained: bool) -> dict:
    """{key: (layer, spec, module)} of the library, with BLD's weights where `trained` and BLD trained it."""
    candidates, meta = library.load_library(DIRECTORY.need(Path(directory) / "library" / "library.json", "library"), parent)
    fits = any(c.recipe["op"] == "linear_fit" for c in candidates)
    states = None
    if fits:
        from flax import nnx

        tokens = calibration_tokens(tc, meta["calibration_batches"])
        states = nnx.jit(lambda m, t: m.layer_states(t))(parent, tokens)
    record = {}
    bld_dir = Path(directory) / "bld"
    if trained and (bld_dir / bld.RECORD).exists():
        record = json.loads((bld_dir / bld.RECORD).read_text())
    out = {}
    for c in candidates:
        layer, spec, module = library.materialize(parent, c, None if states is None else states[c.layer])
        if record.get(c.key, {}).get("status") == "trained":
            module = bld.load_trained(bld_dir, c.key, module)
        out[c.key] = (layer, spec, module)
    return out


def run_bld(directory, *, tokens: int, lr: float = 1e-3, batch_size: int | None = None, progress: bool = True) -> dict:
    """BLD of every library candidate on `tokens` training tokens each (resumes an interrupted run)."""
    tc, parent = load_parent(directory)
    candidates = _candidates(directory, tc, parent, trained=False)
    record = bld.run_bld(parent, candidates, make_dataset(tc), Path(directory) / "bld", tokens=tokens, lr=lr,
                         batch_size=batch_size, heldout=make_dataset(tc, "validation").batch(0), progress=progress)
    DIRECTORY.record(directory, "bld", {"tokens": tokens, "lr": lr, "batch_size": batch_size})
    if any(r["status"] == "running" for r in record.values()):  # stopped by a signal: saved, not finished
        raise KeyboardInterrupt(f"BLD stopped and saved in {Path(directory) / 'bld'}; run it again to resume")
    return record


def run_score(directory, *, eval_batches: int = 4, batch_sizes=(1, 8), seq_len: int | None = None,
              dtype: str = "float32", measure: bool = True, gpu: str = "H100", progress: bool = True) -> Path:
    """Replace-one-layer scores on `eval_batches` held-out batches and the costs at every batch size
    (cost columns "<name>@<b>" for memory, latency and roofline; "params" and "experts" once). Uses
    BLD's weights for the candidates BLD trained."""
    tc, parent = load_parent(directory)
    candidates = _candidates(directory, tc, parent, trained=True)
    scores = score.replace_one_scores(parent, candidates, heldout_batches(tc, eval_batches), progress=progress)
    parent_row = scores.pop("parent")
    for i in range(len(parent.layers)):  # the parent's own option scores the parent itself in every layer
        scores[f"{i}:parent"] = parent_row
    seq_len = seq_len or tc.seq_len
    costs: dict = {}
    for b in batch_sizes:
        per_batch = score.candidate_costs(parent, candidates, batch=b, seq_len=seq_len, dtype=jnp.dtype(dtype),
                                          measure=measure, gpu=gpu, progress=progress)
        for key, row in per_batch.items():
            flat = costs.setdefault(key, {"params": row["params"], "experts": row["experts"]})
            flat.update({f"{name}@{b}": v for name, v in row.items() if name not in ("params", "experts")})
    meta = {"eval_batches": eval_batches, "batch_sizes": list(batch_sizes), "seq_len": seq_len, "dtype": dtype,
            "measured": measure, "gpu": gpu, "parent": parent_row}
    path = Path(directory) / "scores" / "scores.json"
    score.save_scores(path, scores, costs, meta)
    plot_scores(scores, path.with_suffix(".png"))
    DIRECTORY.record(directory, "score", meta)
    return path


def plot_scores(scores: dict, path) -> None:
    """A heatmap of log10 KL per layer (rows) and option name (columns)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    keys = [k for k in scores if ":" in k]
    layers = sorted({int(k.split(":")[0]) for k in keys})
    names = sorted({k.split(":", 1)[1] for k in keys})
    grid = np.full((len(layers), len(names)), np.nan)
    for k in keys:
        i, name = k.split(":", 1)
        grid[layers.index(int(i)), names.index(name)] = np.log10(max(scores[k]["kl"], 1e-6))
    fig = Figure(figsize=(0.45 * len(names) + 2, 0.4 * len(layers) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    ax.set_title("replace-one-layer KL(parent || child), log10")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def options_table(directory, *, latency: str = "measured") -> Options:
    """The score stage's table as `search.Options`; `latency="roofline"` makes the latency budgets
    bound the analytic GPU estimates instead of the times measured here."""
    scores, costs, _ = score.load_scores(DIRECTORY.need(Path(directory) / "scores" / "scores.json", "score"))
    if latency not in ("measured", "roofline"):
        raise ValueError(f"latency must be 'measured' or 'roofline'; got {latency!r}")
    if latency == "roofline":
        costs = {k: {**row, **{n.replace("_roofline", "_latency"): v for n, v in row.items() if "_roofline" in n}}
                 for k, row in costs.items()}
    return tabulate({k: v for k, v in scores.items() if ":" in k}, costs)


def baseline_choices(options: Options, budgets: dict, parent_cfg, *, objective: str = "kl", batch=None,
                     relative: bool = True) -> dict:
    """Every baseline's choice at `budgets` (one searched at the MIP's batch size), or {"infeasible": why}."""
    kv_heads = {i: s.num_kv_heads for i, s in enumerate(parent_cfg.layers) if s.kind == "attention"}
    out = {}
    for label, fn in BASELINES.items():
        extra = {"kv_heads": kv_heads} if fn is baselines.uniform else {}
        try:
            out[label] = fn(options, budgets, objective=objective, batch=batch, relative=relative, **extra)
        except ValueError as err:  # Infeasible: this baseline has no child at the budget
            out[label] = {"infeasible": str(err)}
    return out


def run_search(directory, budgets: dict, *, name: str | None = None, objective: str = "kl", batch_sizes=None,
               relative: bool = True, k: int = 1, latency: str = "measured", with_baselines: bool = True) -> Path:
    """The MIP's best `k` choices under `budgets` (fractions of the parent unless not `relative`) and,
    with `with_baselines`, the baselines' choices at the same budgets, in DIR/search/<name>.json."""
    if not budgets:
        raise ValueError(f"budgets: give at least one, e.g. decode_latency=0.5; budgets: {', '.join(BUDGETS)}")
    _, _, meta = score.load_scores(DIRECTORY.need(Path(directory) / "scores" / "scores.json", "score"))
    batch_sizes = tuple(batch_sizes or meta["batch_sizes"])
    options = options_table(directory, latency=latency)
    found = search(options, budgets, objective=objective, batch_sizes=batch_sizes, relative=relative, k=k)
    out = {"budgets": budgets, "relative": relative, "objective": objective, "latency": latency, "mip": found}
    if with_baselines:
        parent_cfg = ModelConfig.load(Path(DIRECTORY.parent(directory)) / "model_config.json")
        out["baselines"] = baseline_choices(options, budgets, parent_cfg, objective=objective,
                                            batch=found[0]["batch_size"], relative=relative)
    name = name or "_".join(f"{b}{v:g}" for b, v in budgets.items())
    path = Path(directory) / "search" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    DIRECTORY.record(directory, f"search/{name}", {k_: v for k_, v in out.items() if k_ in ("budgets", "objective", "latency")})
    return path


def run_assemble(directory, name: str, *, which: str = "mip", index: int = 0) -> Path:
    """Builds the child chosen by search `name` (`which`: "mip" or a baseline's name; `index`: the
    k-th MIP solution) from the library and BLD weights into DIR/child/<name>[-which]/."""
    directory = Path(directory)
    found = json.loads(DIRECTORY.need(directory / "search" / f"{name}.json", "search").read_text())
    if which == "mip":
        keys = found["mip"][index]["keys"]
    elif which in found.get("baselines", {}) and "keys" in found["baselines"][which]:
        keys = found["baselines"][which]["keys"]
    else:
        raise ValueError(f"which: {which!r} has no choice in {name}.json; choices: mip, "
                         f"{', '.join(b for b, r in found.get('baselines', {}).items() if 'keys' in r)}")
    tc, parent = load_parent(directory)
    candidates, meta = library.load_library(directory / "library" / "library.json", parent)
    tokens = calibration_tokens(tc, meta["calibration_batches"])
    out = directory / "child" / (name if which == "mip" and index == 0 else f"{name}-{which}{index or ''}")
    bld_dir = directory / "bld" if (directory / "bld" / bld.RECORD).exists() else None
    assemble_from_dirs(parent, keys, candidates, bld_dir, tokens=tokens, out_dir=out)
    return out


def run_distill(directory, child: str, *, steps: int, lr: float = 1e-3, lm: bool = False, quiet: bool = False,
                **overrides) -> dict:
    """Global distillation of DIR/child/<child> from the parent into DIR/distill/<child>[-lm]."""
    directory = Path(directory)
    model = load_pretrained(DIRECTORY.need(directory / "child" / child, "assemble"))
    out = directory / "distill" / (child + ("-lm" if lm else ""))
    summary = distill(DIRECTORY.parent(directory), model, out, steps=steps, lr=lr, lm=lm, quiet=quiet, **overrides)
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"distillation stopped and saved in {out}; run it again to resume")
    return summary
