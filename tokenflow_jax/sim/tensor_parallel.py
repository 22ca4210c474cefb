"""Megatron tensor parallelism in the cost model: what each of N devices holds and does, and what the devices
exchange.

Each layer's q/k/v and MLP gate/up projections are split by their outputs (heads, hidden units) and the
attention output and MLP down projections by their inputs, so every device holds and reads 1/N of the weights
and computes 1/N of every matmul and of the attention. The two input-split projections leave partial sums that
are all-reduced over the N devices: two all-reduces of the step's activations (tokens x hidden) per layer. The
KV pool is split by kv heads: each device keeps its heads' share of every page, so for the same memory per
device the pool holds more pages. When N exceeds the kv heads (and is a multiple of them) each device keeps one
kv head, replicated N / kv_heads times, as vLLM does; the k/v projections are replicated with it.

A ring all-reduce of S bytes over N devices takes 2 (N - 1) steps, each sending S / N over one link and paying
one hop's latency: 2 (N - 1) / N * S / link_bytes_per_s + 2 (N - 1) * hop_latency_s.
"""

from __future__ import annotations

import dataclasses

from tokenflow_jax.config import ModelConfig

ACTIVATION_BYTES = 2  # bf16 activations, as the weights


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """The GPU-to-GPU link a ring all-reduce runs over: bytes/s one way per GPU, and the latency of one hop."""

    name: str
    bytes_per_s: float
    hop_latency_s: float


# H100 / H200 SXM: 18 NVLink 4 links, 900 GB/s per GPU both ways together (NVIDIA's H100 and H200 datasheets),
# 450 GB/s each way; CUDA's p2pBandwidthLatencyTest measures ~375 GB/s one way (NVIDIA/nccl issue 1264) and
# ~2 us per peer write over NVLink (NVIDIA/cuda-samples issue 230).
NVLINK4 = Interconnect("NVLink 4", 450e9, 2e-6)
# RTX 4090: no NVLink and peer access disabled, so collectives go over PCIe 4.0 x16 (31.5 GB/s each way, ~25
# effective) and through host memory: 11-19 us per hop in p2pBandwidthLatencyTest without peer access
# (NVIDIA/cuda-samples issue 230).
PCIE4 = Interconnect("PCIe 4.0 x16", 25e9, 15e-6)


def all_reduce_s(nbytes: float, n: int, link: Interconnect) -> float:
    """Seconds of one ring all-reduce of `nbytes` over `n` devices (0 on one device)."""
    return 2 * (n - 1) / n * nbytes / link.bytes_per_s + 2 * (n - 1) * link.hop_latency_s


@dataclasses.dataclass(frozen=True)
class Sharding:
    """What one of `size` tensor-parallel devices holds of a model."""

    size: int
    num_kv_heads: int
    kv_heads_per_device: int

    @property
    def kv_share(self) -> float:
        """Share of every KV page (and of every KV read and page copy) one device holds."""
        return self.kv_heads_per_device / self.num_kv_heads

    def weight_bytes(self, cfg: ModelConfig, weights: int) -> float:
        """Bytes of `weights` (the whole model's) one device holds: 1/N of all but the k/v projections, which
        follow the device's kv heads."""
        kv_proj = ACTIVATION_BYTES * cfg.num_layers * 2 * cfg.hidden_size * cfg.head_dim * cfg.num_kv_heads
        return (weights - kv_proj) / self.size + kv_proj * self.kv_share


def sharding(cfg: ModelConfig, n: int) -> Sharding:
    """How `n` devices split `cfg`; ValueError naming the counts when its heads cannot be split n ways."""
    if n < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {n}")
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if heads % n:
        raise ValueError(f"tensor parallel size {n} does not divide the model's {heads} attention heads")
    if n <= kv and kv % n:
        raise ValueError(f"tensor parallel size {n} does not divide the model's {kv} kv heads")
    if n > kv and n % kv:
        raise ValueError(f"tensor parallel size {n} is above the model's {kv} kv heads but not a multiple of them, "
                         "so they cannot be replicated evenly")  # fmt: skip
    if cfg.intermediate_size % n:
        raise ValueError(f"tensor parallel size {n} does not divide the MLP's {cfg.intermediate_size} hidden units")
    return Sharding(n, kv, max(1, kv // n))


def all_reduce_step_terms(cfg: ModelConfig, n: int, link: Interconnect) -> tuple[float, float]:
    """(seconds per step, seconds per batch token) the step's all-reduces add: two per layer, each of the batch's
    activations (tokens x hidden)."""
    per_step = 2 * cfg.num_layers * all_reduce_s(0, n, link)
    per_token = 2 * cfg.num_layers * all_reduce_s(cfg.hidden_size * ACTIVATION_BYTES, n, link) - per_step
    return per_step, per_token
