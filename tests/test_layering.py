"""The architecture's arrows (docs/ARCHITECTURE.md): every import, lazy or for typing included, points down the
layers; the scheduler and the simulator load no JAX; no module imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenflow_jax", "serving", "checkpoints", "pallas_kernels")

# Top to bottom: a module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("server", ("serving",)),
    (
        "entry points",
        (
            "tokenflow_jax.bench",
            "tokenflow_jax.paper_setups",
            "tokenflow_jax.engine_bench",
            "tokenflow_jax.generate",
            "tokenflow_jax.__init__",
            "pallas_kernels.bench",
        ),
    ),
    (
        "engine front",
        (
            "tokenflow_jax.engine.llm",
            "tokenflow_jax.engine.async_engine",
            "tokenflow_jax.engine.detokenize",
            "tokenflow_jax.engine.replicas",
            "tokenflow_jax.sim.replay",
            "tokenflow_jax.sim.__init__",
            "checkpoints",
        ),
    ),
    ("engine core", ("tokenflow_jax.engine.core", "tokenflow_jax.engine.__init__")),
    (
        "policies and executors",
        (
            "tokenflow_jax.scheduler",
            "tokenflow_jax.engine.paged_executor",
            "tokenflow_jax.engine.step_model",
            "tokenflow_jax.engine.executor",
            "tokenflow_jax.sim.executor",
            "tokenflow_jax.sim.profiles",
            "tokenflow_jax.sim.tensor_parallel",
        ),
    ),
    (
        "plan contract, buffers, metrics",
        ("tokenflow_jax.scheduler.interface", "tokenflow_jax.tracker", "tokenflow_jax.metrics"),
    ),
    (
        "device",
        (
            "tokenflow_jax.engine.runner",
            "tokenflow_jax.parallel",
            "tokenflow_jax.engine.buckets",
            "tokenflow_jax.engine.multihost",
            "tokenflow_jax.distributed",
            "tokenflow_jax.model",
            "tokenflow_jax.attention",
            "tokenflow_jax.sampling",
            "tokenflow_jax.batching",
            "tokenflow_jax.kv.host_tier",
            "tokenflow_jax.kv.host_pool",
            "tokenflow_jax.parallel",
            "tokenflow_jax.tokenizer",
        ),
    ),
    (
        "kv bookkeeping",
        (
            "tokenflow_jax.kv.block_manager",
            "tokenflow_jax.kv.page_pool",
            "tokenflow_jax.kv.prefix_cache",
            "tokenflow_jax.kv.__init__",
            "tokenflow_jax.request",
        ),
    ),
    (
        "base",
        (
            "tokenflow_jax.kv.pages",
            "tokenflow_jax.config",
            "tokenflow_jax.reader",
            "tokenflow_jax.estimators",
            "tokenflow_jax.sampling_params",
            "tokenflow_jax.workloads",
            "pallas_kernels",
        ),
    ),
]
# Peers in one layer that must not know each other: policies decide, executors carry plans out.
FORBIDDEN = [
    (
        "tokenflow_jax.scheduler",
        ("tokenflow_jax.engine", "tokenflow_jax.sim", "tokenflow_jax.kv.host_tier", "tokenflow_jax.kv.host_pool"),
    ),
    ("tokenflow_jax.engine.paged_executor", ("tokenflow_jax.scheduler.",)),
    ("tokenflow_jax.engine.step_model", ("tokenflow_jax.scheduler.",)),
    ("tokenflow_jax.engine.executor", ("tokenflow_jax.scheduler.",)),
    ("tokenflow_jax.sim.executor", ("tokenflow_jax.scheduler.",)),
    ("tokenflow_jax.kv", ("tokenflow_jax.scheduler", "tokenflow_jax.engine")),
]
ALLOWED_CONTRACT = "tokenflow_jax.scheduler.interface"
JAX_FREE = ("tokenflow_jax.scheduler.tokenflow", "tokenflow_jax.scheduler.fcfs", "tokenflow_jax.sim")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts)] = path
    return files


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (a package means its __init__); None outside the project."""
    for candidate in (name, name + ".__init__"):
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, top-level outside packages) that `module` imports anywhere in its file. `from a.b import c`
    points at the module a.b.c when there is one, else at a.b."""
    inside, outside = set(), set()
    package = module.removesuffix(".__init__") if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if resolve(f"{base}.{a.name}", modules) else base for a in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None:
                if target != module:
                    inside.add(target)
            elif name.split(".")[0] not in PACKAGES:
                outside.add(name.split(".")[0])
    return inside, outside


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_files()
    edges, external = {}, {}
    for module, path in modules.items():
        edges[module], external[module] = imports_of(module, path, modules)
    return edges, external


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return best


def test_every_import_points_down_the_layers(graph) -> None:
    edges, _ = graph
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in edges.items() for t in targets if layer_of(t) < layer_of(m)]  # fmt: skip
    assert not upward, "imports against the arrows:\n" + "\n".join(sorted(upward))


def test_policies_and_executors_do_not_know_each_other(graph) -> None:
    edges, _ = graph
    bad = []
    for module, targets in edges.items():
        for source, banned in FORBIDDEN:
            if module == source or module.startswith(source + "."):
                bad += [f"{module} -> {t}" for t in targets
                        if t != ALLOWED_CONTRACT and any(t.startswith(b) for b in banned)]  # fmt: skip
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles(graph) -> None:
    edges, _ = graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_scheduler_and_simulator_import_no_jax_statically(graph) -> None:
    edges, external = graph
    for root in JAX_FREE:
        start = resolve(root, module_files())
        assert start is not None, f"{root} is not a module"
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges[m]
        users = sorted(m for m in seen if external[m] & {"jax", "jaxlib", "flax", "orbax"})
        assert not users, f"{root} reaches JAX through {users}"


def test_scheduler_and_simulator_load_no_jax_at_run_time() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in JAX_FREE)
            + "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib'))\n"
            + "assert not loaded, loaded\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_module_is_over_450_lines() -> None:
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
