"""The local backend (`mdpo train --backend local`, learners/local.py): a whole run in this one process, no Ray and no
gRPC, that computes what the Ray backend computes, writes the same run directory, resumes and stops like it.
Real runs, through the CLI and the Python entry point."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from learners.checkpoint import load_checkpoint, tensors_from_bytes
from tests.helpers import check_tensorboard_matches_metrics
from tests.test_faults import iterations_logged, wait_for

pytestmark = pytest.mark.slow

BATCH = 1024     # cartpole preset: 8 envs x 128 steps
# A learner's loss terms and diagnostics in metrics.jsonl (floats: equal up to rounding) ...
TERMS = ("loss", "policy_loss", "value_loss", "entropy", "kl_peer", "approx_kl", "clipfrac", "grad_norm",
         "explained_variance", "learning_rate", "train_return")
# ... and its counts (equal).
COUNTS = ("id", "step", "iteration", "samples", "syncs", "env_steps", "episodes", "version_lag")


def mdpo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "train", *args, "--progress", "false"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(expected: list[dict], got: list[dict], rel: float) -> None:
    """Per iteration and learner: the same fields, counts and (within `rel`) loss terms."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for want, have in zip(expected, got):
        assert have.keys() == want.keys() and have["env_steps"] == want["env_steps"]
        for a, b in zip(want["learners"], have["learners"]):
            assert b.keys() == a.keys()
            assert {k: b[k] for k in COUNTS} == {k: a[k] for k in COUNTS}, want["iteration"]
            assert {k: b[k] for k in TERMS} == pytest.approx({k: a[k] for k in TERMS}, rel=rel, abs=1e-7), \
                want["iteration"]


def learner_states(run: Path, iteration: int) -> list[dict]:
    return [tensors_from_bytes(data) for data in load_checkpoint(run / "checkpoints" / f"ckpt-{iteration:06d}").learners]


def assert_same_states(expected: list[dict], got: list[dict], rel: float) -> None:
    for a, b in zip(expected, got):
        assert b.keys() == a.keys() and (b["step"], b["iteration"]) == (a["step"], a["iteration"])
        torch.testing.assert_close(b["model"], a["model"], rtol=rel, atol=1e-6)
        torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"], rtol=rel, atol=1e-6)


def ray_sessions(root: Path) -> list[Path]:
    """The session directories Ray made under RAY_TMPDIR=root (ray.init makes one; nothing else does)."""
    return list((root / "ray").glob("session_*"))


def test_local_and_ray_backends_train_the_same_numbers_and_local_starts_no_ray(tmp_path):
    common = ("--preset", "cartpole", "--total-steps", str(3 * BATCH), "--eval-every", "0", "--metrics-port", "0")
    # Short: Ray's socket paths under it must stay within the 107 characters a Unix socket path may have.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        mdpo(*common, "--backend", "ray", "--run-dir", str(tmp_path / "ray"), env={"RAY_TMPDIR": str(ray_tmp / "a")})
        t1 = time.perf_counter()
        out = mdpo(*common, "--backend", "local", "--run-dir", str(tmp_path / "local"),
                   env={"RAY_TMPDIR": str(ray_tmp / "b")})
        t2 = time.perf_counter()
        assert ray_sessions(ray_tmp / "a"), "the check can fail: the Ray run made a session directory"
        assert not ray_sessions(ray_tmp / "b"), "the local backend started Ray"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"cartpole, 3 iterations: ray {t1 - t0:.1f}s, local {t2 - t1:.1f}s (whole commands)")
    assert "local backend: 2 learners and 2 rollout workers in this process" in out.stderr
    ray_run, local_run = tmp_path / "ray", tmp_path / "local"
    assert_same_training(records(ray_run), records(local_run), rel=1e-4)
    assert_same_states(learner_states(ray_run, 3), learner_states(local_run, 3), rel=1e-4)
    ray_summary, summary = (json.loads((run / "summary.json").read_text()) for run in (ray_run, local_run))
    assert summary.keys() == ray_summary.keys() and summary["completed"] and summary["iterations"] == 3
    assert summary["syncs"] == ray_summary["syncs"] == 3 * 2 * 16 and summary["sync_bytes_sent"] == 0
    assert [l["device"] for l in summary["learners"]] == ["cpu", "cpu"]
    assert (local_run / "returns.png").stat().st_size > 0
    check_tensorboard_matches_metrics(local_run)


