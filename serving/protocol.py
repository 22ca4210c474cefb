"""The OpenAI wire protocol: request validation into engine terms, and the JSON shapes of responses.

Everything a client can get wrong is caught here and raised as an `ApiError` carrying OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`), so the handlers only see valid requests.
Extensions beyond OpenAI: `stream_rate` (tokens/s the client reads), `pace` (release tokens at that rate),
`top_k` and `ignore_eos`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from tokenflow_jax.sampling_params import SamplingParams

MAX_STREAM_RATE = 10_000.0  # tokens/s; above this no reader is pacing and the number is a mistake
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_SHARED_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                  "stream_options", "stream_rate", "pace", "ignore_eos"}  # fmt: skip
# Accepted and ignored: they do not change what is generated.
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields we do not implement, accepted only at their neutral value.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt"}
CHAT_FIELDS = _SHARED_FIELDS | {"messages", "max_completion_tokens"}


class ApiError(Exception):
    """An error the client receives as an OpenAI-style error object with this HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    name: str
    max_model_len: int
    vocab_size: int
    encode: Callable[[str], list[int]]  # prompt text -> ids (with the tokenizer's special tokens)
    encode_chat: Callable[[list[dict[str, Any]]], list[int]]  # messages -> templated prompt ids
    # The checkpoint's temperature / top_p / top_k (`LLM.generation.sampling`) for requests that leave them out.
    sampling_defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request in engine terms."""

    chat: bool
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    stream_rate: float | None  # None: the server's default
    pace: bool


# ---- field readers
def _type_error(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(f"'{name}' must be {expected}, got {type(value).__name__}", param=name, code="invalid_type")


def _value_error(name: str, message: str) -> ApiError:
    return ApiError(f"'{name}' {message}", param=name, code="invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_int(body: dict[str, Any], name: str, default: int | None, *, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if low is not None and value < low:
        raise _value_error(name, f"must be >= {low}, got {value}")
    return value


def read_number(
    body: dict[str, Any], name: str, default: float | None, *, low: float, high: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _type_error(name, "a number", value)
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _value_error(name, f"must be in {interval}, got {value:g}")
    return value


def read_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _read_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _type_error("stop", "a string or a list of strings", stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise _value_error("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    if any(not s for s in stop):
        raise _value_error("stop", "must not contain empty strings")
    return tuple(stop)


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED_FIELDS:
            continue
        if name in _NEUTRAL_VALUES:
            if value not in _NEUTRAL_VALUES[name]:
                raise ApiError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
            continue
        raise ApiError(f"unrecognized request argument supplied: '{name}'", param=name, code="unknown_parameter")


# ---- prompts
def _completion_prompt_ids(prompt: Any, model: ModelInfo) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _value_error("prompt", "must not be empty")
        return model.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise _value_error("prompt", f"holds token ids outside [0, {model.vocab_size}): {bad[:5]}")
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise _value_error("prompt", "must not be empty")
    if isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
        raise _value_error("prompt", "must be a single prompt (batches of several prompts are not supported)")
    raise _type_error("prompt", "a string or a list of token ids", prompt)


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _value_error(f"messages[{index}].content", "may only hold text parts")
            parts.append(part["text"])
        return "".join(parts)
    raise _type_error(f"messages[{index}].content", "a string or a list of text parts", content)


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise ApiError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "a list of messages", messages)
    if not messages:
        raise _value_error("messages", "must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _value_error(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        out.append({"role": role, "content": _message_text(message.get("content"), i)})
    if not any(m["content"] for m in out):
        raise _value_error("messages", "must not all be empty")
    return out


# ---- requests
def parse_generation(body: Any, model: ModelInfo, *, chat: bool) -> GenerationRequest:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_type")
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise _type_error("model", "a string", name)
    if name is not None and name != model.name:
        raise ApiError(f"the model '{name}' does not exist; this server serves '{model.name}'",
                       status=404, param="model", code="model_not_found")  # fmt: skip
    if read_int(body, "n", 1) != 1:
        raise _value_error("n", "must be 1 (one choice per request)")
    stream = read_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _value_error("stream_options", "is only allowed when 'stream' is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _type_error("stream_options", "an object with 'include_usage'", options)
    include_usage = read_bool(options or {}, "include_usage", False)

    if chat:
        messages = _chat_messages(body.get("messages"))
        try:
            prompt_ids = model.encode_chat(messages)
        except ValueError as e:  # the model's chat template refused the conversation
            raise _value_error("messages", str(e)) from e
        prompt_param = "messages"
    else:
        if "prompt" not in body:
            raise ApiError("'prompt' is required", param="prompt", code="missing_required_parameter")
        prompt_ids = _completion_prompt_ids(body["prompt"], model)
        prompt_param = "prompt"
    room = model.max_model_len - len(prompt_ids)
    if room < 1:
        raise ApiError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {model.max_model_len} "
                       "tokens including at least one generated token",
                       param=prompt_param, code="context_length_exceeded")  # fmt: skip

    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = read_int(body, max_name, None, low=1)
    if max_tokens is None:
        max_tokens = min(room, DEFAULT_COMPLETION_MAX_TOKENS) if not chat else room
    elif max_tokens > room:
        raise ApiError(f"'{max_name}' is {max_tokens} but the prompt ({len(prompt_ids)} tokens) leaves room for "
                       f"{room} in this model's context of {model.max_model_len} tokens",
                       param=max_name, code="context_length_exceeded")  # fmt: skip

    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **model.sampling_defaults}
    top_k = read_int(body, "top_k", int(defaults["top_k"]), low=-1)
    seed = read_int(body, "seed", None)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=read_number(body, "temperature", defaults["temperature"], low=0.0, high=2.0),
        top_p=read_number(body, "top_p", defaults["top_p"], low=0.0, high=1.0, low_open=True),
        top_k=max(top_k, 0),  # vLLM's -1 means "off", like our 0
        seed=seed,
        stop=_read_stop(body),
        ignore_eos=read_bool(body, "ignore_eos", False),
    )
    return GenerationRequest(
        chat=chat,
        prompt_ids=prompt_ids,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        stream_rate=read_number(body, "stream_rate", None, low=0.0, high=MAX_STREAM_RATE, low_open=True),
        pace=read_bool(body, "pace", False),
    )


# ---- responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served (either tier)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseShape:
    """The JSON objects of one response: streamed chunks and the whole (non-streamed) response."""

    def __init__(self, request_id: str, model: str, *, chat: bool) -> None:
        self.request_id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def opening_chunk(self) -> dict[str, Any] | None:
        """Chat streams announce the assistant role first; completions have no opening chunk."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_object, [choice])

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text or not finish_reason else {}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return self._envelope(self.chunk_object, [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        envelope = self._envelope(self.chunk_object, [])
        return {**envelope, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def whole(
        self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice, obj = {"index": 0, "text": text}, "text_completion"
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._envelope(obj, [choice]), "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return ApiError(message, type=type, code=code, param=param).body()


def models_list(name: str, max_model_len: int, created: int) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": created, "owned_by": "tokenflow-jax",
            "max_model_len": max_model_len}  # fmt: skip
    return {"object": "list", "data": [card]}


__all__ = ["ApiError", "GenerationRequest", "ModelInfo", "ResponseShape", "parse_generation"]
