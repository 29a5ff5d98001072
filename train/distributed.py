"""Joining a multi-process (multi-host) run: who the coordinator is, how many processes, and which one this is.

Taken, in order, from the command line (`--coordinator HOST:PORT --num-processes N --process-id I`), from JAX's
own variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), from torchrun's (`MASTER_ADDR`,
`MASTER_PORT`, `WORLD_SIZE`, `RANK`), or from OpenMPI's (`OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_RANK`, with the
coordinator from `JAX_COORDINATOR_ADDRESS`); with none of these, `jax.distributed.initialize()` detects a SLURM or
OpenMPI cluster itself. CPU processes exchange collectives through gloo.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

from csm_jax.core.errors import UserError


class DistributedError(UserError):
    """An incomplete or contradictory description of the processes of a run."""


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def cluster_spec(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 env: Mapping[str, str] = os.environ) -> dict:
    """Keyword arguments for `jax.distributed.initialize`; {} when nothing is given (JAX's cluster detection)."""
    torchrun = env.get("MASTER_ADDR") and env.get("MASTER_PORT")
    coordinator = (coordinator or env.get("JAX_COORDINATOR_ADDRESS")
                   or (f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" if torchrun else None))
    num_processes = (num_processes if num_processes is not None else
                     _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
                     or _int(env.get("WORLD_SIZE"), "WORLD_SIZE")
                     or _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE"))
    if process_id is None:
        for name in ("JAX_PROCESS_ID", "RANK", "OMPI_COMM_WORLD_RANK"):
            process_id = _int(env.get(name), name)
            if process_id is not None:
                break
    given = {"coordinator": coordinator, "number of processes": num_processes, "process id": process_id}
    if all(v is None for v in given.values()):
        return {}
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise DistributedError(
            f"a multi-process run needs the coordinator address, the number of processes and this process's id, "
            f"but the {' and the '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; pass --coordinator "
            f"HOST:PORT --num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            f"JAX_PROCESS_ID)")
    if ":" not in coordinator:
        raise DistributedError(f"coordinator {coordinator!r} needs a port: HOST:PORT, e.g. 10.0.0.1:1234")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is not in 0..{num_processes - 1} (of {num_processes} "
                               f"processes)")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run described by the arguments or the environment (see the module docstring)."""
    spec = cluster_spec(coordinator, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only; GPUs use NCCL
    try:
        jax.distributed.initialize(**spec)
    except ValueError as e:  # JAX found no cluster to detect
        raise DistributedError(f"cannot join the other processes ({e}); run under SLURM (srun) or OpenMPI, or pass "
                               f"--coordinator HOST:PORT --num-processes N --process-id I (or set "
                               f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
