"""The whole engine against HF transformers: batched `LLM.generate` on an HF folder, with chunked prefill (a
prompt of up to 23 tokens through an 8-token batch budget) and 4-token pages, gives HF's greedy tokens."""

from __future__ import annotations

import pytest

from tokenflow_jax import LLM
from tokenflow_jax.sampling_params import SamplingParams

N_TOKENS = 20


@pytest.mark.parametrize("variant", ["llama", "qwen2_sharded"])
def test_batched_generate_matches_hf_greedy(variant, hf_checkpoint, hf_greedy, byte_prompts) -> None:
    ckpt = hf_checkpoint(variant)
    llm = LLM(str(ckpt.path), scheduler="fcfs", page_size=4, max_num_seqs=4, max_batch_tokens=8, max_model_len=64,
              warmup=False)  # fmt: skip
    prompts = [p for p in byte_prompts if p]
    outs = llm.generate(prompts, SamplingParams(max_tokens=N_TOKENS))
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf_greedy(ckpt.model, prompt, N_TOKENS)
        # HF keeps the EOS it stops at; the engine ends the request there too ("stop").
        assert out.token_ids == expected, prompt
        assert out.finish_reason == ("length" if len(expected) == N_TOKENS else "stop")
