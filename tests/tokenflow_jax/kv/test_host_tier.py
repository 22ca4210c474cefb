"""The host KV tier's copy tickets: a swap-in waits for its own request's copies, not for the backlog queued after.

A device copy that has not completed cannot be produced on demand on a CPU (XLA finishes it at once), so
`HeldCopy` stands in for one: its `block_until_ready` waits until the test lets it land.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tokenflow_jax.engine.harness import add, prompt_pool, reference_outputs, scripted_core, small_llm
from tokenflow_jax.config import PRESETS
from tokenflow_jax.kv.block_manager import PageCopy
from tokenflow_jax.kv.host_tier import HostKVTier
from tokenflow_jax.request import RequestStatus

PAGE_SIZE = 4


class HeldCopy:
    """A gathered device block whose copy completes only when `land` is called (or fails, with `error`)."""

    def __init__(self, data: np.ndarray, error: BaseException | None = None) -> None:
        self.data, self.error, self._landed = data, error, threading.Event()

    def land(self) -> None:
        self._landed.set()

    def block_until_ready(self) -> HeldCopy:
        assert self._landed.wait(timeout=120), "the test never let this copy land"
        if self.error is not None:
            raise self.error
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.data

    @property
    def addressable_shards(self) -> list:
        """The shards of the block on its one device, as a real gathered block has them."""
        return jax.device_put(self.data).addressable_shards


def block_for(tier: HostKVTier, pages: int, value: float) -> np.ndarray:
    shape = list(tier.pages.shape)
    shape[0] = pages
    return np.full(shape, value, dtype=tier.pages.dtype)


def finishes(fn, timeout: float = 30.0) -> bool:
    """Run `fn` on a thread; whether it returned within `timeout` (re-raising what it raised)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if outcome and outcome[0] is not None:
        raise outcome[0]
    return bool(outcome)


@pytest.fixture
def tier():
    t = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)
    yield t
    t.close()


def test_wait_returns_once_its_copy_lands_without_waiting_for_later_ones(tier):
    first = block_for(tier, 2, 1.0)
    held = HeldCopy(block_for(tier, 1, 2.0))
    t1 = tier.write_async(jnp.asarray(first), [1, 2])
    t2 = tier.write_async(held, [3])
    t3 = tier.write_async(jnp.asarray(block_for(tier, 1, 3.0)), [4])
    assert t1 < t2 < t3
    assert finishes(lambda: tier.wait(t1), timeout=30)
    np.testing.assert_array_equal(tier.pages[[1, 2]], first)
    assert tier.pending_pages == 2  # the held copy and the one behind it
    assert not finishes(lambda: tier.wait(t3), timeout=0.3)  # FIFO: the third lands after the held one
    held.land()
    assert finishes(lambda: tier.wait(t3))
    assert tier.pending_pages == 0
    np.testing.assert_array_equal(tier.pages[3], held.data[0])
    np.testing.assert_array_equal(tier.pages[4], 3.0)


def test_wait_surfaces_a_failed_copy_once(tier):
    bad = HeldCopy(block_for(tier, 1, 0.0), error=OSError("copy engine fault"))
    ticket = tier.write_async(bad, [1])
    bad.land()
    with pytest.raises(RuntimeError, match="write-through copy failed"):
        tier.wait(ticket)
    later = tier.write_async(jnp.asarray(block_for(tier, 1, 5.0)), [2])
    tier.wait(later)  # the failure was reported; the tier goes on
    np.testing.assert_array_equal(tier.pages[2], 5.0)


