"""`tokenflow`: buffer-aware preemptive scheduling (docs/DESIGN.md section 3).

Every iteration each RUNNING request gets a decode step or its next prefill chunk, as under fcfs. Under
*stress* (a waiting queue, a paused stream, or a running stream close to running dry) the policy also decides
which requests should hold the device, at most every `reschedule_interval` and on arrivals, finishes and
resume deadlines, and (while a newcomer is left out) when a running stream's buffer should let it give way:

1. working set: at most W = (1 - lambda) floor(M / beta) + lambda * running requests run at once, where beta
   is the KV pages a live request is expected to need (prompt + output); every live request when their
   projected peak footprint fits (finishes are staggered, so it peaks below the sum of full lengths);
2. buffer balancing: candidates (running, paused, waiting) sorted by phi(b) = exp(-b seconds) descending, then
   value (the token weight the next token would earn), then rate; device pages and sequence slots are filled
   greedily, then a few adjacent swaps are tried that let more requests run. Running requests sort as if
   their buffer were `stickiness_s` smaller (no churn between near-equal buffers) and a decision plans at most
   `io_fraction` of an interval of loads;
3. admission gate: a running request may be paused for a newcomer only if its buffer covers the round trip,
   b_j >= mu r_j (t_evict + t_load + t_schedule); for a paused stream due back, mu = 1. Those left out are
   the largest buffers, and each is paused only when an entrant needs its slot (beyond W) or its pages;
4. schedulability: newcomers displace nobody while the working set's rates exceed the decode capacity Gamma
   (fcfs-like memory-aware admission only, until demand falls below `capacity_hysteresis` Gamma), except
   those the overload spares within `overload_entry_fraction` of their playback, and take no free room while a
   started stream waits off the device; and when even the batch memory allows cannot outpace its readers
   (r x step >= 1: compute-bound overload), no order keeps anyone fed, so the plan is exactly fcfs's.

A paused stream is due back once its reader would run dry within its load time plus a margin; it then sorts
as urgent as a newcomer. Loads are spread so one step's compute hides them. Each preemption picks swap (host
copy, reload later) or recompute, whichever the live cost estimates say is cheaper.

Modules: `config` (hyperparameters), `timing` (stress, when to decide), `snapshot` (the live requests as
arrays), `decision` (the pure decision: steps 1 and 4, then 2 and 3 from `balancing`), `costs` (reload or
recompute), `policy` (the iteration's plan).
"""

from tokenflow_jax.scheduler.tokenflow.config import TokenFlowConfig
from tokenflow_jax.scheduler.tokenflow.decision import Decision
from tokenflow_jax.scheduler.tokenflow.policy import TokenFlowPolicy
from tokenflow_jax.scheduler.tokenflow.snapshot import Snapshot

__all__ = ["Decision", "Snapshot", "TokenFlowConfig", "TokenFlowPolicy"]
