"""Every engine feature on at once: the TokenFlow policy pausing streams for newcomers, swap and recompute, a
host tier too small for the burst (the policy plans as fcfs, and its swaps fall back to recompute), pipelined
steps, small pages, greedy and seeded sampled requests side by side, prompts sharing a prefix the cache serves.
Outputs must equal each request run alone with the cache off, and no page may leak."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenflow_jax import LLM
from tokenflow_jax.sampling_params import SamplingParams

ENGINE = dict(page_size=4, max_num_seqs=4, max_batch_tokens=32, max_model_len=64, warmup=False)
GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=14, ignore_eos=True, temperature=0.8, top_k=50, top_p=0.9)


@pytest.mark.parametrize(
    ("host_pages", "exercised"),
    [
        (40, "swaps"),  # room on the host for the burst: tokenflow pauses running streams by swap for newcomers
        (12, "recomputes"),  # too small: planned as fcfs; preemption="swap" tries the host, finds it full, recomputes
    ],
)
def test_a_burst_with_every_feature_on_matches_each_request_alone(host_pages: int, exercised: str) -> None:
    rng = np.random.default_rng(11)
    shared = [int(t) for t in rng.integers(0, 256, 8)]  # two pages every other prompt starts with
    prompts = [(shared if i % 2 == 0 else []) + [int(t) for t in rng.integers(0, 256, int(rng.integers(4, 18)))]
               for i in range(10)]  # fmt: skip
    samplings = [GREEDY if i % 2 else dataclasses.replace(SAMPLED, seed=100 + i) for i in range(10)]
    # Readers at 2 tok/s: a running stream builds seconds of buffer at once, so newcomers take its place.
    llm = LLM("tiny-random", scheduler="tokenflow", preemption="swap", kv_pages=24, host_kv_pages=host_pages,
              **ENGINE, scheduler_config={"reschedule_interval": 0.05})  # fmt: skip
    outs = llm.generate(prompts, samplings, rates=[2.0] * len(prompts))
    records = list(llm.core.records.values())
    counts = {"swaps": sum(r.preemptions_swap for r in records),
              "recomputes": sum(r.preemptions_recompute for r in records)}  # fmt: skip
    assert counts[exercised] > 0, f"{counts}: the path went unexercised"
    assert llm.core.prefix_cache.hits > 0, "no prompt found the shared prefix cached"
    assert llm.executor.page_usage()[0] == 0 and llm.executor.page_usage()[2] == 0  # nothing leaked
    alone = LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, enable_prefix_caching=False, **ENGINE)
    for prompt, sampling, out in zip(prompts, samplings, outs, strict=True):
        assert out.token_ids == alone.generate([prompt], sampling)[0].token_ids
        assert out.finish_reason == "length" and out.metrics is not None


def test_the_pallas_kernels_in_interpret_mode_serve_the_same_tokens_as_the_xla_path() -> None:
    """The kernels a GPU runs, interpreted on CPU inside the real engine (prefill and decode, several pages)."""
    prompts = [[5, 17, 42, 99, 3, 250, 7, 8, 9], [1, 2, 3]]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    small = dict(ENGINE, max_num_seqs=2, max_batch_tokens=16, max_model_len=32)
    pallas = LLM("tiny-random", scheduler="fcfs", attention="pallas_interpret", kv_pages=16, host_kv_pages=0, **small)
    xla = LLM("tiny-random", scheduler="fcfs", attention="reference", kv_pages=16, host_kv_pages=0, **small)
    got = [o.token_ids for o in pallas.generate(prompts, sampling)]
    assert got == [o.token_ids for o in xla.generate(prompts, sampling)]
