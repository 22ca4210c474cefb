"""BOS, EOS and sampling defaults as a checkpoint says: generation_config.json, else config.json, else the
tokenizer; and the byte fallback of a folder without tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from checkpoints import load_hf_config, load_model
from checkpoints.generation import generation_defaults
from serving.protocol import ModelInfo, parse_generation
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.tokenizer import ByteTokenizer, HFTokenizer


def folder(hf_checkpoint, tmp_path: Path, generation: dict | None, config_edit: dict | None = None) -> Path:
    """The small llama checkpoint with its generation_config.json replaced (None: removed) and config edited."""
    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint("llama").path, path)
    (path / "generation_config.json").unlink()
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    if config_edit:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **config_edit}))
    return path


def word_tokenizer(path: Path) -> None:
    """Tokenizer files whose EOS is 2 and BOS 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def test_generation_config_comes_first(hf_checkpoint, tmp_path):
    path = folder(hf_checkpoint, tmp_path, {"eos_token_id": [7, 9], "bos_token_id": 3})
    word_tokenizer(path)
    gen = load_model(path).generation
    assert (gen.bos_token_id, gen.eos_token_ids) == (3, (7, 9))


def test_then_config_json_then_the_tokenizer(hf_checkpoint, tmp_path):
    path = folder(hf_checkpoint, tmp_path, None)
    word_tokenizer(path)
    cfg, tokenizer = load_hf_config(path), HFTokenizer.from_folder(path)
    gen = generation_defaults(path, cfg, tokenizer)
    assert (gen.bos_token_id, gen.eos_token_ids) == (256, (257,))  # config.json's
    (path / "config.json").write_text(
        json.dumps({**json.loads((path / "config.json").read_text()), "bos_token_id": None, "eos_token_id": None})
    )
    gen = generation_defaults(path, load_hf_config(path), tokenizer)
    assert (gen.bos_token_id, gen.eos_token_ids) == (1, (2,))  # the tokenizer's


def test_byte_fallback_uses_the_checkpoint_ids_and_warns(hf_checkpoint, tmp_path):
    path = folder(hf_checkpoint, tmp_path, {"eos_token_id": [7, 9], "bos_token_id": 3})
    with pytest.warns(UserWarning, match="no tokenizer files.*byte fallback.*--prompt-ids"):
        loaded = load_model(path)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.tokenizer.encode("hi") == [3, *b"hi"] and loaded.tokenizer.eos_token_ids == (7, 9)
    assert loaded.tokenizer.decode([3, *b"hi", 7]) == "hi"


def test_sampling_defaults(hf_checkpoint, tmp_path):
    path = folder(hf_checkpoint, tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": -1})
    with pytest.warns(UserWarning):
        gen = load_model(path).generation
    assert gen.sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert gen.sampling_params(max_tokens=5) == SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9)
    assert gen.sampling_params(max_tokens=5, temperature=0.0).temperature == 0.0  # a request's own value wins
    assert load_model("tiny-random").generation.sampling_params() == SamplingParams()  # greedy without any


def test_invalid_sampling_default_is_named(hf_checkpoint, tmp_path):
    path = folder(hf_checkpoint, tmp_path, {"top_p": 0.0})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"generation_config\.json: top_p"):
        load_model(path)


def test_api_requests_take_the_defaults_they_leave_out():
    def info(defaults: dict) -> ModelInfo:
        return ModelInfo("m", 64, 512, lambda text: [1, 2], lambda messages: [1, 2], defaults)

    checkpoint = info({"temperature": 0.7, "top_p": 0.8, "top_k": 20})
    sampling = parse_generation({"prompt": "x"}, checkpoint, chat=False).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.7, 0.8, 20)
    sampling = parse_generation({"prompt": "x", "temperature": 0.2, "top_k": -1}, checkpoint, chat=False).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.2, 0.8, 0)
    sampling = parse_generation({"prompt": "x"}, info({}), chat=False).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, 0)  # OpenAI's defaults
