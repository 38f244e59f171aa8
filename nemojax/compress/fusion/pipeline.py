"""FFN Fusion as stages over one directory (`nemojax fuse <stage> DIR`):

    deps     DIR/dependency.json   the dependency matrix and residual statistics on held-out batches
             DIR/dependency.png    its heatmap (log colour scale)
    plan     DIR/plan.json         what to fuse: FFN runs under a dependency threshold, or full-block windows
    apply    DIR/fused/            the fused model (save_pretrained) and surgery.json: the runs applied, the
                                   parameter counts and the held-out KL / accuracy against the parent
    distill  DIR/distill/          global distillation of the fused model from the parent (a train run)

`DIR/fusion.json` names the parent run (a `nemojax train --out-dir` directory, or any run directory such
as a Puzzle child's distillation) and records every stage's settings. Held-out batches come from the
parent run's validation split (`puzzle.pipeline.heldout_batches`); distillation is Puzzle's (cosine on
every layer + KL), and so is the whole-model comparison (`puzzle.score.compare`). Fusion keeps the layer
count (a run's other layers become no-ops), so the plan's layer indices stay valid through several runs
and the fused model distils layer by layer against the parent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from nemojax.compress.fusion.dependency import dependency_matrix, plot_dependency, residual_stats
from nemojax.compress.fusion.fuse import FFN_KINDS, NORMS, fuse, parallelize
from nemojax.compress.fusion.plan import block_windows, ffn_runs
from nemojax.compress.puzzle.distill import distill
from nemojax.compress.puzzle.pipeline import heldout_batches
from nemojax.compress.puzzle.score import compare
from nemojax.compress.stages import StageDirectory
from nemojax.config import ModelConfig
from nemojax.io.hf import load_pretrained, save_pretrained
from nemojax.nn.model import param_counts
from nemojax.train.loop import load_run

STAGES = ("deps", "plan", "apply", "distill")
STATE = "fusion.json"
DIRECTORY = StageDirectory(STATE, "nemojax fuse", "an FFN Fusion directory", "deps")
SURGERY = "surgery.json"


# ------------------------------------------------------------------------------------------ the directory
def init_directory(directory, parent_run=None) -> None:
    """Makes `directory` an FFN Fusion directory of `parent_run` (a no-op when it already is one of it);
    without `parent_run`, checks that it is one."""
    directory = Path(directory)
    if parent_run is None:
        DIRECTORY.state(directory)
        return
    parent_run = str(Path(parent_run).resolve())
    if (directory / STATE).exists():
        if DIRECTORY.parent(directory) != parent_run:
            raise ValueError(f"--parent: {directory} belongs to the parent {DIRECTORY.parent(directory)}; "
                             "use another directory")
        return
    if not (Path(parent_run) / "train_config.json").exists():
        raise FileNotFoundError(f"--parent: {parent_run} is not a nemojax run directory (no train_config.json)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE).write_text(json.dumps({"parent": parent_run}, indent=2) + "\n")


def load_parent(directory):
    """(TrainConfig, parent model) of an FFN Fusion directory."""
    tc, parent, _ = load_run(DIRECTORY.parent(directory))
    return tc, parent


def parent_config(directory) -> ModelConfig:
    return ModelConfig.load(Path(DIRECTORY.parent(directory)) / "model_config.json")


def _nulls(a: np.ndarray) -> list:
    """Nested lists with None for NaN (JSON has no NaN)."""
    return [_nulls(x) if isinstance(x, np.ndarray) else (None if math.isnan(x) else float(x)) for x in a]


def _nans(v) -> np.ndarray:
    return np.array(v, dtype=np.float64)  # None becomes NaN


# ------------------------------------------------------------------------------------------ deps
def run_deps(directory, parent_run=None, *, eval_batches: int = 4, layers=None, progress: bool = True) -> Path:
    """Writes DIR/dependency.json (`dependency_matrix` and `residual_stats` of the parent on
    `eval_batches` held-out batches; `layers` an optional (start, stop) range) and DIR/dependency.png."""
    init_directory(directory, parent_run)
    directory = Path(directory)
    tc, parent = load_parent(directory)
    batches = heldout_batches(tc, eval_batches)
    layers = None if layers is None else tuple(layers)
    M = dependency_matrix(parent, batches, layers=layers, progress=progress)
    stats = residual_stats(parent, batches)
    settings = {"eval_batches": eval_batches, "layers": None if layers is None else list(layers)}
    out = {"parent": DIRECTORY.parent(directory), **settings, "pattern": parent.cfg.pattern,
           "kinds": [s.kind for s in parent.cfg.layers], "matrix": _nulls(M),
           "stats": {name: _nulls(v) for name, v in stats.items()}}
    path = directory / "dependency.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    plot_dependency(M, path.with_suffix(".png"), pattern=parent.cfg.pattern,
                    title=f"dependency M[i, j] ({eval_batches} held-out batches)")
    DIRECTORY.record(directory, "deps", settings)
    return path


def load_dependency(directory) -> tuple[np.ndarray, dict]:
    """(M [L, L] with NaN where undefined, residual statistics {name: [L]}) of the deps stage."""
    saved = json.loads(DIRECTORY.need(Path(directory) / "dependency.json", "deps").read_text())
    return _nans(saved["matrix"]), {name: _nans(v) for name, v in saved["stats"].items()}


# ------------------------------------------------------------------------------------------ plan
def describe(cfg: ModelConfig, M, start: int, stop: int, op: str) -> dict:
    """A run as the plan lists it: its range, the operation, its layers' kinds and the largest and the
    summed dependency M[a, b] (a < b) among its layers (no-op layers have none)."""
    sub = np.asarray(M, np.float64)[start:stop, start:stop][np.triu_indices(stop - start, 1)]
    sub = sub[np.isfinite(sub)]
    return {"start": start, "stop": stop, "op": op, "kinds": [s.kind for s in cfg.layers[start:stop]],
            "max_dependency": float(sub.max()) if sub.size else None,
            "sum_dependency": float(sub.sum()) if sub.size else None}


def run_plan(directory, *, threshold: float | None = None, keep_last: bool = False, blocks: int | None = None,
             count: int | None = None) -> Path:
    """Writes DIR/plan.json from the deps stage's matrix: FFN runs (`ffn_runs` at `threshold`, the last
    FFN of each stretch left out unless `keep_last`) fused by `apply`, or full-block windows of `blocks`
    layers (`block_windows`, at most `count`) that `apply` parallelises."""
    check_plan(threshold=threshold, keep_last=keep_last, blocks=blocks, count=count)
    M, _ = load_dependency(directory)
    cfg = parent_config(directory)
    if blocks is None:
        ranges, op = ffn_runs(cfg, M, threshold=threshold, leave_out_last=not keep_last), "fuse"
        settings = {"mode": "ffn", "threshold": threshold, "leave_out_last": not keep_last}
    else:
        ranges, op = block_windows(cfg, M, size=blocks, count=count), "parallelize"
        settings = {"mode": "blocks", "size": blocks, "count": count}
    plan = {**settings, "runs": [describe(cfg, M, a, b, op) for a, b in ranges]}
    path = Path(directory) / "plan.json"
    path.write_text(json.dumps(plan, indent=2) + "\n")
    DIRECTORY.record(directory, "plan", settings)
    return path


def check_plan(*, threshold, keep_last, blocks, count) -> None:
    """The plan stage's settings, checked before any stage runs (`nemojax fuse run` measures first)."""
    if (threshold is None) == (blocks is None):
        raise ValueError("--threshold or --blocks: give exactly one (FFN runs under a dependency threshold, or "
                         "full-block windows of that many layers)")
    if blocks is None and count is not None:
        raise ValueError("--count: only with --blocks (FFN runs take every run under the threshold)")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 2):
        raise ValueError(f"--blocks: a window holds an int >= 2 layers; got {blocks!r}")
    if blocks is not None and keep_last:
        raise ValueError("--keep-last: only with --threshold (full-block windows have no last FFN to leave out)")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"--threshold: a cosine distance, finite and >= 0; got {threshold!r}")


