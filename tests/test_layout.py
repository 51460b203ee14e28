"""The layout's rules, read from the source with ast: imports go one way and form no cycle (README: Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "learners", "protos")
# The learner math and its process: what a researcher changes. It must not reach into the driver-side roles.
LEARNER_MATH = ("learners.ppo", "learners.model", "learners.learner", "learners.records", "learners.schedule",
                "learners.reference", "learners.errors", "learners.peer")
DRIVER_SIDE = ("learners.coordinator", "learners.study", "learners.bench", "learners.cli")
# Actors import only config, the data types, the model and telemetry (and their own modules).
ACTOR_MAY_IMPORT = ("actors", "learners.config", "learners.records", "learners.model", "learners.telemetry")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, at module level or inside a function (a deferred import is still a
    dependency), resolved to the module itself: `from learners import ppo` -> learners.ppo, `from learners.tracking
    import Tracking` -> learners.tracking (a package's __init__ is a module like any other: its code is imported)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names += [] if all(name in modules for name in names) else [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    modules = project_modules()
    assert {"learners.learner", "learners.peer.fetch", "learners.coordinator.loop", "actors.rollout"} <= set(modules)
    assert "learners.peer.sync" in graph()["learners.peer.exchange"]
    assert "learners.tracking" in graph()["learners.coordinator.outputs"]     # a package's __init__ counts
    assert "learners.ppo" in graph()["learners.learner"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_learner_math_imports_no_coordinator_study_bench_or_cli_code():
    bad = {(m, d) for m, deps in graph().items() if within(m, LEARNER_MATH) for d in deps if within(d, DRIVER_SIDE)}
    assert not bad, f"learner math importing driver-side code: {sorted(bad)}"


def test_actors_import_only_config_data_types_model_and_telemetry():
    bad = {(m, d) for m, deps in graph().items() if within(m, ("actors",)) for d in deps
           if not within(d, ACTOR_MAY_IMPORT) and not d.startswith("protos")}
    assert not bad, f"actors importing outside their allowance: {sorted(bad)}"


def test_nothing_imports_the_cli():
    users = {m for m, deps in graph().items() if "learners.cli" in deps}
    assert not users, f"the CLI is a leaf: {sorted(users)} import it"


def test_a_peer_that_breaks_the_protocol_is_a_protocol_error_not_divergence():
    from learners.learner import NonFiniteError
    from learners.peer.fetch import PeerFetch
    from learners.peer.sync import ProtocolError

    order = np.arange(4)
    for chunk in (np.zeros((2, 3), np.float32), np.zeros((6, 15), np.float32), np.full((2, 15), np.nan, np.float32)):
        fetch = PeerFetch(1, order, 15)
        with pytest.raises(ProtocolError) as err:
            fetch._on_chunk(chunk)
        assert not isinstance(err.value, NonFiniteError)

    fetch = PeerFetch(1, order, 15)
    fetch.run(lambda sync, digest, rows, keep, on_chunk: (on_chunk(np.zeros((2, 15), np.float32)) or np.zeros((2, 15)),
                                                          0, 0),
              None, "digest", order, False)
    with pytest.raises(ProtocolError, match="returned 2 rows of logits, expected 4"):
        fetch.join(1)


MAX_FILE_LINES, MAX_FUNCTION_LINES = 350, 60


def oversized(paths: dict[str, Path]) -> list[str]:
    """Modules over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES (a role or an idea too big to read
    at once: split it)."""
    found = []
    for name, path in sorted(paths.items()):
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_FILE_LINES:
            found.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name}: {n} lines")
    return found


def test_no_module_or_function_too_long_to_read_at_once(tmp_path):
    long_function = tmp_path / "long.py"
    long_function.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversized({"long": long_function}) == [f"long.f: {MAX_FUNCTION_LINES + 1} lines"]   # the check can fail
    assert oversized(project_modules()) == []


def test_nothing_cites_a_file_the_repository_does_not_have():
    """The code once cited PAPER.md, a summary that lives outside the repository: a reader could not follow it."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    citing = [p for p in tracked if p.endswith((".py", ".md", ".yml", ".yaml", ".toml"))
              and "PAPER.md" in (ROOT / p).read_text(errors="ignore") and p != "tests/test_layout.py"]
    assert not (ROOT / "PAPER.md").exists() and citing == [], citing


def plumbing_in(path: Path) -> list[str]:
    """What makes a module more than math: threads, pools, the wire, the peer machinery (any import of them)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        found += [n for n in names if n.split(".")[0] in ("concurrent", "grpc", "threading", "protos")
                  or n.startswith("learners.peer")]
    return found


def test_the_learner_is_the_math_alone(tmp_path):
    """learners/learner.py reads as the update: under 200 lines, no threads, pools, gRPC or peer machinery (issue 23);
    learners/peer/ does the exchange."""
    plumbed = tmp_path / "plumbed.py"
    plumbed.write_text("import threading\nfrom concurrent.futures import ThreadPoolExecutor\nimport learners.peer.state\n")
    assert plumbing_in(plumbed) == ["threading", "concurrent.futures", "learners.peer.state"]   # the check can fail
    learner = ROOT / "learners" / "learner.py"
    assert len(learner.read_text().splitlines()) < 200
    assert plumbing_in(learner) == []
    assert plumbing_in(ROOT / "learners" / "reference.py") == []
