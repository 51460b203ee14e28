"""A tiny real study (chaser x {mdpo, ppo} x seeds {1, 2}), built once per test session through the real CLI.

chaser pays fractional rewards and ends episodes within 50-250 steps even for a random policy, so even these
few iterations give non-trivial train and test returns.

Phases, each a real `mdpo` subprocess:
1. `mdpo sweep`, stopped with SIGINT once a cell has written its first checkpoint: the running cells are
   interrupted (they checkpoint and stop), the others never start;
2. the same `mdpo sweep` again: resumes the interrupted cells, runs the rest;
3. the same sweep plus a method whose runs cannot start (`gpu`: device=cuda on a CPU-only machine): the four
   finished cells are skipped, the two new ones fail and are reported;
4. `mdpo analyze` and `mdpo report` over the study.
Used by tests/test_sweep.py, tests/test_report.py and tests/test_robustness.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--total-steps", "512", "--num-envs", "4", "--num-steps", "32", "--num-minibatches", "2",
        "--update-epochs", "1", "--eval-episodes", "2", "--eval-max-episode-steps", "50", "--checkpoint-every", "1",
        "--learner-cpus", "0.25", "--actor-cpus", "0.25"]
GAME = "chaser"
GRID = ["--games", GAME, "--seeds", "1", "2"]
CELLS = [f"{GAME}/{m}/seed{s}" for m in ("mdpo", "ppo") for s in (1, 2)]
ANALYZE = ["--num-envs", "4", "--num-steps", "16", "--tsne-points", "24", "--seed", "3"]


@dataclass
class Phase:
    returncode: int
    output: str
    seconds: float


@dataclass
class Study:
    root: Path
    interrupted: Phase
    resumed: Phase
    with_failures: Phase
    analyze: Phase
    report: Phase
    mtimes_before_phase3: dict


def mdpo(*args: str, timeout: float = 600) -> Phase:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "learners.cli", *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return Phase(proc.returncode, proc.stdout, time.time() - t0)


def _interrupted_sweep(root: Path) -> Phase:
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "learners.cli", "sweep", str(root), *GRID, *TINY], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((root / cell / "checkpoints" / "ckpt-000001" / "manifest.json").exists() for cell in CELLS):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=300)
    return Phase(proc.returncode, output, time.time() - t0)


_CACHE: dict[str, Study] = {}


def tiny_study(tmp_path_factory) -> Study:
    if "study" not in _CACHE:
        root = tmp_path_factory.mktemp("study")
        interrupted = _interrupted_sweep(root)
        resumed = mdpo("sweep", str(root), *GRID, *TINY)
        mtimes = {cell: os.stat(root / cell / "summary.json").st_mtime_ns for cell in CELLS
                  if (root / cell / "summary.json").exists()}
        with_failures = mdpo("sweep", str(root), *GRID, "--methods", "mdpo", "ppo", "gpu:device=cuda", *TINY)
        analyze = mdpo("analyze", str(root), *ANALYZE)
        report = mdpo("report", str(root))
        _CACHE["study"] = Study(root, interrupted, resumed, with_failures, analyze, report, mtimes)
    return _CACHE["study"]
