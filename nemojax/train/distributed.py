"""One run over several processes (hosts), on JAX's own distributed runtime.

`initialize` joins this process to the others (`jax.distributed.initialize`); from then on
`jax.devices()` lists every process's devices, the trainer's mesh spans them all, each process loads
only the rows of each global batch that its devices hold (`sharding.load_batch`), orbax writes one
checkpoint from all of them, and process 0 alone writes the run's files (metrics, plots, summary) and
prints. A process that dies is noticed by the runtime's heartbeats: every other process then exits
with an error instead of waiting for it forever.
"""

from __future__ import annotations

import jax

DEFAULT_HEARTBEAT_TIMEOUT = 100  # jax.distributed's own default, in seconds


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT) -> None:
    """Joins the processes of one run; call it in every process before anything else touches JAX.

    Given no address, count or id, JAX finds them in the environment of a SLURM job, an Open MPI
    launch or a cloud TPU pod (and the address in JAX_COORDINATOR_ADDRESS); elsewhere give all three:
    process 0's host and a free port (the same in every process), the number of processes, and this
    process's id in [0, num_processes). `heartbeat_timeout`: seconds after which a silent process
    counts as dead and the others exit with an error.
    """
    if heartbeat_timeout < 1:
        raise ValueError(f"heartbeat_timeout must be >= 1 second; got {heartbeat_timeout}")
    host, _, port = (coordinator_address or "").rpartition(":")
    if coordinator_address is not None and not (host and port.isdigit()):
        raise ValueError(f"coordinator_address must be HOST:PORT (process 0's host and a free port); got "
                         f"{coordinator_address!r}")
    # The training loop turns SIGTERM (and SIGINT) into a stop that every process agrees on; JAX's
    # preemption service would otherwise install a SIGTERM handler of its own that the loop replaces.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except ValueError as err:  # e.g. "coordinator_address should be defined."
        if None not in (coordinator_address, num_processes, process_id):
            raise
        raise ValueError(f"{err} (no SLURM, Open MPI or TPU pod environment gives it: pass the coordinator "
                         f"address, the number of processes and this process's id)") from None


def is_main() -> bool:
    """Whether this is process 0, the one that writes the run's files and prints."""
    return jax.process_index() == 0
