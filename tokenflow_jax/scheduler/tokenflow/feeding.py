"""Who an overload feeds (docs/DESIGN.md 3.13, 3.15): fluid models of the started streams' demand against Gamma,
each stream at its reader's pace to its end, in fcfs's order. Pure functions of a `Snapshot`."""

from __future__ import annotations

import numpy as np

from tokenflow_jax.scheduler.tokenflow.snapshot import Snapshot
from tokenflow_jax.tracker import MAX_TOKENS, NUM_GENERATED, RATE


def started(snap: Snapshot) -> np.ndarray:
    """The started requests, as a mask: running, paused, and those waiting to recompute (a reader is owed their
    tokens too)."""
    mask = snap.block[NUM_GENERATED] > 0
    mask[: snap.holding_kv] = True
    return mask


def entering_before_overload_ends(
    snap: Snapshot, newcomers: np.ndarray, spare_rate: float, fraction: float
) -> np.ndarray:
    """Which overloaded stream `newcomers` (snapshot indices, arrival order) contend all the same, as a mask. The
    started streams, each run at its reader's pace to its end, shed their demand as they finish; a newcomer enters
    once the demand left, with the newcomers let in before it and its own rate, fits Gamma within `fraction` of its
    playback from now, so that whatever it waits meanwhile is a small share of its playback (docs/DESIGN.md 3.13).
    The first that may not holds the rest back (fcfs's order); rate-less newcomers stay held."""
    block = snap.block
    begun = block[:, started(snap)]
    capacity = spare_rate + float(begun[RATE].sum())  # Gamma
    begun = begun[:, begun[RATE] > 0]  # streams (a rate-less request sheds no reader's demand)
    rates = begun[RATE]
    ends = (begun[MAX_TOKENS] - begun[NUM_GENERATED]) / rates
    order = ends.argsort(kind="stable")
    ends, rates = ends[order], rates[order]
    enter = np.zeros(newcomers.size, dtype=bool)
    for k, j in enumerate(newcomers.tolist()):
        rate = float(block[RATE, j])
        if rate <= 0:
            continue
        playback = float(block[MAX_TOKENS, j]) / rate
        demand = float(rates.sum()) + rate
        if demand > capacity:  # it fits once the streams ending first have ended: when the i-th has
            fits = (demand - rates.cumsum()) <= capacity
            if not fits.any() or float(ends[int(fits.argmax())]) > fraction * playback:
                break
        at = int(np.searchsorted(ends, playback, side="right"))
        ends, rates = np.insert(ends, at, playback), np.insert(rates, at, rate)
        enter[k] = True
    return enter


def lag_behind_s(snap: Snapshot, newcomers: np.ndarray, capacity: float) -> np.ndarray:
    """For each of `newcomers` (snapshot indices, arrival order, all streams), how far behind its reader it would
    fall at worst (seconds) if all started now, fed last in fcfs's order: each started stream needs its reader's
    pace from when its buffer runs out to its end, the newcomers before it theirs from now, and `capacity` tok/s
    (Gamma) feeds them first; the newcomer gets what is left."""
    block = snap.block
    ahead = started(snap) & (block[RATE] > 0)
    rates = np.concatenate((block[RATE, ahead], block[RATE].take(newcomers)))
    begins = np.concatenate((snap.dry_in[ahead], np.zeros(newcomers.size)))
    ends = begins + np.concatenate((snap.tokens_to_go()[ahead], block[MAX_TOKENS].take(newcomers))) / rates
    at = np.unique(np.concatenate(([0.0], begins, ends)))  # the total need is piecewise linear: its kinks
    need = np.clip(at[:, None] - begins, 0.0, ends - begins) * rates  # tokens each must have made by then
    first = int(ahead.sum())
    # The need beyond what Gamma made, of the started streams and each newcomer with those before it; a newcomer
    # falls behind by that much, at most by its own need.
    behind = need[:, :first].sum(axis=1, keepdims=True) - capacity * at[:, None] + need[:, first:].cumsum(axis=1)
    return np.minimum(need[:, first:], np.maximum(behind, 0.0)).max(axis=0) / rates[first:]


def overload_fed(snap: Snapshot, newcomers: np.ndarray, spare_rate: float, fraction: float, share: float) -> np.ndarray:
    """Which overloaded `newcomers` (snapshot indices, arrival order) the started streams' buffers and `share` of
    Gamma would feed, as a mask: the leading run whose `lag_behind_s` stays within `fraction` of its playback (all
    False where a newcomer states no rate, or `share` is 0). The rule that waits for the overload's end counts no
    buffer: with the started streams' buffers seconds deep it held newcomers while the batch made tokens past
    tau2, worth nothing (docs/DESIGN.md 3.15). Less than Gamma: Gamma counts no prefill, and a cohort let in on
    Gamma itself drained the buffers it was let in on."""
    fed = np.zeros(newcomers.size, dtype=bool)
    rates = snap.block[RATE].take(newcomers)
    if share <= 0 or not newcomers.size or not (rates > 0).all():
        return fed
    gamma = spare_rate + float(snap.block[RATE, started(snap)].sum())
    lag = lag_behind_s(snap, newcomers, share * gamma)
    within = lag <= fraction * snap.block[MAX_TOKENS].take(newcomers) / rates
    fed[: int(within.argmin()) if not within.all() else within.size] = True
    return fed
