"""The coordinator on Ray: starts the learners and rollout actors as Ray actors, runs each iteration through them
(rollouts and updates in parallel, evaluations without blocking), and recovers from a dead or hung process by
restarting it and rolling the run back to its latest checkpoint. The loop itself, checkpoints and the run
directory's outputs are the Runner's (learners/coordinator/runner.py), shared with the local backend.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from actors.rollout import env_spec, remote_rollout_worker
from learners.config import TrainConfig
from learners.coordinator.cluster import connect_ray, learner_placement, rollout_placement
from learners.coordinator.failures import (HangDetected, TrainingDiverged, await_rollouts, is_hang, is_process_failure,
                                           wait_all)
from learners.coordinator.runner import Runner
from learners.peer.security import channel_token
from learners.learner import NonFiniteError
from learners.learner_worker import LearnerWorker
from learners.records import UpdateStats
from learners.schedule import IterationPlan, actor_seed, eval_seed

log = logging.getLogger("mdpo")


class Coordinator(Runner):
    RECOVERABLE = (ray.exceptions.RayError, HangDetected)

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False):
        super().__init__(cfg, run_dir, resume)
        self.owns_ray = False
        self._actor_placement: dict = {}   # set in start(): rollout_placement()

    # ------------------------------------------------------------ lifecycle
    def _start_processes(self) -> None:
        """The learners and rollout actors, as Ray actors."""
        cfg = self.cfg
        obs_shape, obs_dtype, num_actions = env_spec(cfg)
        self.owns_ray = connect_ray(cfg)
        learner_opts = learner_placement(cfg)
        log.info("placing learners with %s", learner_opts)
        self._learner_args = (learner_opts, obs_shape, obs_dtype, num_actions)
        self._start_learners()
        # A killed actor is restarted by Ray and its in-flight `collect` retried, so the lost rollout is
        # collected again; only rollouts that reach a learner are counted.
        self._actor_placement = rollout_placement()
        log.info("placing rollout actors and evaluators with %s", self._actor_placement or "no node constraint")
        self._remote_actor = remote_rollout_worker().options(
            num_cpus=cfg.actor_cpus, max_restarts=cfg.actor_max_restarts, max_task_retries=cfg.actor_max_restarts,
            **self._actor_placement)
        self.actors = [[self._new_actor(i, a) for a in range(cfg.num_actors)] for i in range(cfg.num_learners)]

    def _build_probe_set(self):
        """Built by the first evaluator's process (the driver would otherwise load Procgen's assets, ~350 MB)."""
        return self._get([self.evaluators[0].probe_set.remote()], "probe set")[0]

    def _start_learners(self) -> None:
        learner_opts, obs_shape, obs_dtype, num_actions = self._learner_args
        token = channel_token(self.cfg)     # read here, handed over, never stored
        # Threads: control calls (state, stop) are not stuck behind an update; each actor's inference call waits in one,
        # and the peers' frames are taken in while it updates.
        threads = 2 + (self.cfg.num_learners - 1) + self.cfg.num_actors * (self.cfg.inference != "actor")
        remote_learner = ray.remote(LearnerWorker).options(**learner_opts, max_concurrency=threads)
        self.learners = [remote_learner.remote(self.cfg, i, obs_shape, obs_dtype, num_actions, token)
                         for i in range(self.cfg.num_learners)]
        self.learner_info = wait_all([l.info.remote() for l in self.learners], self.hang_bounds.startup_seconds,
                                     "learner start-up")
        addresses = {info["id"]: info["address"] for info in self.learner_info}
        for info in self.learner_info:
            log.info("learner %d: gRPC %s, device %s, pid %d, inference on the %s", info["id"], info["address"],
                     info["device"], info["pid"], info["inference"])
        if self.cfg.distilling:
            wait_all([l.connect.remote(addresses) for l in self.learners], self.hang_bounds.startup_seconds, "learner connect")

    def _new_actor(self, learner: int, actor: int):
        return self._remote_actor.remote(self.cfg, learner, actor, actor_seed(self.cfg, learner, actor, self.iteration),
                                         eval_seed(self.cfg, learner))

    def shutdown(self) -> None:
        super().shutdown()
        if self.owns_ray:
            ray.shutdown()

    def _stop_processes(self) -> None:
        for learner in self.learners:
            try:
                ray.get(learner.stop.remote(), timeout=10)
            except Exception as err:  # a dead learner has nothing left to stop
                log.warning("learner stop failed: %s", err)
        for handle in [a for group in self.actors for a in group] + self.learners:
            ray.kill(handle)

    # ------------------------------------------------------------- the loop
    def _iteration(self) -> dict:
        """One iteration, as a newcomer can follow it through the code:

        1. the plan (learners/schedule.py): this iteration's shuffled minibatch order (the same for every learner),
           where the peers sync, the learning rate;
        2. each learner's latest weights, as an object-store reference versioned by optimizer step (or, with
           learner-served inference, just that version: the learner runs its actors' policy itself);
        3. each learner's rollout actors collect `num_steps` steps with those weights (actors/rollout.py); the
           rollout references go straight to their learner, the driver never touches the frames; the driver waits
           until all are there, within the hang bound (learners/coordinator/failures.py: a hung actor is killed,
           Ray restarts it and it collects again);
        4. every learner updates at once (learners/learner.py): PPO epochs over its rollouts, meeting its peers at
           the plan's sync points over gRPC (learners/peer/) for the distillation term: each learner is handed its
           peers' rollouts too, so only rows and logits cross the wire; a learner past the bound
           is hung (HangDetected) and the run rolls back as for a kill (_recover);
        5. the driver adds up env steps, episode returns and sync traffic, polls finished evaluations and starts
           new ones (actors/evaluator.py, never blocking), and returns the record that metrics.jsonl gets.
        """
        cfg, it = self.cfg, self.iteration
        plan = IterationPlan.for_iteration(cfg, it)
        weights = [l.policy.remote() for l in self.learners]
        # With the policy lag this iteration's rollouts were launched during the previous update.
        rollouts, reports = self.next_rollouts or self._collect(weights)
        self.next_rollouts = None
        await_rollouts(weights, rollouts, self.hang_bounds.seconds, self._kill_hung_actor)
        if cfg.policy_lag and it + 1 < cfg.num_iterations and self.stop_signal is None:
            # The next iteration's rollouts, collected with these pre-update weights while the learners update (the
            # learners take calls concurrently, so the weights had to be taken, above, before the update is sent).
            self.next_rollouts = self._collect(weights)
        # Each learner holds its peers' frames of the iteration (object-store references, resolved in its process):
        # a sync then sends rows and logits, never frames.
        held = [l.hold_peer_frames.remote(it, p, *rollouts[p]) for i, l in enumerate(self.learners)
                for p in range(cfg.num_learners) if p != i and cfg.distilling]
        updates = [l.update.remote(plan, *rollouts[i]) for i, l in enumerate(self.learners)]
        stats: list[UpdateStats] = self._get(updates + held, "learner updates")[:len(updates)]
        for learner in self.learners if held else []:     # no peer asks for them any more: Ray may free them
            learner.release_peer_frames.remote(it)
        self.iteration = it + 1
        for i, a, state in self.book.observe(self._get([r for group in reports for r in group], "actor reports")):
            self.actors[i][a].set_state.remote(state)
        self._account(stats)
        self.evals.poll()
        if cfg.eval_every and self.iteration % cfg.eval_every == 0:
            self.evals.launch(self.evaluators, self.learners, time.perf_counter() - self.t_start)
        return self._record(stats)

    def _kill_hung_actor(self, learner: int, actor: int, waited_s: float) -> None:
        self.hangs += 1
        log.error("rollout actor %d/%d hung: no rollout within %.0fs; killing it (Ray restarts it and collects again)",
                  learner, actor, waited_s)
        ray.kill(self.actors[learner][actor], no_restart=False)

    def _get(self, refs: list, what: str) -> list:
        """ray.get of control calls and small results, within the hang bound."""
        return wait_all(refs, self.hang_bounds.seconds, what)

    def _collect(self, weights: list) -> tuple[list[list], list[list]]:
        """Every actor's next rollout (for its learner) and its own report (for me), as Ray references."""
        refs = [[a.collect.remote(weights[i], learner) for a in self.actors[i]] for i, learner in enumerate(self.learners)]
        return [[r for r, _ in group] for group in refs], [[rep for _, rep in group] for group in refs]

    # ------------------------------------------------------------ failures
    def _recover(self, err: Exception) -> None:
        """A learner or actor failed mid-iteration: restart the dead parts and roll the whole pair back to the
        latest good checkpoint, so the iterations since are redone and nothing is counted twice. A failure during
        the restart is one more failure, recovered from the same way."""
        while True:
            self._count_failure(err)
            try:
                return self._restart()
            except (ray.exceptions.RayError, HangDetected) as again:
                err = again

    def _count_failure(self, err: Exception) -> None:
        """Raise unless `err` is a process failure the run may still recover from; else count and log it."""
        cause = getattr(err, "cause", None)
        if isinstance(cause, NonFiniteError):
            raise TrainingDiverged(f"{cause}. The last good checkpoint is kept in {self.ckpt_dir}.") from None
        if not is_process_failure(err):
            raise err    # a bug or bad input, not a dead process: retrying would fail the same way
        self.failures += 1
        self.hangs += (hung := is_hang(err))
        log.error("iteration %d failed (%s%s: %s); failure %d of at most %d: restarting learners from the latest "
                  "checkpoint", self.iteration + 1, "hang, " if hung else "", type(cause or err).__name__,
                  str(cause or err).splitlines()[0][:300], self.failures, self.cfg.max_failures)
        if self.failures > self.cfg.max_failures:
            raise RuntimeError(f"giving up after {self.failures} failures; last: {err}") from err

    def _restart(self) -> None:
        for learner in self.learners:
            ray.kill(learner, no_restart=True)      # SIGKILL: a frozen (hung) process goes too
        for i, group in enumerate(self.actors):
            for a, actor in enumerate(group):
                try:
                    ray.get(actor.ping.remote(), timeout=self.hang_bounds.seconds)
                except ray.exceptions.RayError as gone:     # GetTimeoutError too: a hung actor
                    log.warning("rollout actor %d/%d is gone or hung (%s): starting a new one", i, a,
                                type(gone).__name__)
                    ray.kill(actor, no_restart=True)
                    group[a] = self._new_actor(i, a)
        self.hang_bounds.reset()                    # new processes: the start-up bound again
        self._start_learners()
        self.evals.reset()
        self._restore()

    # ------------------------------------------------------ checkpoints
    def _learner_states(self) -> list[bytes]:
        """Each learner's checkpoint file: LearnerWorker.state()."""
        return self._get([l.state.remote() for l in self.learners], "learner state")

    def _actor_states(self) -> list[list[dict]]:
        return [self._get([a.get_state.remote() for a in group], "actor state") for group in self.actors]

    def _load_learner_states(self, states: list[bytes]) -> None:
        self._get([l.load_state.remote(data) for l, data in zip(self.learners, states)], "learner restore")

    def _load_actor_states(self, states: list[list[dict]]) -> None:
        self._get([a.set_state.remote(s) for group, group_states in zip(self.actors, states)
                   for a, s in zip(group, group_states)], "actor restore")
