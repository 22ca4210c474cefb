"""The engine against HF transformers' `generate` on the same checkpoint, in one run, alternating.

    python -m tokenflow_jax.engine_bench --vs-hf [--vs-hf-rounds 3] [--vs-hf-batch 32] [--vs-hf-tokens 128]

A random Llama checkpoint (vocab 512, hidden 128, 2 layers, 4 heads, 2 kv heads, float32) is saved with
`save_pretrained` and loaded by both. Three workloads, each timed round by round (HF, then the engine):
- fixed: `batch` prompts of 64 tokens, `tokens` greedy tokens each (the greedy tokens must be identical);
- mixed: the same prompts with output lengths drawn from 16-256; HF's batched `generate` runs every row to the
  longest, so only the tokens each request asked for count (continuous batching frees a finished row);
- batch 1: one prompt, `tokens` tokens.
Prints tokens/s of each and the ratio per round; `--out` writes the rounds as JSON.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_LEN = 64
MIXED_LENGTHS = (16, 256)


def random_llama(path: Path, seed: int = 0) -> Any:
    """Save a small random Llama (unit-scale weights: greedy tokens without near-ties) and return the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / (1.0 if "embed" in name else math.sqrt(p.shape[1])))
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_generate(model: Any, prompts: np.ndarray, max_new_tokens: int) -> tuple[list[list[int]], float]:
    """(new tokens per row, seconds) of one batched greedy `generate` that ignores EOS."""
    import torch

    model.generation_config.eos_token_id = None  # run to max_new_tokens without touching the logits
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=0)  # fmt: skip
    seconds = time.perf_counter() - t0
    return out[:, prompts.shape[1] :].tolist(), seconds


def engine_generate(llm: Any, prompts: np.ndarray, lengths: list[int]) -> tuple[list[list[int]], float]:
    from tokenflow_jax.sampling_params import SamplingParams

    samplings = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    t0 = time.perf_counter()
    outs = llm.generate([p.tolist() for p in prompts], samplings)
    return [o.token_ids for o in outs], time.perf_counter() - t0


def compare(batch: int = 32, tokens: int = 128, rounds: int = 3, seed: int = 0, threads: int = 2) -> dict[str, Any]:
    import torch

    from tokenflow_jax.engine.llm import LLM

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 512, size=(batch, PROMPT_LEN))
    mixed = [int(n) for n in rng.integers(MIXED_LENGTHS[0], MIXED_LENGTHS[1] + 1, size=batch)]
    workloads = {"fixed": (prompts, [tokens] * batch), "mixed": (prompts, mixed), "batch 1": (prompts[:1], [tokens])}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(Path(tmp), seed)
        longest = PROMPT_LEN + max(MIXED_LENGTHS[1], tokens)
        llm = LLM(tmp, scheduler="fcfs", max_num_seqs=batch, max_batch_tokens=max(256, PROMPT_LEN * 4),
                  max_model_len=1 << math.ceil(math.log2(longest)), warmup=True)  # fmt: skip
        for p, lengths in workloads.values():  # untimed: first calls (HF's and any compile)
            hf_generate(model, p[:1], 2)
            engine_generate(llm, p, lengths)
        result: dict[str, Any] = {"batch": batch, "tokens": tokens, "threads": threads, "workloads": {}}
        for name, (p, lengths) in workloads.items():
            useful = sum(lengths)
            runs = []
            for _ in range(rounds):
                hf_tokens, hf_s = hf_generate(model, p, max(lengths))
                ours, ours_s = engine_generate(llm, p, lengths)
                identical = all(o == h[:n] for o, h, n in zip(ours, hf_tokens, lengths, strict=True))
                runs.append({"hf_tok_s": useful / hf_s, "engine_tok_s": useful / ours_s,
                             "ratio": hf_s / ours_s, "identical": identical})  # fmt: skip
            result["workloads"][name] = {"requests": len(lengths), "useful_tokens": useful, "rounds": runs}
        llm.close()
    return result


def print_report(result: dict[str, Any]) -> None:
    print(f"engine vs HF transformers generate (torch, {result['threads']} threads), greedy, float32, same checkpoint")
    print(f"{'workload':>9} {'requests':>8} {'tokens':>7} {'HF tok/s':>9} {'engine tok/s':>12} {'ratio':>6} identical")
    for name, w in result["workloads"].items():
        for r in w["rounds"]:
            print(f"{name:>9} {w['requests']:>8} {w['useful_tokens']:>7} {r['hf_tok_s']:>9.0f} "
                  f"{r['engine_tok_s']:>12.0f} {r['ratio']:>6.2f} {r['identical']}")  # fmt: skip