def plan_table(plan: dict) -> str:
    """The plan's runs as a text table."""
    lines = [f"  {'layers':>8s}  {'op':11s}  {'max dep':>9s}  {'sum dep':>9s}  kinds"]
    for r in plan["runs"]:
        dep = [f"{v:9.4g}" if v is not None else f"{'-':>9s}" for v in (r["max_dependency"], r["sum_dependency"])]
        lines.append(f"  {r['start']:>4d}:{r['stop']:<3d}  {r['op']:11s}  {dep[0]}  {dep[1]}  {','.join(r['kinds'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ apply
def operation(cfg: ModelConfig, start: int, stop: int) -> str:
    """"fuse" when every layer of [start, stop) is an FFN layer or a no-op, else "parallelize"."""
    return "fuse" if all(s.kind in (*FFN_KINDS, "noop") for s in cfg.layers[start:stop]) else "parallelize"


def check_runs(runs, n: int) -> list[tuple[int, int]]:
    out = []
    for r in runs:
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, int) for v in r)
                and 0 <= r[0] < r[1] <= n):
            raise ValueError(f"--runs: each run is START:STOP with 0 <= START < STOP <= {n}; got {r!r}")
        out.append((int(r[0]), int(r[1])))
    ordered = sorted(out)
    for (_, b), (c, _) in zip(ordered, ordered[1:]):
        if c < b:
            raise ValueError(f"--runs: runs overlap ({ordered}); each layer belongs to at most one run")
    if not out:
        raise ValueError("--runs: give at least one START:STOP run")
    return out


