"""Training checkpoints with orbax: the whole train state (params, optimizer, correction biases, step) as one
PyTree, plus a JSON record (step, run summary, a checksum per array) per step.

Orbax checks the checksums of its shard indices but not of the array data, so a data file overwritten
with other bytes restores without complaint; the CRC32 of every array, written at save and compared at
restore, catches it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that does not exist or cannot be restored intact; the message names it, says what is
    wrong and lists the steps available."""


def checksums(state) -> dict[str, int]:
    """CRC32 of each array's bytes, keyed by its key path."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(x).tobytes()) for path, x in leaves}


def _root_cause(err: BaseException) -> str:
    """The innermost exception's first line (orbax wraps tensorstore's precise message in a vague one)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


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
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, record: dict) -> None:
        """Saves asynchronously; `wait()` (or `close()`) blocks until it is on disk."""
        if self.manager is None:
            self._open()
        record = {**record, "checksums": checksums(state)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)), force=True)

    def restore(self, like, step: int | None = None):
        """(state, record) of `step` (default: the latest), shaped and typed like the PyTree `like`, its
        arrays verified against the checksums written at save."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; available steps: {steps}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     record=ocp.args.JsonRestore()))
        except Exception as err:  # orbax and tensorstore raise many types for unreadable files
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({_root_cause(err)}); "
                                  f"available steps: {steps}") from None
        state, record = out["state"], out["record"]
        expected = (record or {}).get("checksums")
        if expected is None:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no checksums in its record, so its "
                                  f"arrays cannot be verified; available steps: {steps}")
        found = checksums(state)
        bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if bad:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is damaged: {len(bad)} array(s) differ "
                                  f"from the checksums written at save ({', '.join(bad[:4])}"
                                  f"{', ...' if len(bad) > 4 else ''}); available steps: {steps}")
        return state, record

    def restore_intact(self, like, max_step: int | None = None):
        """(state, record, skipped) of the newest checkpoint at or below `max_step` (default: any) that
        restores intact; `skipped` lists (step, why) of the newer ones that did not."""
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
        without deleting it); returns where it went."""
        self.wait()
        target = self.run_dir / folder / str(step)
        n = 1
        while target.exists():
            target, n = self.run_dir / folder / f"{step}-{n}", n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
