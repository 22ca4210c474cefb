"""Cost profiles for the simulator: how long a step and a page transfer take on a given GPU and model.

A step costs  a + b * batch_tokens + c * context_tokens + p * prefill_tokens + q * prefill_token_pairs
(context_tokens: KV length summed over the batch's sequences; a prefill chunk of n tokens after `start`
contributes n * (start + n / 2) attention pairs). A transfer of n pages costs latency + n * page_bytes / bandwidth.

Built-in profiles are fitted to docs/REFERENCE.md (one H100, naive XLA decode and cuDNN prefill of
Llama-3-8B) and scaled: memory-bound terms (a: weights, c: KV) by bytes / HBM bandwidth, compute terms
(b, p, q) by FLOPs / matmul throughput. Names are `GPU-MODEL`, optionally with `-roofline`: the REFERENCE
HBM floor (weights + KV read once) instead of the naive XLA decode, i.e. what a tuned engine approaches, and
optionally `-tpN`: N such GPUs with Megatron tensor parallelism (`sim.tensor_parallel`). Each device then holds
and reads 1/N of the weights and its kv heads' share of the KV, and computes 1/N of the matmuls and attention
(every term divides accordingly), and the step adds two ring all-reduces of its activations per layer over the
GPUs' interconnect (a per-step latency plus a per-token term, so the cost keeps its form). Page copies divide
too: each device moves its slice of a page over its own PCIe link, all at once.

JSON profile files (`SimProfile.save` / `load_profile`) hold exactly the `SimProfile` fields. The real engine
writes one with `profile_from_engine_measurements`: time `EngineExecutor.runner.run_step` on synthetic decode
batches (batch, context) and single-sequence prefills (tokens) with `block_until_ready`, time
`gather_pages` + `HostKVTier.write_async` + `flush` and `scatter_pages` for a few page counts, and pass the
(batch, context, seconds), (tokens, seconds) and (pages, seconds) triples with the pool sizes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tokenflow_jax.config import PRESETS, ModelConfig
from tokenflow_jax.sim.tensor_parallel import NVLINK4, PCIE4, Interconnect, all_reduce_step_terms, sharding

GIB = 1 << 30

# docs/REFERENCE.md, one H100, Llama-3-8B, in-place naive XLA decode: (batch, context, seconds).
H100_NAIVE_DECODE = [(1, 1024, 0.0157), (64, 1024, 0.0249), (256, 1024, 0.0531), (16, 2048, 0.0199),
                     (64, 2048, 0.0336), (32, 4096, 0.0331), (128, 512, 0.0254)]  # fmt: skip
# HBM floor, weights + KV read once at ~3.35 TB/s.
H100_ROOFLINE_DECODE = [(1, 1024, 0.0048), (64, 1024, 0.0073), (256, 1024, 0.015)]
# Naive prefill of one sequence (cuDNN attention): (tokens, seconds).
H100_PREFILL = [(128, 0.0165), (512, 0.0222), (2048, 0.0552), (8192, 0.203)]
# Page-granular swaps of 2 MiB pages: (pages, seconds).
H100_D2H = [(64, 0.0031), (512, 0.0207)]
H100_H2D = [(64, 0.0035), (512, 0.025)]
REFERENCE_PAGE_BYTES = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Hardware:
    memory_bytes: float
    hbm_bytes_per_s: float
    matmul_flops_per_s: float
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    interconnect: Interconnect  # between GPUs, for tensor parallelism


H100 = Hardware(80 * GIB, 3.35e12, 800e12, REFERENCE_PAGE_BYTES / 0.0393e-3, REFERENCE_PAGE_BYTES / 0.048e-3, NVLINK4)
HARDWARE = {
    "h100": H100,
    "h200": dataclasses.replace(H100, memory_bytes=141e9, hbm_bytes_per_s=1.43 * H100.hbm_bytes_per_s),
    # PCIe 4.0 x16 and about a fifth of the H100's bf16 matmul rate.
    "rtx4090": Hardware(24 * GIB, 1.0e12, 165e12, 25e9, 25e9, PCIE4),
}
MODELS = {"llama3-8b": "llama3-8b", "qwen2.5-32b": "qwen2.5-32b", "llama3-70b": "llama3-70b"}
PROFILE_NAME = re.compile(r"(?P<gpu>[^-]+)-(?P<model>.+?)(?P<roofline>-roofline)?(?:-tp(?P<tp>\d+))?")
GPU_MEMORY_UTILIZATION = 0.9  # the rest is activations and workspace, as vLLM's default
HOST_PAGES_PER_DEVICE_PAGE = 4


def parameter_count(cfg: ModelConfig) -> int:
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return embed + cfg.num_layers * (attn + mlp)


@dataclasses.dataclass(frozen=True)
class SimProfile:
    """Everything the simulator charges for; seconds and bytes."""

    name: str
    step_base_s: float  # a
    step_per_token_s: float  # b
    step_per_context_token_s: float  # c
    prefill_per_token_s: float  # p
    prefill_per_token_pair_s: float  # q
    d2h_latency_s: float
    d2h_bytes_per_s: float
    h2d_latency_s: float
    h2d_bytes_per_s: float
    kv_bytes_per_token: int
    device_kv_bytes: float
    host_kv_bytes: float

    def step_time(
        self, batch_tokens: int, context_tokens: int, prefill_tokens: int = 0, prefill_pairs: float = 0.0
    ) -> float:
        return (self.step_base_s + self.step_per_token_s * batch_tokens
                + self.step_per_context_token_s * context_tokens + self.prefill_per_token_s * prefill_tokens
                + self.prefill_per_token_pair_s * prefill_pairs)  # fmt: skip

    def page_bytes(self, page_size: int) -> int:
        return self.kv_bytes_per_token * page_size

    def device_pages(self, page_size: int) -> int:
        return int(self.device_kv_bytes // self.page_bytes(page_size))

    def host_pages(self, page_size: int) -> int:
        return int(self.host_kv_bytes // self.page_bytes(page_size))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def fit_decode(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of seconds = a + b * batch + c * batch * context, clipped at 0."""
    x = np.array([[1.0, b, b * ctx] for b, ctx, _ in points])
    y = np.array([s for _, _, s in points])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return tuple(float(max(v, 0.0)) for v in coef)  # type: ignore[return-value]


