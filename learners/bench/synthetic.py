"""Synthetic rollouts: random frames, actions, values and episode ends, for the bench's learner stage and the tests.
What an update costs, and whether two implementations of it agree, does not depend on the values."""

from __future__ import annotations

import numpy as np

from learners.records import Rollout, frames_digest


def synthetic_rollout(learner_id: int, obs_shape, obs_dtype, num_actions: int, num_steps: int, num_envs: int,
                      seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    if np.dtype(obs_dtype) == np.uint8:
        obs = rng.integers(0, 256, (num_steps, num_envs, *obs_shape), dtype=np.uint8)
    else:
        obs = rng.normal(size=(num_steps, num_envs, *obs_shape)).astype(np.float32)
    return Rollout(
        learner_id=learner_id, actor_id=0, weights_version=0, obs=obs,
        actions=rng.integers(0, num_actions, (num_steps, num_envs)).astype(np.int64),
        logprobs=np.log(rng.uniform(0.2, 0.9, (num_steps, num_envs))).astype(np.float32),
        values=rng.normal(size=(num_steps, num_envs)).astype(np.float32),
        rewards=rng.normal(size=(num_steps, num_envs)).astype(np.float32),
        dones=rng.uniform(size=(num_steps, num_envs)) < 0.1,
        next_value=rng.normal(size=num_envs).astype(np.float32),
        digest=frames_digest(obs))      # as a distilling run's actor makes it
