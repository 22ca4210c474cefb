"""Reload or recompute: the vectorised costs equal the plain per-request arithmetic, bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow_jax.scheduler.interface import CostEstimates
from tokenflow_jax.scheduler.tokenflow.costs import preemption_costs

seconds = st.floats(0.0, 0.05)


@settings(max_examples=200, deadline=None)
@given(
    kv=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 20_000), st.integers(0, 2_000)), min_size=1,
                max_size=20),
    costs=st.tuples(seconds, seconds, seconds, st.floats(0.0, 1e-3)),
    page_size=st.sampled_from([1, 16, 64]),
    host_free=st.integers(0, 3_000),
)  # fmt: skip
def test_preemption_costs_equal_the_plain_arithmetic(kv, costs, page_size, host_free):
    pending, out_per_page, in_per_page, per_token = costs
    est = CostEstimates(decode_step_s=0.02, prefill_per_token_s=per_token, swap_out_per_page_s=out_per_page,
                        swap_in_per_page_s=in_per_page, pending_transfer_s=pending,
                        decode_capacity_tok_s=1e3)  # fmt: skip
    kv = [(computed, min(synced, computed), on_host) for computed, synced, on_host in kv]
    computed, synced, on_host = (np.array(column, dtype=np.int64) for column in zip(*kv, strict=True))
    got_s, got_swap = preemption_costs(computed, synced, on_host, est, page_size, host_free)
    for i, (c, s, h) in enumerate(kv):
        total = -(-c // page_size)
        swap_s = pending + (total - s // page_size) * out_per_page + total * in_per_page
        recompute_s = c * per_token
        swap = c > 0 and total - h <= host_free and swap_s <= recompute_s
        assert (got_s[i], got_swap[i]) == (swap_s if swap else recompute_s, swap)
        one_s, one_swap = preemption_costs(computed[i:i + 1], synced[i:i + 1], on_host[i:i + 1], est, page_size,
                                           host_free)  # fmt: skip
        assert (one_s[0], one_swap[0]) == (got_s[i], got_swap[i])
