"""What a decision reads: the live requests as arrays (`Snapshot`) and the contenders in urgency order
(`Ranking`), so that the decision needs neither the scheduler state nor the executor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Container

import numpy as np

from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState
from tokenflow_jax.tracker import ARRIVAL, LAST_READ, MAX_TOKENS, NUM_GENERATED, PROMPT_LEN, RATE


@dataclasses.dataclass(slots=True)
class Snapshot:
    """The live requests at a decision as arrays, in one order: running, then paused, then waiting; and the
    executor's capacity then.

    A decision weighs every live request; the tracker's columns and numpy keep it at a fraction of a
    millisecond with hundreds of requests, where a Python object per request cost ~2 us each.
    """

    reqs: list[Request]
    rids: list[str]
    num_running: int
    num_paused: int
    block: np.ndarray  # (6, n): the tracker's columns (`tracker.RATE`, ... rows)
    dry_in: np.ndarray  # seconds until the reader has read every token generated so far (0 when dry)
    context: np.ndarray  # prompt + tokens read (a token sampled but not read yet aside)
    pages: np.ndarray  # device pages each holds or needs for that context (a shared page split among its owners)
    now: float
    page_size: int
    num_device_pages: int
    max_num_seqs: int
    host_free: int  # free host pages: a pause by swap needs room there
    num_host_pages: int = 0  # 0: no host tier
    slack_s: float = 0.0  # added to the resume lead (`timing.resume_lead_s`)
    capacity_floor: float = math.inf  # the lowest Gamma of the recent decisions: an overload clears below it only
    overload_since: float = math.inf  # when the overload in force began (now where one would begin now)
    # Rate-less requests (no reader rate, RATE 0), and those of them that must run (`scheduler.rateless`): held
    # back `max_hold_s` without a token, or so before. None when every request states a rate.
    rateless: np.ndarray | None = None
    must_run: np.ndarray | None = None

    @classmethod
    def take(
        cls, state: SchedulerState, slack_s: float = 0.0, max_hold_s: float = math.inf, must_run: Container[str] = ()
    ) -> Snapshot:
        """The live requests now; rate-less ones off the device for `max_hold_s` since their last token (or
        arrival), or in `must_run`, must run."""
        ex = state.executor
        reqs = [*state.running, *state.paused, *state.waiting]
        rids = [r.request_id for r in reqs]
        block = state.tracker.column_block(rids)
        dry_in = block[LAST_READ] - state.now
        context = block[PROMPT_LEN] + block[NUM_GENERATED]
        pages = context / ex.page_size
        np.ceil(pages, out=pages)  # exact: a quotient of integers is never within rounding of the next integer
        overcount = ex.shared_pages_overcount(reqs)
        if overcount is not None:  # prefix-cached pages several requests hold count once in every sum
            pages -= np.asarray(overcount)
        snap = cls(reqs, rids, len(state.running), len(state.paused), block, np.maximum(dry_in, 0.0, out=dry_in),
                   context, pages, state.now, ex.page_size, ex.num_device_pages, ex.max_num_seqs,
                   ex.free_host_pages(), ex.num_host_pages, slack_s)  # fmt: skip
        rateless = block[RATE] <= 0
        if rateless.any():
            # A rate-less reader reads each token when it is made: its last read is its last token.
            held_s = state.now - np.maximum(block[LAST_READ], block[ARRIVAL])
            must = rateless & (held_s >= max_hold_s)
            must[: snap.num_running] = False  # on the device it is not held back
            if must_run:
                must |= rateless & np.fromiter((rid in must_run for rid in rids), dtype=bool, count=len(rids))
            snap.rateless, snap.must_run = rateless, must
        return snap

    def without_waiting(self, drop: np.ndarray) -> Snapshot:
        """The same snapshot less the waiting requests at indices `drop` (each >= `holding_kv`)."""
        keep = np.ones(len(self.reqs), dtype=bool)
        keep[drop] = False
        at = keep.nonzero()[0].tolist()
        return dataclasses.replace(
            self, reqs=[self.reqs[i] for i in at], rids=[self.rids[i] for i in at], block=self.block[:, keep],
            dry_in=self.dry_in[keep], context=self.context[keep], pages=self.pages[keep],
            rateless=None if self.rateless is None else self.rateless[keep],
            must_run=None if self.must_run is None else self.must_run[keep])  # fmt: skip

    @property
    def room_pages(self) -> int:
        """Pages a started request is held in to its end: the host tier (write-through keeps a copy of the running
        ones too) or, where larger, the device."""
        return max(self.num_host_pages, self.num_device_pages)

    def tokens_to_go(self) -> np.ndarray:
        """max_tokens less the tokens generated, per request."""
        return self.block[MAX_TOKENS] - self.block[NUM_GENERATED]

    @property
    def holding_kv(self) -> int:
        """Running and paused (the working set) come first: how many."""
        return self.num_running + self.num_paused

    def buffer_tokens(self) -> np.ndarray:
        """Unread tokens (whole numbers, as floats): they are read 1/r apart up to the last one, so the buffer
        follows from the last read time."""
        tokens = self.dry_in * self.block[RATE]
        tokens -= 1e-9
        return np.ceil(tokens, out=tokens)


@dataclasses.dataclass(slots=True)
class Ranking:
    """Contenders most urgent first (`order`: snapshot indices), what the fill needs of them, and (once the fill
    must choose: `by_position`) the same per position in `order`."""

    order: np.ndarray
    buffer_tokens: np.ndarray  # per snapshot index
    paused_load_s: np.ndarray | None  # per paused stream: I/O budget its load spends (0 when due back)
    paused_due: np.ndarray | None  # per paused stream: its reader runs dry unless it is loaded now
    total_load_s: float  # of every contender
    pages: np.ndarray | None = None  # per position, from here on
    load_s: np.ndarray | None = None
    due: np.ndarray | None = None
    on_device: np.ndarray | None = None
    gate_s: np.ndarray | None = None  # the admission gate's time factor, NaN until computed
    gate_bound_s: np.ndarray | None = None  # an upper bound on it from the snapshot alone
    fcfs_rank: np.ndarray | None = None  # per snapshot index: fcfs's order (arrival, id), when it decides ties

    def by_position(self, snap: Snapshot, est: CostEstimates, lead_s: float, churn_per_page_s: float = 0.0) -> None:
        order, n, paused = self.order, len(snap.reqs), slice(snap.num_running, snap.holding_kv)
        load_s, due = np.zeros(n), np.zeros(n, dtype=bool)
        if self.paused_load_s is not None:
            load_s[paused], due[paused] = self.paused_load_s, self.paused_due
        self.pages, self.load_s, self.due = snap.pages.take(order), load_s.take(order), due.take(order)
        self.on_device, self.gate_s = order < snap.num_running, np.empty(order.size)
        self.gate_s.fill(np.nan)  # (np.full is a Python wrapper: several times slower)
        # The gate's round trip at most: every page out and back in (pages <= tokens / page size + 1), or
        # recomputing every token, of a context that may hold a token the host has not read yet (in flight).
        per_page = est.swap_out_per_page_s + est.swap_in_per_page_s + 2 * churn_per_page_s
        per_token = max(per_page / snap.page_size, est.prefill_per_token_s) * (1 + 1e-9)  # room for rounding
        fixed = (2 * per_token + per_page + 2 * est.pending_transfer_s + lead_s) * (1 + 1e-9)
        bound = snap.context.take(order)
        bound *= per_token
        self.gate_bound_s = np.add(bound, fixed, out=bound)
