"""The streaming promise as a client sees it: a burst of streams through the real server (a subprocess) and a
real aiohttp client reading each stream at its rate, with and without two CPU-bound processes competing for the
cores. TokenFlow must not make clients stall more than fcfs does (before the host-room rule, the started
streams' demand and the slow-side estimates, the 96-stream version stalled 277-327 s against fcfs's 5 s idle,
352 s against 19 s contended).

No speed is asserted, and both policies are measured in the same conditions: a tokenflow server and an fcfs
server run side by side and each gets the same burst at the same moment, read by one client. Only their
client-side stalls are compared, with slack for the noise of sharing the cores.

The contention is the test's own: work from outside it (other jobs on a shared host) can freeze the servers for
a second at a time, which no policy that keeps bounded buffers can foresee and fcfs, which never pauses a
stream, rides out. A round that misses the bound while outside work took more than `DISTURBED_CORES` of the
machine (from /proc: busy time less this process tree's) is inconclusive and run again, up to `MAX_ROUNDS`; a
miss in an undisturbed round fails at once, and so does a miss in every round.

On a quiet machine every round is judged; on a loaded one a round may be rerun, so it guards against collapse
(the figures above), while the protection's rules are pinned exactly on the simulator
(tests/tokenflow_jax/scheduler/tokenflow/test_scenario.py, test_policy.py, test_decision.py)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from serving import loadtest
from serving.burst_bench import running_server
from tests.serving.conftest import metric_values

BURST = ["--arrivals", "burst", "--num-requests", "32", "--max-tokens", "48", "--prompt-words", "6",
         "--stream-rate", "20"]  # fmt: skip
SERVER = ["--model", "tiny", "--kv-pages", "24", "--max-num-seqs", "16", "--max-model-len", "128"]
MAX_ROUNDS = 4
DISTURBED_CORES = 0.25  # outside work above this (cores, averaged over a round) makes a missed bound inconclusive


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process and its descendants), from /proc; None where
    there is no /proc."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return None
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, user + system ticks)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    text = f.read()
            except OSError:  # ended meanwhile
                continue
            fields = text[text.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier += children
    # Steal counts as outside work: the hypervisor gave the time to another machine.
    busy = user + nice + system + irq + softirq + steal
    return busy, sum(stats[pid][1] for pid in ours if pid in stats)


def preemptions(url: str) -> float:
    m = metric_values(url)
    return m['tokenflow_preemptions_total{mode="swap"}'] + m['tokenflow_preemptions_total{mode="recompute"}']


def side_by_side(urls: dict[str, str], competing: int) -> tuple[dict[str, dict], float]:
    """The burst sent to every server at once (with `competing` CPU-bound processes running): the summary by
    policy, with the preemptions the burst caused, and the cores outside work took meanwhile (0 unknown)."""

    async def bursts() -> list[dict]:
        return await asyncio.gather(*(loadtest.run_load(loadtest.build_parser().parse_args(["--url", url, *BURST]))
                                      for url in urls.values()))  # fmt: skip

    before = {policy: preemptions(url) for policy, url in urls.items()}
    with loadtest.contention(competing):
        ticks, start = cpu_ticks(), time.monotonic()
        summaries = dict(zip(urls, asyncio.run(bursts()), strict=True))
        ticks_after, wall = cpu_ticks(), time.monotonic() - start
    for policy, url in urls.items():
        summaries[policy]["preemptions"] = preemptions(url) - before[policy]
    outside_cores = 0.0
    if ticks is not None and ticks_after is not None:
        outside = (ticks_after[0] - ticks[0]) - (ticks_after[1] - ticks[1])
        outside_cores = max(outside, 0) / os.sysconf("SC_CLK_TCK") / wall
    return summaries, outside_cores


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tokenflow and an fcfs server, side by side: URL by policy."""
    logs = tmp_path_factory.mktemp("burst")
    with running_server([*SERVER, "--scheduler", "tokenflow"], logs / "tokenflow.log") as tokenflow_url:
        with running_server([*SERVER, "--scheduler", "fcfs"], logs / "fcfs.log") as fcfs_url:
            yield {"tokenflow": tokenflow_url, "fcfs": fcfs_url}


def within_slack(tokenflow: dict, fcfs: dict) -> bool:
    return tokenflow["rebuffer_s"] <= 1.5 * fcfs["rebuffer_s"] + 2.0


@pytest.mark.parametrize("competing", [0, 2])
def test_tokenflow_stalls_clients_no_more_than_fcfs(servers, competing):
    rounds = []  # (tokenflow's stall s, fcfs's, outside cores) per round
    for _ in range(MAX_ROUNDS):
        summaries, outside_cores = side_by_side(servers, competing)
        tokenflow, fcfs = summaries["tokenflow"], summaries["fcfs"]
        for summary in (tokenflow, fcfs):
            assert summary["errors"] == 0 and summary["completed"] == 32
            assert summary["total_output_tokens"] == 32 * 48  # one SSE chunk per token, all of them
        assert tokenflow["preemptions"] > 0  # the burst makes tokenflow pause streams: their buffers are at stake
        rounds.append((round(tokenflow["rebuffer_s"], 2), round(fcfs["rebuffer_s"], 2), round(outside_cores, 2)))
        if within_slack(tokenflow, fcfs) or outside_cores <= DISTURBED_CORES:
            break
    assert within_slack(tokenflow, fcfs), f"(tokenflow stall s, fcfs stall s, outside cores) by round: {rounds}"
