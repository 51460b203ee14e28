"""Metrics of a learner process: its update, distillation traffic, memory and gRPC calls (the common part is
learners/telemetry/metrics.py)."""

from __future__ import annotations

import math
import time

from prometheus_client import Counter, Gauge, Histogram

from learners.config import TrainConfig
from learners.records import UpdateStats
from learners.telemetry.metrics import DURATION_BUCKETS, LATENCY_BUCKETS, Telemetry


# Learner.update's per-iteration means -> gauges.
LEARNER_GAUGES = {
    "loss": ("learner_loss", "Total loss (PPO + alpha * KL to peers), mean over the last iteration's minibatches."),
    "policy_loss": ("learner_policy_loss", "PPO clipped policy loss, mean over the last iteration."),
    "value_loss": ("learner_value_loss", "Value loss, mean over the last iteration."),
    "entropy": ("learner_entropy", "Policy entropy in nats, mean over the last iteration."),
    "kl_peer": ("learner_kl_peer", "KL(peer || self) in nats, mean over the last iteration (0 without distillation)."),
    "approx_kl": ("learner_approx_kl", "Approximate KL to the behaviour (old) policy, mean over the last iteration."),
    "clipfrac": ("learner_clip_fraction", "Fraction of samples whose probability ratio was clipped."),
    "explained_variance": ("learner_explained_variance", "Explained variance of the value predictions on the last batch."),
    "learning_rate": ("learner_learning_rate", "Adam learning rate of the last iteration."),
    "grad_norm": ("learner_grad_norm", "Gradient norm before clipping, mean over the last iteration."),
}


class LearnerTelemetry(Telemetry):
    """A LearnerWorker: losses and diagnostics, throughput, time per phase, memory, distillation, gRPC."""

    role = "learner"

    def __init__(self, cfg: TrainConfig, learner_id: int, device: str = "cpu"):
        super().__init__(cfg, learner_id)
        c, m = self._child, self._metric
        self.device = device
        self.gauges = {key: c(m(Gauge, name, doc)) for key, (name, doc) in LEARNER_GAUGES.items()}
        self.weights_version = c(m(Gauge, "learner_weights_version", "Optimizer steps taken (the weights version)."))
        self.iteration = c(m(Gauge, "learner_iteration", "Iterations this learner has completed."))
        self.samples = c(m(Counter, "learner_samples_trained_total", "Samples trained on (batch size x epochs)."))
        self.nonfinite = c(m(Counter, "learner_nonfinite_errors_total", "Updates aborted on a NaN/inf loss, gradient or peer logits."))
        self.phase = m(Histogram, "learner_phase_seconds", "Time per iteration in each phase: wait_data (idle until the "
                       "rollouts arrive), train (PPO epochs less sync), sync (waiting on and talking to peers).",
                       ("phase",), buckets=DURATION_BUCKETS)
        self.memory = m(Gauge, "learner_device_memory_bytes", "Memory in use on the training device (CPU: process RSS; "
                        "CUDA: allocated by torch).", ("device",))
        self.version_lag = m(Gauge, "actor_weights_version_lag", "Optimizer steps between the weights an actor's last "
                             "rollout was collected with and this learner's weights when it trained on it.", ("actor_id",))
        self.sync_seconds = c(m(Histogram, "distill_sync_seconds", "Latency of one sync: sending states to every peer "
                                "and receiving their logits.", buckets=LATENCY_BUCKETS))
        self.sent_bytes = c(m(Counter, "distill_sent_bytes_total", "Distillation bytes sent to peers (states, gradients)."))
        self.received_bytes = c(m(Counter, "distill_received_bytes_total", "Distillation bytes received from peers (logits)."))
        self.staleness = c(m(Gauge, "distill_staleness_steps", "Optimizer steps since the peer logits used as targets "
                             "were made, mean over the last iteration's minibatches."))
        self.staleness_max = c(m(Gauge, "distill_staleness_max_steps", "Largest staleness of peer logits in the last iteration."))
        self.grpc_server = m(Counter, "grpc_server_handled_total", "gRPC calls this learner's server finished, by status code.",
                             ("grpc_service", "grpc_method", "grpc_code"))
        self.grpc_server_seconds = m(Histogram, "grpc_server_handling_seconds", "Time this learner's server spent on one call.",
                                     ("grpc_service", "grpc_method"), buckets=LATENCY_BUCKETS)
        self.grpc_client = m(Counter, "grpc_client_handled_total", "gRPC calls this learner made to its peers, by status code.",
                             ("grpc_service", "grpc_method", "grpc_code"))
        for phase in ("wait_data", "train", "sync"):
            self._child(self.phase, phase=phase)
        self._last_end = time.perf_counter()
        self._record_memory()
        self.serve()

    # gRPC ---------------------------------------------------------------------------------
    def _grpc_server_record(self, service: str, method: str, code, t0: float) -> None:
        self._child(self.grpc_server, grpc_service=service, grpc_method=method, grpc_code=code.name).inc()
        self._child(self.grpc_server_seconds, grpc_service=service, grpc_method=method).observe(time.perf_counter() - t0)

    def _grpc_client_record(self, service: str, method: str, code, t0: float) -> None:
        self._child(self.grpc_client, grpc_service=service, grpc_method=method, grpc_code=code.name).inc()

    def grpc_server_interceptor(self):
        from learners.telemetry.grpc import ServerMetricsInterceptor
        return ServerMetricsInterceptor(self._grpc_server_record)

    def grpc_client_interceptors(self) -> tuple:
        """For PeerClient(interceptors=...): counts the client's calls by status code."""
        from learners.telemetry.grpc import ClientMetricsInterceptor
        return (ClientMetricsInterceptor(self._grpc_client_record),)

    # updates ------------------------------------------------------------------------------
    def record_update(self, stats: UpdateStats, rollouts, started: float, step_before: int) -> None:
        """After LearnerWorker.update: `started`/`step_before` are perf_counter and optimizer step at its start."""
        for key, gauge in self.gauges.items():
            gauge.set(getattr(stats, key))
        self.weights_version.set(stats.step)
        self.iteration.set(stats.iteration)
        self.samples.inc(stats.samples)
        self._child(self.phase, phase="wait_data").observe(max(0.0, started - self._last_end))
        self._child(self.phase, phase="train").observe(max(0.0, stats.update_seconds - stats.sync_seconds))
        self._child(self.phase, phase="sync").observe(stats.sync_seconds)
        for latency in stats.sync_latencies:
            self.sync_seconds.observe(latency)
        self.sent_bytes.inc(stats.sync_bytes_sent)
        self.received_bytes.inc(stats.sync_bytes_received)
        self.staleness.set(stats.staleness_mean)
        self.staleness_max.set(stats.staleness_max)
        for r in rollouts:
            self._child(self.version_lag, actor_id=r.actor_id).set(step_before - r.weights_version)
        self._record_memory()
        self._last_end = time.perf_counter()

    def record_nonfinite(self) -> None:
        self.nonfinite.inc()
        self.gauges["loss"].set(math.nan)

    def _record_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch
            used = torch.cuda.memory_allocated()
        else:
            import psutil
            used = psutil.Process().memory_info().rss
        self._child(self.memory, device=self.device).set(used)
