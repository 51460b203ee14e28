"""The speed-ups change no math: micro-batched updates, streamed (overlapped) syncs and the one-iteration policy lag."""

import copy
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from learners.config import TrainConfig
from learners.peer.fetch import PeerFetch
from learners.schedule import IterationPlan
from tests.helpers import LearnerPair, assert_same_parameters, reference_of, reference_update, synthetic_rollout


@pytest.mark.parametrize("sync", ["minibatch", "2", "epoch", "iteration"])
@pytest.mark.parametrize("microbatch", [0, 3])
def test_streamed_syncs_and_microbatches_equal_the_single_process_update(sync, microbatch):
    """Over real gRPC, with logits streamed in while the learner computes and minibatches of 8 split 3+3+2,
    both learners end exactly where the plain whole-minibatch single-process computation does."""
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, sync=sync, num_envs=4, num_steps=8, num_minibatches=4,
                      update_epochs=2, learning_rate=1e-2, microbatch_size=microbatch, rpc_timeout_s=30,
                      sync_timeout_s=30)
    plan = IterationPlan(0, 5, cfg.batch_size, 4, 2, sync, True, cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 8, 4, seed=20 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        stats = pair.update_all(rollouts, plan)
        reference_update(reference, optimizers, rollouts, cfg, plan)
        for learner, ref in zip(pair.learners, reference):
            assert_same_parameters(learner.agent, ref)
        for s in stats:
            assert s.syncs == plan.sync_points() and s.sync_bytes_received > 0
            assert 0 <= s.sync_seconds <= s.update_seconds
            assert len(s.sync_latencies) == s.syncs and all(x > 0 for x in s.sync_latencies)
    finally:
        pair.close()


def test_a_learner_ahead_steps_on_and_its_peer_reads_the_kept_weights():
    """Detached mode: a learner whose peer starts late does not wait at each sync for the peer to read its
    weights; the peer reads them later from the kept copy, and both still end where the single-process update
    does."""
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, sync="minibatch", num_envs=4, num_steps=8, num_minibatches=4,
                      update_epochs=2, learning_rate=1e-2, rpc_timeout_s=30, sync_timeout_s=30)
    plan = IterationPlan(0, 5, cfg.batch_size, 4, 2, "minibatch", True, cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 8, 4, seed=30 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        pair.update_all(rollouts, plan, delays=[0.0, 1.0])
        reference_update(reference, optimizers, rollouts, cfg, plan)
        for learner, ref in zip(pair.learners, reference):
            assert_same_parameters(learner.agent, ref)
        ahead, late = pair.endpoints
        assert ahead.state.snapshot_reads >= 1    # step 0's weights, read after learner 0 had stepped past them
        assert ahead.state.kept_snapshots == [] and late.state.kept_snapshots == []   # all read, let go
    finally:
        pair.close()


def test_exact_mode_with_microbatches_still_equals_the_joint_update():
    """Exact mode: the KL gradient of each micro-batch flows into the slice of the peer's logits it used."""
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, distill_mode="exact", sync="minibatch", num_envs=4,
                      num_steps=16, num_minibatches=2, update_epochs=2, learning_rate=1e-2, microbatch_size=5,
                      rpc_timeout_s=30, sync_timeout_s=30)
    plan = IterationPlan(0, 7, cfg.batch_size, 2, 2, "minibatch", True, cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 16, 4, seed=10 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        pair.update_all(rollouts, plan)
        reference_update(reference, optimizers, rollouts, cfg, plan)
        for learner, ref in zip(pair.learners, reference):
            assert_same_parameters(learner.agent, ref)
    finally:
        pair.close()


def test_microbatching_gives_the_gradient_of_one_pass_on_images():
    """IMPALA-CNN, minibatch 16 as 5+5+5+1: the same gradient at every optimizer step, and the same parameters after
    an update, as without micro-batching.

    Plain SGD steps here: Adam's first steps are lr * g / (|g| + eps), which turns the float rounding of a gradient
    element near eps (1e-5) into a parameter difference up to lr / eps = 100 times larger, whatever the summation
    order; the gradients themselves are compared directly, at a tighter tolerance."""
    results, grads = [], []
    for microbatch in (0, 5):
        cfg = TrainConfig(env_id="coinrun", alpha=0.0, num_learners=2, num_envs=4, num_steps=8, num_minibatches=2,
                          update_epochs=1, microbatch_size=microbatch, rpc_timeout_s=30, sync_timeout_s=30)
        plan = IterationPlan(0, 3, cfg.batch_size, 2, 1, "minibatch", False, 1e-3)
        pair = LearnerPair(cfg, (64, 64, 3), "uint8", 15)
        seen = []
        for learner in pair.learners:
            learner.optimizer = torch.optim.SGD(learner.agent.parameters(), lr=plan.learning_rate)
            step = learner.optimizer.step

            def recording_step(step=step, learner=learner):
                seen.append((learner.id, [p.grad.clone() for p in learner.agent.parameters()]))
                return step()

            learner.optimizer.step = recording_step
        try:
            pair.update_all([synthetic_rollout(i, (64, 64, 3), "uint8", 15, 8, 4, seed=i) for i in range(2)], plan)
            results.append([copy.deepcopy(l.agent.state_dict()) for l in pair.learners])
            grads.append(sorted(seen, key=lambda item: item[0]))
        finally:
            pair.close()
    assert len(grads[0]) == len(grads[1]) == 4                  # 2 learners x 2 minibatches
    for (_, whole), (_, chunked) in zip(*grads):
        for g_whole, g_chunked in zip(whole, chunked):
            torch.testing.assert_close(g_chunked, g_whole, rtol=1e-4, atol=1e-7)
    for whole, chunked in zip(*results):
        for name in whole:
            torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_failed_stream_surfaces_in_the_training_thread():
    def bad_peer(sync, frames_digest, rows, keep_graph, on_chunk):
        on_chunk(np.full((2, 2), np.nan, np.float32))

    fetch = PeerFetch(1, np.arange(4), 2)
    fetch.run(bad_peer, None, "digest", np.arange(4), False)
    with pytest.raises(RuntimeError, match="bad logits"):
        fetch.wait(1, timeout_s=1)


@pytest.mark.slow
def test_policy_lag_reaches_the_exact_step_total_across_a_stop_with_a_rollout_in_flight(tmp_path):
    """The whole pipeline with --policy-lag: each iteration's rollouts are collected with the pre-update weights
    during the previous update. Ctrl-C mid-run checkpoints while the next rollouts are in flight; the resumed run
    neither loses nor double counts an iteration, ends at the exact step total, and CartPole still learns."""
    run = tmp_path / "lag"
    base = [sys.executable, "-m", "learners.cli", "train", "--progress", "false", "--metrics-port", "-1"]
    proc = subprocess.Popen(base + ["--preset", "cartpole", "--policy-lag", "true", "--eval-every", "0",
                                    "--checkpoint-every", "50", "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 30):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-6000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-6000:]
    stopped_at = len(metrics.read_text().splitlines())
    assert 30 <= stopped_at < 118
    assert (run / "checkpoints" / f"ckpt-{stopped_at:06d}" / "manifest.json").exists()

    resumed = subprocess.run(base + ["--resume", str(run)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["iterations"] == 118
    assert summary["env_steps"]["per_agent"] == [1024 * 118, 1024 * 118]
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(1, 119))
    assert [r["env_steps"] for r in log] == [1024 * i for i in range(1, 119)]
    # version_lag counts optimizer steps between a rollout's weights and the learner's: the lag adds one iteration
    # (16 steps). The first iteration after each start collects fresh, unlagged rollouts.
    lags = [max(l["version_lag"] for l in r["learners"]) for r in log]
    unlagged = {1, stopped_at + 1}
    assert all(lags[i - 1] == lags[0] for i in unlagged)
    assert all(lag == lags[0] + 16 for i, lag in enumerate(lags) if i + 1 not in unlagged)
    for learner in summary["learners"]:
        assert learner["final_train_return"] >= 400, summary


def test_loading_a_checkpoint_drops_the_weights_kept_for_peers():
    """After a restore, a peer asking for step s gets the restored weights, never a copy kept before the restore."""
    from learners.peer.sync import SyncPoint
    from learners.learner_worker import LearnerWorker
    from learners.records import batch_frames

    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                      metrics_port=-1, rpc_timeout_s=30, sync_timeout_s=5)
    workers = [LearnerWorker(cfg, i, (4,), "float32", 2) for i in range(2)]
    try:
        addresses = {w.id: w.address() for w in workers}
        for w in workers:
            w.connect(addresses)
        learner, endpoint = workers[0].learner, workers[0].endpoint
        endpoint.state.keep_snapshot(0, learner.agent)   # step 0's weights, not yet read by the peer
        with torch.no_grad():
            for p in learner.agent.parameters():
                p.add_(0.5)
        restored = workers[0].state()                       # other weights, same step: a checkpoint to restore
        workers[0].load_state(restored)
        assert endpoint.state.kept_snapshots == []
        rollout = synthetic_rollout(1, (4,), "float32", 2, 8, 4, seed=3)      # learner 1's batch of iteration 0
        assert workers[0].hold_peer_frames(0, 1, rollout) == rollout.obs.nbytes
        obs, digest = batch_frames([rollout])
        rows = np.array([5, 0, 17, 3])
        logits, _, _ = workers[1].clients[0].fetch_logits(SyncPoint(1, 0, 0, 0), digest, rows, False)
        with torch.no_grad():
            expected = learner.agent.logits(torch.from_numpy(obs[rows])).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-6)
    finally:
        for w in workers:
            w.stop()


def test_a_rolled_back_iteration_trains_on_its_new_frames_as_the_reference_does():
    """Rollback: iteration 0 trained on rollouts A, the learners go back to the checkpoint before it and iteration 0
    is collected again (rollouts B, other frames). The redone update equals the reference's on B from the
    checkpoint: no learner answers its peer on A's frames, which it held before (a request naming them is refused)."""
    from learners.peer.sync import SyncError, SyncPoint
    from learners.records import batch_frames

    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, sync="2", num_envs=4, num_steps=8, num_minibatches=4,
                      update_epochs=2, learning_rate=1e-2, rpc_timeout_s=30, sync_timeout_s=2)
    plan = IterationPlan(0, 5, cfg.batch_size, 4, 2, "2", True, cfg.learning_rate)
    first = [synthetic_rollout(i, (4,), "float32", 2, 8, 4, seed=40 + i) for i in range(2)]
    again = [synthetic_rollout(i, (4,), "float32", 2, 8, 4, seed=50 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        checkpoint = [copy.deepcopy(l.state_dict()) for l in pair.learners]
        pair.update_all(first, plan)
        for learner, endpoint, state in zip(pair.learners, pair.endpoints, checkpoint):
            learner.load_state_dict(state)
            endpoint.reset()                         # what LearnerWorker.load_state does
        stats = pair.update_all(again, plan)
        reference_update(reference, optimizers, again, cfg, plan)
        for learner, ref in zip(pair.learners, reference):
            assert_same_parameters(learner.agent, ref)
        assert all(s.syncs == plan.sync_points() for s in stats)
        _, stale = batch_frames([first[0]])
        with pytest.raises(SyncError, match="re-collected"):
            pair.endpoints[1].frames.get(0, 0, stale)
        with pytest.raises(Exception, match="FAILED_PRECONDITION: .*re-collected"):
            pair.client(0, 1).fetch_logits(SyncPoint(0, 0, 0, 7), stale, np.arange(4), keep_graph=False)
    finally:
        pair.close()
