"""Where a decode step's time goes: device work per model part, and host work per step of `LLM.generate`.

    python -m tokenflow_jax.engine_bench --step-profile [--vs-hf-batch 32] [--vs-hf-tokens 128]

Device: a `jax.profiler` trace of decode steps at `batch` sequences of ~160 tokens; every XLA operation the
trace times is charged to the model part its HLO's stack frames name (attention, KV page writes, sampling,
norms and RoPE, the rest: matmuls and MLP). Operations run on several threads at once, so the parts can add up
to more than the step's wall time. Host: the fixed workload of `--vs-hf` (`batch` prompts of 64 tokens, `tokens`
greedy tokens each) through `LLM.generate`, each phase of the loop timed by the clock around the methods doing it.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tokenflow_jax.bench.vs_hf import PROMPT_LEN, random_llama

# First function on an operation's stack (innermost first) that names a part.
PARTS = {
    "paged_attention": "attention (page reads, softmax)",
    "paged_decode_attention_reference": "attention (page reads, softmax)",
    "write_kv_pages": "KV page writes",
    "sample": "sampling",
    "rms_norm": "norms, RoPE",
    "apply_rope": "norms, RoPE",
}
OTHER = "matmuls, MLP, embedding"
CONTEXT = 160  # tokens per sequence in the traced decode steps


def _frame_functions(hlo: str) -> dict[int, list[str]]:
    """stack_frame_id -> function names from that frame outwards, from the HLO text's stack frame tables."""
    names = dict(re.findall(r'^(\d+) "([^"]*)"', hlo.split("FunctionNames", 1)[1].split("FileLocations")[0], re.M))
    locations = dict(re.findall(r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+)", hlo.split("FileLocations")[1],
                                re.M))  # fmt: skip
    frames = {int(i): (loc, int(parent)) for i, loc, parent in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", hlo.split("StackFrames")[1], re.M)}  # fmt: skip
    out = {}
    for frame in frames:
        chain, f = [], frame
        while f in frames and len(chain) < 256:
            loc, parent = frames[f]
            chain.append(names.get(locations.get(loc, ""), ""))
            f = parent - 1  # the table prints a frame's parent id plus one (0: none)
        out[frame] = chain
    return out


def _operation_parts(hlo: str) -> dict[str, str]:
    """Name of each operation of the entry computation and while bodies -> the model part it belongs to."""
    frames = _frame_functions(hlo)
    parts = {}
    for name, frame in re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = .*?stack_frame_id=(\d+)", hlo, re.M):
        functions = frames.get(int(frame), [])
        parts[name] = next((PARTS[f.split(".")[-1]] for f in functions if f.split(".")[-1] in PARTS), OTHER)
    return parts


def device_breakdown(llm: Any, batch: int, context: int = CONTEXT, steps: int = 30) -> dict[str, float]:
    """ms per decode step of each model part, summed over the XLA operations a profiler trace times."""
    from tokenflow_jax.batching import SequenceChunk
    from tokenflow_jax.kv.pages import page_ids, pages_for

    runner = llm.executor.runner
    per_seq = pages_for(context, runner.page_size)
    chunks = [SequenceChunk([1], context - 1, page_ids(range(1 + i * per_seq, 1 + (i + 1) * per_seq)))
              for i in range(batch)]  # fmt: skip
    rows = [(0.0, 0, 1.0, 0, 0)] * batch
    for _ in range(5):
        np.asarray(runner.run_step(chunks, rows))
    width = runner.buckets.page_bucket(per_seq)
    hlo = runner._executables[("step", True, runner.buckets.seq_bucket(batch), width)].as_text()
    parts = _operation_parts(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(steps):
            np.asarray(runner.run_step(chunks, rows))
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    totals: dict[str, float] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # A loop or branch is timed as a whole and its body's operations again: count the body's only.
        part = parts.get(name) if e.get("ph") == "X" and not name.startswith(("while", "cond", "call")) else None
        if part is not None:
            totals[part] += e["dur"] / 1e3 / steps
    return {"wall (traced)": wall * 1e3 / steps, **dict(sorted(totals.items(), key=lambda kv: -kv[1]))}


@contextlib.contextmanager
def _timed(owner: Any, name: str, totals: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in `owner.name` to `totals[name]` while the context is open."""
    original = getattr(owner, name)
    own = name in vars(owner)  # a module's function (put back) or an instance's method (the class's shows again)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def host_breakdown(llm: Any, batch: int, tokens: int) -> dict[str, float]:
    """ms per engine step of each phase of `LLM.generate`, exclusive of the phases nested in it."""
    from tokenflow_jax.engine import llm as llm_module
    from tokenflow_jax.engine import runner as runner_module
    from tokenflow_jax.sampling_params import SamplingParams

    prompts = np.random.default_rng(0).integers(3, 512, size=(batch, PROMPT_LEN)).tolist()
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, sampling)  # warm
    ex, runner, core = llm.executor, llm.executor.runner, llm.core
    t: dict[str, float] = collections.Counter()
    timed = [(core, "step"), (core.policy, "plan"), (ex, "_dispatch"), (ex, "_write_through"), (ex, "_compute"),
             (runner_module, "build_ragged_batch"), (runner, "_batch_arrays"), (runner, "_sampling_arrays"),
             (ex, "_sampled_tokens"), (llm_module, "token_text")]  # fmt: skip
    steps = len(llm.core.scheduler_times_s)
    with contextlib.ExitStack() as stack:
        for owner, name in timed:
            stack.enter_context(_timed(owner, name, t))
        t0 = time.perf_counter()
        llm.generate(prompts, sampling)
        total = time.perf_counter() - t0
    n = len(llm.core.scheduler_times_s) - steps
    assembly = t["build_ragged_batch"] + t["_batch_arrays"] + t["_sampling_arrays"]
    phases = {
        "scheduler (policy.plan)": t["plan"],
        "executor bookkeeping (pages, chunks)": t["_dispatch"] - t["_compute"] - t["_write_through"],
        "batch assembly (arrays for the step)": assembly,
        "step dispatch (jitted call)": t["_compute"] - assembly,
        "write-through (bookkeeping, page gathers)": t["_write_through"],
        "wait for the sampled tokens": t["_sampled_tokens"],
        "core: tokens, tracker, finishing": t["step"] - t["plan"] - t["_dispatch"] - t["_sampled_tokens"],
        "detokenize (LLM.generate)": t["token_text"],
        "rest of LLM.generate": total - t["step"] - t["token_text"],
    }
    return {"steps": n, "wall per step": total * 1e3 / n, **{k: v * 1e3 / n for k, v in phases.items()}}


def profile(batch: int = 32, tokens: int = 128) -> dict[str, Any]:
    from tokenflow_jax.engine.llm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        random_llama(Path(tmp))
        longest = PROMPT_LEN + max(CONTEXT, tokens)  # no longer than needed: fewer buckets to compile
        llm = LLM(tmp, scheduler="fcfs", max_num_seqs=batch, max_batch_tokens=max(256, PROMPT_LEN * 4),
                  max_model_len=1 << math.ceil(math.log2(longest)), warmup=True)  # fmt: skip
        try:
            return {"device": device_breakdown(llm, batch), "host": host_breakdown(llm, batch, tokens)}
        finally:
            llm.close()


def print_report(result: dict[str, Any]) -> None:
    print("device, ms per decode step (XLA operations by model part, from a jax.profiler trace)")
    for name, ms in result["device"].items():
        print(f"  {name:<48} {ms:7.3f}")
    host = result["host"]
    print(f"host, ms per engine step of LLM.generate ({host['steps']} steps, prefill included)")
    for name, ms in host.items():
        if name != "steps":
            print(f"  {name:<48} {ms:7.3f}")
