"""One engine across processes (hosts): joining them with `jax.distributed` and checking they run the same engine.

Process 0 leads: it runs the scheduler and broadcasts each device operation; every other process follows
(`tokenflow_jax.engine.multihost`). The flags are `jax.distributed.initialize`'s own argument names. Free of JAX
at import: the CLIs build their parsers first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

# A follower whose leader's host stops answering exits after this long (the coordination service's heartbeat);
# a leader process that ends makes its followers exit at once (its coordination service goes with it).
HEARTBEAT_TIMEOUT_S = 60
_CONFIG_BYTES = 4096  # room for the engine's flags as JSON in the start-up check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, the same on every process (default: unset, one process)")  # fmt: skip
    group.add_argument("--num-processes", type=int, help="processes (hosts) the engine spans (default: 1)")
    index = "this process's index: 0 leads (scheduler, server), the others follow (default: unset)"
    group.add_argument("--process-id", type=int, help=index)


def initialize_from_args(args: argparse.Namespace) -> None:
    """Join the processes the flags name (nothing without --coordinator-address); ValueError on bad flags."""
    given = {"--coordinator-address": args.coordinator_address, "--num-processes": args.num_processes,
             "--process-id": args.process_id}  # fmt: skip
    if all(v is None for v in given.values()):
        return
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ValueError(f"--coordinator-address, --num-processes and --process-id go together; missing {missing}")
    initialize(args.coordinator_address, args.num_processes, args.process_id)


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` (before anything else touches a device); on CPU, collectives over gloo."""
    import jax

    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes - 1}], got {process_id!r}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's collectives across processes
    _native_stdout_to_stderr()
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)  # fmt: skip


def _native_stdout_to_stderr() -> None:
    """Gloo's C++ code prints each connection it makes on stdout, which the CLIs' output owns: native writes to
    file descriptor 1 go to stderr from here on, Python's `print` still to the original stdout."""
    sys.stdout.flush()
    python_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(python_stdout, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def is_multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def check_same_engine(config: dict[str, Any]) -> None:
    """Every process states its engine's flags; ValueError on each of them, naming the flags that differ (before
    any collective whose shapes they fix could hang)."""
    from jax.experimental import multihost_utils

    text = json.dumps(config, sort_keys=True).encode()
    if len(text) > _CONFIG_BYTES:
        raise ValueError(f"engine flags take {len(text)} bytes as JSON, more than {_CONFIG_BYTES}")
    mine = np.zeros(_CONFIG_BYTES, np.uint8)
    mine[: len(text)] = np.frombuffer(text, np.uint8)
    every = multihost_utils.process_allgather(mine)
    configs = [json.loads(bytes(row).rstrip(b"\0")) for row in np.asarray(every)]
    differ = sorted(k for k in configs[0] if any(c.get(k) != configs[0][k] for c in configs))
    if differ:
        seen = "; ".join(f"{k}: " + ", ".join(f"process {i} {c.get(k)!r}" for i, c in enumerate(configs))
                         for k in differ)  # fmt: skip
        raise ValueError(f"the processes were started with different engine flags ({seen}); start each with the same")


def shutdown() -> None:
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()
