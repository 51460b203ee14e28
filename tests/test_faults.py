"""Fault injection into real runs (CartPole through the full distributed pipeline on a local Ray).

Each test appends a row to FAULT_REPORT; conftest prints the table (faults injected, survived, data lost).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from learners.config import TrainConfig
from learners.learner import Learner, NonFiniteError
from learners.schedule import IterationPlan
from tests.helpers import FAULT_REPORT, check_tensorboard_matches_metrics, synthetic_rollout
from tests.tracker_readers import check_trackers_match_metrics

BATCH = 1024          # cartpole preset: 8 envs x 128 steps


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "learners.cli", "train", "--preset", "cartpole", "--eval-every", "0",
           "--run-dir", str(run_dir), "--progress", "false", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "WANDB_MODE": "offline"})     # for the runs with --track wandb


def iterations_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}) waiting for {what}:\n{proc.stdout.read()[-5000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ray_workers(kind: str, session: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"ray::{kind}" in part for part in (p.info["cmdline"] or [])) and os.getsid(p.pid) == session:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        cleanup(proc)
    return out


def cleanup(proc: subprocess.Popen) -> None:
    """Kill whatever the run left in its session (after a driver SIGKILL, Ray's own processes)."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (psutil.Error, ProcessLookupError):
            pass


def check_exact_accounting(run_dir: Path, iterations: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["completed"] and summary["iterations"] == iterations
    assert summary["env_steps"]["per_agent"] == [iterations * BATCH] * 2
    assert [r["iteration"] for r in log] == list(range(1, iterations + 1)), "an iteration was lost or logged twice"
    assert [r["env_steps"] for r in log] == [BATCH * i for i in range(1, iterations + 1)]
    check_tensorboard_matches_metrics(run_dir)      # rolled-back iterations purged there too: no step twice
    return summary


def transitions_lost_or_doubled(summary: dict, iterations: int) -> int:
    return abs(2 * iterations * BATCH - summary["env_steps"]["total"])


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_rollout_actor_killed_mid_collection_is_restarted(tmp_path):
    run = tmp_path / "actor"
    # long rollouts (2048 steps/env) so that the kill lands inside `collect`
    proc = start(run, "--total-steps", str(8 * BATCH), "--num-envs", "2", "--num-steps", "512", "--num-minibatches", "4")
    try:
        wait_for(lambda: iterations_logged(run) >= 2, 240, proc, "2 iterations")
        victims = ray_workers("RolloutWorker", proc.pid)
        assert victims, "no rollout actor process found"
        victims[0].send_signal(signal.SIGKILL)
        out = finish(proc)
    finally:
        cleanup(proc)
    assert proc.returncode == 0, out[-5000:]
    summary = check_exact_accounting(run, 8)
    assert summary["actor_restarts"] >= 1, summary
    assert "was restarted" in out
    FAULT_REPORT.append(("rollout actor SIGKILL", 1, int(summary["completed"]), transitions_lost_or_doubled(summary, 8)))


@pytestmark_slow
def test_learner_killed_mid_run_is_restarted_from_checkpoint(tmp_path):
    run = tmp_path / "learner"
    proc = start(run, "--total-steps", str(10 * BATCH), "--checkpoint-every", "2")
    try:
        wait_for(lambda: iterations_logged(run) >= 3, 240, proc, "3 iterations")
        victims = ray_workers("LearnerWorker", proc.pid)
        assert len(victims) == 2
        victims[1].send_signal(signal.SIGKILL)
        out = finish(proc)
    finally:
        cleanup(proc)
    assert proc.returncode == 0, out[-5000:]
    summary = check_exact_accounting(run, 10)
    assert summary["failures_recovered"] == 1
    assert "restarting learners from the latest checkpoint" in out
    FAULT_REPORT.append(("learner SIGKILL", 1, int(summary["completed"]), transitions_lost_or_doubled(summary, 10)))


@pytestmark_slow
def test_driver_killed_then_the_same_command_resumes_from_last_good_checkpoint(tmp_path):
    """After a driver SIGKILL (and a torn newest checkpoint), the identical command, as a retried job or KubeRay
    runs it, continues the run; once finished it exits at once; another config in that directory is refused."""
    run = tmp_path / "driver"
    args = ("--total-steps", str(12 * BATCH), "--checkpoint-every", "2", "--track", "wandb,mlflow")
    proc = start(run, *args)
    try:
        wait_for(lambda: (run / "checkpoints" / "ckpt-000004" / "manifest.json").exists(), 240, proc, "checkpoint 4")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        cleanup(proc)
    newest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    damaged = newest / "learner-0.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])          # a torn write
    proc2 = start(run, *args)
    out = finish(proc2)
    assert proc2.returncode == 0, out[-5000:]
    assert f"{damaged}: checksum mismatch" in out                    # names the broken file
    assert "resuming it" in out and "resumed from" in out
    summary = check_exact_accounting(run, 12)
    # The trackers hold exactly metrics.jsonl too: the iterations they had past the checkpoint resumed from (the
    # torn one was newer) went to a new run of each, with the whole history.
    check_trackers_match_metrics(run)
    kept = {p: p.read_bytes() for p in [run / "metrics.jsonl", run / "summary.json"]}

    third = start(run, *args)                     # finished: exits at once, changes nothing
    out = finish(third, timeout=60)
    assert third.returncode == 0 and "nothing to do" in out, out[-3000:]
    other = start(run, *args, "--learning-rate", "0.001")    # another config: refused, nothing overwritten
    out = finish(other, timeout=60)
    assert other.returncode == 2 and "another config" in out and "learning_rate" in out, out[-3000:]
    assert {p: p.read_bytes() for p in kept} == kept
    FAULT_REPORT.append(("driver SIGKILL + torn ckpt, same command rerun", 2, 2 * int(summary["completed"]),
                         transitions_lost_or_doubled(summary, 12)))


@pytestmark_slow
def test_sigterm_checkpoints_stops_everything_and_frees_ports(tmp_path):
    run = tmp_path / "term"
    proc = start(run, "--total-steps", str(40 * BATCH), "--checkpoint-every", "100")
    try:
        wait_for(lambda: iterations_logged(run) >= 2, 240, proc, "2 iterations")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        # Checked before cleanup() so a process the run left behind is seen, not killed first.
        assert proc.returncode == 128 + signal.SIGTERM, out[-5000:]
        leftovers = []
        for _ in range(20):
            leftovers = [p for p in psutil.process_iter() if _sid(p) == proc.pid]
            if not leftovers:
                break
            time.sleep(0.5)
        assert not leftovers, [_cmdline(p) for p in leftovers]
        ports = [int(p) for p in re.findall(r"learner \d: gRPC 127\.0\.0\.1:(\d+)", out)]
        assert len(ports) == 2
        for port in ports:
            holders = [(c.pid, c.status) for c in psutil.net_connections("tcp")
                       if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]
            assert not holders, f"port {port} still has a listener: {holders}"
            with socket.socket() as sock:
                # A closed server's accepted connections may sit in TIME_WAIT; a new server binds over
                # those (SO_REUSEADDR, as gRPC does) but never over a live listener.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
    finally:
        cleanup(proc)
    done = iterations_logged(run)
    assert (run / "checkpoints" / f"ckpt-{done:06d}" / "manifest.json").exists()
    assert f"mdpo train --resume {run}" in out
    checkpoint_steps = json.loads((run / "checkpoints" / f"ckpt-{done:06d}" / "state.json").read_text())["env_steps"]
    FAULT_REPORT.append(("SIGTERM (graceful stop)", 1, 1, abs(2 * done * BATCH - sum(checkpoint_steps))))


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return p.pid


def _sid(p):
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def test_non_finite_loss_aborts_before_the_optimizer_step():
    cfg = TrainConfig(env_id="CartPole-v1", alpha=0.0, num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1)
    learner = Learner(cfg, 0, (4,), "float32", 2)
    before = {k: v.clone() for k, v in learner.agent.state_dict().items()}
    rollout = synthetic_rollout(0, (4,), "float32", 2, 8, 4, seed=0)
    rollout.rewards[3, 1] = np.nan
    plan = IterationPlan(0, 1, cfg.batch_size, 2, 1, "minibatch", False, 1e-3)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        learner.update([rollout], plan)
    assert learner.step == 0
    for k, v in learner.agent.state_dict().items():
        assert torch.equal(v, before[k])
    FAULT_REPORT.append(("non-finite loss (update aborted, weights kept)", 1, 1, 0))


# ------------------------------------------------------------------------------------------- hangs (issue 14)
# Bounds a test can wait out: a peer's gRPC deadline of 8 s, the coordinator's hang bound 12 s (120 s while processes start).
HANG_FLAGS = ("--rpc-timeout-s", "8", "--sync-timeout-s", "8", "--hang-timeout-s", "12")


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def freeze(kind: str, proc: subprocess.Popen, index: int = 0) -> psutil.Process:
    victims = sorted(ray_workers(kind, proc.pid), key=lambda p: p.pid)
    assert victims, f"no {kind} process found"
    victims[index].suspend()                      # SIGSTOP: as a deadlock, a stuck GPU call or a frozen node
    return victims[index]


def run_with_a_freeze_for_good(run: Path, kind: str, index: int, after: int) -> tuple[dict, str]:
    """A 6-iteration CartPole run whose `kind` process `index` is frozen for good after `after` iterations; the run
    must still finish with exact accounting. Returns (summary, output)."""
    proc = start(run, "--total-steps", str(6 * BATCH), "--checkpoint-every", "2", *HANG_FLAGS)
    try:
        wait_for(lambda: iterations_logged(run) >= after, 240, proc, f"{after} iterations")
        freeze(kind, proc, index)
        out = finish(proc)
    finally:
        cleanup(proc)
    assert proc.returncode == 0, out[-5000:]
    return check_exact_accounting(run, 6), out


@pytestmark_slow
def test_learner_hung_for_good_is_killed_and_the_run_rolls_back(tmp_path):
    summary, out = run_with_a_freeze_for_good(tmp_path / "hung-learner", "LearnerWorker", 1, after=3)
    assert summary["failures_recovered"] == 1 and summary["hangs_detected"] >= 1, summary
    assert "hang, " in out and "restarting learners from the latest checkpoint" in out
    FAULT_REPORT.append(("learner hung for good (SIGSTOP)", 1, int(summary["completed"]),
                         transitions_lost_or_doubled(summary, 6)))


@pytestmark_slow
def test_rollout_actor_hung_for_good_is_replaced_without_restarting_the_learners(tmp_path):
    summary, out = run_with_a_freeze_for_good(tmp_path / "hung-actor", "RolloutWorker", 0, after=2)
    assert summary["failures_recovered"] == 0, summary            # the learners were never restarted
    assert summary["hangs_detected"] >= 1 and summary["actor_restarts"] >= 1, summary
    assert "hung: no rollout within" in out
    FAULT_REPORT.append(("rollout actor hung for good (SIGSTOP)", 1, int(summary["completed"]),
                         transitions_lost_or_doubled(summary, 6)))


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two free consecutive ports")


@pytestmark_slow
def test_brief_freezes_and_a_flood_of_idle_streams_are_survived_with_no_failure(tmp_path):
    """One run, two faults that must not count as failures: 64 idle streams from a stranger on the learners' gRPC
    ports for the rest of the run, then a learner and a rollout actor frozen for 4 s (well inside the bounds) and
    thawed."""
    import grpc
    from tests.test_channel_guard import IdleStreams

    run, port = tmp_path / "flood", _free_port_pair()
    proc = start(run, "--total-steps", str(6 * BATCH), "--grpc-port", str(port), *HANG_FLAGS)
    channels, floods = [], []
    try:
        wait_for(lambda: iterations_logged(run) >= 1, 240, proc, "1 iteration")
        for learner_port in (port, port + 1):
            channels.append(grpc.insecure_channel(f"127.0.0.1:{learner_port}"))
            floods.append(IdleStreams(channels[-1], 32))
        wait_for(lambda: iterations_logged(run) >= 2, 240, proc, "2 iterations")
        frozen = [freeze("LearnerWorker", proc, 0), freeze("RolloutWorker", proc, 1)]
        time.sleep(4)
        for p in frozen:
            p.resume()
        out = finish(proc)
    finally:
        for flood in floods:
            flood.close()
        for channel in channels:
            channel.close()
        cleanup(proc)
    assert proc.returncode == 0, out[-5000:]
    summary = check_exact_accounting(run, 6)
    assert summary["failures_recovered"] == 0 and summary["hangs_detected"] == 0, summary
    assert {code for flood in floods for code in flood.codes()} == {grpc.StatusCode.PERMISSION_DENIED}
    lost = transitions_lost_or_doubled(summary, 6)
    FAULT_REPORT.append(("64 idle stranger streams on the learners' ports", 1, int(summary["completed"]), lost))
    FAULT_REPORT.append(("learner + actor frozen 4 s, thawed (left alone)", 2, 2 * int(summary["completed"]), lost))


@pytestmark_slow
def test_a_run_that_gives_up_says_so_in_its_summary_and_drops_its_targets(tmp_path):
    run = tmp_path / "runs" / "gives-up"
    proc = start(run, "--total-steps", str(10 * BATCH), "--max-failures", "0", "--metrics-port", "0")
    try:
        wait_for(lambda: iterations_logged(run) >= 2, 240, proc, "2 iterations")
        targets = list((tmp_path / "runs" / "prometheus").glob("*.json"))
        assert targets, "the run serves Prometheus targets while it runs"
        freeze("LearnerWorker", proc, 0).kill()
        out = finish(proc)
    finally:
        cleanup(proc)
    assert proc.returncode == 1, out[-5000:]
    summary = summary_of(run)
    assert summary["completed"] is False and 2 <= summary["iterations"] < 10, summary
    assert summary["error"]["type"] == "RuntimeError" and "giving up after 1 failures" in summary["error"]["message"]
    assert not any(p.exists() for p in targets), "a failed run's targets file must go"
