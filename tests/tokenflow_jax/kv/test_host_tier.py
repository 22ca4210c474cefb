"""The host KV tier's copy tickets: a swap-in waits for its own request's copies, not for the backlog queued after.

A device copy that has not completed cannot be produced on demand on a CPU (XLA finishes it at once), so
`HeldCopy` stands in for one: its `block_until_ready` waits until the test lets it land.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tokenflow_jax.engine.harness import add, prompt_pool, reference_outputs, scripted_core, small_llm
from tokenflow_jax.config import PRESETS
from tokenflow_jax.kv.block_manager import PageCopy
from tokenflow_jax.kv.host_pool import HOST_KV_MEMORY_ENV
from tokenflow_jax.kv.host_tier import HostKVTier
from tokenflow_jax.request import RequestStatus

ROOT = Path(__file__).resolve().parents[3]
PAGE_SIZE = 4
HOST_MEMORY = ["pinned_host", "numpy"]  # both pools, whichever this backend uses by default


class HeldCopy:
    """A gathered device block whose copy completes only when `land` is called (or fails, with `error`)."""

    def __init__(self, data: np.ndarray, error: BaseException | None = None) -> None:
        self.data, self.error, self._landed = data, error, threading.Event()

    def land(self) -> None:
        self._landed.set()

    def block_until_ready(self) -> jax.Array:
        assert self._landed.wait(timeout=120), "the test never let this copy land"
        if self.error is not None:
            raise self.error
        return jnp.asarray(self.data)  # the landed block, as a real gather's `block_until_ready` returns it

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def block_for(tier: HostKVTier, pages: int, value: float) -> np.ndarray:
    return np.full((pages, *tier.shape[1:]), value, dtype=tier.dtype)


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


@pytest.fixture(params=HOST_MEMORY)
def tier(request):
    t = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32, host_memory=request.param)
    assert t.memory_kind == request.param
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
    np.testing.assert_array_equal(tier.host_pages([1, 2]), first)
    assert tier.pending_pages == 2  # the held copy and the one behind it
    assert not finishes(lambda: tier.wait(t3), timeout=0.3)  # FIFO: the third lands after the held one
    held.land()
    assert finishes(lambda: tier.wait(t3))
    assert tier.pending_pages == 0
    np.testing.assert_array_equal(tier.host_pages([3])[0], held.data[0])
    np.testing.assert_array_equal(tier.host_pages([4])[0], 3.0)


def test_wait_surfaces_a_failed_copy_once(tier):
    bad = HeldCopy(block_for(tier, 1, 0.0), error=OSError("copy engine fault"))
    ticket = tier.write_async(bad, [1])
    bad.land()
    with pytest.raises(RuntimeError, match="write-through copy failed"):
        tier.wait(ticket)
    later = tier.write_async(jnp.asarray(block_for(tier, 1, 5.0)), [2])
    tier.wait(later)  # the failure was reported; the tier goes on
    np.testing.assert_array_equal(tier.host_pages([2])[0], 5.0)


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
        data = np.random.default_rng(num_pages).standard_normal((num_pages, *ex.host.shape[1:]))
        ex.runner.scatter_pages(dev, data.astype(ex.host.dtype))
        ex._flush_to_host()  # copies an earlier test left in flight land before the count starts
        moved0 = ex.host.pages_moved_to_host
        ex._transfer_to_host(PageCopy("exact", dev, host))
        ex._flush_to_host()
        assert ex.host.pages_moved_to_host - moved0 == num_pages
        np.testing.assert_array_equal(ex.host.host_pages(host), data.astype(ex.host.dtype))
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


@pytest.mark.parametrize("host_memory", HOST_MEMORY)
def test_a_copy_waits_while_the_staged_blocks_fill_the_cap(host_memory):
    tier = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32, host_memory=host_memory)
    tier.close()
    tier = HostKVTier(
        PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32, max_staged_bytes=2 * tier.page_bytes, host_memory=host_memory
    )
    try:
        held = HeldCopy(block_for(tier, 2, 1.0))
        tier.write_async(held, [1, 2])
        assert not finishes(lambda: tier.write_async(jnp.asarray(block_for(tier, 1, 2.0)), [3]), timeout=0.3)
        held.land()
        assert finishes(lambda: tier.wait(2))  # the held copy landed, so the waiting one went (ticket 2)
        assert tier.pending_pages == 0
        np.testing.assert_array_equal(tier.host_pages([3])[0], 2.0)
        big = tier.write_async(jnp.asarray(block_for(tier, 3, 3.0)), [4, 5, 6])  # over the cap, alone: goes
        assert finishes(lambda: tier.wait(big))
    finally:
        tier.close()


def test_loads_read_the_pinned_pool_while_writes_donate_it():
    """The write thread replaces the pinned pool with every copy (a donated scatter) while the load thread
    gathers from it: every load sees its pages as last written, none reads a donated buffer."""
    tier = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32, host_memory="pinned_host")
    try:
        tier.wait(tier.write_async(jnp.asarray(block_for(tier, 2, 7.0)), [6, 7]))
        loads = []
        for i in range(40):
            tier.write_async(jnp.asarray(block_for(tier, 2, float(i))), [1 + i % 4, 2 + i % 4])
            loads.append(tier.load_async([6, 7], after=None))
        tier.flush()
        for future in loads:
            (block,), _ = future.result(timeout=60)
            np.testing.assert_array_equal(np.asarray(block), 7.0)
        assert set(tier.loads_by_thread()) == {"kv-load"}
        np.testing.assert_array_equal(tier.host_pages([4, 5]), block_for(tier, 2, 39.0))
    finally:
        tier.close()


def test_the_host_memory_is_chosen_at_start_up_and_logged(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="tokenflow_jax.kv.host_tier")
    monkeypatch.setenv(HOST_KV_MEMORY_ENV, "numpy")
    forced = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)
    forced.close()
    assert forced.memory_kind == "numpy"
    assert "8 pages" in caplog.text and "in numpy memory (asked for)" in caplog.text
    monkeypatch.delenv(HOST_KV_MEMORY_ENV)
    caplog.clear()
    auto = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)
    auto.close()
    if jax.default_backend() == "cpu":  # pinned memory works here, but is plain host memory allocated whole
        assert auto.memory_kind == "numpy" and "CPU backend" in caplog.text
    monkeypatch.setenv(HOST_KV_MEMORY_ENV, "pinned")
    with pytest.raises(ValueError, match="'pinned': expected one of auto, pinned_host, numpy"):
        HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)


def test_a_pinned_pool_the_host_refuses_is_kept_in_numpy_memory_unless_pinned_was_asked_for(monkeypatch, caplog):
    """Chosen by default (a tiny round trip through pinned memory passed, as on an accelerator), the whole pool
    can still be refused, as a container's locked-memory limit does. The tier then keeps its pages in numpy
    memory, says so in a warning, and serves; asked for by name, the refusal is the error. (A refusal cannot be
    produced on this CPU, where pinned memory is plain memory: the pinned pool's constructor stands in for it.)"""
    import tokenflow_jax.kv.host_tier as host_tier
    from tokenflow_jax.kv import host_pool

    def refuse(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: failed to allocate 4.00GiB of pinned host memory\nmore detail")

    monkeypatch.setitem(host_pool.POOLS, "pinned_host", refuse)
    monkeypatch.setattr(host_tier, "host_memory_for", lambda mesh, requested: ("pinned_host", "the probe matched"))
    caplog.set_level(logging.INFO, logger="tokenflow_jax.kv.host_tier")
    tier = HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)
    try:
        assert tier.memory_kind == "numpy"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "numpy memory" in warned[0] and "RESOURCE_EXHAUSTED" in warned[0]
        assert "more detail" not in warned[0]  # one line
        block = block_for(tier, 2, 5.0)
        tier.wait(tier.write_async(jnp.asarray(block), [2, 5]))
        np.testing.assert_array_equal(tier.host_pages([2, 5]), block)
    finally:
        tier.close()
    monkeypatch.setattr(host_tier, "host_memory_for", lambda mesh, requested: ("pinned_host", host_pool.ASKED))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        HostKVTier(PRESETS["tiny-random"], 8, PAGE_SIZE, jnp.float32)


def test_a_process_that_exits_with_copies_in_flight_exits_cleanly():
    """Python stops its daemon threads at exit; a copy thread still inside XLA then (a pinned pool's scatter)
    aborted the process ("FATAL: exception not rethrown"), so the tier lets queued copies land first."""
    script = (
        "from tests.tokenflow_jax.engine.harness import add, prompt_pool, scripted_core, small_llm\n"
        "ex = small_llm().executor\n"
        "core, _ = scripted_core(ex)\n"
        "add(core, 'exit', prompt_pool()[0])\n"
        "while core.has_work():\n"
        "    core.step()\n"
        "print('host pages still being copied at exit:', ex.host.pending_pages)\n"  # no flush, no close
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
