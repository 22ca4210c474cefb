"""Engine microbenchmarks: decode step time, swap bandwidth each way, write-through cost, offline tokens/s.

    python -m tokenflow_jax.engine_bench [--model tiny|llama3-8b] [--batches 16,64] [--context 256]
        [--swap-pages 64,512] [--dtype float32|bfloat16] [--out FILE.json]
    python -m tokenflow_jax.engine_bench --host-memory-ab [--model llama3-8b] [--batches 16] [--swap-pages 4,16]

Decode steps run on the real runner with synthetic block tables (KV contents do not change the cost).
`--host-memory-ab` compares the host tier's two pools (numpy, pinned host memory) alternately in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tokenflow_jax.batching import SequenceChunk, build_ragged_batch
from tokenflow_jax.engine.executor import EngineExecutor
from tokenflow_jax.engine.llm import default_attention
from tokenflow_jax.kv.block_manager import PageCopy
from tokenflow_jax.kv.host_pool import POOLS, pinned_unavailable
from tokenflow_jax.kv.host_tier import HostKVTier
from tokenflow_jax.kv.pages import page_ids, pages_for


def _median_time(fn: Any, repeats: int) -> float:
    fn()  # warm: compile and first-touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_step_time(ex: EngineExecutor, batch: int, context: int, repeats: int, write_through: bool) -> float:
    """Seconds per decode step at `batch` sequences of `context` tokens; optionally with page write-through."""
    s = ex.page_size
    pages_per_seq = pages_for(context, s)
    pages = ex.blocks.device.allocate(batch * pages_per_seq)
    host = ex.blocks.host.allocate(batch * pages_per_seq) if write_through else []
    chunks = [
        SequenceChunk([1], context - 1, page_ids(pages[i * pages_per_seq : (i + 1) * pages_per_seq]))
        for i in range(batch)
    ]  # as the executor passes them
    rows = [(0.0, 0, 1.0, 0, 0)] * batch
    cursor = [0]

    def step() -> None:
        tokens = ex.runner.run_step(chunks, rows)
        if write_through:
            # One completed page per sequence every page_size steps: copy batch/page_size pages per step.
            n = max(1, batch // s)
            i = cursor[0] % max(1, len(pages) - n)
            cursor[0] += n
            ex._transfer_to_host(PageCopy("bench", pages[i : i + n], host[i : i + n]))
        np.asarray(tokens)

    try:
        return _median_time(step, repeats)
    finally:
        ex._flush_to_host()
        ex.blocks.device.free(pages)
        if host:
            ex.blocks.host.free(host)


def batch_assembly_time(page_size: int, batch: int, context: int, repeats: int) -> float:
    """Host seconds to lay out one decode step's batch (`build_ragged_batch`, which every step runs before
    dispatch): `batch` sequences of `context` tokens, each with its own pages."""
    pages_per_seq = pages_for(context, page_size)
    chunks = [SequenceChunk([1], context - 1, page_ids(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)))
              for i in range(batch)]  # fmt: skip
    return _median_time(lambda: build_ragged_batch(chunks, page_size, pad_tokens=batch, pad_seqs=batch,
                                                   pad_pages=pages_per_seq), repeats)  # fmt: skip


def prefill_time(ex: EngineExecutor, num_tokens: int, repeats: int) -> float:
    """Seconds to prefill one sequence of `num_tokens` tokens from scratch."""
    pages = ex.blocks.device.allocate(pages_for(num_tokens, ex.page_size))
    chunks = [SequenceChunk([1] * num_tokens, 0, pages)]
    try:
        return _median_time(lambda: np.asarray(ex.runner.run_step(chunks, [(0.0, 0, 1.0, 0, 0)])), repeats)
    finally:
        ex.blocks.device.free(pages)


def swap_bandwidth(ex: EngineExecutor, num_pages: int, repeats: int) -> tuple[float, float]:
    """(device->host, host->device) GB/s for one batched transfer of `num_pages` pages."""
    dev = ex.blocks.device.allocate(num_pages)
    host = ex.blocks.host.allocate(num_pages)
    gb = num_pages * ex.host.page_bytes / 1e9

    def out() -> None:
        ex._transfer_to_host(PageCopy("bench", dev, host))
        ex._flush_to_host()

    def back() -> None:
        ex._transfer_to_device(PageCopy("bench", host, dev))
        ex.runner.block_until_ready()

    try:
        return gb / _median_time(out, repeats), gb / _median_time(back, repeats)
    finally:
        ex.blocks.device.free(dev)
        ex.blocks.host.free(host)


def host_memory_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The host tier with its pages in numpy against pinned host memory, alternating in one process: a swap
    round trip (device block -> host pages, landed; host pages -> device block, ready) at each `--swap-pages`
    at the model's page shape (no weights needed), and, where the model's weights load (`--batches`), the decode
    step with write-through into each pool on one executor."""
    from checkpoints.presets import model_config
    from tokenflow_jax.parallel import make_mesh

    kinds = list(POOLS) if pinned_unavailable(make_mesh(1)) is None else ["numpy"]
    cfg = model_config(args.model)
    swap_pages = [int(p) for p in args.swap_pages.split(",")]
    tiers = {k: HostKVTier(cfg, 2 * max(swap_pages) + 1, args.page_size, args.dtype, host_memory=k) for k in kinds}
    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "kinds": kinds,
        "swap": [],
        "decode": [],
    }
    for n in swap_pages:
        block = jax.random.normal(jax.random.key(n), (n, *tiers[kinds[0]].shape[1:]), tiers[kinds[0]].dtype)
        ids = list(range(1 + n, 1 + 2 * n))
        times: dict[str, list[float]] = {f"{k}_{way}": [] for k in kinds for way in ("out", "in")}
        for i in range(args.repeats + 1):  # the first round compiles and touches the pages: not timed
            for k, tier in tiers.items():
                t0 = time.perf_counter()
                tier.wait(tier.write_async(block, ids))
                t1 = time.perf_counter()
                back = jax.block_until_ready(tier.load(ids))
                t2 = time.perf_counter()
                if i:
                    times[f"{k}_out"].append(t1 - t0)
                    times[f"{k}_in"].append(t2 - t1)
                assert np.array_equal(np.concatenate([np.asarray(b) for b in back]), np.asarray(block)), k
        result["swap"].append({"pages": n, "MiB": n * tiers[kinds[0]].page_bytes / 2**20,
                               **{f"{key}_ms": statistics.median(t) * 1e3 for key, t in times.items()}})  # fmt: skip
    for tier in tiers.values():
        tier.close()
    if args.batches:
        from checkpoints import load_model

        batches = [int(b) for b in args.batches.split(",")]
        loaded = load_model(args.model, dtype=args.dtype)
        pages = max(batches) * pages_for(args.context, args.page_size) + 8
        ex = EngineExecutor(loaded.cfg, loaded.params, num_device_pages=pages, num_host_pages=pages,
                            page_size=args.page_size, max_num_seqs=max(batches), max_batch_tokens=max(batches),
                            max_model_len=args.context, kv_dtype=args.dtype,
                            attention_impl=args.attention or default_attention(), host_memory=kinds[0])  # fmt: skip
        steps = {k: ex.host if k == kinds[0] else HostKVTier(
            loaded.cfg, ex.host.num_pages, args.page_size, args.dtype, mesh=ex.runner.mesh,
            transfer_pages=ex.runner.buckets.transfer_pages, host_memory=k) for k in kinds}  # fmt: skip
        for b in batches:
            times = {k: [] for k in ["off", *kinds]}
            for _ in range(args.repeats):
                times["off"].append(decode_step_time(ex, b, args.context, 3, write_through=False))
                for k in kinds:
                    ex.host = steps[k]
                    times[k].append(decode_step_time(ex, b, args.context, 3, write_through=True))
            off = statistics.median(times["off"])
            result["decode"].append({"batch": b, "step_ms": off * 1e3, **{
                f"{k}_write_through_ratio": statistics.median(times[k]) / off for k in kinds}})  # fmt: skip
        ex.host = steps.pop(kinds[0])
        for tier in steps.values():
            tier.close()
        ex.close()
    return result


