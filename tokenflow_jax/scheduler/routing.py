"""Data-parallel routing: which replica a new request joins (docs/DESIGN.md, "Data-parallel replicas").

Each replica publishes its measured decode capacity (tokens/s its batch decodes, the executor's live Gamma
estimate) and the rates of the requests it holds. A new request goes to the replica with the most spare decode
capacity: its capacity less what its live requests take of it. A request takes its reader's rate, or one
sequence slot's share of the capacity (capacity / max_num_seqs) when that is more: a running sequence is decoded
every step whatever its rate, and a rate-less request (no reader) takes what it gets. Spares within `NEAR_TIE`
of the largest capacity count as equal, and the replica with fewer unfinished requests wins (a shorter queue
starts sooner). A replica that has not measured a decode step yet counts as fast as the fastest measured one:
every replica runs the same model on the same kind of devices.

Pure host Python: it reads published figures, never arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

NEAR_TIE = 0.05  # spares closer than this share of the largest capacity are a tie: fewer unfinished wins


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """What one replica holds, as the router weighs it."""

    rates: tuple[float | None, ...]  # reader rate of each unfinished request (None: rate-less)
    capacity_tok_s: float | None  # measured decode capacity across its batch; None before its first decode step
    max_num_seqs: int  # sequence slots of its batch

    @classmethod
    def of(cls, rates: Iterable[float | None], capacity_tok_s: float | None, max_num_seqs: int) -> ReplicaLoad:
        return cls(tuple(rates), capacity_tok_s if capacity_tok_s else None, max_num_seqs)

    @property
    def num_unfinished(self) -> int:
        return len(self.rates)

    @property
    def stream_demand_tok_s(self) -> float:
        """The stated rates of its live streams, summed."""
        return float(sum(r for r in self.rates if r is not None))


def spare_capacity(load: ReplicaLoad, capacity_tok_s: float) -> float:
    """`capacity_tok_s` less what each live request takes: its rate, or a sequence slot's share when more."""
    slot_share = capacity_tok_s / max(load.max_num_seqs, 1)
    taken = sum(slot_share if r is None or r < slot_share else r for r in load.rates)
    return capacity_tok_s - taken


def pick_replica(loads: Sequence[ReplicaLoad], near_tie: float = NEAR_TIE) -> int:
    """Index of the replica a new request joins: the most spare decode capacity; among spares within `near_tie`
    of the largest capacity of the best, the fewest unfinished requests; then the most spare, then the lowest
    index."""
    if not loads:
        raise ValueError("no replica to route to")
    fastest = max((load.capacity_tok_s for load in loads if load.capacity_tok_s), default=1.0)
    capacities = [load.capacity_tok_s or fastest for load in loads]
    spares = [spare_capacity(load, capacity) for load, capacity in zip(loads, capacities, strict=True)]
    best = max(spares)
    close = [i for i, spare in enumerate(spares) if spare >= best - near_tie * max(capacities)]
    return min(close, key=lambda i: (loads[i].num_unfinished, -spares[i], i))
