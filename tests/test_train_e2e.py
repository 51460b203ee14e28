"""End to end through the CLI: Ray actors, both learners, gRPC and the coordinator (embedded local Ray). The smoke
preset's run directory is checked on a run from the installed wheel (tests/test_packaging.py)."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import check_tensorboard_matches_metrics
from tests.tracker_readers import check_trackers_match_metrics

pytestmark = pytest.mark.slow


def mdpo(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "learners.cli", *args, "--progress", "false"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cartpole_mutual_distillation_learns(tmp_path):
    run = tmp_path / "cartpole"
    token = f"tok-{secrets.token_hex(8)}"     # the learners' channel requires it on every call
    proc = mdpo("train", "--preset", "cartpole", "--run-dir", str(run), env={"MDPO_GRPC_TOKEN": token})
    assert token not in proc.stdout + proc.stderr
    for path in run.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"token leaked into {path}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["alpha"] == 1.0 and summary["distill_mode"] == "detached"
    assert summary["syncs"] > 0 and summary["sync_bytes_sent"] > 0
    for learner in summary["learners"]:
        assert learner["device"] == "cpu"
        assert learner["final_train_return"] >= 450, summary
        assert learner["final_test_return"] is not None
    log = records(run)
    assert [r["iteration"] for r in log] == list(range(1, summary["iterations"] + 1))
    assert all(l["kl_peer"] > 0 for r in log for l in r["learners"])


def test_resume_continues_to_the_requested_total_and_alpha_zero_is_independent_ppo(tmp_path):
    run = tmp_path / "resume"
    common = ("--preset", "cartpole", "--alpha", "0", "--eval-every", "0", "--checkpoint-every", "2",
              "--track", "wandb,mlflow")
    offline = {"WANDB_MODE": "offline"}
    mdpo("train", *common, "--total-steps", "3072", "--run-dir", str(run), env=offline)   # 3 iterations of 1024
    first = json.loads((run / "summary.json").read_text())
    assert first["iterations"] == 3 and first["syncs"] == 0 and first["sync_bytes_sent"] == 0
    mdpo("train", "--resume", str(run), "--total-steps", "6144", env=offline)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["iterations"] == 6
    assert summary["env_steps"]["per_agent"] == [6144, 6144]
    log = records(run)
    assert [r["iteration"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["env_steps"] for r in log] == [1024 * i for i in range(1, 7)]
    assert log[3]["learners"][0]["step"] == 4 * 16       # optimizer steps continue from the checkpoint
    check_tensorboard_matches_metrics(run)    # the resumed run appended its event files: every step once
    wb, _ = check_trackers_match_metrics(run)    # and continued its W&B and MLflow runs: every step once
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and wb["exit_codes"] == [0, 0]