def sequential_layers(cfg: ModelConfig) -> int:
    """The layers that run one after another (no-op layers cost nothing)."""
    return sum(s.kind != "noop" for s in cfg.layers)


def run_apply(directory, *, norm: str | None = None, runs=None, eval_batches: int = 4) -> dict:
    """Builds the fused model by applying the plan's runs (or `runs`, (start, stop) pairs: `fuse` where
    every layer is an FFN or a no-op, else `parallelize`) to the parent, one after another, saves it in
    DIR/fused/ with DIR/fused/surgery.json, and returns that record: the runs, parameter counts and
    sequential depth of both models, and `compare` of each against the parent on `eval_batches`
    held-out batches. `norm` ("last" by default) is the fused runs' (`fuse`); parallelised layers keep
    their own norms, so runs that are all parallelised take no `norm`."""
    if norm is not None and norm not in NORMS:
        raise ValueError(f"--norm must be one of {', '.join(NORMS)}; got {norm!r}")
    directory = Path(directory)
    tc, parent = load_parent(directory)
    cfg = parent.cfg
    if runs is None:
        plan = json.loads(DIRECTORY.need(Path(directory) / "plan.json", "plan").read_text())
        chosen = [(r["start"], r["stop"], r["op"]) for r in plan["runs"]]
        if not chosen:
            raise ValueError(f"{directory / 'plan.json'} holds no runs: plan again with a higher --threshold (or "
                             "--blocks), or give --runs START:STOP,...")
        source = "plan"
    else:
        chosen = [(a, b, operation(cfg, a, b)) for a, b in check_runs(runs, len(cfg.layers))]
        source = "runs"
    if all(op == "parallelize" for *_, op in chosen):
        if norm is not None:
            raise ValueError("--norm: every run is parallelised, and parallel layers keep their own norms; --norm "
                             "is for fused FFN runs")
    else:
        norm = norm or "last"
    child = parent
    for a, b, op in chosen:
        child = fuse(child, a, b, norm=norm) if op == "fuse" else parallelize(child, a, b)
    out = directory / "fused"
    save_pretrained(child, out)
    batches = heldout_batches(tc, eval_batches)
    record = {
        "parent": DIRECTORY.parent(directory), "source": source, "norm": norm,
        "runs": [{"start": a, "stop": b, "op": op, "kinds": [s.kind for s in cfg.layers[a:b]]} for a, b, op in chosen],
        "pattern": {"parent": cfg.pattern, "fused": child.cfg.pattern},
        "params": {"parent": param_counts(cfg), "fused": param_counts(child.cfg)},
        "sequential_layers": {"parent": sequential_layers(cfg), "fused": sequential_layers(child.cfg)},
        "eval_batches": eval_batches,
        "heldout": {"parent": compare(parent, parent, batches), "fused": compare(parent, child, batches)},
    }
    (out / SURGERY).write_text(json.dumps(record, indent=2) + "\n")
    DIRECTORY.record(directory, "apply", {"norm": norm, "source": source, "runs": record["runs"], "eval_batches": eval_batches})
    return record


# ------------------------------------------------------------------------------------------ distill
def run_distill(directory, *, steps: int, lr: float = 1e-3, quiet: bool = False, **overrides) -> dict:
    """Global distillation of DIR/fused from the parent into DIR/distill (resumes an interrupted run);
    returns the run's summary, whose "kl_to_parent" holds the held-out KL before and after."""
    directory = Path(directory)
    child = load_pretrained(DIRECTORY.need(Path(directory) / "fused", "apply"), progress=False)
    out = directory / "distill"
    summary = distill(DIRECTORY.parent(directory), child, out, steps=steps, lr=lr, quiet=quiet, **overrides)
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"distillation stopped and saved in {out}; run it again to resume")
    DIRECTORY.record(directory, "distill", {"steps": steps, "lr": lr, **overrides})
    return summary