def print_host_memory_ab(r: dict[str, Any]) -> None:
    kinds = r["kinds"]
    print(f"host tier pools, {r['model']} {r['dtype']} pages on {r['device']} ({r['backend']}): medians, "
          "alternating in one process")  # fmt: skip
    print(f"{'pages':>6} {'MiB':>8} " + " ".join(f"{k + ' ' + w + ' ms':>18}" for k in kinds for w in ("out", "in")))
    for s in r["swap"]:
        print(f"{s['pages']:>6} {s['MiB']:>8.1f} " + " ".join(f"{s[f'{k}_{w}_ms']:>18.2f}" for k in kinds
                                                              for w in ("out", "in")))  # fmt: skip
    for d in r["decode"]:
        ratios = ", ".join(f"{k} {d[f'{k}_write_through_ratio']:.2f}x" for k in kinds)
        print(f"decode batch {d['batch']}: {d['step_ms']:.2f} ms without write-through; with it: {ratios}")


def offline_tokens_per_s(model: str, dtype: str, num_prompts: int, max_tokens: int, repeats: int = 3) -> dict:
    """`LLM.generate` throughput with sampled tokens read in the same step vs one step late (pipelined),
    alternating the two `repeats` times on one engine."""
    from tokenflow_jax import LLM, SamplingParams

    llm = LLM(model, scheduler="fcfs", dtype=dtype, max_num_seqs=min(32, num_prompts), max_batch_tokens=256,
              max_model_len=512, warmup=True)  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, 64)] for _ in range(num_prompts)]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], sp)
    rates: dict[str, list[float]] = {"same_step": [], "pipelined": []}
    for _ in range(repeats):
        for mode in rates:
            llm.executor.pipelined = mode == "pipelined"
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            rates[mode].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    llm.close()
    return {"requests": num_prompts, "output_tokens": num_prompts * max_tokens,
            **{f"{mode}_tokens_per_s": statistics.mean(r) for mode, r in rates.items()},
            **{f"{mode}_runs": r for mode, r in rates.items()}}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from checkpoints import load_model

    batches = [int(b) for b in args.batches.split(",")]
    swap_pages = [int(p) for p in args.swap_pages.split(",")]
    loaded = load_model(args.model, dtype=args.dtype)
    pages_needed = max(batches) * pages_for(args.context, args.page_size) + 8
    ex = EngineExecutor(
        loaded.cfg, loaded.params, num_device_pages=max(pages_needed, max(swap_pages) + 8),
        num_host_pages=max(pages_needed, max(swap_pages) + 8), page_size=args.page_size,
        max_num_seqs=max(batches), max_batch_tokens=max(batches), max_model_len=args.context,
        kv_dtype=args.dtype, attention_impl=args.attention or default_attention(),
    )  # fmt: skip
    result: dict[str, Any] = {
        "model": args.model, "dtype": args.dtype, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "python": platform.python_version(),
        "attention": ex.runner.attention_impl, "host_memory": ex.host.memory_kind, "page_size": args.page_size,
        "context": args.context,
        "decode": [], "swap": [],
    }  # fmt: skip
    for b in batches:
        off = decode_step_time(ex, b, args.context, args.repeats, write_through=False)
        on = decode_step_time(ex, b, args.context, args.repeats, write_through=True)
        assembly = batch_assembly_time(args.page_size, b, args.context, max(args.repeats, 20))
        result["decode"].append({"batch": b, "step_ms": off * 1e3, "step_ms_write_through": on * 1e3,
                                 "write_through_ratio": on / off, "tokens_per_s": b / off,
                                 "host_batch_ms": assembly * 1e3})  # fmt: skip
    for n in swap_pages:
        d2h, h2d = swap_bandwidth(ex, n, args.repeats)
        result["swap"].append({"pages": n, "MiB": n * ex.host.page_bytes / 2**20, "d2h_GBps": d2h, "h2d_GBps": h2d})
    if args.profile_out:
        result["profile"] = write_sim_profile(ex, loaded.cfg, args, result)
    ex.close()
    if args.offline_requests:
        result["offline"] = offline_tokens_per_s(args.model, args.dtype, args.offline_requests, args.offline_tokens)
    return result


