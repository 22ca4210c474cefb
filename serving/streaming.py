"""Relaying one request's deltas to its HTTP client: Server-Sent Events (optionally paced) or one JSON body.

Only the handler's own coroutine ever waits on its client: the engine thread fills per-request queues and
never blocks on a socket, so one slow reader delays nobody else.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from serving.protocol import ApiError, ResponseShape, error_body
from tokenflow_jax.engine.async_engine import EngineError, RequestStream, StreamDelta
from tokenflow_jax.reader import next_read

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
SHUTDOWN_MESSAGE = "the server is shutting down; the request was aborted"


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ReleaseClock:
    """When a paced stream sends its next token: as the reader reads it (`reader.next_read`), one token every
    1/rate seconds from the first, never before the token exists."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate
        self.last_release: float | None = None

    def wait_s(self, now: float) -> float:
        return next_read(self.last_release, now, self.period) - now

    def release(self, now: float) -> None:
        self.last_release = now


async def stream_events(
    http_request: web.Request,
    stream: RequestStream,
    shape: ResponseShape,
    first: StreamDelta,
    *,
    include_usage: bool,
    pace_rate: float | None,
) -> web.StreamResponse:
    """Send the stream as SSE chunks ending in `data: [DONE]`. A client that goes away aborts the request."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    loop = asyncio.get_running_loop()
    clock = ReleaseClock(pace_rate) if pace_rate else None
    opening = shape.opening_chunk()
    out = bytearray(sse_event(opening) if opening else b"")
    delta = first
    try:
        await response.prepare(http_request)
        while True:
            # Unpaced, everything already produced goes out in one write.
            batch = [delta] if clock else [delta, *stream.ready()]
            if clock:
                await asyncio.sleep(clock.wait_s(loop.time()))
                clock.release(loop.time())
            for d in batch:
                if d.finish_reason == "abort":
                    out += sse_event(error_body(SHUTDOWN_MESSAGE, type="server_error", code="aborted"))
                else:
                    out += sse_event(shape.chunk(d.text, d.finish_reason if d.finished else None))
            last = batch[-1]
            if last.finished:
                if include_usage:
                    out += sse_event(shape.usage_chunk(last.prompt_tokens, last.completion_tokens, last.cached_tokens))
                out += SSE_DONE
            await response.write(bytes(out))
            out.clear()
            if not clock:  # paced, the server holds the buffer itself: what it sends is on time by design
                stream.engine.report_delivery(last)
            if last.finished:
                break
            try:
                delta = await anext(stream)
            except EngineError as e:
                await response.write(sse_event(error_body(str(e), type="server_error")) + SSE_DONE)
                break
        await response.write_eof()
    except ConnectionError:  # the client went away (aiohttp's ClientConnectionResetError is one)
        stream.abort()
    return response


async def whole_response(stream: RequestStream, shape: ResponseShape, first: StreamDelta) -> dict[str, Any]:
    """Wait for the whole generation and return the non-streamed response object."""
    text, last = [first.text], first
    while not last.finished:
        last = await anext(stream)
        text.append(last.text)
    if last.finish_reason == "abort":
        raise ApiError(SHUTDOWN_MESSAGE, status=503, type="server_error", code="aborted")
    return shape.whole(
        "".join(text), last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens
    )
