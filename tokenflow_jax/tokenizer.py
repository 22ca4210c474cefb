"""Tokenizers (byte-level for presets, HF `tokenizer.json` for real models) and streaming detokenization.

`IncrementalDetokenizer` turns a stream of sampled token ids into text deltas that are safe to send to a
client: never half a UTF-8 character, never text that a stop string might still swallow.
"""

from __future__ import annotations

import abc
import codecs
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenflow_jax.config import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB_SIZE

Message = dict[str, Any]


def builtin_chat_template(messages: Sequence[Message]) -> str:
    """The chat format of presets and of models without a template: `<|role|>\\ncontent\\n` per message,
    then `<|assistant|>\\n` to prompt the reply."""
    turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return turns + "<|assistant|>\n"


class Tokenizer(abc.ABC):
    """What the engine needs from a tokenizer. `decode` drops special tokens."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        return builtin_chat_template(messages)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, BOS 256, EOS 257; ids above 257 (vocab padding) decode to nothing."""

    def __init__(self, vocab_size: int = BYTE_VOCAB_SIZE) -> None:
        self.bos_token_id = BYTE_BOS_ID
        self.eos_token_ids = (BYTE_EOS_ID,)
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def decode_bytes(ids: Sequence[int]) -> bytes:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256)


def _special_token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens and jinja chat template of an HF model folder."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_ids = [tokenizer.token_to_id(t) for t in eos_tokens]
        eos_ids += list(extra_eos_token_ids)
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.chat_template = chat_template
        self._compiled_template: Any = None

    @classmethod
    def from_folder(cls, path: str | Path) -> HFTokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
        `chat_template.jinja` (where transformers 5 saves the template) and `generation_config.json`
        (extra EOS ids)."""
        from tokenizers import Tokenizer as RawTokenizer

        path = Path(path)
        raw = RawTokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos = _special_token_text(tok_cfg.get("eos_token"))
        gen_eos = gen_cfg.get("eos_token_id")
        extra_eos = gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos])
        return cls(
            raw,
            bos_token=_special_token_text(tok_cfg.get("bos_token")),
            eos_tokens=[eos] if eos else [],
            extra_eos_token_ids=extra_eos,
            chat_template=template,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """Render the model's jinja template the way transformers does; the built-in format without one.

        The rendered text already holds any BOS the template writes: encode it with add_special_tokens=False.
        """
        if self.chat_template is None:
            return builtin_chat_template(messages)
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # Same environment options as transformers' chat templating, so templates render identically.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages),
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=True,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


# How many already-emitted tokens are re-decoded as context, so tokenizers whose decoding depends on
# neighbours (SentencePiece's leading space) produce the same text incrementally as in one go.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Token ids in, final text deltas out.

    `push` returns only text that can no longer change. Incomplete UTF-8 is held back (byte tokenizer: an
    incremental UTF-8 decoder; HF: re-decode a window from `prefix_offset` and hold back text ending in
    U+FFFD), and so is any tail that could be the start of a stop string. When a stop string completes, the
    text before it is emitted, `stopped` becomes True and nothing more is emitted. Call `flush` at the end.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self.text = ""  # everything emitted so far
        self._pending = ""  # final text held back because a stop string may start in it
        self._byte_decoder = (
            codecs.getincrementaldecoder("utf-8")(errors="replace") if isinstance(tokenizer, ByteTokenizer) else None
        )
        self._ids = [int(i) for i in prompt_ids[-_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self._detokenize(int(token_id)), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self._byte_decoder is not None:
            tail = self._byte_decoder.decode(b"", final=True)
        else:
            prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            tail = self.tokenizer.decode(self._ids[self._prefix_offset :])[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(tail, final=True)

    def _detokenize(self, token_id: int) -> str:
        """Newly complete text from one more token (before stop-string handling)."""
        if self._byte_decoder is not None:
            return self._byte_decoder.decode(ByteTokenizer.decode_bytes([token_id]))
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        window = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""  # an incomplete character (or a token with no text yet): wait for more tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(prefix) :]

    def _emit(self, new_text: str, *, final: bool) -> str:
        pending = self._pending + new_text
        hits = [(i, s) for s in self.stop if (i := pending.find(s)) >= 0]
        if hits:
            cut = min(hits)[0]
            out, self._pending, self.stopped = pending[:cut], "", True
        else:
            hold = 0 if final else _stop_prefix_len(pending, self.stop)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