def fit_prefill(points: Sequence[tuple[int, float]], a: float, b: float, c: float) -> tuple[float, float]:
    """(p, q) of what a one-sequence prefill costs beyond the decode terms: p * n + q * n^2 / 2."""
    x = np.array([[n, n * n / 2] for n, _ in points])
    y = np.array([s - (a + b * n + c * n) for n, s in points])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(max(coef[0], 0.0)), float(max(coef[1], 0.0))


def fit_transfer(points: Sequence[tuple[int, float]], page_bytes: int) -> tuple[float, float]:
    """(latency s, bytes/s) from (pages, seconds)."""
    x = np.array([[1.0, n * page_bytes] for n, _ in points])
    latency, per_byte = np.linalg.lstsq(x, np.array([s for _, s in points]), rcond=None)[0]
    if per_byte <= 0 or latency < 0:
        # Noisy timings (a larger copy measured relatively faster): no latency, mean bandwidth.
        return 0.0, float(sum(n * page_bytes for n, _ in points) / sum(s for _, s in points))
    return float(latency), float(1.0 / per_byte)


def fit_steps(records: Sequence[tuple[int, int, int, float, float]]) -> tuple[float, float, float, float, float]:
    """(a, b, c, p, q) of `SimProfile.step_time` from a serving loop's own steps: (batch tokens, context tokens,
    prefill tokens, prefill pairs, seconds from the previous step's tokens to this one's), so host work per step
    (scheduling, batch assembly, reading tokens) is charged as the loop pays it. Least squares with every
    coefficient >= 0 (a negative one is dropped and the rest refitted), without the steps over 20 times the
    median step (compiles). With the intercept free, the fit charges the kept steps' total time exactly; it is
    not trimmed further, as trimming by error biases that total (a loaded machine's steps are skewed)."""
    x = np.array([[1.0, *r[:4]] for r in records])
    y = np.array([r[4] for r in records])
    keep = y <= 20 * float(np.median(y))
    coef = _nonnegative_lstsq(x[keep], y[keep])
    return tuple(float(v) for v in coef)  # type: ignore[return-value]


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.linalg.norm(x, axis=0), 1e-30)  # columns span 1 .. 1e6: fit them on one scale
    free = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while free:
        coef[:] = 0.0
        coef[free] = np.linalg.lstsq(x[:, free] / scale[free], y, rcond=None)[0] / scale[free]
        worst = min(free, key=lambda i: coef[i])
        if coef[worst] >= 0:
            break
        free.remove(worst)
    return np.maximum(coef, 0.0)


def profile_from_engine_measurements(
    name: str,
    cfg: ModelConfig,
    *,
    decode: Sequence[tuple[int, int, float]],
    prefill: Sequence[tuple[int, float]],
    d2h: Sequence[tuple[int, float]],
    h2d: Sequence[tuple[int, float]],
    page_bytes: int,
    device_kv_bytes: float,
    host_kv_bytes: float,
    kv_dtype_bytes: int = 2,
) -> SimProfile:
    """A profile fitted to timings taken on the real engine (see the module docstring for what to time)."""
    a, b, c = fit_decode(decode)
    p, q = fit_prefill(prefill, a, b, c)
    d2h_latency, d2h_bw = fit_transfer(d2h, page_bytes)
    h2d_latency, h2d_bw = fit_transfer(h2d, page_bytes)
    return SimProfile(name, a, b, c, p, q, d2h_latency, d2h_bw, h2d_latency, h2d_bw,
                      cfg.kv_bytes_per_token * kv_dtype_bytes, device_kv_bytes, host_kv_bytes)  # fmt: skip