def test_the_local_backend_resumes_as_the_uninterrupted_run_would(tmp_path):
    """Stopped at iteration 3 and resumed to 6: the first 3 iterations and the checkpoint at 3 are the uninterrupted
    run's. The iterations after a resume start from fresh envs (a checkpoint keeps no env state, on either backend),
    so the uninterrupted run's iterations 4-6 differ; from the same checkpoint they are the same: the uninterrupted
    run, rolled back to its checkpoint at 3, computes the resumed run's iterations 4-6."""
    common = ("--backend", "local", "--preset", "cartpole", "--no-anneal-lr", "--eval-every", "0",
              "--checkpoint-every", "3", "--metrics-port", "-1")
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    mdpo(*common, "--total-steps", str(6 * BATCH), "--run-dir", str(whole))
    mdpo(*common, "--total-steps", str(3 * BATCH), "--run-dir", str(halves))
    assert_same_training(records(whole)[:3], records(halves), rel=1e-6)
    assert_same_states(learner_states(whole, 3), learner_states(halves, 3), rel=1e-6)
    states = [load_checkpoint(run / "checkpoints" / "ckpt-000003").state for run in (whole, halves)]
    states = [{k: v for k, v in state.items() if k != "wall_seconds"} for state in states]
    assert states[0] == states[1]        # counters, returns, the actors' reward normalizers

    mdpo("--resume", str(halves), "--total-steps", str(6 * BATCH))
    log = records(halves)
    assert [r["iteration"] for r in log] == list(range(1, 7))
    assert [r["env_steps"] for r in log] == [BATCH * i for i in range(1, 7)]
    assert [r["learners"][1]["step"] for r in log] == [16 * i for i in range(1, 7)]     # Adam's steps continue
    summary = json.loads((halves / "summary.json").read_text())
    assert summary["completed"] and summary["env_steps"]["per_agent"] == [6 * BATCH] * 2
    check_tensorboard_matches_metrics(halves)    # the resumed run appended its event files: every step once

    shutil.rmtree(whole / "checkpoints" / "ckpt-000006")
    mdpo("--resume", str(whole))
    assert_same_training(records(halves), records(whole), rel=1e-6)
    assert_same_states(learner_states(halves, 6), learner_states(whole, 6), rel=1e-6)


def test_ctrl_c_checkpoints_and_stops_a_local_run(tmp_path):
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "learners.cli", "train", "--backend", "local", "--preset",
                             "cartpole", "--eval-every", "0", "--checkpoint-every", "100", "--metrics-port", "-1",
                             "--progress", "false", "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: iterations_logged(run) >= 2, 300, proc, "2 iterations")
    proc.send_signal(signal.SIGINT)
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-6000:]
    done = len(records(run))
    assert 2 <= done < 118 and load_checkpoint(run / "checkpoints" / f"ckpt-{done:06d}").iteration == done
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["completed"] and summary["iterations"] == done
    assert f"mdpo train --resume {run}" in err


