"""Blockwise local distillation (BLD, Puzzle §1.2): each library candidate learns, on its own, to do what
its parent layer does to the parent's residual stream.

A candidate `(layer, spec, module)` sits under the parent layer's pre-norm, as `replace_layers` puts it:
its block is x + module(norm(x)). Training is teacher-forced: x is the parent's stream entering the layer
(`parent.layer_states(tokens)[layer]`), and the target is the parent layer's contribution
states[layer + 1] - states[layer] (subtracted in fp32). The loss is the normalised MSE
sum |f_c(x) - f_p(x)|^2 / sum |f_p(x)|^2 over the batch (`losses.normalized_mse`). It compares
contributions, not block outputs x + f(x) as the reference code does: the residual x usually dwarfs f(x),
so on block outputs every candidate looks close to the parent; on contributions a no-op scores exactly 1
and the parent 0. Only the module's `nnx.Param`s train (fp32 master copies, cast to the module's dtypes
in the forward pass); the pre-norm stays the parent's. Parent and no-op candidates need no training and
are recorded as "skipped".

Candidates whose modules have the same graph and parameter shapes (every `linear`, `mlp_w50` of layers
of equal width, ...) train together: their parameters are stacked, one jitted step `jax.vmap`s the loss
and its gradient over the stack (each member on its own layer's inputs), and one Adam updates the stack.
Adam is elementwise, so a group trains each member exactly as it would train alone. The learning rate
follows a cosine decay from `lr` to 0 over the run (no warmup: candidates start from the parent-derived
initialisation, and Adam's first steps are already normalised). The parent runs once per step, jitted,
and every group reads the inputs and targets of its layers from that one forward pass: a forward per
group would repeat the most expensive computation of the step once per group.

Outputs in `out_dir`: `bld.json` (per candidate key: layer, name, status "trained" / "skipped" /
"running", steps, tokens, initial and final normalised MSE on a held-out batch, and the training loss every
`log_every` steps), and `weights/<key with ':' as '_'>.safetensors` per trained candidate (fp32, names are
the module's nnx state paths joined by '.'; `load_trained` reads them). An unfinished run keeps every
group's parameters, Adam state, step and loss curves in `resume.safetensors`, rewritten atomically every
`save_every` steps and on SIGINT / SIGTERM (the step in flight completes, then the run saves and
returns). `dataset.batch(step)` is a pure function of the step, so a resumed run continues bit for bit.
A finished candidate is never retrained: delete its weights and entry to train it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from nemojax.config import NoOpSpec
from nemojax.nn.ffn import inference_copy
from nemojax.nn.model import Block
from nemojax.train import losses
from nemojax.train.loop import _stop_requests

RECORD = "bld.json"
RESUME = "resume.safetensors"


def weights_path(out_dir, key: str) -> Path:
    """Where `run_bld` writes the trained parameters of candidate `key`."""
    return Path(out_dir) / "weights" / (key.replace(":", "_") + ".safetensors")


def load_trained(out_dir, key: str, module):
    """Puts the BLD-trained parameters of candidate `key` into `module` (a freshly materialised candidate of
    the same spec; cast to its dtypes) and returns it. A candidate BLD skipped (parent, no-op) comes back
    as it is. ValueError naming the key when BLD has not finished it or the shapes differ."""
    record = _read_json(Path(out_dir) / RECORD)
    if key not in record:
        raise ValueError(f"load_trained: {Path(out_dir) / RECORD} has no candidate {key!r}")
    status = record[key]["status"]
    if status == "skipped":
        return module
    if status != "trained":
        raise ValueError(f"load_trained: BLD of candidate {key!r} has not finished (status {status!r}); "
                         f"run run_bld on {out_dir} again to finish it")
    path = weights_path(out_dir, key)
    saved = load_file(path)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    want = {_name(p): tuple(v.get_value().shape) for p, v in flat}
    have = {n: tuple(a.shape) for n, a in saved.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise ValueError(f"load_trained: candidate {key!r}: the module's parameters do not match {path} "
                         f"(first differences, as (name, shape)): {diff}")
    nnx.update(module, nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(saved[_name(p)], v.get_value().dtype))) for p, v in flat]))
    return module


def run_bld(parent, candidates: dict, dataset, out_dir, *, tokens: int, lr: float = 1e-3,
            batch_size: int | None = None, heldout: dict | None = None, log_every: int = 10,
            save_every: int = 100, progress: bool = True) -> dict:
    """Trains every candidate that needs it (see the module docstring) on `tokens` tokens each, and returns
    the record it writes to `out_dir/bld.json`.

    candidates: {key: (layer, spec, module_or_None)}, keys f"{layer}:{name}". dataset: `batch(step) ->
    {"inputs": int32 [B, T], ...}`. batch_size: sequences per step, taken in order from the dataset's
    stream (sequence n is row n % B of `dataset.batch(n // B)`); None: B. heldout: a batch {"inputs": ...}
    for the initial and final normalised MSE (e.g. `make_dataset(tc, "validation").batch(0)`); None: the
    first batch of the stream after the training budget. A run interrupted earlier resumes only with the
    same tokens, lr, batch size and held-out batch.
    """
    for name, v in (("tokens", tokens), ("log_every", log_every), ("save_every", save_every)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"run_bld: {name} must be a positive int; got {v!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"run_bld: batch_size must be None or a positive int; got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"run_bld: lr must be a finite number > 0; got {lr!r}")
    if not isinstance(candidates, dict):
        raise ValueError(f"run_bld: candidates must be a dict {{key: (layer, spec, module)}}; got "
                         f"{type(candidates).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _read_json(out / RECORD) if (out / RECORD).exists() else {}
    parsed = {key: _parse(parent, key, c) for key, c in candidates.items()}
    skipped = {key: {"layer": layer, "name": name, "status": "skipped",
                     "reason": "no-op" if isinstance(spec, NoOpSpec) else "the parent's own layer"}
               for key, (layer, name, spec, _) in parsed.items() if not _trainable(name, spec) and key not in record}
    if skipped:
        record.update(skipped)
        _write_json(out / RECORD, record)
    pending = sorted((k for k, (_, name, spec, _) in parsed.items()
                      if _trainable(name, spec) and record.get(k, {}).get("status") != "trained"), key=_order)
    resume = _read_resume(out)
    if resume is not None and all(record.get(k, {}).get("status") == "trained" for g in resume["groups"]
                                  for k in g):
        os.remove(out / RESUME)  # stopped between writing the record and removing this file
        resume = None
    if not pending and resume is None:
        return record

    stream = _Stream(dataset, batch_size)
    steps = math.ceil(tokens / (stream.batch_size * stream.seq_len))
    if heldout is None:
        heldout_tokens, heldout_id = stream(steps), "stream"
    else:
        if not isinstance(heldout, dict) or "inputs" not in heldout:
            raise ValueError(f"run_bld: heldout must be a batch {{'inputs': int32 [B, T]}}; got {type(heldout)}")
        heldout_tokens = _tokens(heldout["inputs"], "heldout['inputs']")
        heldout_id = hashlib.sha256(heldout_tokens.tobytes()).hexdigest()[:16]
    settings = {"tokens": tokens, "lr": float(lr), "batch_size": stream.batch_size, "seq_len": stream.seq_len,
                "steps": steps, "heldout": heldout_id}
    sessions = []
    if resume is not None:
        if resume["settings"] != settings:
            diff = {k: (resume["settings"].get(k), v) for k, v in settings.items() if resume["settings"].get(k) != v}
            raise ValueError(f"run_bld: {out / RESUME} is an interrupted run with other settings "
                             f"(field: (saved, now)): {diff}; run with the saved ones, or delete the file to "
                             f"start those candidates over")
        keys = [k for g in resume["groups"] for k in g]
        missing = [k for k in keys if k not in parsed]
        if missing:
            raise ValueError(f"run_bld: the interrupted run in {out / RESUME} trains candidates that are not "
                             f"given now: {missing}")
        sessions.append((keys, resume))
        pending = [k for k in pending if k not in keys]
    if pending:
        sessions.append((pending, None))
    run = _Run(parent, parsed, stream, settings, heldout_tokens, out, record, log_every, save_every, progress)
    for keys, saved in sessions:
        if not run.session(keys, saved):
            break
    return record


# ------------------------------------------------------------------------------------------- internals
def _parse(parent, key, candidate):
    """(layer, name, spec, module) of one candidate, or ValueError naming its key."""
    if not (isinstance(candidate, tuple) and len(candidate) == 3):
        raise ValueError(f"candidate {key!r}: expected (layer, spec, module_or_None); got {type(candidate).__name__}")
    layer, spec, module = candidate
    n = len(parent.layers)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"candidate {key!r}: layer must be an int in [0, {n}); got {layer!r}")
    head, sep, name = key.partition(":") if isinstance(key, str) else ("", "", "")
    if not sep or head != str(layer) or not name:
        raise ValueError(f"candidate key {key!r}: must be '{layer}:<name>' (its tuple's layer, then its name)")
    if isinstance(spec, NoOpSpec) != (module is None):
        raise ValueError(f"candidate {key!r}: the module is None exactly when the spec is NoOpSpec; got "
                         f"{type(spec).__name__} with {type(module).__name__}")
    if _trainable(name, spec):
        if not isinstance(module, nnx.Module) or isinstance(module, Block):
            raise ValueError(f"candidate {key!r}: the module must be a mixer (it goes under the parent's "
                             f"pre-norm); got {type(module).__name__}")
        if not nnx.state(module, nnx.Param):
            raise ValueError(f"candidate {key!r}: the module has no parameters to train")
        if parent.layers[layer].norm is None:
            raise ValueError(f"candidate {key!r}: parent layer {layer} is a no-op; there is nothing to distil")
    return layer, name, spec, module


def _trainable(name: str, spec) -> bool:
    return name != "parent" and not isinstance(spec, NoOpSpec)


def _order(key: str):
    layer, _, name = key.partition(":")
    return int(layer), name


def _name(path) -> str:
    return ".".join(map(str, path))


def _tokens(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"run_bld: {what} must be an integer array [batch, length]; got {x.dtype} {x.shape}")
    return x.astype(np.int32)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: record[k] for k in sorted(record, key=_order)}, indent=1) + "\n")
    os.replace(tmp, path)


def _read_resume(out: Path):
    if not (out / RESUME).exists():
        return None
    with safe_open(out / RESUME, "np") as f:
        meta = json.loads(f.metadata()["bld"])
    return {**meta, "arrays": load_file(out / RESUME)}


class _Stream:
    """The input tokens of BLD step s: sequences s * batch_size ... (s + 1) * batch_size - 1 of the dataset's
    stream, so any batch size is a pure function of the step."""

    def __init__(self, dataset, batch_size):
        first = _tokens(dataset.batch(0)["inputs"], "dataset.batch(0)['inputs']")
        self.dataset, self.rows = dataset, first.shape[0]
        self.batch_size, self.seq_len = batch_size or self.rows, first.shape[1]
        self._cached = (0, first)

    def __call__(self, step: int) -> np.ndarray:
        out = []
        for n in range(step * self.batch_size, (step + 1) * self.batch_size):
            b, r = divmod(n, self.rows)
            if self._cached[0] != b:
                self._cached = (b, _tokens(self.dataset.batch(b)["inputs"], f"dataset.batch({b})['inputs']"))
            out.append(self._cached[1][r])
        return np.stack(out)


# Module-level jits with the structure as static arguments: a re-run, a resumed run or another session
# with groups of the same structure reuses the compiled steps.
@partial(jax.jit, static_argnums=(0, 1))
def _parent_io(graphdef, layers, state, tokens):
    """Inputs (normed, in the model's compute dtype) and target contributions (fp32) of `layers`, [n, B, T, D]."""
    model = nnx.merge(graphdef, state)
    states = model.layer_states(tokens)
    h = jnp.stack([model.layers[i].norm(states[i]).astype(model.dtype) for i in layers])
    y = jnp.stack([states[i + 1].astype(jnp.float32) - states[i].astype(jnp.float32) for i in layers])
    return h, y


def _optimizer(lr: float, steps: int):
    return optax.adam(optax.cosine_decay_schedule(lr, steps))


def _member_loss(graphdef, dtypes, params, rest, h, y):
    leaves, treedef = jax.tree.flatten(params)
    params = jax.tree.unflatten(treedef, [p.astype(d) for p, d in zip(leaves, dtypes)])
    return losses.normalized_mse(nnx.merge(graphdef, params, rest)(h)[0], y)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _group_step(graphdef, dtypes, idx, lr, steps, params, opt, rest, h_all, y_all):
    """One Adam step of a stacked group; member m trains on the inputs and targets of row idx[m]."""
    idx = np.array(idx)
    loss, grads = jax.vmap(jax.value_and_grad(partial(_member_loss, graphdef, dtypes)))(
        params, rest, h_all[idx], y_all[idx])
    updates, opt = _optimizer(lr, steps).update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss


@partial(jax.jit, static_argnums=(0, 1, 2))
def _group_nmse(graphdef, dtypes, idx, params, rest, h_all, y_all):
    idx = np.array(idx)
    return jax.vmap(partial(_member_loss, graphdef, dtypes))(params, rest, h_all[idx], y_all[idx])


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@dataclasses.dataclass
class _Group:
    """Candidates of one structure, trained as one stack."""

    keys: list
    graphdef: object
    dtypes: tuple  # the modules' parameter dtypes (leaf order), which the forward pass casts to
    idx: tuple  # each member's row in the parent's stacked inputs and targets
    params: object  # fp32 master parameters, stacked [G, ...]
    rest: object  # the modules' other variables (e.g. MoE correction biases), stacked, frozen
    opt: object

    def step(self, lr, steps, h_all, y_all):
        self.params, self.opt, loss = _group_step(self.graphdef, self.dtypes, self.idx, lr, steps, self.params,
                                                  self.opt, self.rest, h_all, y_all)
        return loss

    def nmse(self, h_all, y_all):
        return _group_nmse(self.graphdef, self.dtypes, self.idx, self.params, self.rest, h_all, y_all)


def _build_groups(keys, modules, rows, tx) -> list[_Group]:
    by_structure = {}
    for key in keys:
        graphdef, params, rest = nnx.split(modules[key], nnx.Param, ...)
        shapes = tuple((p, v.get_value().shape, str(v.get_value().dtype))
                       for s in (params, rest) for p, v in nnx.to_flat_state(s))
        by_structure.setdefault((graphdef, shapes), []).append((key, params, rest))
    groups = []
    for (graphdef, _), members in by_structure.items():
        params = _stack([jax.tree.map(lambda p: p.astype(jnp.float32), p) for _, p, _ in members])
        groups.append(_Group(keys=[k for k, _, _ in members], graphdef=graphdef,
                             dtypes=tuple(p.dtype for p in jax.tree.leaves(members[0][1])),
                             idx=tuple(rows[k] for k, _, _ in members), params=params,
                             rest=_stack([r for _, _, r in members]), opt=tx.init(params)))
    return groups


def _flat_arrays(groups) -> dict[str, np.ndarray]:
    tree = [(g.params, g.opt) for g in groups]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore(groups, arrays: dict, path: Path) -> None:
    tree = [(g.params, g.opt) for g in groups]
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    if set(names) != set(arrays) or any(arrays[n].shape != x.shape for n, (_, x) in zip(names, flat)):
        raise ValueError(f"run_bld: {path} does not match the candidates' parameters (were they rebuilt with "
                         f"other shapes?); delete it to start them over")
    restored = jax.tree.unflatten(treedef, [jnp.asarray(arrays[n], x.dtype) for n, (_, x) in zip(names, flat)])
    for g, (params, opt) in zip(groups, restored):
        g.params, g.opt = params, opt


class _Run:
    def __init__(self, parent, parsed, stream, settings, heldout_tokens, out, record, log_every, save_every,
                 progress):
        self.parent = inference_copy(parent)
        self.parsed, self.stream, self.settings, self.heldout_tokens = parsed, stream, settings, heldout_tokens
        self.out, self.record, self.log_every, self.save_every, self.progress = (
            out, record, log_every, save_every, progress)

    def session(self, keys, saved) -> bool:
        """Trains `keys` in lockstep (from `saved`, a resume file's content, when given); False if stopped."""
        steps, out, record = self.settings["steps"], self.out, self.record
        layers = sorted({self.parsed[k][0] for k in keys})
        rows = {k: layers.index(self.parsed[k][0]) for k in keys}
        modules = {k: inference_copy(self.parsed[k][3]) for k in keys}
        lr = self.settings["lr"]
        groups = _build_groups(keys, modules, rows, _optimizer(lr, steps))
        if saved is not None and [g.keys for g in groups] != saved["groups"]:
            raise ValueError(f"run_bld: the candidates of {out / RESUME} no longer group as they did "
                             f"({saved['groups']}); delete it to start them over")
        graphdef, state = nnx.split(self.parent)
        h_eval, y_eval = _parent_io(graphdef, tuple(layers), state, self.heldout_tokens)

        def heldout_nmse():
            return {k: float(v) for g in groups for k, v in zip(g.keys, g.nmse(h_eval, y_eval))}

        if saved is None:
            start, initial, curves = 0, heldout_nmse(), {k: [] for k in keys}
        else:
            _restore(groups, saved["arrays"], out / RESUME)
            start, initial, curves = saved["step"], saved["initial"], saved["curves"]

        def save(step):
            meta = {"step": step, "settings": self.settings, "groups": [g.keys for g in groups],
                    "initial": initial, "curves": curves}
            tmp = out / (RESUME + ".tmp")
            save_file(_flat_arrays(groups), tmp, metadata={"bld": json.dumps(meta)})
            os.replace(tmp, out / RESUME)
            for k in keys:
                record[k] = self._entry(k, "running", step, initial[k], None, curves[k])
            _write_json(out / RECORD, record)

        desc = f"bld {len(keys)} candidates in {len(groups)} groups"
        with _stop_requests() as stop, tqdm(total=steps, initial=start, desc=desc, disable=not self.progress,
                                            unit="step") as bar:
            for step in range(start, steps):
                h_all, y_all = _parent_io(graphdef, tuple(layers), state, jnp.asarray(self.stream(step)))
                values = [g.step(lr, steps, h_all, y_all) for g in groups]
                done = step + 1
                if done % self.log_every == 0 or done == steps:
                    for g, value in zip(groups, jax.device_get(values)):
                        for k, v in zip(g.keys, value.tolist()):
                            if not math.isfinite(v):
                                raise FloatingPointError(
                                    f"run_bld: the loss of candidate {k!r} is {v} at step {done}; try a lower "
                                    f"lr (now {self.settings['lr']})")
                            curves[k].append([done, v])
                    bar.set_postfix(mean_nmse=f"{np.mean([c[-1][1] for c in curves.values()]):.4f}")
                bar.update(1)
                if stop["signal"] is not None and done < steps:
                    save(done)
                    tqdm.write(f"bld: stopped by {signal.Signals(stop['signal']).name} at step {done}; "
                               f"run again to resume")
                    return False
                if done % self.save_every == 0 and done < steps:
                    save(done)
        final = heldout_nmse()
        for g in groups:
            for m, k in enumerate(g.keys):
                path = weights_path(out, k)
                path.parent.mkdir(exist_ok=True)
                member = jax.tree.map(lambda x, m=m: np.asarray(x[m]), g.params)
                save_file({_name(p): v.get_value() for p, v in nnx.to_flat_state(member)}, path)
        for k in keys:
            record[k] = self._entry(k, "trained", steps, initial[k], final[k], curves[k])
        _write_json(out / RECORD, record)
        if (out / RESUME).exists():
            os.remove(out / RESUME)
        return True

    def _entry(self, key, status, step, initial, final, curve):
        layer, name, _, _ = self.parsed[key]
        s = self.settings
        return {"layer": layer, "name": name, "status": status, "steps": step,
                "tokens": step * s["batch_size"] * s["seq_len"], "lr": s["lr"], "batch_size": s["batch_size"],
                "initial_nmse": initial, "final_nmse": final, "loss_curve": curve}
