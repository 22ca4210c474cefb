"""The aiohttp application: OpenAI-compatible routes over an `AsyncEngine`.

    app = create_app(engine, ServerConfig(model_name="tiny"))
    runner, port = await start_server(app, "127.0.0.1", 0)

Routes: POST /v1/completions, POST /v1/chat/completions (streamed or whole), GET /v1/models, GET /health,
GET /metrics. Every error is an OpenAI error object; a client that disconnects has its request aborted.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from serving.config import ServerConfig
from serving.metrics import ServingMetrics
from serving.protocol import ApiError, ModelInfo, ResponseShape, error_body, models_list, parse_generation
from serving.streaming import SHUTDOWN_MESSAGE, stream_events, whole_response
from tokenflow_jax.engine.async_engine import AsyncEngine, EngineError, EngineStopped
from tokenflow_jax.engine.llm import LLM
from tokenflow_jax.engine.replicas import EngineReplicas

logger = logging.getLogger("serving")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class ServingState:
    engine: AsyncEngine | EngineReplicas  # one engine, or data-parallel replicas behind a router
    config: ServerConfig
    model: ModelInfo
    metrics: ServingMetrics
    default_rate: float | None  # None: requests without stream_rate are rate-less
    created: int


STATE = web.AppKey("tokenflow_serving", ServingState)


def model_info(llm: LLM, name: str) -> ModelInfo:
    tokenizer = llm.tokenizer
    # A model's own template writes its BOS; the built-in template does not.
    templated = getattr(tokenizer, "chat_template", None) is not None

    def encode_chat(messages: list[dict[str, Any]]) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=not templated)

    return ModelInfo(name, llm.executor.max_model_len, llm.cfg.vocab_size, llm.encode_prompt, encode_chat,
                     sampling_defaults=llm.generation.sampling)  # fmt: skip


# ---- middlewares
def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI error object and count responses by route."""
    state = request.app[STATE]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except ApiError as e:
        response = _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "server_error" if e.status >= 500 else "invalid_request_error"
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        response = web.json_response(error_body(e.reason, type=kind), status=e.status, headers=headers)
    except ConnectionError:  # the client left before its response: nothing to send, nothing went wrong
        logger.debug("client disconnected on %s", request.path)
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        response = web.json_response(error_body("internal server error", type="server_error"), status=500)
    state.metrics.observe_response(route, response.status)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With an API key configured, /v1/* needs `Authorization: Bearer <key>` (health and metrics stay open)."""
    key = request.app[STATE].config.api_key
    if key and request.path.startswith("/v1/"):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    return await handler(request)


# ---- routes
async def read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(f"the request body exceeds {request.app[STATE].config.max_body_bytes} bytes",
                       status=413, code="request_too_large") from e  # fmt: skip
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and invalid UTF-8 both
        raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from e


def _overloaded(state: ServingState) -> ApiError:
    return ApiError(f"the server is at capacity ({state.config.max_queue} requests in flight); retry later",
                    status=503, type="server_error", code="server_overloaded",
                    headers={"Retry-After": str(state.config.retry_after_s)})  # fmt: skip


def _shutting_down() -> ApiError:
    return ApiError(SHUTDOWN_MESSAGE, status=503, type="server_error", code="shutting_down")


async def generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    gen = parse_generation(await read_json(request), state.model, chat=chat)
    engine = state.engine
    if not engine.is_running:
        raise _shutting_down()
    if engine.num_unfinished >= state.config.max_queue:
        raise _overloaded(state)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        stream = engine.submit(gen.prompt_ids, gen.sampling, rate=gen.stream_rate, request_id=request_id)
    except EngineStopped as e:
        raise _shutting_down() from e
    except ValueError as e:
        raise ApiError(str(e), code="invalid_value") from e
    try:
        try:
            first = await anext(stream)  # limits the engine checks surface here, before any header is sent
        except ValueError as e:
            raise ApiError(str(e), code="invalid_value") from e
        except EngineError as e:
            raise ApiError(str(e), status=500, type="server_error") from e
        if first.finish_reason == "abort":
            raise _shutting_down()
        shape = ResponseShape(request_id, state.model.name, chat=chat)
        if gen.stream:
            pace_rate = (gen.stream_rate or state.default_rate) if gen.pace else None  # rate-less: unpaced
            return await stream_events(request, stream, shape, first, include_usage=gen.include_usage,
                                       pace_rate=pace_rate)  # fmt: skip
        try:
            return web.json_response(await whole_response(stream, shape, first))
        except EngineError as e:
            raise ApiError(str(e), status=500, type="server_error") from e
    finally:
        stream.abort()  # no-op once finished; otherwise the client left (or failed) mid-request


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(models_list(state.model.name, state.model.max_model_len, state.created))


async def health(request: web.Request) -> web.Response:
    """200 while requests are served: "ok", or "degraded" with the replicas whose engine died (the rest serve);
    503 once none is: "failed" with why, or "stopping" on shutdown."""
    engine = request.app[STATE].engine
    failures = engine.failures if isinstance(engine, EngineReplicas) else {0: engine.failure} if engine.failure else {}
    if not engine.is_running:
        if failures:
            return web.json_response({"status": "failed", "errors": list(failures.values())}, status=503)
        return web.json_response({"status": "stopping"}, status=503)
    if failures:  # some replicas still serve
        failed = [{"replica": i, "error": why} for i, why in sorted(failures.items())]
        running = len(engine.replicas) - len(failed)
        body = {"status": "degraded", "replicas": len(engine.replicas), "replicas_running": running, "failed": failed}
        return web.json_response(body)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    serving_metrics = request.app[STATE].metrics
    return web.Response(body=serving_metrics.render(), headers={"Content-Type": serving_metrics.content_type})


def create_app(engine: AsyncEngine | EngineReplicas, config: ServerConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware, auth_middleware])
    app[STATE] = ServingState(
        engine=engine,
        config=config,
        model=model_info(engine.llm, config.model_name),
        metrics=ServingMetrics(engine, config.model_name),
        default_rate=engine.llm.default_rate,
        created=int(time.time()),
    )
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns the runner and the bound port.

    Handlers are cancelled when their client disconnects, so a request waiting for tokens is aborted at once.
    """
    config = app[STATE].config
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_timeout_s)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound


async def stop_server(runner: web.AppRunner, engine: AsyncEngine | EngineReplicas) -> None:
    """Stop accepting connections, abort in-flight requests (their streams end), stop the engine thread."""
    for site in list(runner.sites):
        await site.stop()
    await engine.shutdown()
    await runner.cleanup()
