"""Tensor parallelism on a CPU mesh of 4 host devices (tests/conftest.py): `LLM(tensor_parallel_size=N)` on HF
checkpoints (untied and tied embeddings) gives HF's greedy tokens at N = 2 and 4 (4 replicates the checkpoints'
2 kv heads), through preemption by swap and by recompute; seeded sampling draws the same tokens as on one device;
host copies made by each device's slice equal the device pages bit for bit; counts the mesh cannot split are a
clear error."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from tests.tokenflow_jax.engine.harness import check_host_copies, check_page_ownership, host_kv_memory
from tokenflow_jax import LLM
from tokenflow_jax.config import ModelConfig
from tokenflow_jax.parallel import kv_head_replicas
from tokenflow_jax.request import RequestStatus
from tokenflow_jax.sampling_params import SamplingParams

N_TOKENS = 16
# 4-token pages and 13 usable pages for 4 running requests that grow to 5-9 pages each: preemption is forced.
ENGINE = dict(page_size=4, max_num_seqs=4, max_batch_tokens=8, max_model_len=64, kv_pages=13, host_kv_pages=64,
              warmup=False)  # fmt: skip
SAMPLED = SamplingParams(max_tokens=N_TOKENS, ignore_eos=True, temperature=1.0, top_k=40, top_p=0.9)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (XLA_FLAGS in tests/conftest.py)")


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [[256, *(int(t) for t in rng.integers(0, 256, int(rng.integers(3, 20))))] for _ in range(6)]


@functools.cache
def sampled_on_one_device(path: str) -> tuple[tuple[int, ...], ...]:
    llm = LLM(path, scheduler="fcfs", **dict(ENGINE, kv_pages=128))
    outs = llm.generate(prompts(), [dataclasses.replace(SAMPLED, seed=50 + i) for i in range(len(prompts()))])
    llm.close()
    return tuple(tuple(o.token_ids) for o in outs)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize(("variant", "tp"), [("llama", 2), ("qwen2_sharded", 4), ("llama_tied", 4)])
def test_tensor_parallel_matches_hf_greedy_through_preemption(variant, tp, mode, hf_checkpoint, hf_greedy) -> None:
    ckpt = hf_checkpoint(variant)
    llm = LLM(str(ckpt.path), scheduler="tokenflow", preemption=mode, tensor_parallel_size=tp, **ENGINE)
    assert {d.id for d in llm.executor.runner.kv_cache[0][0].sharding.device_set} == {d.id for d in jax.devices()[:tp]}
    # Readers at 2 tok/s: the policy also pauses requests far ahead of their reader.
    outs = llm.generate(prompts(), SamplingParams(max_tokens=N_TOKENS, ignore_eos=True), rates=[2.0] * 6)
    for prompt, out in zip(prompts(), outs, strict=True):
        expected = hf_greedy(ckpt.model, prompt, N_TOKENS)  # HF stops at EOS; the engine ignores it here
        assert out.token_ids[: len(expected)] == expected, prompt
        assert len(out.token_ids) == N_TOKENS
    preempted = sum(getattr(r, f"preemptions_{mode}") for r in llm.core.records.values())
    assert preempted > 0, f"no preemption by {mode}: the test did not exercise it"
    assert llm.executor.page_usage()[0] == 0
    llm.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_seeded_sampling_under_tensor_parallel_equals_one_device(tp, hf_checkpoint) -> None:
    path = str(hf_checkpoint("llama").path)
    llm = LLM(path, scheduler="tokenflow", preemption="swap", tensor_parallel_size=tp, **ENGINE)
    outs = llm.generate(prompts(), [dataclasses.replace(SAMPLED, seed=50 + i) for i in range(len(prompts()))],
                        rates=[2.0] * 6)  # fmt: skip
    assert tuple(tuple(o.token_ids) for o in outs) == sampled_on_one_device(path)
    assert sum(r.preemptions_swap for r in llm.core.records.values()) > 0
    llm.close()


@pytest.mark.parametrize(("tp", "host_memory"), [(4, "numpy"), (2, "pinned_host")])
def test_host_copies_of_each_slice_equal_the_device_pages_and_resume_bit_exact(tp, host_memory, hf_checkpoint) -> None:
    """Each device's kv-head slice goes to its own slice of the host pages and back: numpy, and a pinned pool
    sharded like the blocks (each slice in its device's pinned memory)."""
    with host_kv_memory(host_memory):
        llm = LLM(str(hf_checkpoint("qwen2_sharded").path), scheduler="fcfs", tensor_parallel_size=tp, **ENGINE)
    core, ex = llm.core, llm.executor
    assert ex.host.memory_kind == host_memory
    reqs = [llm.make_request(p, SamplingParams(max_tokens=N_TOKENS, ignore_eos=True)) for p in prompts()[:2]]
    for r in reqs:
        core.add_request(r)
    while min(r.num_computed for r in reqs) < 9:
        core.step()
    check_page_ownership(core)
    check_host_copies(core)  # every kv head's slice, written by its own device
    victim = reqs[0]
    ex.host.flush()
    before = {t: _device_token_kv(ex, victim, t) for t in range(victim.num_computed)}
    ex.swap_out(victim)
    victim.status = RequestStatus.PAUSED
    ex.blocks.device.drop_idle()  # nothing of it stays on the device: resume loads every page
    ex.swap_in(victim)
    ex._finish_loads()  # the pages load on the load thread; the next step would wait for them here
    for t, kv in before.items():
        np.testing.assert_array_equal(_device_token_kv(ex, victim, t), kv, err_msg=f"token {t}")
    llm.close()


def _device_token_kv(ex, req, t: int) -> np.ndarray:
    page, slot = req.device_pages[t // ex.page_size], t % ex.page_size
    return np.stack([np.stack([np.asarray(k[:, page, slot]), np.asarray(v[:, page, slot])])
                     for k, v in ex.runner.kv_cache])  # fmt: skip


@pytest.mark.parametrize(("heads", "kv_heads", "tp", "message"), [
    (4, 2, 3, "tensor_parallel_size 3 does not divide the model's 4 attention"),
    (8, 4, 8, None),
    (12, 4, 6, "neither divides the model's 4 kv heads"),
    (4, 2, 0, "positive integer"),
])  # fmt: skip
def test_head_counts_the_mesh_cannot_split_are_named(heads, kv_heads, tp, message) -> None:
    cfg = ModelConfig("LlamaForCausalLM", 300, 64, 128, 2, heads, kv_heads, 16)
    if message is None:
        assert kv_head_replicas(cfg, tp) == tp // kv_heads
        return
    with pytest.raises(ValueError, match=message):
        kv_head_replicas(cfg, tp)


def test_more_devices_than_the_machine_has_is_a_clear_error() -> None:
    n = len(jax.devices()) * 2  # 8: Llama-3-8B's heads (32 / 8) split, but the machine has 4 devices
    with pytest.raises(ValueError, match=f"needs {n} devices, {len(jax.devices())} available"):
        LLM("llama3-8b", tensor_parallel_size=n, **ENGINE)
