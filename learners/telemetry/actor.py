"""Metrics of a rollout actor and of the evaluator it may host (the common part is learners/telemetry/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Summary

from learners.config import TrainConfig
from learners.telemetry.metrics import DURATION_BUCKETS, LENGTH_BUCKETS, Telemetry, restart_count


class ActorTelemetry(Telemetry):
    """A RolloutWorker: env throughput, training-level episodes, inference time, weights, restarts."""

    role = "actor"

    def __init__(self, cfg: TrainConfig, learner_id: int, actor_id: int):
        super().__init__(cfg, learner_id, actor_id)
        c = self._child
        self.env_steps = c(self._metric(Counter, "actor_env_steps_total", "Environment steps taken (all of this actor's envs)."))
        self.steps_per_second = c(self._metric(Gauge, "actor_env_steps_per_second", "Environment steps per second of the last rollout."))
        self.episodes = c(self._metric(Counter, "actor_episodes_total", "Training-level episodes finished."))
        self.episode_return = c(self._metric(Summary, "actor_episode_return", "Raw return of finished training-level episodes."))
        self.episode_length = c(self._metric(Histogram, "actor_episode_length_steps", "Length of finished training-level episodes.",
                                             buckets=LENGTH_BUCKETS))
        self.rollout_seconds = c(self._metric(Histogram, "actor_rollout_seconds", "Wall time of one rollout (num_steps steps of every env).",
                                              buckets=DURATION_BUCKETS))
        self.inference_seconds = c(self._metric(Histogram, "actor_inference_seconds", "Policy inference time within one rollout.",
                                                buckets=DURATION_BUCKETS))
        self.weights_version = c(self._metric(Gauge, "actor_weights_version", "Optimizer step of the weights this actor acts with."))
        self.restarts = c(self._metric(Counter, "actor_restarts_total", "Times Ray restarted this actor (counted when it comes back)."))
        self.restarts.inc(restart_count())
        self.serve()

    def record_rollout(self, rollout) -> None:
        self.env_steps.inc(rollout.env_steps)
        self.steps_per_second.set(rollout.env_steps / max(rollout.collect_seconds, 1e-9))
        self.episodes.inc(len(rollout.episode_returns))
        for ret, length in zip(rollout.episode_returns.tolist(), rollout.episode_lengths.tolist()):
            self.episode_return.observe(ret)
            self.episode_length.observe(length)
        self.rollout_seconds.observe(rollout.collect_seconds)
        self.inference_seconds.observe(rollout.inference_seconds)
        self.weights_version.set(rollout.weights_version)


class EvaluatorTelemetry(Telemetry):
    """An Evaluator: test-level (unseen levels) returns."""

    role = "evaluator"

    def __init__(self, cfg: TrainConfig, learner_id: int):
        super().__init__(cfg, learner_id)
        c = self._child
        self.evaluations = c(self._metric(Counter, "evaluator_evaluations_total", "Evaluations finished."))
        self.episodes = c(self._metric(Counter, "evaluator_episodes_total", "Test-level episodes played (finished or cut)."))
        self.seconds = c(self._metric(Histogram, "evaluator_evaluation_seconds", "Wall time of one evaluation.",
                                      buckets=DURATION_BUCKETS))
        self.test_return = self._metric(Gauge, "evaluator_test_return", "Mean return of the last evaluation on unseen levels.")
        self.weights_version = c(self._metric(Gauge, "evaluator_weights_version", "Optimizer step of the last evaluated weights."))
        self.serve()

    def record_eval(self, result: dict) -> None:
        self.evaluations.inc()
        self.episodes.inc(len(result["test_returns"]))
        self.seconds.observe(result["seconds"])
        self._child(self.test_return).set(result["test_return"])
        self.weights_version.set(result["weights_version"])
