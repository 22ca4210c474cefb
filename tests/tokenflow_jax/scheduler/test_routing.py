"""The data-parallel routing rule against hand-computed cases (16 sequence slots: a slot's share is capacity / 16)."""

from __future__ import annotations

import pytest

from tokenflow_jax.scheduler.routing import ReplicaLoad, pick_replica, spare_capacity


def load(capacity: float | None, rates: list[float | None], max_num_seqs: int = 16) -> ReplicaLoad:
    return ReplicaLoad.of(rates, capacity, max_num_seqs)


def test_each_request_takes_its_rate_or_a_slot_share_when_more() -> None:
    replica = load(1600.0, [20.0, 300.0, None])
    # Slot share 100: the 20 tok/s stream and the rate-less request take 100 each, the 300 tok/s stream 300.
    assert spare_capacity(replica, 1600.0) == 1600.0 - (100.0 + 300.0 + 100.0)
    assert (replica.stream_demand_tok_s, replica.num_unfinished) == (320.0, 3)
    assert load(0.0, []).capacity_tok_s is None  # nothing measured yet


def test_most_spare_capacity_wins_over_a_shorter_queue() -> None:
    # Replica 0: 1000 - 900 = 100 spare with 1 request; replica 1: 1000 - 5 x 62.5 = 687.5 with 5.
    # Round-robin or the shortest queue would pick 0; the readers are better fed on 1.
    assert pick_replica([load(1000.0, [900.0]), load(1000.0, [20.0] * 5)]) == 1


def test_measured_capacity_counts() -> None:
    # The same two streams: 1000 - 2 x 62.5 = 875 against 2000 - 2 x 125 = 1750.
    assert pick_replica([load(1000.0, [50.0, 50.0]), load(2000.0, [50.0, 50.0])]) == 1


def test_a_faster_replica_does_not_take_every_slow_stream() -> None:
    # 10 streams at 20 tok/s on 2000 tok/s: 2000 - 10 x 125 = 750; 2 on 1600: 1600 - 2 x 100 = 1400. (By their
    # rates alone, 1800 against 1560, the 10 streams' replica would get an 11th.)
    assert pick_replica([load(2000.0, [20.0] * 10), load(1600.0, [20.0] * 2)]) == 1


def test_near_tie_goes_to_fewer_unfinished() -> None:
    # 1000 - 2 x 100 = 800 with 2 requests, 1000 - 230 = 770 with 1: 30 apart, within 5% of 1000.
    assert pick_replica([load(1000.0, [100.0, 100.0]), load(1000.0, [230.0])]) == 1
    assert pick_replica([load(1000.0, [100.0, 100.0]), load(1000.0, [230.0])], near_tie=0.0) == 0
    # 800 against 700: 100 apart is no tie.
    assert pick_replica([load(1000.0, [100.0, 100.0]), load(1000.0, [300.0])]) == 0


def test_exact_tie_goes_to_the_lowest_index() -> None:
    assert pick_replica([load(1000.0, []), load(1000.0, [])]) == 0
    assert pick_replica([load(1000.0, [20.0]), load(1000.0, [20.0]), load(1000.0, [])]) == 2


def test_rateless_requests_take_a_slot_share() -> None:
    # Two rate-less on 1600 tok/s: 1600 - 2 x 100 = 1400 (2 requests); one 260 tok/s stream: 1340 (1 request).
    # 60 apart, within 80: the shorter queue.
    assert pick_replica([load(1600.0, [None, None]), load(1600.0, [260.0])]) == 1
    # Against a 500 tok/s stream (1100, 300 below) the rate-less replica has the spare.
    assert pick_replica([load(1600.0, [None, None]), load(1600.0, [500.0])]) == 0


def test_a_replica_not_measured_yet_counts_as_the_fastest() -> None:
    # 3000 - 4 x 187.5 = 2250 against an idle replica taken at 3000.
    assert pick_replica([load(3000.0, [20.0] * 4), load(None, [])]) == 1
    # Nothing measured anywhere: all equal, so the rates decide.
    assert pick_replica([load(None, [20.0]), load(None, [])]) == 1


def test_overloaded_replicas_pick_the_least_overloaded() -> None:
    assert pick_replica([load(100.0, [300.0]), load(100.0, [150.0]), load(100.0, [400.0])]) == 1


def test_a_burst_routed_one_by_one() -> None:
    def route(rates: list[float]) -> list[list[float | None]]:
        replicas: list[list[float | None]] = [[], []]
        for rate in rates:
            replicas[pick_replica([load(1000.0, held) for held in replicas])].append(rate)
        return replicas

    # A 10,000 tok/s stream takes replica 0 (a tie: the lowest index), leaving it 9,000 tok/s short: every
    # 20 tok/s stream after it goes to replica 1, where round-robin would send half of them to 0.
    assert route([10_000.0] + [20.0] * 6) == [[10_000.0], [20.0] * 6]
    # Equal streams alternate.
    assert route([20.0] * 6) == [[20.0] * 3, [20.0] * 3]


def test_no_replica_is_an_error() -> None:
    with pytest.raises(ValueError, match="no replica"):
        pick_replica([])
