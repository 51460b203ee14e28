"""The local backend (`mdpo train --backend local`): one whole run in this one process, no Ray and no gRPC, to step
through or profile the math (a loss term, the schedule) with an ordinary debugger or profiler.

The same as on Ray (learners/coordinator/loop.py): the config, the run directory and all it holds (metrics.jsonl
records with the same fields, TensorBoard, checkpoints in the same format, summary.json, returns.png), --resume
(either backend resumes the other's runs), Ctrl-C, evaluations with the probe set, --policy-lag. The loop,
checkpoints and outputs are the Runner's (learners/coordinator/runner.py); this module is what runs in them:

- the learners are plain Learners (learners/learner.py), which seed torch alike, so they start from the Ray run's
  weights; the update of all of them at once is learners/reference.py's mdpo_update, the single-process MDPO that
  the distributed learners are tested against: the peers' logits are computed right there, nothing is sent;
- the rollout workers are plain RolloutWorkers (actors/rollout.py), called one after the other; actor 0 of each
  learner hosts its Evaluator, whose evaluations are awaited (a record has the test return of its own weights);
- no sync traffic: `syncs` counts the plan's sync points, their bytes, latency and staleness are 0;
- CPU only, the policy run by the rollout workers, whole minibatches (mdpo_update takes no micro-batches: the same
  gradient, more activation memory), no process to lose: an error stops the run, its last checkpoint intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

import learners.ppo as ppo
from actors.rollout import RolloutWorker, env_spec
from learners.checkpoint import tensors_from_bytes, tensors_to_bytes
from learners.config import TrainConfig
from learners.coordinator.evaluations import InProcessEvaluations
from learners.coordinator.failures import TrainingDiverged
from learners.coordinator.runner import Runner
from learners.errors import NonFiniteError
from learners.learner import Learner
from learners.records import Batch, ProbeSet, Rollout, UpdateStats, Weights
from learners.reference import mdpo_update
from learners.schedule import IterationPlan, actor_seed, eval_seed
from learners.telemetry.learner import LearnerTelemetry

log = logging.getLogger("mdpo")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside. RolloutWorker and Evaluator set one thread for their process (on
    Ray many share a machine); here the update takes the cores, and collection keeps its one thread, as on Ray.
    (On a machine busy with other work, fewer threads can be much faster: --learner-threads 1.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalCoordinator(Runner):
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False):
        super().__init__(cfg, run_dir, resume)
        self.evals = InProcessEvaluations(cfg.num_learners, cfg.probe_budget)
        # torch's threads before the workers set one: given back at the end (train() may run in a notebook), and
        # the update's unless --learner-threads says (torch's default is the cores; OMP_NUM_THREADS is honoured).
        self.caller_threads = torch.get_num_threads()
        self.update_threads = cfg.learner_threads or self.caller_threads
        self.learner_telemetry: list[LearnerTelemetry] = []     # each learner's /metrics, as a LearnerWorker's

    # ------------------------------------------------------------ lifecycle
    def _start_processes(self) -> None:
        """The learners and rollout workers, as plain objects (workers seeded as the Coordinator seeds its actors)."""
        cfg = self.cfg
        obs_shape, obs_dtype, num_actions = env_spec(cfg)
        self.learners = [Learner(cfg, i, obs_shape, obs_dtype, num_actions, "cpu") for i in range(cfg.num_learners)]
        self.learner_telemetry = [LearnerTelemetry(cfg, i, "cpu") for i in range(cfg.num_learners)]
        self.learner_info = [{"id": i, "device": "cpu", "pid": os.getpid(), "metrics": t.endpoint()}
                             for i, t in enumerate(self.learner_telemetry)]
        self.actors = [[RolloutWorker(cfg, i, a, actor_seed(cfg, i, a, self.iteration), eval_seed(cfg, i))
                        for a in range(cfg.num_actors)] for i in range(cfg.num_learners)]
        log.info("local backend: %d learners and %d rollout workers in this process (pid %d); updates on %d threads",
                 cfg.num_learners, cfg.num_learners * cfg.num_actors, os.getpid(), self.update_threads)

    def _build_probe_set(self) -> ProbeSet:
        return self.evaluators[0].probe_set()

    def _stop_processes(self) -> None:
        for worker in [a for group in self.actors for a in group]:
            worker.close()
        for telemetry in self.learner_telemetry:
            telemetry.close()
        torch.set_num_threads(self.caller_threads)

    # ------------------------------------------------------------- the loop
    def _iteration(self) -> dict:
        """One iteration, the Coordinator's steps one after the other:

        1. the plan (learners/schedule.py): this iteration's shuffled minibatch order (the same for every learner),
           where the peers sync, the learning rate;
        2. each learner's weights, a copy versioned by optimizer step;
        3. each learner's rollout workers collect `num_steps` steps with them (with --policy-lag the next
           iteration's rollouts are collected next, with the same pre-update weights, as on Ray);
        4. every learner updates at once (_update: learners/reference.py's mdpo_update);
        5. env steps, episode returns and sync counts are added up, evaluations run when due, and the record
           that metrics.jsonl gets is returned.
        """
        cfg, it = self.cfg, self.iteration
        plan = IterationPlan.for_iteration(cfg, it)
        weights = [Weights.from_module(l.step, l.agent) for l in self.learners]
        rollouts, reports = self.next_rollouts or self._collect(weights)
        self.next_rollouts = None
        if cfg.policy_lag and it + 1 < cfg.num_iterations and self.stop_signal is None:
            self.next_rollouts = self._collect(weights)
        stats = self._update(plan, rollouts)
        self.iteration = it + 1
        self.book.observe([r for group in reports for r in group])    # one process, no restarts: the actors' states
        self._account(stats)
        if cfg.eval_every and self.iteration % cfg.eval_every == 0:
            self.evals.launch(self.evaluators, self.learners, time.perf_counter() - self.t_start)
        return self._record(stats)

    def _collect(self, weights: list[Weights]) -> tuple[list[list], list[list]]:
        """Every worker's next rollout and its report, per learner."""
        pairs = [[worker.collect(weights[i]) for worker in group] for i, group in enumerate(self.actors)]
        return [[r for r, _ in group] for group in pairs], [[rep for _, rep in group] for group in pairs]

    def _update(self, plan: IterationPlan, rollouts: list[list[Rollout]]) -> list[UpdateStats]:
        """Every learner's update of `plan` on its rollouts, at once, and its UpdateStats as a LearnerWorker reports
        them (update_seconds: the joint update's)."""
        cfg, learners = self.cfg, self.learners
        started, steps_before = time.perf_counter(), [l.step for l in learners]
        batches = [Batch.from_rollouts(r, cfg.gamma, cfg.gae_lambda) for r in rollouts]
        try:
            with torch_threads(self.update_threads):
                terms = mdpo_update([l.agent for l in learners], [l.optimizer for l in learners], batches, cfg, plan)
        except NonFiniteError as err:
            for telemetry in self.learner_telemetry:
                telemetry.record_nonfinite()
            raise TrainingDiverged(f"{err}. The last good checkpoint is kept in {self.ckpt_dir}.") from None
        seconds = time.perf_counter() - started
        stats = []
        for i, (learner, batch) in enumerate(zip(learners, batches)):
            learner.step += plan.update_epochs * plan.num_minibatches     # one Adam step per minibatch
            learner.iteration = plan.iteration + 1
            s = UpdateStats(learner_id=i, step=learner.step, iteration=learner.iteration,
                            samples=batch.size * plan.update_epochs, **terms[i],
                            explained_variance=ppo.explained_variance(batch.values, batch.returns),
                            learning_rate=plan.learning_rate, update_seconds=seconds, syncs=plan.sync_points())
            stats.append(s.with_rollouts(rollouts[i], steps_before[i]))
            self.learner_telemetry[i].record_update(stats[i], rollouts[i], started, steps_before[i])
        return stats

    # ------------------------------------------------------ checkpoints
    # LearnerWorker.state()'s format, so that either backend resumes the other's checkpoints. This process has one
    # torch RNG (nothing draws from it once the networks are built): every learner's file carries it.
    def _learner_states(self) -> list[bytes]:
        return [tensors_to_bytes({**l.state_dict(), "torch_rng": torch.get_rng_state()}) for l in self.learners]

    def _actor_states(self) -> list[list[dict]]:
        return [[worker.get_state() for worker in group] for group in self.actors]

    def _load_learner_states(self, states: list[bytes]) -> None:
        for learner, data in zip(self.learners, states):
            state = tensors_from_bytes(data)
            learner.load_state_dict(state)
            torch.set_rng_state(state["torch_rng"])

    def _load_actor_states(self, states: list[list[dict]]) -> None:
        for group, group_states in zip(self.actors, states):
            for worker, state in zip(group, group_states):
                worker.set_state(state)
