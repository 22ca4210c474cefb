"""One process of a multi-process engine for tests/tokenflow_jax/engine/test_multihost.py, through the public
entry points: process 0 generates the test's prompts and prints one JSON line; the others follow.

    python -m tests.tokenflow_jax.engine.multihost_driver MODEL_DIR HOST:PORT NUM_PROCESSES PROCESS_ID
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tokenflow_jax import distributed

N_TOKENS = 16
RATE = 2.0  # tokens/s: the policy also pauses requests far ahead of their reader
# 4-token pages and 13 usable pages for 4 running requests that grow to 5-9 pages each: preemption is forced.
ENGINE = dict(scheduler="tokenflow", preemption="swap", page_size=4, max_num_seqs=4, max_batch_tokens=8,
              max_model_len=64, kv_pages=13, host_kv_pages=64, warmup=False)  # fmt: skip


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [[256, *(int(t) for t in rng.integers(0, 256, int(rng.integers(3, 20))))] for _ in range(6)]


def main(model: str, coordinator: str, num_processes: int, process_id: int) -> None:
    distributed.initialize(coordinator, num_processes, process_id)
    import jax

    from tokenflow_jax import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=jax.device_count(), **ENGINE)
    print(f"process {process_id} ready", file=sys.stderr, flush=True)
    if not llm.is_leader:
        llm.follow()
    else:
        outs = llm.generate(prompts(), SamplingParams(max_tokens=N_TOKENS, ignore_eos=True),
                            rates=[RATE] * len(prompts()))  # fmt: skip
        records = llm.core.records.values()
        print(json.dumps({
            "token_ids": [o.token_ids for o in outs],
            "preemptions_swap": sum(r.preemptions_swap for r in records),
            "bytes_to_host": llm.executor.bytes_to_host, "bytes_to_device": llm.executor.bytes_to_device,
        }), flush=True)  # fmt: skip
        llm.close()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
