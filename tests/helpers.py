"""Small builders shared by the tests."""

from __future__ import annotations

import threading

import numpy as np

from learners.batch import Rollout
from learners.config import TrainConfig
from learners.distill_service import PeerClient, serve
from learners.learner import Learner


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
        next_value=rng.normal(size=num_envs).astype(np.float32))


class LearnerPair:
    """N learners with real gRPC servers on 127.0.0.1, wired to each other, in this process."""

    def __init__(self, cfg: TrainConfig, obs_shape, obs_dtype, num_actions: int):
        self.learners = [Learner(cfg, i, obs_shape, obs_dtype, num_actions) for i in range(cfg.num_learners)]
        self.servers, self.ports = [], []
        for learner in self.learners:
            server, port = serve(learner, "127.0.0.1", 0)
            self.servers.append(server)
            self.ports.append(port)
        self.clients = []
        for learner in self.learners:
            peers = [PeerClient(p, learner.id, f"127.0.0.1:{self.ports[p]}", cfg.rpc_timeout_s)
                     for p in range(cfg.num_learners) if p != learner.id]
            for c in peers:
                c.wait_ready(10)
            learner.connect(peers)
            self.clients.extend(peers)

    def update_all(self, rollouts, plan) -> list[dict]:
        results, errors = [None] * len(self.learners), []

        def run(i):
            try:
                results[i] = self.learners[i].update([rollouts[i]], plan)
            except BaseException as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.learners))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results

    def close(self):
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.stop(None)
        for learner in self.learners:
            learner.close()
