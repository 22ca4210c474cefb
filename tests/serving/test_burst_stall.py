"""The streaming promise as a client sees it: a burst of streams through the real server (a subprocess) and a
real aiohttp client reading each stream at its rate, on an idle machine and with two CPU-bound processes
competing for the cores. TokenFlow must not make clients stall more than fcfs does (before the host-room rule,
the started streams' demand and the slow-side estimates, the 96-stream version stalled 277-327 s against
fcfs's 5 s idle, 352 s against 19 s contended).

No speed is asserted: both policies run the same burst on the same machine, one after the other, and only
their client-side stalls are compared, with slack for the noise of a shared CI machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serving import loadtest
from serving.burst_bench import running_server

BURST = ["--arrivals", "burst", "--num-requests", "32", "--max-tokens", "48", "--prompt-words", "6",
         "--stream-rate", "20"]  # fmt: skip
SERVER = ["--model", "tiny", "--kv-pages", "24", "--max-num-seqs", "16", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def stalls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, int], dict]]:
    """Client-side summaries by (policy, competing processes)."""
    results: dict[tuple[str, int], dict] = {}
    logs = tmp_path_factory.mktemp("burst")
    for policy in ("tokenflow", "fcfs"):
        with running_server([*SERVER, "--scheduler", policy], logs / f"{policy}.log") as url:
            for competing in (0, 2):
                args = loadtest.build_parser().parse_args(["--url", url, *BURST, "--contention", str(competing)])
                results[policy, competing] = loadtest.load(args)
    yield results


@pytest.mark.parametrize("competing", [0, 2])
def test_tokenflow_stalls_clients_no_more_than_fcfs(stalls, competing):
    tokenflow, fcfs = stalls["tokenflow", competing], stalls["fcfs", competing]
    for summary in (tokenflow, fcfs):
        assert summary["errors"] == 0 and summary["completed"] == 32
        assert summary["total_output_tokens"] == 32 * 48  # one SSE chunk per token, all of them
    assert tokenflow["rebuffer_s"] <= 1.5 * fcfs["rebuffer_s"] + 2.0
