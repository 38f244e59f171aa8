"""Training checkpoints with orbax: the whole train state (params, optimizer, router biases, step,
RNG) as one PyTree, plus a JSON record (data position, metrics) per step."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin `ocp.CheckpointManager` over `<run_dir>/checkpoints`, keeping the newest `keep` steps."""

    def __init__(self, run_dir, keep: int = 3):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        """Saves asynchronously; `wait()` (or `close()`) blocks until it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)), force=True)

    def restore(self, like, step: int | None = None):
        """(state, record) of `step` (default: the latest), shaped and typed like the PyTree `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 record=ocp.args.JsonRestore()))
        return out["state"], out["record"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
