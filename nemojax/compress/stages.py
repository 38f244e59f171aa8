"""A compression pipeline as stages over one directory (`nemojax puzzle`, `nemojax fuse`): a state file
names the parent run and records every stage's settings, and a stage whose input is missing says which
command makes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageDirectory:
    state_name: str  # the state file, e.g. "puzzle.json"
    command: str  # the CLI command, e.g. "nemojax puzzle"
    what: str  # e.g. "a Puzzle directory"
    first: str  # the stage that creates the directory

    def state(self, directory) -> dict:
        path = Path(directory) / self.state_name
        if not path.exists():
            raise FileNotFoundError(f"{directory} is not {self.what} (no {self.state_name}); start with "
                                    f"`{self.command} {self.first} DIR --parent RUN`")
        return json.loads(path.read_text())

    def parent(self, directory) -> str:
        return self.state(directory)["parent"]

    def record(self, directory, stage: str, settings: dict) -> None:
        state = self.state(directory)
        state.setdefault("stages", {})[stage] = settings
        (Path(directory) / self.state_name).write_text(json.dumps(state, indent=2) + "\n")

    def need(self, path, stage: str) -> Path:
        """`path`, which the stage `stage` writes; FileNotFoundError naming the command when it is missing."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `{self.command} {stage}` on this directory first")
        return path
