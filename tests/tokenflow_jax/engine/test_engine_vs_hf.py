"""The whole engine against HF transformers: batched `LLM.generate` on an HF folder, with chunked prefill (a
prompt of up to 23 tokens through an 8-token batch budget) and 4-token pages, gives HF's greedy tokens in float32,
and in bfloat16 picks HF's float32 argmax or a token within a stated logit tolerance of it."""

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


# bfloat16 keeps 8 bits of mantissa: logits move by a few hundredths here. A token the engine picks must be HF's
# float32 argmax or trail it by at most BF16_LOGIT_TOL (a near-tie that rounding can flip).
BF16_LOGIT_TOL = 0.25
BF16_MIN_EXACT = 0.9  # and most picks are the argmax itself: a wrong bfloat16 path cannot hide in the tolerance


@pytest.mark.parametrize("variant", ["llama", "qwen2_sharded"])
def test_batched_generate_in_bfloat16_follows_hf_float32_within_tolerance(variant, hf_checkpoint, byte_prompts):
    """Teacher-forced: HF's float32 logits at every position of the engine's own output, so one near-tie flip
    does not end the comparison (the tokens after it are still checked)."""
    import torch

    ckpt = hf_checkpoint(variant)
    llm = LLM(str(ckpt.path), scheduler="fcfs", dtype="bfloat16", page_size=4, max_num_seqs=4, max_batch_tokens=8,
              max_model_len=64, warmup=False)  # fmt: skip
    prompts = [p for p in byte_prompts if p]
    outs = llm.generate(prompts, SamplingParams(max_tokens=N_TOKENS, ignore_eos=True))
    exact, gaps = 0, []
    for prompt, out in zip(prompts, outs, strict=True):
        seq = prompt + out.token_ids
        with torch.no_grad():
            logits = ckpt.model(torch.tensor([seq])).logits[0, len(prompt) - 1 : -1].double().numpy()
        picked = logits[range(len(out.token_ids)), out.token_ids]
        gaps += (logits.max(axis=-1) - picked).tolist()
        exact += int((logits.argmax(axis=-1) == out.token_ids).sum())
    assert max(gaps) <= BF16_LOGIT_TOL, sorted(gaps)[-5:]
    assert exact >= BF16_MIN_EXACT * len(gaps), (exact, len(gaps))
