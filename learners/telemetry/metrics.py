"""Prometheus metrics of every mdpo process: their definitions, the /metrics endpoints, the targets file.

Each process owns one telemetry object for its role, a `Telemetry` subclass: `CoordinatorTelemetry` (the `mdpo
train` driver, learners/telemetry/coordinator.py), `LearnerTelemetry` (a LearnerWorker, including the distillation
and gRPC metrics, learners/telemetry/learner.py), `ActorTelemetry` (a RolloutWorker) and `EvaluatorTelemetry` (an
Evaluator, hosted by the first RolloutWorker of its learner), both in learners/telemetry/actor.py. Each has its own
`CollectorRegistry`, so several runs in one process never collide, and serves it with prometheus_client's HTTP
server. We use prometheus_client rather than Ray's metrics export: Ray's export needs its dashboard/metrics agent
(the embedded local Ray runs without it), and one endpoint per process keeps the labels exact.

Every metric is named `mdpo_<role>_...` (distillation: `mdpo_distill_...`, gRPC: `mdpo_grpc_...`, the
coordinator's probe-set measurements: `mdpo_probe_...`), in base units, `_total` on counters, histograms for
latencies, and carries the labels `run_id` and `role` (coordinator | learner | actor | evaluator), plus `learner_id`
and `actor_id` where they apply (a pair of agents: `learner_a`, `learner_b`).

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
import os
import socket
import warnings
from pathlib import Path
from typing import Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, start_http_server

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


# --grpc-host/--metrics-host value: bind to the address of the Ray node the process runs on. On a multi-host cluster
# that is the one address its peers reach it at; 0.0.0.0 would also open the port on every other interface.
NODE_HOST = "node"


def bind_host(host: str) -> str:
    """The address a server is bound to for --grpc-host/--metrics-host `host`."""
    if host != NODE_HOST:
        return host
    import ray
    return ray.util.get_node_ip_address()


def advertised_host(host: str) -> str:
    """The address other machines reach a server bound to `host` at."""
    host = bind_host(host)
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
        host = bind_host(self.cfg.metrics_host)
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


# ------------------------------------------------------------------------------- coordinator


def write_targets(path: Path, groups: list[dict]) -> None:
    """Atomically write a Prometheus file_sd JSON file (Prometheus watches it and must never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(groups, indent=2) + "\n")
