"""`python -m serving` / `tokenflow-serve`: the OpenAI-compatible streaming server on one model.

    python -m serving --model tiny [--host 127.0.0.1] [--port 8000] [--scheduler tokenflow] [--api-key KEY]
        [--max-queue N] [--default-rate R|none] [--max-hold-s S] [--kv-pages N] [--max-num-seqs N] ...

Prints `serving <model> on http://HOST:PORT` once it accepts requests (port 0 picks a free one). SIGINT or
SIGTERM: stop accepting, abort in-flight requests, stop the engine thread, exit 0. Across hosts
(`--coordinator-address HOST:PORT --num-processes N --process-id I`, the same flags on every process): process 0
serves, the others follow its engine without serving HTTP and exit 0 when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from serving.config import ServerConfig
from tokenflow_jax import distributed
from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S, check_max_hold

if TYPE_CHECKING:
    from tokenflow_jax.engine.llm import LLM

USAGE_ERROR = 2
logger = logging.getLogger("serving")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description="OpenAI-compatible streaming LLM server.")
    models = "model name (tiny, tiny-random, llama3-8b, ...), HF model folder or orbax folder"
    p.add_argument("--model", default="tiny", help=f"{models} (default: tiny)")
    p.add_argument("--served-model-name", help="the model id clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, localhost only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    key_help = "require 'Authorization: Bearer KEY' on /v1/* (default: $TOKENFLOW_API_KEY, else no key)"
    p.add_argument("--api-key", default=os.environ.get("TOKENFLOW_API_KEY"), help=key_help)
    p.add_argument("--max-queue", type=int, default=256, help="unfinished requests before answering 503 (default: 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1048576)")
    rate_help = ("tokens/s a client reads unless its request sets stream_rate; 'none': such requests are rate-less, "
                 "served at what the streams leave spare (default: 20)")  # fmt: skip
    p.add_argument("--default-rate", type=_rate_or_none, default=20.0, help=rate_help)
    hold_help = (f"seconds a rate-less request may be held back without a token before it must run "
                 f"(default: {DEFAULT_MAX_HOLD_S:g})")  # fmt: skip
    p.add_argument("--max-hold-s", type=float, default=DEFAULT_MAX_HOLD_S, help=hold_help)
    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--scheduler", default="tokenflow", help="tokenflow, fcfs, sglang or andes (default: tokenflow)"
    )
    preemption_help = "how a paused request's KV is kept; auto picks the cheaper (default: auto)"
    engine.add_argument("--preemption", choices=("auto", "swap", "recompute"), default="auto", help=preemption_help)
    engine.add_argument("--kv-pages", type=int, help="usable device KV pages (default: max-num-seqs full sequences)")
    memory_help = "size the device KV pool to this fraction of device memory, weights included, instead of --kv-pages"
    engine.add_argument("--gpu-memory-utilization", type=float, help=memory_help + " (default: unset)")
    host_help = "host-tier KV pages (default: 2x device, or 4 GiB if more, at most 1/4 of host memory)"
    engine.add_argument("--host-kv-pages", type=int, help=host_help)
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    engine.add_argument("--max-num-seqs", type=int, default=32, help="requests decoding at once (default: 32)")
    engine.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step (default: 256)")
    context = "the model's context, at most 2048"
    engine.add_argument("--max-model-len", type=int, help=f"prompt + output tokens per request (default: {context})")
    dtype_help = "weight and KV cache dtype (default: float32)"
    engine.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=dtype_help)
    seed_help = "seeds requests that set no seed, and a preset's random weights (default: 0)"
    engine.add_argument("--seed", type=int, default=0, help=seed_help)
    tp_help = "split the model over this many devices: heads and MLP columns, KV pages by kv head (default: 1)"
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help=tp_help)
    dp_help = ("serve with this many engine replicas, each on its own --tensor-parallel-size devices; each new "
               "request goes to the one with the most spare decode capacity (default: 1)")  # fmt: skip
    engine.add_argument("--data-parallel-size", type=int, default=1, help=dp_help)
    cache_help = "reuse the KV of prompt prefixes already computed, on both tiers (default: on)"
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help=cache_help)
    distributed.add_arguments(p)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    return p


def _rate_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected tokens/s or 'none', got {text!r}") from None


def _check(args: argparse.Namespace) -> None:
    positive = {"--max-queue": args.max_queue, "--max-num-seqs": args.max_num_seqs,
                "--max-batch-tokens": args.max_batch_tokens, "--page-size": args.page_size}  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.default_rate is not None and not (math.isfinite(args.default_rate) and args.default_rate > 0):
        raise ValueError(f"--default-rate must be a positive number of tokens/s or 'none', got {args.default_rate}")
    check_max_hold(args.max_hold_s)


async def serve(llm: LLM | Sequence[LLM], config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly. Several LLMs are data-parallel replicas behind a router."""
    from serving.app import create_app, start_server, stop_server
    from tokenflow_jax.engine.async_engine import AsyncEngine
    from tokenflow_jax.engine.replicas import EngineReplicas

    llms = list(llm) if isinstance(llm, Sequence) else [llm]
    engine = AsyncEngine(llms[0]) if len(llms) == 1 else EngineReplicas([AsyncEngine(one) for one in llms])
    await engine.start()
    runner, port = await start_server(create_app(engine, config), config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving {config.model_name} on http://{config.host}:{port}", flush=True)
    await stop.wait()
    logger.info("shutting down: %d requests in flight are aborted", engine.num_unfinished)
    await stop_server(runner, engine)


def start_engine(args: argparse.Namespace, devices: Sequence | None = None) -> LLM:
    """Load the model and compile every step shape, saying what it is doing (a cold start takes a while)."""
    from tokenflow_jax.engine.llm import LLM

    start = time.perf_counter()
    logger.info("loading %s (%s)", args.model, args.dtype)
    llm = LLM(args.model, scheduler=args.scheduler, kv_pages=args.kv_pages, host_kv_pages=args.host_kv_pages,
              gpu_memory_utilization=args.gpu_memory_utilization, preemption=args.preemption, seed=args.seed,
              dtype=args.dtype, page_size=args.page_size,
              max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
              max_model_len=args.max_model_len, default_rate=args.default_rate,
              enable_prefix_caching=args.enable_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
              devices=devices, warmup=False,
              scheduler_config={"max_hold_s": args.max_hold_s})  # fmt: skip
    if not llm.is_leader:  # its compilations follow the leader's warm-up
        return llm
    logger.info("loaded in %.1f s; compiling the engine's step shapes (cached for the next start) ...",
                time.perf_counter() - start)  # fmt: skip
    start = time.perf_counter()
    shapes = llm.executor.warmup(progress=sys.stderr.isatty())
    logger.info("compiled %d step shapes in %.1f s", shapes, time.perf_counter() - start)
    return llm


def start_replicas(args: argparse.Namespace) -> list[LLM]:
    """One engine per device group of --data-parallel-size x --tensor-parallel-size devices. On a GPU later replicas
    load the first one's executables from the persistent cache; on CPU its keys name the device: each compiles."""
    from tokenflow_jax.engine.replicas import replica_devices

    groups = replica_devices(args.data_parallel_size, args.tensor_parallel_size)
    llms: list[LLM] = []
    try:
        for i, devices in enumerate(groups):
            logger.info("replica %d of %d on %s", i, len(groups), ", ".join(str(d) for d in devices))
            llms.append(start_engine(args, devices))
    except BaseException:
        for llm in llms:
            llm.close()
        raise
    return llms


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _check(args)
        config = ServerConfig(
            model_name=args.served_model_name or args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR

    try:
        if args.data_parallel_size != 1 and args.num_processes not in (None, 1):
            raise ValueError("--data-parallel-size runs replicas in one process; across processes, split one engine")
        distributed.initialize_from_args(args)
        llms = start_replicas(args) if args.data_parallel_size != 1 else [start_engine(args)]
    except ValueError as e:  # unknown model or scheduler, bad sizes, a model the device cannot hold, too few devices
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    if not llms[0].is_leader:
        logger.info("process %d follows the leader's engine (%s)", args.process_id, args.coordinator_address)
        llms[0].follow()
        distributed.shutdown()
        return 0
    try:
        asyncio.run(serve(llms, config))
    finally:
        for llm in llms:
            llm.close()  # followers stop following
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
