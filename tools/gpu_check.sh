#!/usr/bin/env bash
# One run on a GPU machine; everything lands under $OUT (default gpu_out/). Quick, decisive
# parts first and the slowest last, so a run cut short still returns the first figures:
#   1. env.txt           python, jax, devices
#   2. kernel_check.txt  both Pallas kernels compiled for the device (interpret=False) against the XLA
#                        references, float32 and bfloat16, at Llama-3-8B, Qwen2.5-7B (group 7) and Qwen2.5-32B
#                        (group 5) head shapes, decode with and without the context split (flash-decoding)
#   3. kernels.{txt,json} paged decode GB/s at context 512/2048/8192 (batch 64 and 1) against JAX's own Pallas
#                        paged attention and the XLA reference, prefill TFLOP/s; tiles.json, the fastest tiling
#                        of each shape as a tile table (pallas_kernels/tiles.py)
#   4. engine.{txt,json} the decode step of $MODEL (dummy bf16 weights) at batch 64 and 256, context 1024, with
#                        write-through on and off, and swap bandwidth for 64 and 512 pages each way;
#                        host_memory.{txt,json} the host tier's pools (numpy, pinned_host) alternately, swaps of
#                        64 and 512 $MODEL pages each way (env.txt says which pool the engine chose, and why)
#   5. decision.*        the TokenFlow decision time on this host's CPU
#   6. burst.{txt,json}  a short streaming burst, tokenflow against fcfs, on the real server with $MODEL (dummy
#                        bf16 weights) and a device pool too small for the burst, measured at the client
# Exits non-zero when any part failed (all parts still run). Dry run on CPU, a test:
#   MODEL=tiny SMALL=1 OUT=/tmp/gpu_check bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-gpu_out}
MODEL=${MODEL:-llama3-8b}
export SMALL=${SMALL:-0}
mkdir -p "$OUT"
failed=()

# part NAME LOG COMMAND...: run COMMAND with its output also in $OUT/LOG; note a failure and go on.
part() {
  local name=$1 log=$2
  shift 2
  echo "== $name" >&2
  "$@" 2>&1 | tee "$OUT/$log"
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=("$name")
}

part env env.txt python -c '
import jax, platform
from tokenflow_jax.kv.host_pool import host_memory
from tokenflow_jax.parallel import make_mesh
print(platform.python_version(), "jax", jax.__version__, jax.devices(), jax.devices()[0].device_kind)
print("host KV memory: %s (%s)" % host_memory(make_mesh(1)))'

part kernel-check kernel_check.txt python - <<'PY'
import os, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_kernels as pk

interpret = jax.default_backend() != "gpu"
small = os.environ["SMALL"] == "1"
rng = np.random.default_rng(0)
failures = 0


def report(what, out, ref, dtype):
    global failures
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    ok = bool(np.isfinite(out).all()) and err < (1e-5 if dtype == jnp.float32 else 1e-2)
    failures += not ok
    print(what, jnp.dtype(dtype).name, "rel err", err, "OK" if ok else "FAIL", flush=True)


