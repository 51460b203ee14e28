"""`exact` mode equals the authors' single-process joint update (learners/reference.py), over real gRPC and through
in-process peers (issue 2, item 6; issue 23)."""

import dataclasses

import pytest
import torch

from learners.config import TrainConfig
from learners.schedule import IterationPlan
from tests.helpers import LearnerPair, assert_same_parameters, reference_of, reference_update, synthetic_rollout


@pytest.mark.parametrize("obs_shape,obs_dtype,num_actions,wire", [
    ((4,), "float32", 2, "grpc"), ((64, 64, 3), "uint8", 15, "grpc"), ((4,), "float32", 2, "inproc")],
    ids=["mlp", "impala", "mlp-inproc"])
def test_exact_mode_matches_joint_single_process_update(obs_shape, obs_dtype, num_actions, wire):
    num_steps, num_envs = (16, 4) if obs_dtype == "float32" else (4, 4)
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, distill_mode="exact", sync="minibatch", num_envs=num_envs,
                      num_steps=num_steps, num_minibatches=2, update_epochs=2, learning_rate=1e-2, rpc_timeout_s=30,
                      sync_timeout_s=30)
    plan = IterationPlan(iteration=0, shuffle_seed=7, batch_size=cfg.batch_size, num_minibatches=2, update_epochs=2,
                         sync="minibatch", distill=True, learning_rate=cfg.learning_rate)
    rollouts = [synthetic_rollout(i, obs_shape, obs_dtype, num_actions, num_steps, num_envs, seed=10 + i)
                for i in range(2)]
    pair = LearnerPair(cfg, obs_shape, obs_dtype, num_actions, wire=wire)
    try:
        reference, optimizers = reference_of(pair)
        initial = [{k: v.clone() for k, v in l.agent.state_dict().items()} for l in pair.learners]
        stats = pair.update_all(rollouts, plan)
        expected = reference_update(reference, optimizers, rollouts, cfg, plan)
        for learner, ref, init in zip(pair.learners, reference, initial):
            assert_same_parameters(learner.agent, ref)
            assert any(not torch.equal(p.detach(), init[name]) for name, p in learner.agent.named_parameters()), \
                "the update did not change the parameters"
            assert learner.step == 4
        assert all(s.syncs == 4 and s.kl_peer > 0 for s in stats)
        for s, e in zip(stats, expected):       # the loss terms the learners report are the reference's too
            for name in ("loss", "policy_loss", "value_loss", "entropy", "kl_peer", "grad_norm"):
                assert getattr(s, name) == pytest.approx(e[name], rel=1e-4, abs=1e-6), name
        if wire == "inproc":
            assert all(s.sync_bytes_sent == 0 for s in stats)
    finally:
        pair.close()


def test_detached_mode_differs_from_exact():
    """Sanity check that the equivalence test can fail: detaching the peer changes the result."""
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, distill_mode="detached", sync="minibatch", num_envs=4,
                      num_steps=16, num_minibatches=2, update_epochs=1, learning_rate=1e-2)
    plan = IterationPlan(0, 7, cfg.batch_size, 2, 1, "minibatch", True, cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 16, 4, seed=10 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        pair.update_all(rollouts, plan)
        reference_update(reference, optimizers, rollouts, dataclasses.replace(cfg, distill_mode="exact"), plan)
        diffs = [max((p - r).abs().max().item() for p, r in zip(l.agent.parameters(), ref.parameters()))
                 for l, ref in zip(pair.learners, reference)]
        assert max(diffs) > 1e-4
    finally:
        pair.close()
