"""The text of a request's tokens as they arrive, and where a stop string ends it: one path for `LLM.generate`
and the `AsyncEngine`."""

from __future__ import annotations

from tokenflow_jax.engine.core import EngineCore, TokenEvent
from tokenflow_jax.tokenizer import IncrementalDetokenizer


def token_text(core: EngineCore, event: TokenEvent, detok: IncrementalDetokenizer) -> tuple[str, bool, str | None]:
    """(text the token adds, whether its request ends with it, why). EOS adds no text of its own (what was held
    back comes out); a stop string this token completes ends the request here: the core finishes it at once."""
    if event.finish_reason == "stop" and event.token_id in core.eos_token_ids:
        return detok.flush(), True, "stop"
    text = detok.push(event.token_id)
    if detok.stopped:
        if not event.finished:
            core.finish(event.request_id, "stop")
        return text, True, "stop"
    if event.finished:
        text += detok.flush()
    return text, event.finished, event.finish_reason
