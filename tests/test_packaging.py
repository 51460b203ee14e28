"""A non-editable install (what the Docker image does) carries every package and subpackage and runs from anywhere:
the smoke preset's Procgen training, whose run directory is checked here."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_wheel_installs_into_a_fresh_venv_and_trains_from_another_directory(tmp_path):
    # The wheel, built as pip builds it (the build hook compiles the protos into it), from a copy of the checkout:
    # setuptools writes build/ into the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                                 "__pycache__", "*_pb2*.py", "*_pb2.pyi"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mdpo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for pkg in ("actors", "learners", "protos")
                for p in (ROOT / pkg).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert {"learners/peer", "learners/coordinator", "learners/study", "learners/bench", "learners/telemetry"} <= packages
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    assert "protos/distill_pb2.py" in names and "protos/distill_pb2_grpc.py" in names

    # A fresh venv outside the checkout; its third-party packages come from this test's environment (a path
    # entry, so nothing of the checkout, such as the editable install's finder, comes along).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    (Path(purelib.stdout.strip()) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import learners.peer.client, learners.coordinator.loop, learners.study.sweep, "
                 "learners.bench.measure, actors.evaluator, protos.distill_pb2, learners; print(learners.__file__)"],
                cwd=elsewhere)
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout

    mdpo = str(venv / "bin" / "mdpo")
    assert "train" in run([mdpo, "--help"], cwd=elsewhere).stdout

    # The README's main job, `mdpo train --preset smoke` (Procgen), with its defaults, from the installed wheel: what
    # every run directory holds.
    run_dir = elsewhere / "smoke"
    out = run([mdpo, "train", "--preset", "smoke", "--run-dir", str(run_dir)], cwd=elsewhere, timeout=420,
              env={"PYTHONPATH": ""}).stdout
    assert "done:" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("env_steps", "wall_seconds", "env_steps_per_second", "iterations", "syncs", "sync_seconds_total",
                "distill_mode", "alpha"):
        assert key in summary
    assert summary["completed"] and summary["iterations"] == 4 and summary["syncs"] > 0
    assert summary["env_steps"]["per_agent"] == [2048, 2048] and summary["env_steps"]["total"] == 4096
    for learner in summary["learners"]:
        assert {"id", "device", "final_train_return", "final_test_return"} <= set(learner)
        assert learner["final_test_return"] is not None
    png = (run_dir / "returns.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "ckpt-000004"
    assert json.loads((run_dir / "config.json").read_text())["env_id"] == "coinrun"

    # The mechanism metrics (actors/probes.py): the first evaluation measures the probe set kept in the run directory
    # (the smoke preset's), and the numbers reach metrics.jsonl with their weights version, TensorBoard and
    # summary.json.
    from learners.config import preset
    from learners.coordinator.tensorboard import read_scalars
    from learners.records import ProbeSet

    states = preset("smoke").probe_states
    probe_set = ProbeSet.from_npz(run_dir / "probes.npz")
    assert probe_set.states == states and list(probe_set.renderings) == ["default", "no_backgrounds", "monochrome_assets"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r["probe"] for r in records if "probe" in r]
    assert measured, "no evaluation measured the probe set"
    for probe in measured + [summary["probe"]]:
        assert probe["states"] == states and probe["weights_version"] > 0
        assert set(probe["robustness_tv"]) == set(probe["render_cka"]) == {"no_backgrounds", "monochrome_assets"}
        assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in probe["robustness_tv"].values())
        assert set(probe["agreement_tv"]) == set(probe["cka"]) == {"0-1"} and 0 <= probe["agreement_tv"]["0-1"] <= 1
    scalars = read_scalars(run_dir)
    first = next(r for r in records if "probe" in r)
    assert scalars["probe/robustness_tv/no_backgrounds/agent1"][0] == (
        first["env_steps"], pytest.approx(first["probe"]["robustness_tv"]["no_backgrounds"][1], rel=1e-6))
    assert scalars["probe/cka/agents0-1"][0][1] == pytest.approx(first["probe"]["cka"]["0-1"], rel=1e-6)
