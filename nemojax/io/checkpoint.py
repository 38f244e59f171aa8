"""Training checkpoints with orbax: the whole train state (params, optimizer, correction biases, step) as one
PyTree, plus a JSON record (step, run summary, a fingerprint per array) per step.

Multi-host: every process calls `save` and `restore` with its share of the global arrays; orbax writes one
checkpoint (each process its own shards, process 0 the metadata and the record) and restores it onto
whatever mesh `like` carries, resharding as needed, so a run may resume on another mesh or device count.

Orbax checks the checksums of its shard indices but not of the array data, so a data file overwritten
with other bytes restores without complaint; a fingerprint of every array, written at save and compared
at restore, catches it. The fingerprint is computed where the array lives (a sum over elements of a hash
of (position, bits), reduced across devices), so it needs no gathering and is the same for any layout.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
    """A checkpoint that does not exist or cannot be restored intact; the message names it, says what is
    wrong and lists the steps available."""


class CheckpointMismatch(ValueError):
    """A checkpoint that is intact but holds another state than the one being restored (another model or
    optimizer): the message names the arrays that differ."""


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint(x) -> jax.Array:
    """uint32: sum over elements of fmix32(bits ^ position * golden ratio), modulo 2^32. A sum, so the
    devices add their shards' partial sums in any order and layout to the same value."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    position = jnp.zeros(bits.shape, jnp.uint32)  # the row-major flat index, built without a reshape
    for d in range(bits.ndim):
        stride = jnp.uint32(math.prod(bits.shape[d + 1:]) % 2**32)
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * stride
    return jnp.sum(_fmix32(bits ^ (position * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


_fingerprints_jit = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(state) -> dict[str, int]:
    """A layout-independent 32-bit fingerprint of each array, keyed by its key path; computed by every
    process on its own shards (all processes must call it, like `save`)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    values = jax.device_get(_fingerprints_jit([jnp.asarray(x) for x in leaves]))
    return {jax.tree_util.keystr(p): int(v) for p, v in zip(paths, values)}


def compile_fingerprints(state) -> None:
    """Compiles `fingerprints` for arrays shaped and placed like `state`'s, so that the first save does
    not wait for it (a training loop's progress bar would count that as a step)."""
    _fingerprints_jit.lower([jnp.asarray(x) for x in jax.tree.leaves(state)]).compile()


def checksums(state) -> dict[str, int]:
    """CRC32 of each array's bytes: what checkpoints written before `fingerprints` recorded (their arrays
    are verified this way, on a process that holds every array whole)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(x).tobytes()) for path, x in leaves}


def _root_cause(err: BaseException) -> str:
    """The innermost exception's first line (orbax wraps tensorstore's precise message in a vague one)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _placed(x) -> jax.ShapeDtypeStruct:
    """The shape, dtype and sharding to restore `x` as; an array without a sharding goes whole to this
    process's first device."""
    x = ocp.utils.to_shape_dtype_struct(x)
    if getattr(x, "sharding", None) is not None:
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def _describe(meta) -> str:
    return f"{tuple(meta.shape)} {np.dtype(meta.dtype).name}"


# Replica-parallel saving (orbax's default off GPUs) has each replica of a replicated array write a
# slice of it, which compiles one slicing program per array shape: about 7 s per save of a tiny model
# on 8 CPU devices, for a write that takes milliseconds. Each array is written by one replica instead.
_ARRAYS = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))


class Checkpointer:
    """A thin `ocp.CheckpointManager` over `<run_dir>/checkpoints`, keeping the newest `keep` steps.
    `create=False` opens it read-only: nothing is written to `run_dir` until a save."""

    def __init__(self, run_dir, keep: int = 3, create: bool = True):
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.keep = keep
        self.manager = None
        if create or self.directory.exists():
            self._open()

    def _open(self) -> None:
        handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state = ocp.PyTreeCheckpointHandler(type_handler_registry=_ARRAYS)
        record = ocp.JsonCheckpointHandler()
        for name, handler, args in (("state", state, (ocp.args.PyTreeSave, ocp.args.PyTreeRestore)),
                                    ("record", record, (ocp.args.JsonSave, ocp.args.JsonRestore))):
            for a in args:
                handlers.add(name, a, handler)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True), handler_registry=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, record: dict) -> None:
        """Saves asynchronously; `wait()` (or `close()`) blocks until it is on disk."""
        if self.manager is None:
            self._open()
        record = {**record, "fingerprints": fingerprints(state)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        record=ocp.args.JsonSave(record)), force=True)

    def check_fits(self, like, step: int) -> None:
        """Raises `CheckpointMismatch` naming the arrays that checkpoint `step` lacks, holds beyond `like`'s, or
        holds with another shape or dtype."""
        try:
            saved = ocp.tree.to_flat_dict(self.manager.item_metadata(step)["state"].tree, sep="/")
        except Exception as err:  # unreadable metadata: damage, which `restore` reports
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has unreadable metadata "
                                  f"({_root_cause(err)}); available steps: {self.steps()}") from None
        wanted = ocp.tree.to_flat_dict(like, sep="/")
        diffs = [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
        diffs += [f"{k}: not in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
        diffs += [f"{k}: {_describe(saved[k])} in the checkpoint, {_describe(wanted[k])} here"
                  for k in sorted(saved.keys() & wanted.keys())
                  if (tuple(saved[k].shape), np.dtype(saved[k].dtype)) != (tuple(wanted[k].shape),
                                                                            np.dtype(wanted[k].dtype))]
        if diffs:
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} holds another state than the one "
                                     f"being restored (another model or optimizer): {len(diffs)} array(s) differ: "
                                     + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else ""))

    def restore(self, like, step: int | None = None):
        """(state, record) of `step` (default: the latest), shaped, typed and placed like the PyTree `like`
        (arrays or jax.ShapeDtypeStructs; their shardings say where each shard goes), its arrays verified
        against the fingerprints written at save. Raises `CheckpointMismatch` when the checkpoint holds
        other arrays than `like`, `CheckpointError` when it cannot be read intact."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; available steps: {steps}")
        self.check_fits(like, step)
        abstract = jax.tree.map(_placed, like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
                    abstract)), record=ocp.args.JsonRestore()))
        except Exception as err:  # orbax and tensorstore raise many types for unreadable files
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({_root_cause(err)}); "
                                  f"available steps: {steps}") from None
        state, record = out["state"], out["record"] or {}
        if "fingerprints" in record:
            expected, found = record["fingerprints"], fingerprints(state)
        elif "checksums" in record:
            expected, found = record["checksums"], checksums(state)
        else:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no fingerprints in its record, so "
                                  f"its arrays cannot be verified; available steps: {steps}")
        bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if bad:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is damaged: {len(bad)} array(s) differ "
                                  f"from the fingerprints written at save ({', '.join(bad[:4])}"
                                  f"{', ...' if len(bad) > 4 else ''}); available steps: {steps}")
        return state, record

    def restore_intact(self, like, max_step: int | None = None):
        """(state, record, skipped) of the newest checkpoint at or below `max_step` (default: any) that
        restores intact; `skipped` lists (step, why) of the newer ones that did not. A checkpoint of another
        state (`CheckpointMismatch`) is not damage: it raises rather than falling back."""
        candidates = [s for s in reversed(self.steps()) if max_step is None or s <= max_step]
        if max_step is not None and max_step not in candidates:
            raise CheckpointError(f"no checkpoint of step {max_step} in {self.directory}; available steps: "
                                  f"{self.steps()}")
        skipped = []
        for step in candidates:
            try:
                state, record = self.restore(like, step)
                return state, record, skipped
            except CheckpointError as err:
                skipped.append((step, str(err)))
        raise CheckpointError(f"no checkpoint in {self.directory} restores intact:\n"
                              + "\n".join(f"  step {s}: {why}" for s, why in skipped))

    def set_aside(self, step: int, folder: str) -> Path:
        """Moves checkpoint `step` to `<run_dir>/<folder>/` (so a resumed run can write that step again
        without deleting it); returns where it went. Every process calls it; process 0 moves."""
        self.wait()
        target = self.run_dir / folder / str(step)
        n = 1
        while target.exists():
            target, n = self.run_dir / folder / f"{step}-{n}", n + 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:  # the others reload once the move is done
            multihost_utils.sync_global_devices(f"nemojax set_aside {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
