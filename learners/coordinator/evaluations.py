"""Evaluation on unseen levels without blocking the loop: each learner's latest weights go to the Evaluator hosted
by its actor 0 (actors/evaluator.py), at most one evaluation per learner in flight, results picked up when ready.

With a probe set (actors/probes.py) every evaluation also returns the agent's outputs on it. No process but this
one sees two agents, so the mechanism metrics (robustness, agreement, CKA) are computed here, once every learner's
outputs for one weights version have come in; evaluations skipped while one is in flight leave a version
incomplete, and a later complete one supersedes it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import ray

from actors.probes import probe_metrics
from learners.files import atomic_write
from learners.records import ProbeOutput, ProbeSet, Weights

log = logging.getLogger("mdpo")
PROBES_FILE = "probes.npz"


def probe_due(spent_seconds: float, last_round_seconds: float, budget: float, wall_seconds: float) -> bool:
    """--probe-budget's rule: measure when what was spent so far plus one more round (as long as the last) stays within
    `budget` of the run's time; before any measurement nothing is known of the cost, so the first is always due."""
    return spent_seconds + last_round_seconds <= budget * wall_seconds


def load_probe_set(run_dir: Path, build: Callable[[], ProbeSet]) -> ProbeSet:
    """The run's probe set: kept in the run directory, so a resumed run measures the same states; else `build()`
    (the Coordinator has the first evaluator's process build it, actors/rollout.py: RolloutWorker.probe_set)."""
    path = Path(run_dir) / PROBES_FILE
    if path.exists():
        return ProbeSet.from_npz(path)
    t0 = time.perf_counter()
    probe = build()
    atomic_write(path, probe.to_npz())
    fraction = probe.training_level_fraction
    log.info("probe set: %d states of %s (%s) built in %.1fs%s", probe.states, probe.env_id, ", ".join(probe.renderings),
             time.perf_counter() - t0, "" if fraction is None else f", {fraction:.1%} of them on training levels")
    return probe


class Evaluations:
    def __init__(self, num_learners: int, probe_budget: float = 1.0):
        self.num_learners, self.probe_budget = num_learners, probe_budget
        self.probe_seconds = 0.0                                # spent measuring probes, all evaluators together
        self.probe_round_seconds = 0.0                          # the last measurement of every learner together
        self.last: list[dict | None] = [None] * num_learners    # per learner, the latest finished evaluation
        self.in_flight: dict = {}                               # Ray reference -> learner
        self.probe: ProbeSet | None = None                      # the run's probe set, if it measures one
        self.probe_ref = None                                   # ... in Ray's object store, handed with each call
        self.outputs: dict[int, dict[int, ProbeOutput]] = {}    # weights version -> learner -> its probe outputs
        self.measured: dict | None = None                       # the newest paired measurement, not yet in a record
        self.last_measured: dict | None = None                  # the newest paired measurement (summary.json)

    def use_probe(self, probe: ProbeSet) -> None:
        self.probe, self.probe_ref = probe, ray.put(probe)

    def probe_due(self, wall_seconds: float) -> bool:
        """Measure the probe set in this round of evaluations? Within the budget share of the run's time so far, one
        more measurement included (the first is always due: every run gets one early on)."""
        return self.probe_ref is not None and probe_due(self.probe_seconds, self.probe_round_seconds,
                                                        self.probe_budget, wall_seconds)

    def launch(self, evaluators: list, learners: list, wall_seconds: float = float("inf")) -> None:
        extra = (self.probe_ref,) if self.probe_due(wall_seconds) else ()
        for i, evaluator in enumerate(evaluators):
            if i not in self.in_flight.values():
                self.in_flight[evaluator.evaluate.remote(learners[i].weights.remote(), *extra)] = i

    def poll(self, timeout: float = 0) -> None:
        if not self.in_flight:
            return
        ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout)
        for ref in ready:
            i = self.in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                # Best effort: the host actor is restarted by Ray (or replaced by the failure handling), and the
                # next evaluation goes to it.
                log.warning("evaluation of learner %d failed (%s); the next one goes on", i, type(err).__name__)
                continue
            self.take(i, result)

    def take(self, i: int, result: dict) -> None:
        """Learner i's finished evaluation (Evaluator.evaluate's result)."""
        output = result.pop("probe", None)     # arrays: kept only until paired, never in checkpoints
        self.last[i] = result
        if output is not None:
            self.probe_seconds += output.seconds
            self._pair(output)

    def _pair(self, output: ProbeOutput) -> None:
        version = output.weights_version
        outputs = self.outputs.setdefault(version, {})
        outputs[output.learner_id] = output
        if len(outputs) == self.num_learners:
            self.probe_round_seconds = sum(o.seconds for o in outputs.values())
            self.measured = self.last_measured = probe_metrics(list(outputs.values()), self.probe)
            self.outputs = {v: o for v, o in self.outputs.items() if v > version}

    def take_measured(self) -> dict | None:
        """The paired measurement that came in since the last record, once."""
        measured, self.measured = self.measured, None
        return measured

    def reset(self) -> None:
        """After a rollback: what is in flight or half paired belongs to weights the run no longer has."""
        self.in_flight.clear()
        self.outputs.clear()
        self.measured = None

    def final(self, evaluators: list, learners: list, wall_seconds: float, timeout: float = 600) -> None:
        """The summary's test return is that of the final weights: wait for one last evaluation."""
        if not evaluators:
            return
        self.poll(timeout)          # let in-flight evaluations finish first
        self.launch(evaluators, learners, wall_seconds)
        self.poll(timeout)


class InProcessEvaluations(Evaluations):
    """The local backend's evaluations (learners/local.py): each runs at once, in this process, on the learner's
    current weights; the results, the probe pairing and --probe-budget are the same. `evaluators` are RolloutWorkers
    (actor 0 of each learner), `learners` Learners."""

    def use_probe(self, probe: ProbeSet) -> None:
        self.probe = self.probe_ref = probe      # no object store: the evaluators take it as it is

    def launch(self, evaluators: list, learners: list, wall_seconds: float = float("inf")) -> None:
        extra = (self.probe,) if self.probe_due(wall_seconds) else ()
        for i, evaluator in enumerate(evaluators):
            self.take(i, evaluator.evaluate(Weights.from_module(learners[i].step, learners[i].agent), *extra))

    def poll(self, timeout: float = 0) -> None:
        """Nothing is ever in flight."""
