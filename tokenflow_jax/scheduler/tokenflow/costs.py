"""Reload or recompute (docs/DESIGN.md sections 3.6 and 3.12): what pausing a request costs, the cheaper way.

One function serves both the choice made when a request is paused and the admission gate's round trip, so
the gate weighs exactly the preemption that would happen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.interface import CostEstimates


def preemption_costs(
    computed: np.ndarray, synced: np.ndarray, on_host: np.ndarray, est: CostEstimates, page_size: int, host_free: int
) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, swap) per request, from its computed tokens, tokens synced to the host and host pages held:
    swap (queued transfers + evicting the tail write-through has not synced + loading every page back) when it
    is no dearer than recomputing every computed token and the host has room; else recompute."""
    total = pages_for(computed, page_size)
    swap_s = (est.pending_transfer_s + (total - synced // page_size) * est.swap_out_per_page_s
              + total * est.swap_in_per_page_s)  # fmt: skip
    recompute_s = computed * est.prefill_per_token_s
    swap = (computed > 0) & (total - on_host <= host_free) & (swap_s <= recompute_s)
    return np.where(swap, swap_s, recompute_s), swap


def kv_state(reqs: Sequence[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(computed tokens, tokens synced to the host, host pages held) per request: what `preemption_costs` and
    `swapped_pages` weigh."""
    computed = np.array([r.num_computed for r in reqs], dtype=np.int64)
    synced = np.array([r.num_host_synced for r in reqs], dtype=np.int64)
    on_host = np.array([len(r.host_pages) for r in reqs], dtype=np.int64)
    return computed, synced, on_host


def preemption_costs_of(
    reqs: Sequence[Request], est: CostEstimates, page_size: int, host_free: int
) -> tuple[np.ndarray, np.ndarray]:
    """`preemption_costs` read off the requests' KV state."""
    return preemption_costs(*kv_state(reqs), est, page_size, host_free)


def swapped_pages(computed: np.ndarray, synced: np.ndarray, page_size: int) -> np.ndarray:
    """Pages a pause by swap and its load back move per request: the tail write-through has not synced, then every
    page."""
    return 2 * pages_for(computed, page_size) - synced // page_size
