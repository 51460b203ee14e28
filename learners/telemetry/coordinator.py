"""The coordinator's telemetry: run-level metrics (iterations, env steps, returns, sync totals, faults, the probe
set's measurements of the mechanism), the live state of every worker process, and the targets file that tells
Prometheus where every endpoint is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
import re
import threading
import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from learners.config import TrainConfig
from learners.telemetry.metrics import (DURATION_BUCKETS, PREFIX, TARGETS_FILE, Telemetry, actor_states, sd_dir,
                                        write_targets)

log = logging.getLogger("mdpo")


@dataclass(frozen=True)
class RunProgress:
    """What the coordinator's telemetry reports, handed over by the coordinator after start and each iteration."""
    iteration: int
    env_steps: list[int]                 # per learner, so far
    failures: int                        # learner/actor failures recovered
    learner_endpoints: list[dict]        # each learner's /metrics endpoint ({} where it has none)
    actors: list                         # every rollout actor's handle (asked for its endpoints, and its evaluator's),
                                         # or with the local backend the RolloutWorker itself
    evaluators: int
    hangs: int = 0                       # processes found hung (past the bound) and replaced


class _LiveWorkers:
    """Collector: Ray actors of each kind that the GCS reports ALIVE, asked at scrape time (cached 1 s)."""

    NAME = f"{PREFIX}_coordinator_live_workers"
    DOC = "Ray actors of each kind (learner, actor, evaluator) that are alive, per Ray's GCS."

    def __init__(self, telemetry: "CoordinatorTelemetry"):
        self.telemetry = telemetry
        self._cache: tuple[float, dict[str, int] | None] = (0.0, None)
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int] | None:
        with self._lock:
            if time.monotonic() - self._cache[0] < 1.0:
                return self._cache[1]
            workers = list(self.telemetry.workers.values())
            states = actor_states({aid for aid, _ in workers})
            counts = None
            if states is not None:
                counts = {kind: 0 for kind in ("learner", "actor", "evaluator")}
                for aid, kind in workers:     # an evaluator is alive when the rollout actor hosting it is
                    counts[kind] += states.get(aid) == "ALIVE"
            self._cache = (time.monotonic(), counts)
            return counts

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.DOC, labels=[*self.telemetry.labels, "kind"])]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.DOC, labels=[*self.telemetry.labels, "kind"])
        for kind, n in (self.counts() or {}).items():
            family.add_metric([*self.telemetry.labels.values(), kind], n)
        yield family