def test_the_python_entry_point_trains_locally_in_this_process_and_awaits_its_evaluations(tmp_path):
    import ray

    from learners import preset, train

    assert not ray.is_initialized()
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(preset("cartpole"), backend="local", total_steps=2 * BATCH, eval_every=1,
                              metrics_port=-1, progress=False)
    summary = train(cfg, run_dir=tmp_path / "py")
    assert summary["completed"] and summary["iterations"] == 2
    assert not ray.is_initialized(), "the local backend started Ray"
    assert torch.get_num_threads() == threads        # the rollout workers' one thread is not left behind
    log = records(tmp_path / "py")
    # Evaluations are awaited: each record has the test return of the weights it ends with, and the probe set's
    # first measurement (always due) is in the first record.
    for r in log:
        assert [l["test_weights_version"] for l in r["learners"]] == [l["step"] for l in r["learners"]]
        assert all(l["test_return"] is not None for l in r["learners"])
    assert log[0]["probe"]["weights_version"] == 16 and "0-1" in log[0]["probe"]["agreement_tv"]
    assert (tmp_path / "py" / "probes.npz").exists() and summary["probe"]["weights_version"] >= 16


def test_a_diverged_local_run_stops_as_a_ray_run_does(tmp_path):
    """A learning rate that blows the weights up: the next loss is inf; exit 1, summary.json says why, and the
    checkpoint of iteration 0 is kept."""
    run = tmp_path / "diverged"
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "train", "--backend", "local", "--preset", "cartpole",
                           "--total-steps", str(BATCH), "--learning-rate", "1e30", "--eval-every", "0",
                           "--metrics-port", "-1", "--progress", "false", "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "mdpo train: error: training diverged: non-finite" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["error"]["type"] == "TrainingDiverged"
    assert load_checkpoint(run / "checkpoints" / "ckpt-000000").iteration == 0


def test_a_resumed_run_seeds_its_actors_at_the_checkpoints_iteration(tmp_path):
    """schedule.actor_seed shifts an actor's env seed by the iteration it starts at, so a resumed run does not replay
    the episodes of the run's start: the actors of a run resumed at iteration 2 are seeded for iteration 2 (they
    were seeded for iteration 0 before the runner read the checkpoint first)."""
    from learners.config import TrainConfig
    from learners.local import LocalCoordinator
    from learners.schedule import actor_seed

    run = tmp_path / "seeds"
    mdpo("--backend", "local", "--preset", "cartpole", "--total-steps", str(2 * BATCH), "--eval-every", "0",
         "--metrics-port", "-1", "--run-dir", str(run))
    cfg = dataclasses.replace(TrainConfig.load(run / "config.json"), total_steps=4 * BATCH)
    coordinator = LocalCoordinator(cfg, run, resume=True)
    try:
        coordinator.start()
        seeds = [[worker.rng.initial_seed() for worker in group] for group in coordinator.actors]
        assert coordinator.iteration == 2
    finally:
        coordinator.shutdown()
    expected = [[actor_seed(cfg, i, a, 2) for a in range(cfg.num_actors)] for i in range(cfg.num_learners)]
    assert seeds == expected and expected != [[actor_seed(cfg, i, a, 0) for a in range(cfg.num_actors)]
                                               for i in range(cfg.num_learners)]


def test_with_the_policy_lag_both_backends_train_the_same_numbers(tmp_path):
    """--policy-lag: each iteration trains on rollouts collected during the previous update. The learners' peers
    must hold the frames being trained on, never the next iteration's: the Ray run's loss terms (every KL term
    included) and weights equal the single-process reference's, which computes the peers' logits on the very batch."""
    common = ("--preset", "cartpole", "--total-steps", str(3 * BATCH), "--eval-every", "0", "--metrics-port", "-1",
              "--policy-lag", "true")
    mdpo(*common, "--backend", "ray", "--run-dir", str(tmp_path / "ray"))
    mdpo(*common, "--backend", "local", "--run-dir", str(tmp_path / "local"))
    ray_log, local_log = records(tmp_path / "ray"), records(tmp_path / "local")
    assert [max(l["version_lag"] for l in r["learners"]) for r in ray_log] == [0, 16, 16]    # lagged from iteration 2
    assert_same_training(ray_log, local_log, rel=1e-4)
    assert_same_states(learner_states(tmp_path / "ray", 3), learner_states(tmp_path / "local", 3), rel=1e-4)
