"""One process of a multi-process `nemojax train --distributed` run, for test_sharding.py.

    python _distributed_run.py LOG HANG_AT TERM_AT -- NEMOJAX_ARGS...

runs `nemojax NEMOJAX_ARGS` (the real CLI) after test hooks: every batch the process reads is appended
to the JSON-lines file LOG ({"split", "step", "rows", "inputs"}), and process 1, when it is asked for
training batch HANG_AT, stops answering (it writes LOG + ".hung" and sleeps, as a process that hangs or
is about to be killed would), and when the training loop asks for batch TERM_AT, sends itself SIGTERM
(as a scheduler that stops one task would; the run's first read, which compiles the step before the
loop starts, does not count); -1: never. The environment fixes the devices (XLA_FLAGS,
JAX_PLATFORMS) before jax starts.
"""

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

from nemojax import cli
from nemojax.data.base import Dataset
from nemojax.train import loop


def main(log: str, hang_at: int, term_at: int, argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung test sends it for the stacks
    process_id = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--process-id=")))
    make_dataset, batch = loop.make_dataset, Dataset.batch
    train_reads = []

    def tagged_dataset(tc, split="train"):
        ds = make_dataset(tc, split)
        ds.split = split
        return ds

    def logged_batch(ds, step, rows=None):
        if process_id == 1 and ds.split == "train" and step == hang_at:
            Path(log + ".hung").write_text(str(step))
            time.sleep(3600)
        if process_id == 1 and ds.split == "train" and step == term_at and train_reads:
            os.kill(os.getpid(), signal.SIGTERM)
        if ds.split == "train":
            train_reads.append(step)
        out = batch(ds, step, rows)
        with open(log, "a") as f:
            f.write(json.dumps({"split": ds.split, "step": step, "rows": None if rows is None else list(map(int, rows)),
                                "inputs": out["inputs"].tolist()}) + "\n")
        return out

    loop.make_dataset, Dataset.batch = tagged_dataset, logged_batch
    return cli.main(argv)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[sep + 1:]))