class CoordinatorTelemetry(Telemetry):
    """The driver: progress, train vs test return per agent, generalization gap, workers, targets file."""

    role = "coordinator"

    def __init__(self, cfg: TrainConfig, run_dir: Path | str):
        super().__init__(cfg)
        c, m = self._child, self._metric
        self.run_dir = Path(run_dir)
        self.targets_path = self.run_dir / TARGETS_FILE
        self.sd_path = sd_dir(cfg, run_dir) / (re.sub(r"[^A-Za-z0-9_.-]", "_", self.labels["run_id"]) + ".json")
        self.run_info = c(m(Info, "run", "Configuration of the run."))
        self.iteration = c(m(Gauge, "coordinator_iteration", "Iterations completed."))
        self.iterations_planned = c(m(Gauge, "coordinator_iterations_planned", "Iterations the run is configured for."))
        self.env_steps = m(Counter, "coordinator_env_steps_total", "Environment steps per agent (training levels).",
                           ("learner_id",))
        self.steps_per_second = c(m(Gauge, "coordinator_env_steps_per_second",
                                    "Environment steps per second, all agents, since the run (re)started."))
        self.train_return = m(Gauge, "coordinator_train_return", "Mean return of the last --return-window training "
                              "episodes of an agent.", ("learner_id",))
        self.test_return = m(Gauge, "coordinator_test_return", "Mean return of an agent's latest evaluation on unseen "
                             "levels.", ("learner_id",))
        self.gap = m(Gauge, "coordinator_generalization_gap", "Train return minus test return of an agent.", ("learner_id",))
        self.iteration_seconds = c(m(Histogram, "coordinator_iteration_seconds", "Wall time of one iteration "
                                     "(rollouts, updates and syncs).", buckets=DURATION_BUCKETS))
        self.last_progress = c(m(Gauge, "coordinator_last_progress_timestamp_seconds", "Unix time of the last finished "
                                 "iteration (or of the start)."))
        self.expected = m(Gauge, "coordinator_expected_workers", "Ray actors of each kind the run started.", ("kind",))
        self.failures = c(m(Counter, "coordinator_recovered_failures_total", "Learner/actor failures the run recovered "
                            "from by restarting from the latest checkpoint."))
        self.hangs = c(m(Counter, "coordinator_hangs_detected_total", "Processes that did not answer within the hang "
                         "bound and were killed and replaced (a hung learner also rolls the run back)."))
        # The paper's mechanism, measured by the driver on a fixed probe set of states at some evaluations. The
        # series appear with the first measurement: a zero before it would read as a perfect score.
        self.probe_robustness_tv = m(Gauge, "probe_robustness_tv", "Mean total-variation distance, in [0, 1], "
                                     "between an agent's action distributions on two renderings (variant) of the "
                                     "same probe states; lower is more robust.", ("learner_id", "variant"))
        self.probe_render_cka = m(Gauge, "probe_render_cka", "Linear CKA between an agent's encoder features of two "
                                  "renderings (variant) of the same probe states; about [0, 1], 1 is the same "
                                  "representation up to rotation and scale.", ("learner_id", "variant"))
        self.probe_agreement_tv = m(Gauge, "probe_agreement_tv", "Mean total-variation distance, in [0, 1], between "
                                    "two agents' action distributions on the same probe states; lower is more "
                                    "agreement.", ("learner_a", "learner_b"))
        self.probe_cka = m(Gauge, "probe_cka", "Linear CKA between two agents' encoder features on the same probe "
                           "states; about [0, 1], 1 is the same representation up to rotation and scale.",
                           ("learner_a", "learner_b"))
        self.probe_weights_version = m(Gauge, "probe_weights_version", "Weights version (optimizer steps) of the "
                                       "agents the last probe measurement is of.")
        self.workers: dict[str, tuple[str, str]] = {}   # instance -> (Ray actor id of its process, kind)
        self.live = _LiveWorkers(self)
        self.registry.register(self.live)
        self.endpoints: dict[str, dict] = {}          # instance -> endpoint
        self._seen: dict = {}          # counter key -> the total it has been brought up to
        self._last_time = time.perf_counter()

    # lifecycle ----------------------------------------------------------------------------
    def attach(self, progress: RunProgress) -> None:
        """At the end of Coordinator.start(): serve, gather every process's endpoint, write the targets files."""
        cfg = self.cfg
        self.serve()
        self.run_info.info({"env_id": cfg.env_id, "alpha": str(cfg.alpha), "distill_mode": cfg.distill_mode,
                            "sync": cfg.sync, "num_learners": str(cfg.num_learners), "seed": str(cfg.seed)})
        self.iterations_planned.set(cfg.num_iterations)
        self.iteration.set(progress.iteration)
        self._count_up(progress)
        self._child(self.expected, kind="learner").set(len(progress.learner_endpoints))
        self._child(self.expected, kind="actor").set(len(progress.actors))
        self._child(self.expected, kind="evaluator").set(progress.evaluators)
        self.endpoints = {self.instance: self.endpoint()}
        self._refresh_endpoints(progress, actors_wait_s=120, quiet=True)   # printed by the CLI
        self.last_progress.set_to_current_time()
        self._last_time = time.perf_counter()

    def on_iteration(self, progress: RunProgress, record: dict) -> None:
        """After each iteration's record (metrics.jsonl line) is written."""
        now = time.perf_counter()
        self.iteration_seconds.observe(now - self._last_time)
        self._last_time = now
        self.iteration.set(record["iteration"])
        self.steps_per_second.set(record.get("env_steps_per_second", 0.0))
        self._count_up(progress)
        for entry in record["learners"]:
            for gauge, key in ((self.train_return, "train_return"), (self.test_return, "test_return"),
                               (self.gap, "generalization_gap")):
                if entry.get(key) is not None:
                    self._child(gauge, learner_id=entry["id"]).set(entry[key])
        if record.get("probe"):
            self._set_probe(record["probe"])
        self.last_progress.set_to_current_time()
        self._refresh_endpoints(progress, actors_wait_s=5)

    def _set_probe(self, probe: dict) -> None:
        """A record's "probe" block: per agent and rendering variant, lists indexed by learner id (none for envs
        without renderings); per pair of agents, keys "i-j" with i < j. A value the measurement could not give
        (None) leaves its gauge as it was rather than failing the iteration."""
        self._child(self.probe_weights_version).set(probe["weights_version"])
        for gauge, key in ((self.probe_robustness_tv, "robustness_tv"), (self.probe_render_cka, "render_cka")):
            for variant, per_agent in (probe.get(key) or {}).items():
                for learner_id, value in enumerate(per_agent):
                    if value is not None:
                        self._child(gauge, learner_id=learner_id, variant=variant).set(value)
        for gauge, key in ((self.probe_agreement_tv, "agreement_tv"), (self.probe_cka, "cka")):
            for pair, value in (probe.get(key) or {}).items():
                learner_a, learner_b = pair.split("-")
                if value is not None:
                    self._child(gauge, learner_a=learner_a, learner_b=learner_b).set(value)

    def _count_up(self, progress: RunProgress) -> None:
        """Counters follow the coordinator's totals (restored ones included; a rollback never lowers them)."""
        for i, steps in enumerate(progress.env_steps):
            self._follow(self._child(self.env_steps, learner_id=i), ("env_steps", i), steps)
        self._follow(self.failures, "failures", progress.failures)
        self._follow(self.hangs, "hangs", progress.hangs)

    def _follow(self, counter, key, total: int) -> None:
        counter.inc(max(0, total - self._seen.get(key, 0)))
        self._seen[key] = max(total, self._seen.get(key, 0))

    def _refresh_endpoints(self, progress: RunProgress, actors_wait_s: float, quiet: bool = False) -> None:
        """Learners restarted after a failure and rollout actors restarted by Ray (with the evaluators they host)
        serve on new ports: re-read the endpoints and rewrite the targets files when one changed. Rollout actors
        are idle between iterations (with the policy lag, a busy one answers after its rollout)."""
        import ray

        if self.cfg.metrics_port < 0:
            return
        found = [e for e in progress.learner_endpoints if e]
        # An actor's own endpoint and, for the first actor of a learner, its evaluator's. Those that do not answer
        # in time (busy, restarting, hung) are asked again next iteration; the others count now. The local
        # backend's workers are plain objects in this process: they answer at once.
        found += [e for a in progress.actors if not isinstance(a, ray.actor.ActorHandle) for e in a.metrics_endpoints()]
        refs = [a.metrics_endpoints.remote() for a in progress.actors if isinstance(a, ray.actor.ActorHandle)]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=actors_wait_s) if refs else ([], [])
        for ref in ready:
            try:
                found += ray.get(ref)
            except ray.exceptions.RayError as err:   # an actor in the middle of a restart
                log.warning("could not read a rollout actor's metrics endpoints: %s", type(err).__name__)
        if late and not quiet:
            log.debug("%d rollout actor(s) did not report their metrics endpoints within %.0fs", len(late),
                        actors_wait_s)
        changed = [e for e in found if e.get("address")
                   and self.endpoints.get(e["labels"]["instance"], {}).get("address") != e["address"]]
        for e in changed:
            self.endpoints[e["labels"]["instance"]] = e
        self.workers = {instance: (e["ray_actor_id"], e["labels"]["role"]) for instance, e in self.endpoints.items()
                        if e.get("ray_actor_id")}
        if changed and not quiet:
            log.info("metrics endpoints: %s", ", ".join(f"{e['labels']['instance']} {e['address']}" for e in changed))
        if changed:
            self.write_targets()

    def close(self, clean: bool = True) -> None:
        """Stop serving. After an end the coordinator saw (finished, stopped, or failed with summary.json saying
        why) the shared targets file goes, so Prometheus stops scraping; after a driver that died without a word it
        stays, and the `up == 0` alerts say the run is down."""
        if clean and self.sd_path.exists():
            self.sd_path.unlink()
        super().close()

    # targets ------------------------------------------------------------------------------
    def target_groups(self) -> list[dict]:
        return [{"targets": [e["address"]], "labels": e["labels"]} for e in self.endpoints.values() if e.get("address")]

    def write_targets(self) -> None:
        if self.cfg.metrics_port < 0:
            return
        groups = self.target_groups()
        for path in (self.targets_path, self.sd_path):
            write_targets(path, groups)

    def describe_endpoints(self) -> str:
        """What `mdpo train` prints: every endpoint and the targets files."""
        if self.cfg.metrics_port < 0:
            return "metrics: off (--metrics-port -1)"
        lines = [f"metrics: {len(self.endpoints)} Prometheus endpoints (file_sd targets: {self.targets_path}, "
                 f"{self.sd_path}); run_id={self.labels['run_id']}"]
        lines += [f"  {name:<16} http://{e['address']}/metrics" for name, e in self.endpoints.items() if e.get("address")]
        return "\n".join(lines)