def builtin_profile(name: str, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION) -> SimProfile:
    """`h100-llama3-8b`, `h200-qwen2.5-32b`, `rtx4090-llama3-8b-roofline`, `h100-llama3-70b-tp4`, ...:
    docs/REFERENCE.md fits, scaled. Weights and KV get `gpu_memory_utilization` of each GPU's memory (the KV
    pool is what the weights leave); the host tier holds 4x the device pool."""
    m = PROFILE_NAME.fullmatch(name)
    if m is None or m["gpu"] not in HARDWARE or m["model"] not in MODELS:
        raise ValueError(f"unknown profile {name!r}; expected GPU-MODEL[-roofline][-tpN] with GPU in "
                         f"{sorted(HARDWARE)} and MODEL in {sorted(MODELS)}")  # fmt: skip
    hw, ref_cfg, cfg = HARDWARE[m["gpu"]], PRESETS["llama3-8b"], PRESETS[MODELS[m["model"]]]
    n = int(m["tp"] or 1)
    shard = sharding(cfg, n)
    a, b, c = fit_decode(H100_ROOFLINE_DECODE if m["roofline"] else H100_NAIVE_DECODE)
    p, q = fit_prefill(H100_PREFILL, *fit_decode(H100_NAIVE_DECODE))
    weights = 2 * parameter_count(cfg)
    device_weights = shard.weight_bytes(cfg, weights)
    params = parameter_count(cfg) / parameter_count(ref_cfg) * (device_weights / weights)  # per device
    kv = cfg.kv_bytes_per_token / ref_cfg.kv_bytes_per_token * shard.kv_share
    attention = (cfg.num_layers * cfg.num_heads) / (ref_cfg.num_layers * ref_cfg.num_heads) / n
    memory, compute = H100.hbm_bytes_per_s / hw.hbm_bytes_per_s, H100.matmul_flops_per_s / hw.matmul_flops_per_s
    all_reduce_step_s, all_reduce_token_s = all_reduce_step_terms(cfg, n, hw.interconnect)
    kv_memory = gpu_memory_utilization * hw.memory_bytes - device_weights  # per device
    if kv_memory <= 0:
        split = f", {device_weights / 1e9:.1f} GB on each of {n} GPUs" if n > 1 else ""
        raise ValueError(f"profile {name!r}: the weights ({weights / 1e9:.1f} GB{split}) leave no room for KV in "
                         f"{gpu_memory_utilization:g} of a {hw.memory_bytes / 1e9:.1f} GB GPU; a larger tensor "
                         "parallel size splits them over more GPUs")  # fmt: skip
    device_kv = kv_memory / shard.kv_share  # in whole pages: each GPU holds its share of every page
    d2h_latency = fit_transfer(H100_D2H, REFERENCE_PAGE_BYTES)[0]
    h2d_latency = fit_transfer(H100_H2D, REFERENCE_PAGE_BYTES)[0]
    return SimProfile(
        name, a * params * memory + all_reduce_step_s, b * params * compute + all_reduce_token_s,
        c * kv * memory, p * params * compute, q * attention * compute, d2h_latency,
        hw.d2h_bytes_per_s / shard.kv_share, h2d_latency, hw.h2d_bytes_per_s / shard.kv_share,
        cfg.kv_bytes_per_token * 2, device_kv, HOST_PAGES_PER_DEVICE_PAGE * device_kv,
    )  # fmt: skip


BUILTIN_PROFILES = ("h100-llama3-8b", "h200-llama3-8b", "rtx4090-llama3-8b", "h100-qwen2.5-32b", "h200-qwen2.5-32b",
                    "h100-llama3-70b-tp4", "rtx4090-qwen2.5-32b-tp4")  # fmt: skip


def load_profile(profile: str | Path | SimProfile, tensor_parallel_size: int = 1) -> SimProfile:
    """A built-in name, a path to a JSON profile, or a profile; a built-in name on `tensor_parallel_size` GPUs
    (a fitted profile knows no model to split)."""
    path = None if isinstance(profile, SimProfile) else Path(profile)
    if tensor_parallel_size != 1 and (path is None or path.suffix == ".json" or path.exists()):
        name = getattr(profile, "name", profile)
        raise ValueError(f"tensor parallel size {tensor_parallel_size} needs a built-in profile (GPU-MODEL), "
                         f"not {name}")  # fmt: skip
    if isinstance(profile, SimProfile):
        return profile
    if path.suffix == ".json" or path.exists():
        fields = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(SimProfile)}
        if set(fields) != known:
            raise ValueError(f"profile {path}: expected fields {sorted(known)}, got {sorted(fields)}")
        return SimProfile(**fields)
    return builtin_profile(str(profile) + (f"-tp{tensor_parallel_size}" if tensor_parallel_size > 1 else ""))
