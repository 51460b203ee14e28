"""The paper's experiment, point by point: `--preset paper` and the `ppo` baseline equal the authors' code.

The references below are the authors' update written out flat, as their trainer.py / ppo.py / agent.py compute
it (their KL with +1e-8 on probabilities, their min-form surrogate, their GAE convention, their advantage epsilons,
their init), not mdpo's own functions, so that a drift in either shows up here.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import VectorEnv
from gymnasium.wrappers.vector import NormalizeReward as GymnasiumNormalizeReward
from torch import nn
from torch.distributions import Categorical

from actors.envs import make_vector_env
from actors.reward_normalization import NormalizeReturn
from actors.evaluator import Evaluator
from learners.records import Weights
from learners.cli import main as mdpo_main
from learners.config import PAPER_ITERATIONS, TrainConfig, preset
from learners.schedule import actor_seed
from learners.learner import Learner
from learners.model import ConvSequence, sample_actions
from learners.schedule import IterationPlan
from learners.study.sweep import Method, SweepConfig, expand
from tests.helpers import LearnerPair, assert_same_parameters, synthetic_rollout

IMPALA = ((64, 64, 3), "uint8", 15)


def paper_learner_config(**small) -> TrainConfig:
    """The paper preset with a tiny batch: every loss, init and clipping setting is the preset's."""
    shape = dict(num_envs=4, num_steps=8, num_minibatches=2, rpc_timeout_s=60, sync_timeout_s=60, metrics_port=-1)
    return dataclasses.replace(preset("paper"), **{**shape, **small})


# --- the authors' network and update, written out -----------------------------------------------------------

class AuthorsAgent(nn.Module):
    """agent.py's Agent: IMPALA encoder whose Linear(2048 -> 256) keeps PyTorch's default init, heads orthogonal
    0.01 / 1 (layer_init), built in the same module order as mdpo's so one torch seed gives both."""

    def __init__(self, num_actions: int = 15):
        super().__init__()
        shape, stages = (3, 64, 64), []
        for channels in (16, 32, 32):
            stages.append(ConvSequence(shape, channels))
            shape = stages[-1].output_shape()
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(int(np.prod(shape)), 256)
        self.actor = nn.Linear(256, num_actions)
        nn.init.orthogonal_(self.actor.weight, 0.01)
        nn.init.constant_(self.actor.bias, 0.0)
        self.critic = nn.Linear(256, 1)
        nn.init.orthogonal_(self.critic.weight, 1.0)
        nn.init.constant_(self.critic.bias, 0.0)

    def hidden(self, x):
        x = self.stages(x.permute((0, 3, 1, 2)) / 255.0)
        return torch.relu(self.fc(torch.relu(torch.flatten(x, 1))))

    def get_action_and_value(self, x, a):
        hidden = self.hidden(x)
        distribution = Categorical(logits=self.actor(hidden))
        return distribution.log_prob(a), distribution.entropy(), self.critic(hidden), distribution.probs

    def get_probs(self, x):
        return Categorical(logits=self.actor(self.hidden(x))).probs


def authors_gae(rollout, cfg):
    """agent.py's GAE: their dones[t] is the done flag of obs t (ours shifted by one step), next_done ours at T-1."""
    T = rollout.rewards.shape[0]
    their_dones = np.concatenate([np.zeros_like(rollout.dones[:1]), rollout.dones[:-1]]).astype(np.float32)
    next_done = rollout.dones[-1].astype(np.float32)
    advantages, last = np.zeros_like(rollout.rewards), 0.0
    for t in reversed(range(T)):
        non_terminal = 1.0 - next_done if t == T - 1 else 1.0 - their_dones[t + 1]
        next_values = rollout.next_value if t == T - 1 else rollout.values[t + 1]
        delta = rollout.rewards[t] + cfg.gamma * next_values * non_terminal - rollout.values[t]
        advantages[t] = last = delta + cfg.gamma * cfg.gae_lambda * non_terminal * last
    flat = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(-1, *a.shape[2:]))
    return dict(obs=flat(rollout.obs).float(), actions=flat(rollout.actions), logprobs=flat(rollout.logprobs),
                values=flat(rollout.values), advantages=flat(advantages), returns=flat(advantages + rollout.values))


