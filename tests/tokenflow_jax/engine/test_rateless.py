"""Requests that state no rate through `LLM.generate(..., rates=[None, ...])`: served by every policy, the
TokenFlow policy pausing streams for them and them for streams, with the outputs each request gets alone; bad
rates are refused, naming the value."""

from __future__ import annotations

import numpy as np
import pytest

from tokenflow_jax import LLM
from tokenflow_jax.sampling_params import SamplingParams

ENGINE = dict(page_size=4, max_num_seqs=4, max_batch_tokens=32, max_model_len=64, warmup=False)
GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(21)
    return [[int(t) for t in rng.integers(0, 256, int(rng.integers(4, 18)))] for _ in range(10)]


@pytest.fixture(scope="module")
def fcfs_llm() -> LLM:
    return LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, **ENGINE)


@pytest.fixture(scope="module")
def alone(prompts: list[list[int]], fcfs_llm: LLM) -> list[list[int]]:
    return [fcfs_llm.generate([p], GREEDY)[0].token_ids for p in prompts]


@pytest.mark.parametrize("scheduler", ["tokenflow", "fcfs", "sglang", "andes"])
def test_streams_and_rateless_requests_side_by_side_match_each_alone(scheduler, prompts, alone) -> None:
    # Readers at 2 tok/s build seconds of buffer at once: under tokenflow the rate-less requests take their place.
    llm = LLM("tiny-random", scheduler=scheduler, preemption="swap", kv_pages=24, host_kv_pages=40, **ENGINE,
              scheduler_config={"reschedule_interval": 0.05} if scheduler == "tokenflow" else None)  # fmt: skip
    rates = [None if i % 2 else 2.0 for i in range(len(prompts))]
    outs = llm.generate(prompts, GREEDY, rates=rates)
    assert [o.token_ids for o in outs] == alone
    assert llm.executor.page_usage()[0] == 0 and llm.executor.page_usage()[2] == 0  # nothing leaked
    records = llm.core.records
    assert [records[o.request_id].rate for o in outs] == rates
    for out, rate in zip(outs, rates, strict=True):
        if rate is None:  # no reader to stall: every token counts as read when it is made
            assert out.metrics.rebuffer_s == 0 and out.metrics.effective_tokens == len(out.token_ids)
    if scheduler == "tokenflow":
        swaps = sum(r.preemptions_swap for r in records.values())
        assert swaps > 0, "the policy never paused anyone: the mixed path went unexercised"


def test_rates_none_is_rateless_and_no_rates_is_the_default_rate(prompts) -> None:
    llm = LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, default_rate=7.5, **ENGINE)
    outs = llm.generate(prompts[:2], GREEDY, rates=[None, 3.0]) + llm.generate(prompts[:1], GREEDY)
    assert [llm.core.records[o.request_id].rate for o in outs] == [None, 3.0, 7.5]
    rateless = LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, default_rate=None, **ENGINE)
    out = rateless.generate(prompts[:1], GREEDY)[0]
    assert rateless.core.records[out.request_id].rate is None


@pytest.mark.parametrize("rate", [-1.0, 0, float("nan"), float("inf"), "20", "fast", True])
def test_a_bad_rate_is_refused_naming_it(prompts, fcfs_llm, rate) -> None:
    with pytest.raises(ValueError, match="stream rate must be") as error:
        fcfs_llm.generate(prompts[:1], GREEDY, rates=[rate])
    assert repr(rate) in str(error.value)
    with pytest.raises(ValueError, match="stream rate must be"):
        LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, default_rate=rate, **ENGINE)
