"""One engine across two processes on localhost (`jax.distributed`, gloo on CPU), each with 2 host devices, the
model split over all 4: process 0 leads, process 1 follows. The tokens equal one process at TP 1 and HF greedy,
through preemption by swap (each process's host tier holds its own devices' kv heads); the generate CLI works the
same way; flags that differ between the processes are named; a follower whose leader dies exits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.tokenflow_jax.engine.multihost_driver import ENGINE, N_TOKENS, RATE, prompts
from tokenflow_jax import LLM
from tokenflow_jax.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[3]
DEADLINE_S = 600  # two cold processes compile every shape they meet on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(argv: Callable[[str, int], list[str]], log_dir: Path) -> Iterator[list[subprocess.Popen]]:
    """Processes 0 and 1 of `argv(coordinator_address, process_id)`, each seeing 2 CPU devices; killed (with their
    children) on the way out, whatever happened."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        for i in range(2):
            with open(log_dir / f"process{i}.log", "w") as log:
                procs.append(subprocess.Popen(argv(address, i), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                              stderr=log, text=True, start_new_session=True))  # fmt: skip
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def finish(procs: list[subprocess.Popen], log_dir: Path) -> list[str]:
    """Each process's stdout once every one has exited 0 (a process past the deadline fails the test)."""
    outs = [p.communicate(timeout=DEADLINE_S)[0] for p in procs]
    for i, p in enumerate(procs):
        log = (log_dir / f"process{i}.log").read_text()
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
    return outs


def test_two_processes_through_preemption_by_swap_equal_one_process_and_hf(hf_checkpoint, hf_greedy, tmp_path) -> None:
    ckpt = hf_checkpoint("llama")  # 2 kv heads over 4 devices: each process holds (and copies to its host) one
    driver = [sys.executable, "-m", "tests.tokenflow_jax.engine.multihost_driver", str(ckpt.path)]
    with two_processes(lambda address, i: [*driver, address, "2", str(i)], tmp_path) as procs:
        leader, follower = finish(procs, tmp_path)
    result = json.loads(leader.strip().splitlines()[-1])
    assert follower == ""
    assert result["preemptions_swap"] > 0, "no preemption by swap: the host tiers were not exercised"
    assert result["bytes_to_host"] > 0 and result["bytes_to_device"] > 0

    one = LLM(str(ckpt.path), tensor_parallel_size=1, **ENGINE)
    expected = one.generate(prompts(), SamplingParams(max_tokens=N_TOKENS, ignore_eos=True),
                            rates=[RATE] * len(prompts()))  # fmt: skip
    one.close()
    assert result["token_ids"] == [o.token_ids for o in expected]
    for prompt, tokens in zip(prompts(), result["token_ids"], strict=True):
        hf = hf_greedy(ckpt.model, prompt, N_TOKENS)  # HF stops at EOS; the engine ignores it here
        assert tokens[: len(hf)] == hf, prompt


def _generate_cli(model: str, *extra: str) -> Callable[[str, int], list[str]]:
    return lambda address, i: [
        sys.executable, "-m", "tokenflow_jax.generate", "--model", model, "--prompt-ids", "256,72,105,33",
        "--max-tokens", "10", "--ignore-eos", "--json", "--tensor-parallel-size", "4",
        "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i), *extra,
    ]  # fmt: skip


def test_generate_cli_across_two_processes_equals_hf(hf_checkpoint, hf_greedy, tmp_path) -> None:
    ckpt = hf_checkpoint("qwen2_sharded")
    with two_processes(_generate_cli(str(ckpt.path)), tmp_path) as procs:
        leader, follower = finish(procs, tmp_path)
    assert follower == ""
    tokens = json.loads(leader)["token_ids"]
    hf = hf_greedy(ckpt.model, [256, 72, 105, 33], 10)
    assert len(tokens) == 10 and tokens[: len(hf)] == hf


def test_flags_that_differ_between_processes_are_named_on_each(hf_checkpoint, tmp_path) -> None:
    path = str(hf_checkpoint("llama").path)

    def argv(address: str, i: int) -> list[str]:
        return _generate_cli(path, "--dtype", ("float32", "bfloat16")[i])(address, i)

    with two_processes(argv, tmp_path) as procs:
        for p in procs:
            p.communicate(timeout=DEADLINE_S)
    for i, p in enumerate(procs):
        log = (tmp_path / f"process{i}.log").read_text()
        assert p.returncode == 2, log[-3000:]
        assert "different engine flags (dtype: process 0 'float32', process 1 'bfloat16'" in log
        assert "Traceback" not in log


def test_a_follower_whose_leader_dies_exits(hf_checkpoint, tmp_path) -> None:
    driver = [sys.executable, "-m", "tests.tokenflow_jax.engine.multihost_driver", str(hf_checkpoint("llama").path)]
    with two_processes(lambda address, i: [*driver, address, "2", str(i)], tmp_path) as procs:
        deadline = time.monotonic() + DEADLINE_S
        while "process 1 ready" not in (tmp_path / "process1.log").read_text():
            assert time.monotonic() < deadline and procs[1].poll() is None, (tmp_path / "process1.log").read_text()
            time.sleep(0.2)
        os.killpg(procs[0].pid, signal.SIGKILL)  # the leader goes away mid-run
        procs[1].wait(timeout=DEADLINE_S)  # exits on its own: the coordination service went with the leader
    assert procs[1].returncode != 0


def test_distributed_flags_are_checked_before_joining(capsys) -> None:
    from tokenflow_jax.generate import main

    base = ["--model", "tiny", "--prompt-ids", "1,2", "--max-tokens", "1"]
    assert main([*base, "--num-processes", "2"]) == 2
    assert "--coordinator-address, --num-processes and --process-id go together" in capsys.readouterr().err
    assert main([*base, "--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "process_id must be in [0, 1], got 2" in capsys.readouterr().err
    assert main([*base, "--coordinator-address", "no-port", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "coordinator_address must be HOST:PORT" in capsys.readouterr().err
