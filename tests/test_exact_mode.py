"""`exact` mode over real gRPC equals the authors' single-process joint update (issue 2, item 6)."""

import copy

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from learners import ppo
from learners.records import Batch
from learners.config import TrainConfig
from learners.schedule import IterationPlan
from tests.helpers import LearnerPair, assert_same_parameters, synthetic_rollout


def reference_update(agents, rollouts, cfg: TrainConfig, plan: IterationPlan):
    """The authors' objective in one process: 0.5*(loss_A + loss_B), one joint backward (peer not detached),
    gradient clipping per network, one Adam over both networks."""
    batches = [Batch.from_rollouts([r], cfg.gamma, cfg.gae_lambda) for r in rollouts]
    params = [p for a in agents for p in a.parameters()]
    optimizer = torch.optim.Adam(params, lr=plan.learning_rate, eps=cfg.adam_eps)
    mbs = plan.minibatch_size
    for epoch in range(plan.update_epochs):
        perm = plan.permutation(epoch)
        for j in range(plan.num_minibatches):
            mb = perm[j * mbs:(j + 1) * mbs]
            losses = []
            for me, peer, b in ((agents[0], agents[1], batches[0]), (agents[1], agents[0], batches[1])):
                obs = torch.from_numpy(b.obs[mb])
                logits, value = me(obs)
                newlogprob = Categorical(logits=logits).log_prob(torch.from_numpy(b.actions[mb]))
                adv = ppo.normalize_advantages(torch.from_numpy(b.advantages[mb]))
                pg = ppo.policy_loss(newlogprob, torch.from_numpy(b.logprobs[mb]), adv, cfg.clip_coef)
                v = ppo.value_loss(value, torch.from_numpy(b.values[mb]), torch.from_numpy(b.returns[mb]), cfg.clip_coef)
                kl = ppo.kl_to_peer(peer.logits(obs), logits)       # peer NOT detached
                losses.append(pg + cfg.vf_coef * v - cfg.ent_coef * ppo.entropy(logits) + cfg.alpha * kl)
            optimizer.zero_grad()
            (0.5 * (losses[0] + losses[1])).backward()
            for a in agents:
                torch.nn.utils.clip_grad_norm_(a.parameters(), cfg.max_grad_norm)
            optimizer.step()


@pytest.mark.parametrize("obs_shape,obs_dtype,num_actions", [((4,), "float32", 2), ((64, 64, 3), "uint8", 15)],
                         ids=["mlp", "impala"])
def test_exact_mode_matches_joint_single_process_update(obs_shape, obs_dtype, num_actions):
    num_steps, num_envs = (16, 4) if obs_dtype == "float32" else (4, 4)
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, distill_mode="exact", sync="minibatch", num_envs=num_envs,
                      num_steps=num_steps, num_minibatches=2, update_epochs=2, learning_rate=1e-2, rpc_timeout_s=30,
                      sync_timeout_s=30)
    plan = IterationPlan(iteration=0, shuffle_seed=7, batch_size=cfg.batch_size, num_minibatches=2, update_epochs=2,
                         sync="minibatch", distill=True, learning_rate=cfg.learning_rate)
    rollouts = [synthetic_rollout(i, obs_shape, obs_dtype, num_actions, num_steps, num_envs, seed=10 + i)
                for i in range(2)]
    pair = LearnerPair(cfg, obs_shape, obs_dtype, num_actions)
    try:
        reference = [copy.deepcopy(l.agent) for l in pair.learners]
        initial = [copy.deepcopy(l.agent.state_dict()) for l in pair.learners]
        stats = pair.update_all(rollouts, plan)
        reference_update(reference, rollouts, cfg, plan)
        for learner, ref, init in zip(pair.learners, reference, initial):
            assert_same_parameters(learner.agent, ref)
            assert any(not torch.equal(p.detach(), init[name]) for name, p in learner.agent.named_parameters()), \
                "the update did not change the parameters"
            assert learner.step == 4
        assert all(s.syncs == 4 and s.kl_peer > 0 for s in stats)
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
        reference = [copy.deepcopy(l.agent) for l in pair.learners]
        pair.update_all(rollouts, plan)
        reference_update(reference, rollouts, cfg, plan)
        diffs = [max((p - r).abs().max().item() for p, r in zip(l.agent.parameters(), ref.parameters()))
                 for l, ref in zip(pair.learners, reference)]
        assert max(diffs) > 1e-4
    finally:
        pair.close()
