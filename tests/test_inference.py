"""Learner-served inference (--inference learner, learners/inference.py): requests of several actors answered by one
batched forward pass, and rollouts that equal those of local inference for the same weights, observations and RNG
(the actor samples from the served logits with its own generator)."""

import threading

import numpy as np
import pytest
import ray
import torch

from actors.rollout import remote_rollout_worker
from learners.config import ConfigError, TrainConfig
from learners.inference import InferenceServer, StaleVersion
from learners.learner_worker import LearnerWorker, serves_inference
from learners.model import make_agent
from learners.records import ServedPolicy, Weights

FRAMES = ((64, 64, 3), "uint8", 15)


def test_inference_mode_is_checked_and_auto_serves_on_gpus_only():
    with pytest.raises(ConfigError, match="--inference must be one of auto, actor, learner"):
        TrainConfig(env_id="CartPole-v1", inference="gpu").validate()
    auto = TrainConfig(env_id="CartPole-v1").validate()
    assert auto.inference == "auto" and not serves_inference(auto, "cpu") and serves_inference(auto, "cuda")
    assert serves_inference(TrainConfig(env_id="CartPole-v1", inference="learner"), "cpu")
    assert not serves_inference(TrainConfig(env_id="CartPole-v1", inference="actor"), "cuda")


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows():
    agent = make_agent(*FRAMES)
    server = InferenceServer(agent, torch.device("cpu"), clients=4, max_wait_s=0.5)
    try:
        server.load(3, agent)
        rng = np.random.default_rng(0)
        obs = [rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for n in (2, 5, 1, 3)]
        results, barrier = {}, threading.Barrier(4)

        def actor(i):
            barrier.wait()
            results[i] = server.infer(3, obs[i])

        threads = [threading.Thread(target=actor, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert server.requests == 4 and server.batches == 1, "the four actors' requests were not one batch"
        with torch.no_grad():
            for i, o in enumerate(obs):
                logits, values = agent(torch.from_numpy(o))
                assert results[i][0].shape == (len(o), 15) and results[i][1].shape == (len(o),)
                np.testing.assert_allclose(results[i][0], logits.numpy(), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(results[i][1], values.numpy(), rtol=1e-5, atol=1e-6)
        with pytest.raises(StaleVersion, match="version 4 is not served"):
            server.infer(4, obs[0])
    finally:
        server.close()


def test_two_versions_are_served_for_the_policy_lag_and_the_oldest_makes_room():
    """With --policy-lag the next rollouts are collected with version v while version v+1 is loaded."""
    agent = make_agent((4,), "float32", 2)
    server = InferenceServer(agent, torch.device("cpu"), clients=1)
    try:
        obs = np.ones((3, 4), np.float32)
        server.load(0, agent)
        before = server.infer(0, obs)[0]
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(0.3)
        server.load(16, agent)
        assert np.array_equal(server.infer(0, obs)[0], before)          # the kept version is untouched
        assert not np.allclose(server.infer(16, obs)[0], before)
        server.load(32, agent)
        assert sorted(server.nets) == [16, 32]
        with pytest.raises(StaleVersion):
            server.infer(0, obs)
        server.reset()                                                   # weights restored from a checkpoint
        with pytest.raises(StaleVersion):
            server.infer(32, obs)
    finally:
        server.close()


def test_served_rollouts_equal_local_ones_through_ray(local_ray):
    """Two actors with the same seed, one acting with shipped weights, one with its learner's served inference:
    the same actions, log-probs and values (and so the same rewards and episodes)."""
    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=64, num_actors=1, inference="learner", alpha=0.0,
                      metrics_port=-1).validate()
    learner = ray.remote(LearnerWorker).options(num_cpus=0, max_concurrency=4).remote(cfg, 0, (4,), "float32", 2)
    try:
        weights, policy = ray.get([learner.weights.remote(), learner.policy.remote()])
        assert isinstance(weights, Weights) and policy == ServedPolicy(0, 0)
        Actor = remote_rollout_worker().options(num_cpus=0)
        local, served = Actor.remote(cfg, 0, 0, 7), Actor.remote(cfg, 0, 0, 7)
        (a_ref, _), (b_ref, _) = local.collect.remote(weights), served.collect.remote(policy, learner)
        a, b = ray.get([a_ref, b_ref])
        assert a.weights_version == b.weights_version == 0
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.dones, b.dones)
        for name in ("logprobs", "values", "rewards", "next_value"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, err_msg=name)
        assert a.episode_returns.tolist() == b.episode_returns.tolist()
        with pytest.raises(ray.exceptions.RayTaskError, match="not served"):
            ray.get(served.collect.remote(ServedPolicy(0, 5), learner)[0])
    finally:
        ray.get(learner.stop.remote())
