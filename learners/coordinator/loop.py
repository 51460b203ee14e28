"""The coordinator: starts actors and learners on Ray, runs the iteration loop, schedules syncs,
evaluates without blocking, checkpoints, and writes the run directory.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from pathlib import Path

import ray

from actors.rollout import env_spec, remote_rollout_worker
from learners.checkpoint import latest_checkpoint, save_checkpoint
from learners.config import TrainConfig
from learners.coordinator.actors import ActorBook
from learners.coordinator.cluster import connect_ray, learner_placement, rollout_placement
from learners.coordinator.evaluations import Evaluations, load_probe_set
from learners.coordinator.failures import (HangBounds, HangDetected, RunStopped, TrainingDiverged, await_rollouts,
                                           is_hang, is_process_failure, wait_all)
from learners.peer.security import channel_token
from learners.coordinator.outputs import MetricsLog, iteration_record, learner_summary, write_summary
from learners.learner import NonFiniteError
from learners.learner_worker import LearnerWorker
from learners.coordinator.plots import plot_returns
from learners.records import UpdateStats
from learners.schedule import IterationPlan, actor_seed, eval_seed
from learners.telemetry.coordinator import CoordinatorTelemetry, RunProgress
from learners.telemetry.metrics import with_run_id

log = logging.getLogger("mdpo")


class Coordinator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.cfg = with_run_id(cfg, self.run_dir)      # the run_id label of every Prometheus metric of the run
        self.telemetry = CoordinatorTelemetry(self.cfg, self.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir, self.cfg)    # metrics.jsonl, TensorBoard, --track trackers
        self.learners: list = []
        self.actors: list[list] = []
        self.iteration = 0
        self.env_steps = [0] * cfg.num_learners
        self.returns = [deque(maxlen=cfg.return_window) for _ in range(cfg.num_learners)]
        self.evals = Evaluations(cfg.num_learners, cfg.probe_budget)
        self.sync_totals = {"syncs": 0, "seconds": 0.0, "bytes_sent": 0, "bytes_received": 0}
        self.wall_offset = 0.0
        self.stop_signal: int | None = None
        self.learner_info: list[dict] = []
        self.failures = 0
        self.hangs = 0                # processes found hung and replaced
        self.hang_bounds = HangBounds(cfg.hang_timeout_s, cfg.hang_floor_s)
        self.error: BaseException | None = None      # what ended the run, if an error did
        self.next_rollouts: list[list] | None = None   # policy lag: the next iteration's rollouts, being collected
        self.owns_ray = False
        self._actor_placement: dict = {}   # set in start(): rollout_placement()
        self.book = ActorBook(cfg.num_learners, cfg.num_actors)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        cfg.save(self.run_dir / "config.json")
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
        if cfg.eval_every and cfg.probe_states:   # the same states at every evaluation, resumed runs included
            self.evals.use_probe(load_probe_set(self.run_dir, self.evaluators[0], self._get))
        if self.resume:
            self._restore()
        else:
            self.metrics.start()
            self.checkpoint(0.0)    # iteration 0: every failure has a checkpoint to roll back to
        self.telemetry.attach(self.progress())   # serve /metrics, write the Prometheus targets files

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

    def progress(self) -> RunProgress:
        return RunProgress(self.iteration, list(self.env_steps), self.failures,
                           [info.get("metrics") or {} for info in self.learner_info],
                           [a for group in self.actors for a in group], len(self.evaluators), self.hangs)

    @property
    def evaluators(self) -> list:
        """Per learner, the rollout actor that hosts its Evaluator (actor 0); none when evaluation is off."""
        return [group[0] for group in self.actors] if self.cfg.eval_every else []

    def shutdown(self) -> None:
        for learner in self.learners:
            try:
                ray.get(learner.stop.remote(), timeout=10)
            except Exception as err:  # a dead learner has nothing left to stop
                log.warning("learner stop failed: %s", err)
        for handle in [a for group in self.actors for a in group] + self.learners:
            ray.kill(handle)
        self.learners, self.actors = [], []
        self.metrics.close()
        self.telemetry.close(clean=self.stop_signal is not None or self.iteration >= self.cfg.num_iterations
                             or self.error is not None)
        if self.owns_ray:
            ray.shutdown()

    # ------------------------------------------------------------- the loop
    def run(self, progress=None) -> dict:
        cfg = self.cfg
        t_start = self.t_start = time.perf_counter() - self.wall_offset
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            while self.iteration < cfg.num_iterations and self.stop_signal is None:
                try:
                    self._step(t_start, progress)
                except (ray.exceptions.RayError, HangDetected) as err:
                    self._recover(err)
            if self.stop_signal is not None:
                self.checkpoint(time.perf_counter() - t_start)
            else:
                self.evals.final(self.evaluators, self.learners, time.perf_counter() - t_start)
            summary = self.write_outputs(time.perf_counter() - t_start)
        except Exception as err:      # the run ends here: summary.json says how far it got and why
            self.error = err
            self.write_outputs(time.perf_counter() - t_start)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stop_signal is not None:
            raise RunStopped(f"stopped by signal {self.stop_signal} at iteration {self.iteration}; checkpoint written")
        return summary

    def _step(self, t_start: float, progress) -> None:
        """One iteration, its record (metrics.jsonl, telemetry, progress bar) and, when due, a checkpoint."""
        t0 = time.perf_counter()
        record = self._iteration()
        self.hang_bounds.observe(time.perf_counter() - t0)
        record["wall_seconds"] = time.perf_counter() - t_start
        record["env_steps_per_second"] = sum(self.env_steps) / record["wall_seconds"]
        self.metrics.append(record)
        self.telemetry.on_iteration(self.progress(), record)
        if progress:
            progress(record)
        if self.iteration % self.cfg.checkpoint_every == 0 or self.iteration == self.cfg.num_iterations:
            self.checkpoint(time.perf_counter() - t_start)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:   # second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("signal %s: finishing iteration %d, then checkpointing and stopping", signum, self.iteration + 1)

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
        self.iteration = it + 1
        for i, a, state in self.book.observe(self._get([r for group in reports for r in group], "actor reports")):
            self.actors[i][a].set_state.remote(state)
        for i, s in enumerate(stats):
            self.env_steps[i] += s.env_steps
            self.returns[i].extend(s.episode_returns)
            self.sync_totals["syncs"] += s.syncs
            self.sync_totals["seconds"] += s.sync_seconds
            self.sync_totals["bytes_sent"] += s.sync_bytes_sent
            self.sync_totals["bytes_received"] += s.sync_bytes_received
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

    def _record(self, stats: list[UpdateStats]) -> dict:
        return iteration_record(self.iteration, self.env_steps, stats, self.returns, self.evals.last,
                                self.book.restarts, self.evals.take_measured())

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

    # ------------------------------------------------------ checkpointing
    def checkpoint(self, wall_seconds: float) -> None:
        learner_states = self._get([l.state.remote() for l in self.learners], "learner state")
        # Each actor's state after the last rollout a learner consumed, from its ActorReport: no call to the actors
        # (a hung one cannot hold up the checkpoint), and with the policy lag exactly what the counted rollouts left
        # (the one in flight is redone on resume). Only the fresh actors of iteration 0 are asked.
        actor_states = (self.book.states if self.iteration else
                        [self._get([a.get_state.remote() for a in group], "actor state") for group in self.actors])
        state = {"iteration": self.iteration, "env_steps": self.env_steps, "returns": [list(r) for r in self.returns],
                 "last_eval": self.evals.last, "sync_totals": self.sync_totals, "wall_seconds": wall_seconds,
                 "actors": actor_states, "actor_restarts": self.book.restarts, "failures": self.failures, "hangs": self.hangs}
        save_checkpoint(self.ckpt_dir, self.iteration, learner_states, state, self.cfg.keep_checkpoints)
        self.metrics.commit(self.iteration)

    def _restore(self) -> None:
        self.next_rollouts = None     # collected for weights the restored learners no longer have
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no valid checkpoint under {self.ckpt_dir}: nothing to resume")
        if len(ckpt.learners) != self.cfg.num_learners:
            raise ValueError(f"{ckpt.path} holds {len(ckpt.learners)} learners, the config asks for {self.cfg.num_learners}")
        self._get([l.load_state.remote(data) for l, data in zip(self.learners, ckpt.learners)], "learner restore")
        state = ckpt.state
        self.iteration, self.env_steps = state["iteration"], state["env_steps"]
        self.evals.last = state["last_eval"]
        self.sync_totals = state["sync_totals"]
        self.wall_offset = state["wall_seconds"]
        self.book.restarts = state.get("actor_restarts", self.book.restarts)
        self.failures = max(self.failures, state.get("failures", 0))
        self.hangs = max(self.hangs, state.get("hangs", 0))
        self.returns = [deque(values, maxlen=self.cfg.return_window) for values in state["returns"]]
        self.book.states = state["actors"]
        self._get([a.set_state.remote(s) for group, states in zip(self.actors, state["actors"])
                   for a, s in zip(group, states)], "actor restore")
        self.metrics.truncate(self.iteration)
        log.info("resumed from %s at iteration %d (%d env steps per agent)", ckpt.path, self.iteration, self.env_steps[0])

    # ------------------------------------------------------------- outputs
    def write_outputs(self, wall_seconds: float) -> dict:
        cfg, records = self.cfg, self.metrics.records()
        if records:
            plot_returns(records, self.run_dir / "returns.png", title=f"{cfg.env_id}  alpha={cfg.alpha}  {cfg.distill_mode}")
        totals = self.sync_totals
        summary = write_summary(self.run_dir, {
            "env_id": cfg.env_id, "env_steps": {"total": sum(self.env_steps), "per_agent": self.env_steps},
            "wall_seconds": wall_seconds, "env_steps_per_second": sum(self.env_steps) / max(wall_seconds, 1e-9),
            "iterations": self.iteration, "syncs": totals["syncs"], "sync_seconds_total": totals["seconds"],
            "sync_bytes_sent": totals["bytes_sent"], "sync_bytes_received": totals["bytes_received"],
            "distill_mode": cfg.distill_mode, "alpha": cfg.alpha, "sync": cfg.sync,
            "completed": self.iteration >= cfg.num_iterations, "actor_restarts": sum(self.book.restarts),
            "failures_recovered": self.failures, "hangs_detected": self.hangs,
            **({"error": {"type": type(self.error).__name__, "message": str(self.error)[:2000]}} if self.error else {}),
            "learners": [learner_summary(i, self.learner_info[i]["device"] if self.learner_info else "unknown",
                                         self.returns[i], self.evals.last[i]) for i in range(cfg.num_learners)],
            **({"probe": self.evals.last_measured} if self.evals.last_measured else {})})
        self.metrics.end(summary)
        return summary
