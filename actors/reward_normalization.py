"""Reward scaling by the running std of the discounted return, with the authors' arithmetic (gym 0.23.1).

The authors wrap their Procgen envs in gym 0.23.1's `NormalizeReward`. Per step, for every env:

    G      = gamma * G + r           # the discounted return, including this step's reward
    stats <- update(G over envs)     # running mean/var of G (Welford-style merge, count starts at 1e-4)
    r'     = r / sqrt(var + 1e-8)
    G      = 0 where the episode ended at this step

Gymnasium 1.x's vector `NormalizeReward` differs at episode ends (it drops the accumulated return at the terminal
step and its reset timing has changed between 1.x releases), so mdpo carries this arithmetic itself; the running
statistics are gymnasium's `RunningMeanStd`, whose update is the same as gym 0.23.1's. tests/test_fidelity.py checks a
hand-computed trace.
"""

from __future__ import annotations

import numpy as np
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.wrappers.utils import RunningMeanStd


class NormalizeReturn(VectorWrapper):
    """Divides rewards by the running std of the per-env discounted return (gym 0.23.1 `NormalizeReward`)."""

    def __init__(self, env: VectorEnv, gamma: float = 0.99, epsilon: float = 1e-8):
        super().__init__(env)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma, self.epsilon = gamma, epsilon
        self.return_rms = RunningMeanStd(shape=())
        self.accumulated_reward = np.zeros(self.num_envs, np.float64)   # gym 0.23.1's `returns`, float64 as there

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.accumulated_reward = self.accumulated_reward * self.gamma + reward
        self.return_rms.update(self.accumulated_reward)
        scaled = reward / np.sqrt(self.return_rms.var + self.epsilon)
        self.accumulated_reward[np.logical_or(terminated, truncated)] = 0.0
        return obs, scaled, terminated, truncated, info