def write_sim_profile(ex: EngineExecutor, cfg: Any, args: argparse.Namespace, result: dict[str, Any]) -> str:
    """Fit the simulator's cost model to this engine: decode steps at two contexts per batch, one-sequence
    prefills, and the swaps above; save it where `--sim-profile PATH` (bench) can load it."""
    from tokenflow_jax.sim.profiles import profile_from_engine_measurements

    decode = [(d["batch"], d["batch"] * args.context, d["step_ms"] / 1e3) for d in result["decode"]]
    half = max(ex.page_size, args.context // 2)
    decode += [(b, b * half, decode_step_time(ex, b, half, args.repeats, write_through=False))
               for b in (int(x) for x in args.batches.split(","))]  # fmt: skip
    sizes = sorted({min(n, ex.max_batch_tokens, args.context) for n in (32, 128, 512)})
    prefill = [(n, prefill_time(ex, n, args.repeats)) for n in sizes]
    page_bytes = ex.host.page_bytes
    d2h = [(s["pages"], s["pages"] * page_bytes / (s["d2h_GBps"] * 1e9)) for s in result["swap"]]
    h2d = [(s["pages"], s["pages"] * page_bytes / (s["h2d_GBps"] * 1e9)) for s in result["swap"]]
    name = f"{result['device'].replace(' ', '_').lower()}-{args.model}"
    profile = profile_from_engine_measurements(
        name, cfg, decode=decode, prefill=prefill, d2h=d2h, h2d=h2d, page_bytes=page_bytes,
        device_kv_bytes=ex.num_device_pages * page_bytes, host_kv_bytes=ex.num_host_pages * page_bytes,
        kv_dtype_bytes=page_bytes // (cfg.kv_bytes_per_token * ex.page_size),
    )  # fmt: skip
    profile.save(args.profile_out)
    return args.profile_out


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['model']} {r['dtype']} on {r['device']} ({r['backend']}), jax {r['jax']}, attention={r['attention']}, "
          f"host KV pages in {r['host_memory']} memory")  # fmt: skip
    print(
        f"{'batch':>6} {'ctx':>6} {'step ms':>9} {'+write-through':>15} {'ratio':>6} {'tok/s':>9} "
        f"{'of which host batch ms':>22}"
    )
    for d in r["decode"]:
        print(f"{d['batch']:>6} {r['context']:>6} {d['step_ms']:>9.2f} {d['step_ms_write_through']:>15.2f} "
              f"{d['write_through_ratio']:>6.2f} {d['tokens_per_s']:>9.0f} {d['host_batch_ms']:>22.3f}")  # fmt: skip
    print(f"{'pages':>6} {'MiB':>8} {'D2H GB/s':>9} {'H2D GB/s':>9}")
    for s in r["swap"]:
        print(f"{s['pages']:>6} {s['MiB']:>8.1f} {s['d2h_GBps']:>9.2f} {s['h2d_GBps']:>9.2f}")
    if "offline" in r:
        o = r["offline"]
        print(f"offline: {o['requests']} requests x {o['output_tokens'] // o['requests']} tokens: "
              f"{o['same_step_tokens_per_s']:.0f} tok/s reading tokens in the same step, "
              f"{o['pipelined_tokens_per_s']:.0f} tok/s pipelined (one step late)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenflow_jax.engine_bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="tiny", help="preset or checkpoint folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV")
    p.add_argument("--batches", default="16,64", help="decode batch sizes to time")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence in the decode steps")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--swap-pages", default="64,512", help="pages per swap to time, each way")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per figure")
    p.add_argument(
        "--attention",
        choices=["xla", "reference", "pallas", "pallas_interpret"],
        help="None: Pallas on a GPU, plain XLA (tokenflow_jax.attention) elsewhere",
    )
    p.add_argument("--offline-requests", type=int, default=32, help="requests of the offline run (0: skip it)")
    p.add_argument("--offline-tokens", type=int, default=128, help="tokens per request of the offline run")
    p.add_argument("--vs-hf", action="store_true", help="engine against HF transformers' generate (see bench.vs_hf)")
    p.add_argument("--vs-hf-batch", type=int, default=32, help="--vs-hf: requests in the fixed and mixed workloads")
    p.add_argument("--vs-hf-tokens", type=int, default=128, help="--vs-hf: tokens per request (fixed, batch 1)")
    p.add_argument("--vs-hf-rounds", type=int, default=3, help="--vs-hf: alternating rounds per workload")
    p.add_argument("--step-profile", action="store_true",
                   help="where a decode step's time goes, device and host (see bench.step_profile)")  # fmt: skip
    p.add_argument(
        "--host-memory-ab",
        action="store_true",
        help="the host tier's numpy pool against its pinned one (swaps; decode steps at --batches)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--profile-out",
        "--profile",
        dest="profile_out",
        help="also fit and write a simulator cost profile (JSON) for --sim-profile",
    )
    args = p.parse_args(argv)
    if args.vs_hf:
        from tokenflow_jax.bench import vs_hf

        result = vs_hf.compare(args.vs_hf_batch, args.vs_hf_tokens, args.vs_hf_rounds)
        vs_hf.print_report(result)
    elif args.host_memory_ab:
        result = host_memory_ab(args)
        print_host_memory_ab(result)
    elif args.step_profile:
        from tokenflow_jax.bench import step_profile

        result = step_profile.profile(args.vs_hf_batch, args.vs_hf_tokens)
        step_profile.print_report(result)
    else:
        result = run(args)
        print_report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
