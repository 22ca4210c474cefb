"""Tokenizers (byte-level for the random presets, transformers' `AutoTokenizer` for model folders) and streaming
detokenization.

`IncrementalDetokenizer` turns a stream of sampled token ids into text deltas that are safe to send to a
client: never half a UTF-8 character, never text that a stop string might still swallow.
"""

from __future__ import annotations

import abc
import codecs
from collections.abc import Sequence
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
    """UTF-8 bytes as ids 0..255, then BOS and EOS (256 and 257 for the presets); other ids decode to nothing.

    Also the fallback for a model folder without tokenizer files, with the checkpoint's BOS and EOS ids.
    """

    def __init__(
        self,
        vocab_size: int = BYTE_VOCAB_SIZE,
        bos_token_id: int | None = BYTE_BOS_ID,
        eos_token_ids: Sequence[int] = (BYTE_EOS_ID,),
    ) -> None:
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        special = (self.bos_token_id, *self.eos_token_ids)
        return bytes(int(i) for i in ids if 0 <= int(i) < 256 and int(i) not in special)


# The files from which transformers can build a tokenizer (fast, SentencePiece, or GPT-2 style BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class HFTokenizer(Tokenizer):
    """An HF model folder's tokenizer through transformers' `AutoTokenizer`: special and added tokens, the chat
    template (`apply_chat_template`), decoding.

    Streaming decodes a short window per token; a fast tokenizer's Rust backend does that with the same text as
    `AutoTokenizer.decode` (which adds Python overhead per call), so it is used unless the tokenizer cleans up
    spaces after decoding, which only the transformers side does.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.bos_token_id = hf_tokenizer.bos_token_id
        eos = hf_tokenizer.eos_token_id
        self.eos_token_ids = () if eos is None else (int(eos),)
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleans_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self._backend = None if cleans_up else backend

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    @classmethod
    def from_folder(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """The model's template rendered by transformers; the built-in format when it has none.

        The rendered text already holds any BOS the template writes: encode it with add_special_tokens=False.
        """
        if self.chat_template is None:
            return builtin_chat_template(messages)
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # the template's raise_exception(): a conversation it refuses
            raise ValueError(f"chat template error: {e}") from e


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
            return self._byte_decoder.decode(self.tokenizer.decode_bytes([token_id]))
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
