"""Prometheus metrics of every mdpo process: their definitions, the /metrics endpoints, the targets file.

Each process owns one telemetry object for its role: `CoordinatorTelemetry` (the `mdpo train` driver, learners/telemetry/coordinator.py),
`LearnerTelemetry` (a LearnerWorker, including the distillation and gRPC metrics), `ActorTelemetry`
(a RolloutWorker) and `EvaluatorTelemetry` (an Evaluator, hosted by the first RolloutWorker of its learner). Each has its own `CollectorRegistry`, so
several runs in one process never collide, and serves it with prometheus_client's HTTP server. We use
prometheus_client rather than Ray's metrics export: Ray's export needs its dashboard/metrics agent
(the embedded local Ray runs without it), and one endpoint per process keeps the labels exact.

Every metric is named `mdpo_<role>_...` (distillation: `mdpo_distill_...`, gRPC: `mdpo_grpc_...`), in
base units, `_total` on counters, histograms for latencies, and carries the labels `run_id` and `role`
(coordinator | learner | actor | evaluator), plus `learner_id` and `actor_id` where they apply.

Ports, with base B = `--metrics-port`, L = `--num-learners`, A = `--num-actors` (per learner):
    coordinator B, learner i B+1+i, evaluator i B+1+L+i, actor a of learner i B+1+2L+i*A+a.
B = 0 binds free ports (tests, several runs on one machine); B = -1 turns the endpoints off. A fixed
port that is taken falls back to a free one (with a warning). Whatever was bound, the coordinator
writes every endpoint, with its labels, to a Prometheus file_sd targets file (`write_targets`):
`RUN_DIR/prometheus_targets.json`, and `<run id>.json` in `--metrics-sd-dir` (default: `prometheus/`
beside the run directory, e.g. `runs/prometheus/`), which deploy/prometheus/ scrapes. The latter is
removed when the run ends cleanly (a crashed run's targets stay, so their `up == 0` alerts fire).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, Summary,
                               disable_created_metrics, start_http_server)

from learners.files import atomic_write
from learners.config import TrainConfig

log = logging.getLogger("mdpo")
disable_created_metrics()   # no `_created` companion series: half the series, nothing lost for rate()

PREFIX = "mdpo"
ROLES = ("coordinator", "learner", "actor", "evaluator")
TARGETS_FILE = "prometheus_targets.json"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LENGTH_BUCKETS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 27000)


# ------------------------------------------------------------------------------------------ ports
def metrics_port(cfg: TrainConfig, role: str, learner_id: int = 0, actor_id: int = 0) -> int:
    """The port a process of `role` binds (0: any free port); see the module docstring for the scheme."""
    base, L, A = cfg.metrics_port, cfg.num_learners, cfg.num_actors
    if base <= 0:
        return 0
    offset = {"coordinator": 0, "learner": 1 + learner_id, "evaluator": 1 + L + learner_id,
              "actor": 1 + 2 * L + learner_id * A + actor_id}[role]
    return base + offset


def ports_needed(cfg: TrainConfig) -> int:
    return 1 + 2 * cfg.num_learners + cfg.num_learners * cfg.num_actors


def run_id_of(cfg: TrainConfig, run_dir: Path | str) -> str:
    return cfg.run_id or Path(run_dir).resolve().name or "run"


def with_run_id(cfg: TrainConfig, run_dir: Path | str) -> TrainConfig:
    """cfg with `run_id` filled in, so every process of the run labels its metrics alike."""
    return cfg if cfg.run_id else dataclasses.replace(cfg, run_id=run_id_of(cfg, run_dir))


def sd_dir(cfg: TrainConfig, run_dir: Path | str) -> Path:
    """Where the shared file_sd file of this run goes (`--metrics-sd-dir`, default `prometheus/` beside RUN_DIR)."""
    return Path(cfg.metrics_sd_dir) if cfg.metrics_sd_dir else Path(run_dir).resolve().parent / "prometheus"


def advertised_host(host: str) -> str:
    """The address other machines reach a server bound to `host` at."""
    if host not in ("0.0.0.0", "::", ""):
        return f"[{host}]" if ":" in host else host
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: fall through to the host name
        pass
    return socket.gethostbyname(socket.gethostname())


def _ray_actor_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:
        return None


def restart_count() -> int:
    """How many times Ray has restarted the current actor (0 in its first life or outside an actor)."""
    try:
        import ray
        if not ray.is_initialized():
            return 0
        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        if actor_id is None:
            return 0
        with warnings.catch_warnings():   # Ray's own property reads its deprecated `actor_id`: not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            if not ctx.was_current_actor_reconstructed:
                return 0
    except Exception:
        return 0
    try:
        from ray._private import state   # the GCS actor table; Ray's public state API needs the dashboard
        return max(1, int(state.actors(actor_id)["NumRestarts"]))
    except Exception:
        return 1


def actor_states(actor_ids: Iterable[str]) -> dict[str, str] | None:
    """GCS state (ALIVE, RESTARTING, DEAD, ...) of each Ray actor id, or None when Ray cannot say."""
    try:
        import ray
        from ray._private import state
        if not ray.is_initialized():
            return None
        return {aid: str(state.actors(aid).get("State", "UNKNOWN")) for aid in actor_ids}
    except Exception:
        return None


# ------------------------------------------------------------------------------ the common part
class Telemetry:
    """A role's registry, labels and HTTP endpoint. Subclasses define the metrics."""

    role = ""

    def __init__(self, cfg: TrainConfig, learner_id: int | None = None, actor_id: int | None = None):
        self.cfg = cfg
        self.learner_id, self.actor_id = learner_id, actor_id
        self.labels = {"run_id": cfg.run_id or "run", "role": self.role}
        if learner_id is not None:
            self.labels["learner_id"] = str(learner_id)
        if actor_id is not None:
            self.labels["actor_id"] = str(actor_id)
        # A stable instance name: a restarted actor on a new port continues the same series.
        self.instance = "-".join([self.role, *(self.labels[k] for k in ("learner_id", "actor_id") if k in self.labels)])
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)   # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.address: str | None = None
        self._server = None

    # metric constructors: every metric gets this process's labels first
    def _metric(self, kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
        return kind(f"{PREFIX}_{name}", doc, [*self.labels, *labels], registry=self.registry, **kwargs)

    def _child(self, metric, **extra):
        return metric.labels(**self.labels, **{k: str(v) for k, v in extra.items()})

    def serve(self) -> "Telemetry":
        """Start the /metrics endpoint (unless --metrics-port -1); `address` is then host:port."""
        if self.cfg.metrics_port < 0 or self._server is not None:
            return self
        host = self.cfg.metrics_host
        port = metrics_port(self.cfg, self.role, self.learner_id or 0, self.actor_id or 0)
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            if port == 0:
                raise
            log.warning("%s: metrics port %s:%d unavailable (%s); serving on a free port", self.instance, host, port, err)
            server, _ = start_http_server(0, addr=host, registry=self.registry)
        self._server = server
        self.address = f"{advertised_host(host)}:{server.server_port}"
        return self

    def endpoint(self) -> dict:
        """What the coordinator needs to list this process in the targets file."""
        return {"address": self.address, "labels": {**self.labels, "instance": self.instance}, "pid": os.getpid(),
                "ray_actor_id": _ray_actor_id()}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ---------------------------------------------------------------------------------- rollouts
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


# ---------------------------------------------------------------------------------- learners
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
    def record_update(self, stats: dict, rollouts, started: float, step_before: int) -> None:
        """After LearnerWorker.update: `started`/`step_before` are perf_counter and optimizer step at its start."""
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(stats[key])
        self.weights_version.set(stats["step"])
        self.iteration.set(stats["iteration"])
        self.samples.inc(stats["samples"])
        sync = stats.get("sync_seconds", 0.0)
        self._child(self.phase, phase="wait_data").observe(max(0.0, started - self._last_end))
        self._child(self.phase, phase="train").observe(max(0.0, stats["update_seconds"] - sync))
        self._child(self.phase, phase="sync").observe(sync)
        for latency in stats.get("sync_latencies", []):
            self.sync_seconds.observe(latency)
        self.sent_bytes.inc(stats.get("sync_bytes_sent", 0))
        self.received_bytes.inc(stats.get("sync_bytes_received", 0))
        self.staleness.set(stats.get("staleness_mean", 0.0))
        self.staleness_max.set(stats.get("staleness_max", 0))
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


# ------------------------------------------------------------------------------- coordinator


def write_targets(path: Path, groups: list[dict]) -> None:
    """Atomically write a Prometheus file_sd JSON file (Prometheus watches it and must never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(groups, indent=2) + "\n")