def authors_terms(data, mb, new_log_prob, new_value, entropy, cfg, adv_eps):
    """trainer.py / ppo.py: min-form clipped surrogate, clipped value loss, entropy, per-minibatch advantage norm."""
    ratios = (new_log_prob - data["logprobs"][mb]).exp()
    adv = data["advantages"][mb]
    adv = (adv - adv.mean()) / (adv.std() + adv_eps)
    policy_loss = -torch.min(adv * ratios, adv * torch.clamp(ratios, 1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
    new_value = new_value.view(-1)
    unclipped = (new_value - data["returns"][mb]) ** 2
    clipped = data["values"][mb] + torch.clamp(new_value - data["values"][mb], -cfg.clip_coef, cfg.clip_coef)
    value_loss = 0.5 * torch.max(unclipped, (clipped - data["returns"][mb]) ** 2).mean()
    return policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy.mean()


def authors_mdpo_update(agents, rollouts, cfg, plan):
    """trainer.py: both networks on both minibatches, KL with +1e-8, one Adam over both on 0.5 * (loss_1 + loss_2),
    the peer NOT detached, gradients clipped per network."""
    data = [authors_gae(r, cfg) for r in rollouts]
    optimizer = torch.optim.Adam(list(agents[0].parameters()) + list(agents[1].parameters()), lr=cfg.learning_rate,
                                 eps=1e-5)

    def kld(p, q):
        return torch.sum(p * ((p + 1e-8).log() - (q + 1e-8).log()), -1)

    for epoch in range(plan.update_epochs):
        perm = torch.from_numpy(plan.permutation(epoch))
        for j in range(plan.num_minibatches):
            mb = perm[j * plan.minibatch_size:(j + 1) * plan.minibatch_size]
            losses = []
            for me, peer, d in ((agents[0], agents[1], data[0]), (agents[1], agents[0], data[1])):
                log_prob, entropy, value, probs = me.get_action_and_value(d["obs"][mb], d["actions"][mb])
                kl = kld(peer.get_probs(d["obs"][mb]), probs).mean()
                losses.append(authors_terms(d, mb, log_prob, value, entropy, cfg, 1e-8) + kl * cfg.alpha)
            optimizer.zero_grad()
            (0.5 * (losses[0] + losses[1])).backward()
            nn.utils.clip_grad_norm_(agents[0].parameters(), cfg.max_grad_norm)
            nn.utils.clip_grad_norm_(agents[1].parameters(), cfg.max_grad_norm)
            optimizer.step()


def authors_ppo_update(agent, rollout, cfg, plan, loss_scale=1.0):
    """ppo.py: one agent, its loss not halved (loss_scale 1), advantages normalized with 1e-12, clip at 0.5."""
    data = authors_gae(rollout, cfg)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    for epoch in range(plan.update_epochs):
        perm = torch.from_numpy(plan.permutation(epoch))
        for j in range(plan.num_minibatches):
            mb = perm[j * plan.minibatch_size:(j + 1) * plan.minibatch_size]
            log_prob, entropy, value, _ = agent.get_action_and_value(data["obs"][mb], data["actions"][mb])
            loss = authors_terms(data, mb, log_prob, value, entropy, cfg, 1e-12)
            optimizer.zero_grad()
            (loss_scale * loss).backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()


def authors_agent_like(learner: Learner) -> AuthorsAgent:
    """The authors' network built under the learner's torch seed; it must start with the learner's weights."""
    torch.manual_seed(learner.cfg.seed * 1000 + learner.id)
    agent = AuthorsAgent()
    mine = [p.detach() for p in learner.agent.parameters()]
    theirs = [p.detach() for p in agent.parameters()]
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return agent


def paper_plan(cfg: TrainConfig) -> IterationPlan:
    return IterationPlan(iteration=0, shuffle_seed=11, batch_size=cfg.batch_size, num_minibatches=cfg.num_minibatches,
                         update_epochs=cfg.update_epochs, sync=cfg.sync, distill=cfg.distilling,
                         learning_rate=cfg.learning_rate)


def test_paper_encoder_init_is_pytorch_default_and_heads_orthogonal():
    learner = Learner(paper_learner_config(), 0, *IMPALA)
    fc = learner.agent.encoder.fc
    bound = 1 / math.sqrt(fc.in_features)          # kaiming_uniform(a=sqrt(5)) and its bias: U(-1/sqrt(fan_in), ..)
    assert fc.weight.abs().max() <= bound and fc.bias.abs().max() <= bound
    assert fc.weight.std() < 0.6 * bound           # uniform: std = bound / sqrt(3); orthogonal sqrt(2) is ~1.2x bound
    for head, gain in ((learner.agent.actor, 0.01), (learner.agent.critic, 1.0)):
        w = head.weight.detach()
        torch.testing.assert_close(w @ w.T, gain ** 2 * torch.eye(w.shape[0]), rtol=0, atol=1e-6)
        assert torch.count_nonzero(head.bias) == 0


def test_paper_preset_exact_update_equals_the_authors_joint_update():
    cfg = paper_learner_config()
    assert cfg.distill_mode == "exact" and cfg.alpha == 1.0 and cfg.max_grad_norm == 0.5
    plan = paper_plan(cfg)
    rollouts = [synthetic_rollout(i, *IMPALA, cfg.num_steps, cfg.num_envs, seed=20 + i) for i in range(2)]
    pair = LearnerPair(cfg, *IMPALA)
    try:
        authors = [authors_agent_like(l) for l in pair.learners]
        stats = pair.update_all(rollouts, plan)
        authors_mdpo_update(authors, rollouts, cfg, plan)
        for learner, ref in zip(pair.learners, authors):
            assert_same_parameters(learner.agent, ref)
            assert learner.step == cfg.update_epochs * cfg.num_minibatches
        assert all(s.syncs == cfg.update_epochs * cfg.num_minibatches and s.kl_peer > 0 for s in stats)
    finally:
        pair.close()


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_the_packages_single_process_reference_equals_the_authors_update(alpha):
    """learners/reference.py, which the in-process backend trains with and the distributed learners are tested
    against, is itself the authors' joint MDPO update; with alpha 0 it is each agent's own Learner update, which the
    next test holds to the authors' PPO baseline (compared on other batches, Adam's eps turns their advantage
    epsilon, 1e-12 against 1e-8, into differences near 1e-4 in a few weights)."""
    from learners.records import Batch
    from learners.reference import mdpo_update

    cfg = paper_learner_config(alpha=alpha)
    plan = paper_plan(cfg)
    rollouts = [synthetic_rollout(i, *IMPALA, cfg.num_steps, cfg.num_envs, seed=20 + i) for i in range(2)]
    learners = [Learner(cfg, i, *IMPALA) for i in range(2)]
    if alpha:
        expected = [authors_agent_like(l) for l in learners]
        authors_mdpo_update(expected, rollouts, cfg, plan)
    else:
        alone = [Learner(cfg, i, *IMPALA) for i in range(2)]
        for learner, rollout in zip(alone, rollouts):
            learner.update([rollout], plan)
        expected = [learner.agent for learner in alone]
    mdpo_update([l.agent for l in learners], [l.optimizer for l in learners],
                [Batch.from_rollouts([r], cfg.gamma, cfg.gae_lambda) for r in rollouts], cfg, plan)
    for learner, ref in zip(learners, expected):
        assert_same_parameters(learner.agent, ref)


def test_alpha_zero_update_equals_the_authors_ppo_baseline():
    cfg = paper_learner_config(alpha=0.0)
    plan = paper_plan(cfg)
    rollout = synthetic_rollout(0, *IMPALA, cfg.num_steps, cfg.num_envs, seed=5)
    learner = Learner(cfg, 0, *IMPALA)
    assert learner.loss_scale == 1.0
    reference, halved = authors_agent_like(learner), authors_agent_like(learner)
    stats = learner.update([rollout], plan)
    assert stats.grad_norm > cfg.max_grad_norm and stats.syncs == 0
    authors_ppo_update(reference, rollout, cfg, plan)
    assert_same_parameters(learner.agent, reference)
    # The test can fail: the old scaling (loss halved before the clip) ends elsewhere. (Adam is blind to a
    # constant gradient scale: only the clip, met by some steps and not others, makes the halving matter.)
    authors_ppo_update(halved, rollout, cfg, plan, loss_scale=0.5)
    assert max((a - b).abs().max().item() for a, b in zip(reference.parameters(), halved.parameters())) > 1e-4


# --- reward normalization: gym 0.23.1's arithmetic ---------------------------------------------------------

class ScriptedEnv(VectorEnv):
    """Two envs that pay scripted rewards and end where the script says."""

    def __init__(self, rewards, dones):
        self.num_envs, self.rewards, self.dones, self.t = 2, rewards, dones, 0
        self.single_observation_space, self.single_action_space = Box(0, 1, (1,)), Discrete(2)
        self.observation_space, self.action_space = Box(0, 1, (2, 1)), Box(0, 1, (2,))

    def reset(self, *, seed=None, options=None):
        return np.zeros((2, 1), np.float32), {}

    def step(self, actions):
        r, d = np.asarray(self.rewards[self.t], np.float32), np.asarray(self.dones[self.t])
        self.t += 1
        return np.zeros((2, 1), np.float32), r, d, np.zeros(2, bool), {}


REWARDS = [[1.0, 2.0], [1.0, 0.0], [2.0, 1.0]]
DONES = [[False, False], [True, False], [False, False]]     # env 0's episode ends at step 2


def test_reward_normalizer_matches_a_hand_computed_gym_0_23_trace():
    """gamma 0.5. Running stats start at mean 0, var 1, count 1e-4; each step merges the two envs' returns G:
    mean' = mean + d * n / (c + n), var' = (var * c + bvar * n + d^2 * c * n / (c + n)) / (c + n), d = bmean - mean.
      step 1: G = [1, 2]           -> stats over G; r' = [1, 2] / sqrt(var' + 1e-8)
      step 2: G = [0.5+1, 1+0]     =  [1.5, 1.0] -> stats; r' = [1, 0] / sqrt(var'' + 1e-8); env 0 ended: G0 = 0
      step 3: G = [0+2, 0.5+1]     =  [2.0, 1.5] -> stats; r' = [2, 1] / sqrt(var''' + 1e-8)
    """
    mean, var, count, expected = 0.0, 1.0, 1e-4, []
    for G, r in (([1.0, 2.0], [1.0, 2.0]), ([1.5, 1.0], [1.0, 0.0]), ([2.0, 1.5], [2.0, 1.0])):
        bmean, bvar, n = float(np.mean(G)), float(np.var(G)), 2
        d, total = bmean - mean, count + n
        mean, var, count = mean + d * n / total, (var * count + bvar * n + d * d * count * n / total) / total, total
        expected.append(np.array(r) / math.sqrt(var + 1e-8))
    # The same numbers worked by hand (var after step 1: 0.500325 / 2.0001 = 0.250150; step 2: 0.687789 / 4.0001 =
    # 0.171943; step 3: 1.000325 / 6.0001 = 0.166718), so the loop above computes what the docstring says.
    np.testing.assert_allclose(expected, [[1.99940, 3.99880], [2.41161, 0.0], [4.89822, 2.44911]], rtol=2e-5)

    env = NormalizeReturn(ScriptedEnv(REWARDS, DONES), gamma=0.5)
    got = [env.step(np.zeros(2))[1] for _ in REWARDS]
    # float32 rewards stay float32 (numpy 1.x casting, as under the authors' gym 0.23.1): equal to float32 precision.
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6)
    np.testing.assert_array_equal(env.accumulated_reward, [2.0, 1.5])
    assert env.return_rms.count == pytest.approx(6 + 1e-4)

    # Gymnasium's own wrapper differs on this very trace (the terminal step drops the accumulated return), which
    # is why mdpo does not use it.
    gymnasium_env = GymnasiumNormalizeReward(ScriptedEnv(REWARDS, DONES), gamma=0.5)
    theirs = np.array([gymnasium_env.step(np.zeros(2))[1] for _ in REWARDS])
    assert not np.allclose(theirs, np.array(expected), rtol=1e-6)


def test_training_envs_use_the_authors_reward_arithmetic_and_clip():
    env = make_vector_env("CartPole-v1", 2, seed=0, gamma=0.999, clip_reward=10.0)
    assert isinstance(env.env, NormalizeReturn) and env.env.gamma == 0.999
    env.close()


# --- levels ---------------------------------------------------------------------------------------------------

def level_sequence(seed: int, action_seed: int, steps: int = 400) -> list[list[int]]:
    """Per env, the Procgen level seeds of the episodes it plays under random actions."""
    env = make_vector_env("chaser", 2, seed, num_levels=500, start_level=0, normalize_reward=False, clip_reward=None)
    obs, info = env.reset(seed=seed)
    levels = [[int(s)] for s in info["level_seed"]]
    rng = np.random.default_rng(action_seed)
    for _ in range(steps):
        obs, _, terminated, truncated, info = env.step(rng.integers(0, 15, 2))
        for i in np.flatnonzero(terminated | truncated):
            levels[i].append(int(info["level_seed"][i]))
    env.close()
    return levels


@pytest.mark.parametrize("same", [True, False], ids=["same_levels", "own_levels"])
def test_agents_see_the_same_level_sequence_only_when_asked(same):
    cfg = dataclasses.replace(TrainConfig(env_id="chaser"), same_levels=same)
    seeds = [actor_seed(cfg, learner, 0, iteration=0) for learner in (0, 1)]
    assert (seeds[0] == seeds[1]) == same
    # Each agent acts differently; with one seed the levels still come in the same order.
    a, b = level_sequence(seeds[0], action_seed=1), level_sequence(seeds[1], action_seed=2)
    for env_a, env_b in zip(a, b):
        n = min(len(env_a), len(env_b))
        assert n >= 2, "too few episodes to compare"
        assert (env_a[:n] == env_b[:n]) == same, (env_a, env_b)
    assert actor_seed(cfg, 0, 0, 0) != actor_seed(cfg, 0, 1, 0) != actor_seed(cfg, 0, 0, 5)


def test_paper_preset_asks_for_the_authors_setup():
    cfg = preset("paper")
    assert cfg.same_levels and cfg.distill_mode == "exact" and cfg.sync == "minibatch"
    assert cfg.num_iterations == PAPER_ITERATIONS == 3051 and cfg.total_steps == 3051 * 64 * 256
    assert (cfg.num_levels, cfg.start_level, cfg.distribution_mode) == (500, 0, "hard")
    # main.py / ppo.py get_args(), the README's Fidelity table.
    authors = dict(num_envs=64, num_steps=256, num_minibatches=8, update_epochs=3, learning_rate=5e-4, adam_eps=1e-5,
                   gamma=0.999, gae_lambda=0.95, clip_coef=0.2, clip_vloss=True, vf_coef=0.5, ent_coef=0.01,
                   alpha=1.0, max_grad_norm=0.5, normalize_reward=True, clip_reward=10.0, anneal_lr=False,
                   num_learners=2, eval_every=1, eval_episodes=10)
    assert {k: getattr(cfg, k) for k in authors} == authors
    assert cfg.minibatch_size == 2048 and cfg.env_id == "coinrun"


# --- evaluation protocols --------------------------------------------------------------------------------------

def random_weights(seed: int) -> Weights:
    torch.manual_seed(seed)
    from learners.model import make_agent
    return Weights.from_module(0, make_agent(*IMPALA))


def play(weights: Weights, num_envs: int, seed: int, generator_seed: int, until):
    """Run a policy with sampled actions on test levels until `until(finished)`; (returns, lengths) in end order,
    plus each env's first finished episode."""
    from learners.model import make_agent
    agent = make_agent(*IMPALA)
    weights.load_into(agent)
    env = make_vector_env("chaser", num_envs, seed, num_levels=0, start_level=seed, normalize_reward=False,
                          clip_reward=None)
    obs, _ = env.reset(seed=seed)
    rng = torch.Generator().manual_seed(generator_seed)
    running, lengths, finished, first = np.zeros(num_envs), np.zeros(num_envs, np.int64), [], {}
    with torch.no_grad():
        while not until(finished, first):
            obs, reward, terminated, truncated, _ = env.step(sample_actions(agent.logits(torch.from_numpy(obs)), rng).numpy())
            running += reward
            lengths += 1
            for i in np.flatnonzero(terminated | truncated):
                finished.append((running[i], lengths[i]))
                first.setdefault(i, (running[i], lengths[i]))
                running[i], lengths[i] = 0.0, 0
    env.close()
    return finished, first


def evaluator(protocol: str, episodes: int, seed: int = 123) -> Evaluator:
    cfg = TrainConfig(env_id="chaser", eval_protocol=protocol, eval_episodes=episodes, metrics_port=-1)
    return Evaluator(cfg, 0, seed)


def test_authors_evaluation_protocol_on_a_fixed_seed():
    weights = random_weights(3)
    ev = evaluator("authors", 10)
    assert ev.env.num_envs == 4 and ev.seed == 42
    result = ev.evaluate(weights)
    finished, _ = play(weights, 4, 42, 42, until=lambda finished, first: len(finished) >= 10)
    assert result["completed"] == len(finished) >= 10
    np.testing.assert_allclose(result["test_returns"], [r for r, _ in finished])
    assert result["test_lengths"] == [int(l) for _, l in finished]
    assert result["test_return"] == pytest.approx(np.mean([r for r, _ in finished]))
    # Every call plays the same 4 levels (the authors rebuild ProcgenEnv(rand_seed=42) each time).
    np.testing.assert_array_equal(ev.reset(), ev.reset())
    ev.close()


def test_default_evaluation_protocol_on_a_fixed_seed():
    weights = random_weights(3)
    ev = evaluator("first-episodes", 4, seed=123)
    result = ev.evaluate(weights)
    _, first = play(weights, 4, 123, 123, until=lambda finished, first: len(first) == 4)
    assert result["completed"] == 4
    np.testing.assert_allclose(result["test_returns"], [first[i][0] for i in range(4)])
    assert result["test_lengths"] == [int(first[i][1]) for i in range(4)]
    # New unseen levels at every call.
    assert not np.array_equal(ev.reset(), ev.reset())
    ev.close()


# --- the command line and the study -----------------------------------------------------------------------------

def test_print_config_shows_the_resolved_config_and_starts_nothing(capsys, tmp_path):
    run_dir = tmp_path / "never-made"
    assert mdpo_main(["train", "--preset", "paper", "--print-config", "--run-dir", str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["distill_mode"] == "exact" and printed["total_steps"] == 3051 * 16384
    assert printed["same_levels"] is True and TrainConfig.from_dict(printed).num_iterations == 3051
    assert not run_dir.exists()
    assert mdpo_main(["train", "--preset", "smoke", "--alpha", "0", "--eval-protocol", "authors", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["alpha"] == 0.0 and printed["eval_protocol"] == "authors" and printed["num_envs"] == 8
    assert mdpo_main(["train", "--eval-protocol", "best-of", "--print-config"]) == 2
    assert "--eval-protocol must be one of first-episodes, authors" in capsys.readouterr().err


def test_sweep_defaults_are_the_authors_mdpo_and_ppo(capsys, tmp_path):
    sweep = SweepConfig(tmp_path, ["coinrun"], [1], preset="paper")
    cells = {c.method: c.config for c in expand(sweep.validate())}
    assert set(cells) == {"mdpo", "ppo"}
    assert cells["mdpo"].distill_mode == "exact" and cells["mdpo"].alpha == 1.0 and cells["mdpo"].same_levels
    assert cells["ppo"].alpha == 0.0 and not cells["ppo"].distilling
    assert Method.parse("dml").overrides == {"alpha": 1.0, "distill_mode": "detached"}
    assert mdpo_main(["sweep", str(tmp_path / "study"), "--games", "coinrun", "--seeds", "1", "--preset", "paper",
                      "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"coinrun/mdpo/seed1", "coinrun/ppo/seed1"}
    assert printed["coinrun/mdpo/seed1"]["distill_mode"] == "exact" and printed["coinrun/ppo/seed1"]["alpha"] == 0.0
    assert not (tmp_path / "study").exists()
