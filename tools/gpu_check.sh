#!/usr/bin/env bash
# One device run for a session lent a GPU: Pallas kernels against the XLA references on the real backend,
# kernel timings, engine timings at Llama-3-8B shapes. Everything lands under $OUT (default gpu_out/).
# Dry run on CPU: MODEL=tiny SMALL=1 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-gpu_out}
MODEL=${MODEL:-llama3-8b}
mkdir -p "$OUT"
python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import jax, platform
print(platform.python_version(), "jax", jax.__version__, jax.devices(), jax.devices()[0].device_kind)
PY
# Correctness first: the compiled kernels (interpret=False on a GPU) against the references.
python - <<'PY' 2>&1 | tee "$OUT/kernel_check.txt"
import os, jax, jax.numpy as jnp, numpy as np
import pallas_kernels as pk
from pallas_kernels.reference import paged_decode_attention_reference, paged_prefill_attention_reference
interpret = jax.default_backend() != "gpu"
small = os.environ.get("SMALL") == "1"
rng = np.random.default_rng(0)
for dtype in (jnp.float32, jnp.bfloat16):
    hq, hkv, d, s = (8, 2, 64, 16) if small else (32, 8, 128, 16)
    b, maxp, pages = (3, 8, 40) if small else (16, 64, 2048)
    k = jnp.asarray(rng.standard_normal((hkv, pages, s, d)), dtype)
    v = jnp.asarray(rng.standard_normal((hkv, pages, s, d)), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, pages))[: b * maxp].reshape(b, maxp), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, maxp * s, b), jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, hq, d)), dtype)
    out = pk.paged_decode_attention(q, k, v, lengths, tables, interpret=interpret)
    ref = paged_decode_attention_reference(q, k, v, lengths, tables)
    err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    print("decode", jnp.dtype(dtype).name, "rel err", err, "OK" if err < (1e-5 if dtype == jnp.float32 else 1e-2) else "FAIL")
    q_lens = rng.integers(1, 3 * s, b)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lens = jnp.maximum(lengths, jnp.asarray(q_lens, jnp.int32))
    qp = jnp.asarray(rng.standard_normal((int(cu[-1]) + 5, hq, d)), dtype)
    out = pk.paged_prefill_attention(qp, k, v, cu, kv_lens, tables, interpret=interpret)[: int(cu[-1])]
    ref = paged_prefill_attention_reference(qp, k, v, cu, kv_lens, tables)[: int(cu[-1])]
    err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    print("prefill", jnp.dtype(dtype).name, "rel err", err, "OK" if err < (1e-5 if dtype == jnp.float32 else 1e-2) else "FAIL")
PY
if [ "${SMALL:-0}" = 1 ]; then
  python -m pallas_kernels.bench --small --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
  python -m tokenflow_jax.engine_bench --model "$MODEL" --batches 8,16 --context 128 --swap-pages 16,64 \
    --repeats 3 --offline-requests 8 --offline-tokens 16 --out "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt"
else
  python -m pallas_kernels.bench --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
  python -m tokenflow_jax.engine_bench --model "$MODEL" --dtype bfloat16 --batches 64,256 --context 1024 \
    --swap-pages 64,512 --offline-requests 0 --out "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt"
fi
# Last (first to drop if time runs short): the TokenFlow decision time on this host's CPU, whose caches differ
# from the dev VM's (BENCHMARKS.md, "Scheduler time per decision").
if [ "${SMALL:-0}" = 1 ]; then
  python -c "from tokenflow_jax.bench import paper_setups as ps; print(ps.decision_benchmark(num_requests=32, repeats=5, staggered=True, steps_between=1))" \
    2>&1 | tee "$OUT/decision.txt"
else
  timeout 240 python -m tokenflow_jax.paper_setups --decision-bench 2>&1 | tee "$OUT/decision.json"
fi
