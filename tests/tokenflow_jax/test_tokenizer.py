"""Byte and HF tokenizers, chat templates, and streaming detokenization (UTF-8 safety, stop strings)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tokenflow_jax.config import BYTE_BOS_ID, BYTE_EOS_ID
from tokenflow_jax.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "naïve café — 日本語のテキスト 😀👍🏽 done",
    "  leading spaces and\nnew lines\t tabs",
    "Ünïcödé everywhere: ∑∫√ ≠ ≤ ∞ 🚀",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, detok.stopped


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained on a few sentences, saved with a tokenizer_config.json chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("hf_tok")
    raw.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# Byte tokenizer.


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == BYTE_BOS_ID and max(ids[1:]) < 256
        assert tok.decode(ids + [BYTE_EOS_ID, 300]) == text
    assert tok.encode("a", add_special_tokens=False) == [97]
    assert (tok.bos_token_id, tok.eos_token_ids) == (BYTE_BOS_ID, (BYTE_EOS_ID,))


def test_byte_builtin_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert ByteTokenizer().apply_chat_template(messages) == expected


def test_byte_stream_never_emits_partial_characters():
    tok = ByteTokenizer()
    for text in TEXTS:
        deltas, _ = stream(tok, tok.encode(text))  # BOS included: specials produce no text
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)
        for d in deltas:
            d.encode("utf-8")  # no lone surrogates or other half characters


def test_byte_stream_matches_full_decode_on_invalid_bytes():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(0, 260) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tok, ids)[0]) == tok.decode(ids)


# Stop strings.


def test_stop_string_spanning_tokens():
    tok = ByteTokenizer()
    deltas, stopped = stream(tok, tok.encode("Hello STOP world", add_special_tokens=False), ("STOP",))
    assert stopped and "".join(deltas) == "Hello "
    # Nothing of the stop string leaks out while it is being matched.
    assert all("S" not in d for d in deltas)


def test_stop_string_with_multibyte_characters():
    tok = ByteTokenizer()
    deltas, stopped = stream(tok, tok.encode("x → 日本 y", add_special_tokens=False), ("→ 日",))
    assert stopped and "".join(deltas) == "x "


def test_partial_stop_match_is_released():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, ("abc",))
    assert [detok.push(i) for i in b"xab"] == ["x", "", ""]
    assert detok.push(ord("d")) == "abd"
    assert detok.push(ord("a")) == "" and detok.flush() == "a"
    assert not detok.stopped


def test_earliest_stop_wins_and_nothing_after_stop():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, ("world", "o w"))
    out = "".join(detok.push(i) for i in b"hello world")
    assert out == "hell" and detok.stopped
    assert detok.push(ord("z")) == "" and detok.flush() == ""


def test_no_stop_text_flushes_everything():
    tok = ByteTokenizer()
    deltas, stopped = stream(tok, list(b"the end"), ("the end!",))
    assert not stopped and "".join(deltas) == "the end"
    assert deltas[-1] == "the end"  # all of it could still have become the stop string


# HF tokenizer.


def test_hf_tokenizer_specials_and_round_trip(hf_tokenizer_dir):
    tok = HFTokenizer.from_folder(hf_tokenizer_dir)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids + [1]) == text


def test_hf_chat_template(hf_tokenizer_dir, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    tok = HFTokenizer.from_folder(hf_tokenizer_dir)
    assert tok.apply_chat_template(messages) == "<s><|system|>Be brief.</s><|user|>Hi there</s><|assistant|>"
    # A template that refuses a conversation (raise_exception) is a ValueError, which the server answers as 400.
    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": refusing}))
    with pytest.raises(ValueError, match="chat template error: user first"):
        HFTokenizer.from_folder(tmp_path).apply_chat_template(messages)


def test_hf_without_template_uses_builtin(hf_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|user|>\nHi\n<|assistant|>\n"
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where transformers 5 saves templates
    templated = HFTokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert templated == "<|user|>Hi<|assistant|>"  # no special tokens configured: they render empty


def test_hf_incremental_equals_full_decode(hf_tokenizer_dir):
    tok = HFTokenizer.from_folder(hf_tokenizer_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        deltas, _ = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)
    # Multi-byte characters that BPE never merged are split across several byte tokens.
    assert len(tok.encode("😀👍🏽", add_special_tokens=False)) > 2


@pytest.mark.parametrize("clean_up", [False, True])
def test_streamed_text_is_what_transformers_decodes(hf_tokenizer_dir, tmp_path, clean_up):
    """Streaming decodes through the Rust backend only where that gives transformers' text; a tokenizer that
    may clean up spaces (" ." -> "."; transformers 5 skips it for BPE) decodes through transformers."""
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "clean_up_tokenization_spaces": clean_up}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.from_folder(tmp_path)
    assert (tok._backend is None) == clean_up
    rng = random.Random(0)
    texts = [*TEXTS, "Hello , world . Isn ' t it ?"]
    for text in texts:
        ids = tok.encode(text)
        expected = tok.hf.decode(ids, skip_special_tokens=True)
        assert "".join(stream(tok, ids)[0]) == expected
        shuffled = rng.sample(ids, len(ids))  # arbitrary token sequences, as a model may sample them
        assert "".join(stream(tok, shuffled)[0]) == tok.hf.decode(shuffled, skip_special_tokens=True)


def test_hf_stop_string(hf_tokenizer_dir):
    tok = HFTokenizer.from_folder(hf_tokenizer_dir)
    deltas, stopped = stream(tok, tok.encode("the quick brown fox jumps"), ("brown f",))
    assert stopped and "".join(deltas) == "the quick "
