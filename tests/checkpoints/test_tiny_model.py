"""The embedded `tiny` model (trained by tools/train_tiny.py): an HF folder that writes text, and transformers
agrees with the engine on it."""

from __future__ import annotations

import re
import string
from functools import lru_cache

import pytest

from checkpoints import load_hf_config
from checkpoints.presets import EMBEDDED_MODELS
from tokenflow_jax import LLM, SamplingParams
from tokenflow_jax.config import PRESETS
from tokenflow_jax.tokenizer import ByteTokenizer, HFTokenizer

PROMPTS = ["The ", "In Python, ", "A list is ", "When the "]
N_TOKENS = 80
ENGINE = dict(scheduler="fcfs", max_num_seqs=4, max_model_len=128, max_batch_tokens=64, warmup=False)
TEXT_CHARS = set(string.ascii_letters + string.whitespace + string.punctuation)


def text_fraction(text: str) -> float:
    """Share of characters that are letters, spaces or punctuation."""
    return sum(c in TEXT_CHARS or c.isalpha() for c in text) / max(len(text), 1)


@lru_cache(maxsize=1)
def documentation_words() -> frozenset[str]:
    import pydoc_data.topics

    return frozenset(re.findall(r"[a-z]+", " ".join(pydoc_data.topics.topics.values()).lower()))


def word_fraction(text: str) -> float:
    """Share of the words in `text` that occur in the documentation the model was trained on."""
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in documentation_words() for w in words) / max(len(words), 1)


def greedy_texts(model: str) -> list[str]:
    llm = LLM(model, **ENGINE)
    try:
        return [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=N_TOKENS, ignore_eos=True))]
    finally:
        llm.close()


def check_writes_text(model: str) -> list[str]:
    """The greedy text of each prompt is >= 85% letters, spaces and punctuation, mostly in real words."""
    texts = greedy_texts(model)
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert len(text) >= N_TOKENS // 2, (prompt, text)
        assert text_fraction(text) >= 0.85, (prompt, text)
        assert word_fraction(text) >= 0.7, (prompt, text)
    return texts


def test_tiny_writes_text():
    check_writes_text("tiny")


def test_the_check_fails_on_random_weights():
    """Guard: the same check rejects tiny-random, whose shapes are tiny's."""
    with pytest.raises(AssertionError):
        check_writes_text("tiny-random")


def test_tiny_is_an_hf_folder_with_tiny_random_shapes():
    folder = EMBEDDED_MODELS["tiny"]
    assert load_hf_config(folder) == PRESETS["tiny-random"]
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 4_000_000
    llm = LLM("tiny", **ENGINE)
    assert isinstance(llm.tokenizer, HFTokenizer) and llm.generation.eos_token_ids == (257,)
    byte = ByteTokenizer()
    for text in ["Hello, world!", "naïve café — 日本語 😀", "  tabs\tand\nlines"]:
        assert llm.tokenizer.encode(text) == byte.encode(text)  # the byte-level ids of the presets
        assert llm.tokenizer.decode(byte.encode(text) + [257]) == text
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == "<s><|user|>\nHi\n<|assistant|>\n"  # BOS, then the built-in chat format
    llm.close()


def test_tiny_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = EMBEDDED_MODELS["tiny"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = LLM("tiny", **ENGINE)
    ours = llm.generate(PROMPTS, SamplingParams(max_tokens=20))
    llm.close()
    for prompt, out in zip(PROMPTS, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, do_sample=False, max_new_tokens=20)[0, ids.shape[1] :].tolist()
        assert out.token_ids == expected
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