# (q heads, kv heads): Llama-3-8B (group 4), Qwen2.5-7B (group 7), Qwen2.5-32B (group 5). SMALL (the CPU dry run
# of this script): group 7 only; tests/pallas_kernels checks every group against the references in interpret mode.
heads = ((14, 2),) if small else ((32, 8), (28, 4), (40, 8))
d, s = (64, 16) if small else (128, 16)
b, maxp, pages = (3, 8, 40) if small else (16, 64, 2048)
for dtype in (jnp.float32, jnp.bfloat16):
    for hq, hkv in heads:
        k = jnp.asarray(rng.standard_normal((hkv, pages, s, d)), dtype)
        v = jnp.asarray(rng.standard_normal((hkv, pages, s, d)), dtype)
        tables = jnp.asarray(rng.permutation(np.arange(1, pages))[: b * maxp].reshape(b, maxp), jnp.int32)
        lengths = jnp.asarray(rng.integers(1, maxp * s, b), jnp.int32)
        q = jnp.asarray(rng.standard_normal((b, hq, d)), dtype)
        ref = pk.paged_decode_attention_reference(q, k, v, lengths, tables)
        # The tile table's choice; blocks of 2 pages, whole and in 3 splits (in SMALL the last split is empty).
        for tiles in ({}, {"pages_per_block": 2, "num_splits": 1}, {"pages_per_block": 2, "num_splits": 3}):
            out = pk.paged_decode_attention(q, k, v, lengths, tables, interpret=interpret, **tiles)
            report(f"decode hq={hq} hkv={hkv} {tiles or 'table'}", out, ref, dtype)
        q_lens = rng.integers(1, 3 * s, b)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        kv_lens = jnp.maximum(lengths, jnp.asarray(q_lens, jnp.int32))
        n = int(cu[-1])
        qp = jnp.asarray(rng.standard_normal((n + 5, hq, d)), dtype)
        out = pk.paged_prefill_attention(qp, k, v, cu, kv_lens, tables, interpret=interpret)[:n]
        ref = pk.paged_prefill_attention_reference(qp, k, v, cu, kv_lens, tables)[:n]
        report(f"prefill hq={hq} hkv={hkv}", out, ref, dtype)
sys.exit(1 if failures else 0)
PY

if [ "$SMALL" = 1 ]; then
  part kernel-bench kernels.txt python -m pallas_kernels.bench --small --out "$OUT/kernels.json" \
    --tiles-out "$OUT/tiles.json"
  part engine-bench engine.txt python -m tokenflow_jax.engine_bench --model "$MODEL" --batches 8,16 --context 128 \
    --swap-pages 16,64 --repeats 3 --offline-requests 8 --offline-tokens 16 --out "$OUT/engine.json"
  part host-memory host_memory.txt python -m tokenflow_jax.engine_bench --host-memory-ab --model "$MODEL" \
    --batches 8 --context 64 --swap-pages 4,16 --repeats 3 --out "$OUT/host_memory.json"
  part decision decision.txt python -c "from tokenflow_jax.bench import paper_setups as ps; \
print(ps.decision_benchmark(num_requests=32, repeats=5, staggered=True, steps_between=1))"
  # tiny-random: random weights, as $MODEL's preset has on the GPU (and nothing to load).
  part burst burst.txt python -m serving.burst_bench --schedulers tokenflow,fcfs --contention 0 --model tiny-random \
    --num-requests 8 --max-tokens 8 --server-args "--kv-pages 6 --max-num-seqs 4 \
    --max-batch-tokens 64 --max-model-len 64" --log-dir "$OUT" --json "$OUT/burst.json"
else
  part kernel-bench kernels.txt python -m pallas_kernels.bench --out "$OUT/kernels.json" --tiles-out "$OUT/tiles.json"
  part engine-bench engine.txt python -m tokenflow_jax.engine_bench --model "$MODEL" --dtype bfloat16 \
    --batches 64,256 --context 1024 --swap-pages 64,512 --offline-requests 0 --out "$OUT/engine.json"
  part host-memory host_memory.txt python -m tokenflow_jax.engine_bench --host-memory-ab --model "$MODEL" \
    --dtype bfloat16 --batches '' --swap-pages 64,512 --repeats 5 --out "$OUT/host_memory.json"
  # Last (first to drop if time runs short): its CPU caches differ from the dev VM's (BENCHMARKS.md).
  part decision decision.json timeout 240 python -m tokenflow_jax.paper_setups --decision-bench
  # ~9 pages a request, 80 device pages: about 9 of the 64 fit at once, the rest wait or are paused to the host.
  part burst burst.txt timeout 300 python -m serving.burst_bench --schedulers tokenflow,fcfs --contention 0 \
    --model "$MODEL" --num-requests 64 --max-tokens 96 --server-args "--dtype bfloat16 \
    --kv-pages 80 --host-kv-pages 2048 --max-num-seqs 32 --max-batch-tokens 512 --max-model-len 256" \
    --log-dir "$OUT" --json "$OUT/burst.json"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}" | tee "$OUT/failed.txt" >&2
  exit 1
fi
echo "gpu_check: all parts passed" >&2