def test_swap_in_does_not_wait_for_copies_queued_after_its_own():
    ex = small_llm().executor
    core, policy = scripted_core(ex)
    req = add(core, "swap-in-ticket", prompt_pool()[0])
    while req.num_computed < 9:
        core.step()
    policy.swap_out.append(req.request_id)
    core.step()
    assert req.status is RequestStatus.PAUSED
    # A copy queued after the request's own (as every step's write-through of the running requests is) that
    # has not landed: into a host page nobody owns.
    spare = ex.blocks.host.allocate(1)
    held = HeldCopy(block_for(ex.host, 1, 0.0))
    ex.host.write_async(held, spare)
    try:
        policy.swap_in.append(req.request_id)
        assert finishes(core.step, timeout=10), "the swap-in waited for a copy queued after the request's own"
        assert req.status is RequestStatus.RUNNING
    finally:
        held.land()
        ex.host.flush()
        ex.blocks.host.free(spare)
    while core.has_work():
        core.step()
    assert tuple(req.output_ids) == reference_outputs()[0]


@pytest.mark.parametrize("num_pages", [5, 13])
def test_a_device_to_host_copy_moves_only_the_pages_asked_for(num_pages):
    """Bucketed, 5 pages would cross as 8 and 13 as 16; exact pieces (4 + 1, 8 + 4 + 1) move just the pages."""
    ex = small_llm().executor
    dev, host = ex.blocks.device.allocate(num_pages), ex.blocks.host.allocate(num_pages)
    try:
        data = np.random.default_rng(num_pages).standard_normal((num_pages, *ex.host.pages.shape[1:]))
        ex.runner.scatter_pages(dev, data.astype(ex.host.pages.dtype))
        moved0 = ex.host.pages_moved_to_host
        ex._transfer_to_host(PageCopy("exact", dev, host))
        ex._flush_to_host()
        assert ex.host.pages_moved_to_host - moved0 == num_pages
        np.testing.assert_array_equal(ex.host.pages[host], data.astype(ex.host.pages.dtype))
        assert sum(block.shape[0] for block in ex.runner.gather_pages(dev)) == num_pages
    finally:
        ex.blocks.device.free(dev)
        ex.blocks.host.free(host)


def test_a_swap_in_loads_its_pages_on_the_load_thread_and_resumes_exactly():
    ex = small_llm().executor
    core, policy = scripted_core(ex)
    prompts = prompt_pool()[:2]
    reqs = [add(core, f"load-thread-{i}", p) for i, p in enumerate(prompts)]
    while reqs[0].num_computed < 9:
        core.step()
    reads0 = ex.host.loads_by_thread()
    policy.swap_out.append(reqs[0].request_id)
    core.step()
    assert reqs[0].status is RequestStatus.PAUSED
    core.step()  # the other request runs on, writing through, while this one is paused
    policy.swap_in.append(reqs[0].request_id)
    core.step()
    assert reqs[0].status is RequestStatus.RUNNING
    reads = ex.host.loads_by_thread() - reads0
    assert set(reads) == {"kv-load"}, f"host pages read for the device on {dict(reads)}"
    while core.has_work():
        core.step()
    assert [tuple(r.output_ids) for r in reqs] == list(reference_outputs()[:2])


def test_a_copy_waits_while_the_staged_blocks_fill_the_cap():
    one_page = int(np.prod(HostKVTier(PRESETS["tiny-random"], 1, PAGE_SIZE, jnp.float32).pages.shape) * 4)
    tier = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32, max_staged_bytes=2 * one_page)
    try:
        held = HeldCopy(block_for(tier, 2, 1.0))
        tier.write_async(held, [1, 2])
        assert not finishes(lambda: tier.write_async(jnp.asarray(block_for(tier, 1, 2.0)), [3]), timeout=0.3)
        held.land()
        assert finishes(lambda: tier.wait(2))  # the held copy landed, so the waiting one went (ticket 2)
        assert tier.pending_pages == 0
        np.testing.assert_array_equal(tier.pages[3], 2.0)
        big = tier.write_async(jnp.asarray(block_for(tier, 3, 3.0)), [4, 5, 6])  # over the cap, alone: goes
        assert finishes(lambda: tier.wait(big))
    finally:
        tier.close()
