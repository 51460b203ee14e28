"""Rollout collection: a vector env plus inference with the learner's latest weights, on this actor's CPU or served
by the learner (--inference learner: learners/inference.py).

Plain classes; the coordinator makes RolloutWorker a Ray actor (`ray.remote(RolloutWorker)`), tests can run it
in process. The first actor of each learner also hosts that learner's Evaluator, in a second Ray concurrency group
(EVAL_GROUP), so evaluation runs beside collection without a process of its own: every Procgen process decodes all
games' assets (~350 MB), and a separate evaluator process per learner cost ~0.6 GB each.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch
from torch.distributions import Categorical

from actors.envs import (ProcgenVectorEnv, get_reward_normalizer_state, is_procgen, make_vector_env, obs_spec,
                         set_reward_normalizer_state)
from actors.evaluator import Evaluator
from actors.probes import build_probe_set
from learners.records import ActorReport, ProbeSet, Rollout, ServedPolicy, Weights, frames_digest
from learners.config import TrainConfig
from learners.model import make_agent, sample_actions, warn_if_emulated_bf16
from learners.telemetry.actor import ActorTelemetry


def env_spec(cfg: TrainConfig) -> tuple[tuple[int, ...], str, int]:
    """(observation shape, observation dtype, number of actions) of the configured env."""
    if is_procgen(cfg.env_id):   # the same for every game; building an env would load all Procgen assets (~350 MB)
        return ProcgenVectorEnv.SPEC
    env = make_vector_env(cfg.env_id, 1, cfg.seed, num_levels=cfg.num_levels, start_level=cfg.start_level,
                          distribution_mode=cfg.distribution_mode, normalize_reward=False, clip_reward=None)
    try:
        return obs_spec(env)
    finally:
        env.close()


EVAL_GROUP = "eval"


def remote_rollout_worker():
    """RolloutWorker as a Ray actor class: `evaluate` runs in its own concurrency group (a thread of its own),
    beside `collect` in the default one. Ray takes concurrency groups only here, not in `.options()`."""
    return ray.remote(concurrency_groups={EVAL_GROUP: 1})(RolloutWorker)


def hosts_evaluator(cfg: TrainConfig, actor_id: int) -> bool:
    return actor_id == 0 and cfg.eval_every > 0


class RolloutWorker:
    """Collects fixed-length rollouts for one learner; actor 0 of a learner also evaluates it (`evaluate`)."""

    def __init__(self, cfg: TrainConfig, learner_id: int, actor_id: int, seed: int, eval_seed: int | None = None):
        torch.set_num_threads(1)   # many actors share a machine's cores; one thread each avoids oversubscription
        self.cfg, self.learner_id, self.actor_id = cfg, learner_id, actor_id
        self.telemetry = ActorTelemetry(cfg, learner_id, actor_id)   # /metrics endpoint; counts Ray restarts
        self.env = make_vector_env(cfg.env_id, cfg.envs_per_actor, seed, num_levels=cfg.num_levels,
                                   start_level=cfg.start_level, distribution_mode=cfg.distribution_mode,
                                   gamma=cfg.gamma, normalize_reward=cfg.normalize_reward,
                                   clip_reward=cfg.clip_reward, procgen_threads=1)   # steps and inference alternate
        obs_shape, obs_dtype, num_actions = obs_spec(self.env)
        self.agent = make_agent(obs_shape, obs_dtype, num_actions, cfg.precision)
        if actor_id == 0:
            warn_if_emulated_bf16(cfg.precision, "cpu", f"rollout actors of learner {learner_id}")
        self.agent.eval()
        self.version = -1
        self.obs, _ = self.env.reset(seed=seed)
        self.rng = torch.Generator().manual_seed(seed)
        self.env_steps = 0
        self.evaluator = (Evaluator(cfg, learner_id, seed if eval_seed is None else eval_seed)
                          if hosts_evaluator(cfg, actor_id) else None)

    def _load(self, weights: Weights) -> None:
        if weights.version != self.version:
            weights.load_into(self.agent)
            self.version = weights.version

    @ray.method(num_returns=2)    # (stacked on torch.no_grad(), Ray 2.60 ignores it: the body holds no_grad)
    def collect(self, policy: Weights | ServedPolicy, learner=None) -> tuple[Rollout, ActorReport]:
        """One rollout for the learner, and this actor's own report for the coordinator (two Ray objects: the
        frames go to the learner, the report to the driver). `policy`: the learner's weights, run here, or a
        ServedPolicy, run by `learner` (its Ray actor handle)."""
        with torch.no_grad():
            rollout = self._rollout(policy, learner)
        self.telemetry.record_rollout(rollout)
        return rollout, ActorReport(self.learner_id, self.actor_id, os.getpid(), self.get_state())

    def _policy(self, policy: Weights | ServedPolicy, learner):
        """obs -> (logits, values) as torch tensors: my network, or my learner's batched inference (one Ray call a
        step for all my envs; frames travel as uint8)."""
        if isinstance(policy, Weights):
            self._load(policy)
            return lambda obs: self.agent(torch.from_numpy(obs))
        if learner is None:
            raise ValueError("learner-served inference needs the learner's handle")

        def served(obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            logits, values = ray.get(learner.infer.remote(policy.version, obs))
            return torch.from_numpy(logits), torch.from_numpy(values)
        return served

    def _rollout(self, policy: Weights | ServedPolicy, learner=None) -> Rollout:
        act = self._policy(policy, learner)
        version = policy.version
        cfg, T, N = self.cfg, self.cfg.num_steps, self.cfg.envs_per_actor
        obs_buf = np.empty((T, N, *self.obs.shape[1:]), dtype=self.obs.dtype)
        actions = np.empty((T, N), np.int64)
        logprobs, values, rewards = (np.empty((T, N), np.float32) for _ in range(3))
        dones = np.empty((T, N), bool)
        ep_returns, ep_lengths = [], []
        t0, infer = time.perf_counter(), 0.0
        for t in range(T):
            obs_buf[t] = self.obs
            ti = time.perf_counter()
            logits, value = act(self.obs)
            action = sample_actions(logits, self.rng)
            logprobs[t] = Categorical(logits=logits).log_prob(action).numpy()
            infer += time.perf_counter() - ti
            values[t], actions[t] = value.numpy(), action.numpy()
            self.obs, reward, terminated, truncated, info = self.env.step(actions[t])
            reward = np.asarray(reward, np.float32).copy()
            cut = truncated & ~terminated
            if cut.any() and "final_obs" in info:
                # A time limit is not a real end: bootstrap from the value of the state that was cut off.
                final = np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)])
                reward[cut] += cfg.gamma * act(final)[1].numpy()
            rewards[t], dones[t] = reward, terminated | truncated
            if "episode" in info:
                done_mask = info["_episode"]
                ep_returns.extend(np.asarray(info["episode"]["r"])[done_mask].tolist())
                ep_lengths.extend(np.asarray(info["episode"]["l"])[done_mask].tolist())
        next_value = act(self.obs)[1].numpy()
        self.env_steps += T * N
        # Where peers will hold the frames (distilling learners on Ray): their digest here, once, on the actor's core,
        # rather than by each learner that holds them.
        held = cfg.distilling and cfg.backend == "ray"
        return Rollout(self.learner_id, self.actor_id, version, obs_buf, actions, logprobs, values, rewards,
                       dones, next_value, np.asarray(ep_returns, np.float32), np.asarray(ep_lengths, np.int64),
                       time.perf_counter() - t0, infer, frames_digest(obs_buf) if held else "")

    def get_state(self) -> dict:
        """What a checkpoint needs to continue this actor: reward-normaliser statistics."""
        return {"reward_normalizer": get_reward_normalizer_state(self.env), "env_steps": self.env_steps}

    def set_state(self, state: dict) -> None:
        set_reward_normalizer_state(self.env, state.get("reward_normalizer", {}))
        self.env_steps = int(state.get("env_steps", 0))

    def ping(self) -> int:
        return self.version

    @ray.method(concurrency_group=EVAL_GROUP)
    def evaluate(self, weights: Weights, probe: ProbeSet | None = None) -> dict:
        """The hosted Evaluator's evaluate(), in its own thread: collection goes on meanwhile."""
        if self.evaluator is None:
            raise RuntimeError(f"actor {self.actor_id} of learner {self.learner_id} hosts no evaluator "
                               "(only actor 0 does, when eval_every > 0)")
        return self.evaluator.evaluate(weights, probe)

    @ray.method(concurrency_group=EVAL_GROUP)
    def probe_set(self) -> ProbeSet:
        """The run's probe set (actors/probes.py), built here rather than in the driver, whose process would
        otherwise load Procgen's assets (~350 MB) for it."""
        cfg = self.cfg
        return build_probe_set(cfg.env_id, cfg.distribution_mode, cfg.probe_states, cfg.seed, cfg.num_levels,
                               cfg.start_level)

    def metrics_endpoints(self) -> list[dict]:
        """This actor's /metrics endpoint and, if it hosts one, its evaluator's (same process, own port and role)."""
        return [self.telemetry.endpoint()] + ([self.evaluator.metrics_endpoint()] if self.evaluator else [])

    def close(self) -> None:
        self.env.close()
        self.telemetry.close()
        if self.evaluator:
            self.evaluator.close()
