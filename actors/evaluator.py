"""Evaluation on unseen levels: a policy's test-level return under the configured protocol (README: Evaluation).

Plain class; it lives inside the first RolloutWorker of its learner (actors/rollout.py, a Ray concurrency group of
its own), so it shares that process's Procgen assets.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.envs import make_vector_env, obs_spec
from actors.probes import measure
from learners.records import ProbeSet, Weights
from learners.config import AUTHORS_EVAL_ENVS, AUTHORS_EVAL_SEED, TrainConfig
from learners.model import make_agent, sample_actions
from learners.telemetry.actor import EvaluatorTelemetry


class Evaluator:
    """Runs a policy on unseen levels (num_levels=0, its own seed) for a fixed number of episodes.

    Has its own env, network copy and /metrics endpoint (role `evaluator`); lives inside a RolloutWorker."""

    def __init__(self, cfg: TrainConfig, learner_id: int, seed: int):
        torch.set_num_threads(1)
        self.cfg, self.learner_id, self.seed = cfg, learner_id, seed
        self.telemetry = EvaluatorTelemetry(cfg, learner_id)   # /metrics endpoint
        self.authors = cfg.eval_protocol == "authors"
        if self.authors:   # the authors' eval envs: ProcgenEnv(4 envs, rand_seed=42, num_levels=0, start_level=0)
            self.seed, num_envs, start_level = AUTHORS_EVAL_SEED, AUTHORS_EVAL_ENVS, 0
        else:
            num_envs, start_level = cfg.eval_episodes, seed
        self.env = make_vector_env(cfg.env_id, num_envs, self.seed, num_levels=0, start_level=start_level,
                                   distribution_mode=cfg.distribution_mode, normalize_reward=False, clip_reward=None,
                                   procgen_threads=1)
        obs_shape, obs_dtype, num_actions = obs_spec(self.env)
        self.agent = make_agent(obs_shape, obs_dtype, num_actions, cfg.precision)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.calls = 0

    def reset(self) -> np.ndarray:
        """The first observations of this call: the same levels at every call under the authors' protocol, new
        ones (seed + calls) otherwise."""
        obs, _ = self.env.reset(seed=self.seed if self.authors else self.seed + self.calls)
        self.calls += 1
        return obs

    @torch.no_grad()
    def evaluate(self, weights: Weights, probe: ProbeSet | None = None) -> dict:
        """Mean test-level return under cfg.eval_protocol, episodes cut at eval_max_episode_steps; with a probe set,
        also this policy's outputs on it (`probe`: a ProbeOutput the coordinator pairs with the other agents')."""
        weights.load_into(self.agent)
        t0 = time.perf_counter()
        obs = self.reset()
        returns, lengths, completed = (self._authors_episodes if self.authors else self._first_episodes)(obs)
        result = {"learner_id": self.learner_id, "weights_version": weights.version, "test_return": float(np.mean(returns)),
                  "test_returns": returns.tolist(), "test_lengths": lengths.tolist(), "completed": completed,
                  "seconds": time.perf_counter() - t0}
        if probe is not None:
            result["probe"] = measure(self.agent, probe, self.learner_id, weights.version)
        self.telemetry.record_eval(result)
        return result

    def _act(self, obs: np.ndarray) -> np.ndarray:
        return sample_actions(self.agent.logits(torch.from_numpy(obs)), self.rng).numpy()

    def _first_episodes(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The first episode of each of the eval_episodes envs: every env counts once, long episodes too."""
        n, limit = self.cfg.eval_episodes, self.cfg.eval_max_episode_steps or 10**9
        returns, lengths = np.zeros(n), np.zeros(n, np.int64)
        done = np.zeros(n, bool)
        while not done.all() and lengths.max() < limit:
            obs, reward, terminated, truncated, _ = self.env.step(self._act(obs))
            returns[~done] += reward[~done]
            lengths[~done] += 1
            done |= terminated | truncated
        return returns, lengths, int(done.sum())

    def _authors_episodes(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The authors' loop (main.py/agent.py): step the 4 envs until at least eval_episodes episodes have ended,
        keeping every episode that ended, in the order they ended (short episodes end first, so they weigh more).
        With eval_max_episode_steps set, the loop stops after that many steps (then the running episodes count as
        cut, so that a policy that never finishes still yields a number)."""
        limit = self.cfg.eval_max_episode_steps or 10**9
        running_return, running_length = np.zeros(self.env.num_envs), np.zeros(self.env.num_envs, np.int64)
        returns, lengths, steps = [], [], 0
        while len(returns) < self.cfg.eval_episodes and steps < limit:
            obs, reward, terminated, truncated, _ = self.env.step(self._act(obs))
            running_return += reward
            running_length += 1
            steps += 1
            for i in np.flatnonzero(terminated | truncated):
                returns.append(running_return[i])
                lengths.append(running_length[i])
                running_return[i], running_length[i] = 0.0, 0
        completed = len(returns)
        if not returns:
            returns, lengths = list(running_return), list(running_length)
        return np.asarray(returns, np.float64), np.asarray(lengths, np.int64), completed

    def metrics_endpoint(self) -> dict:
        return self.telemetry.endpoint()

    def close(self) -> None:
        self.env.close()
        self.telemetry.close()
