"""One training run, whichever backend runs its roles: the iteration loop, Ctrl-C, checkpoints and the rollback to
them, and the run directory's outputs (metrics.jsonl, TensorBoard, summary.json, returns.png).

Two backends subclass Runner: the Coordinator (learners/coordinator/loop.py) runs the learners and rollout actors
as Ray actors; the LocalCoordinator (learners/local.py) runs them as plain objects in this process. A backend starts
and stops them (`_start_processes`, `_stop_processes`), runs one iteration (`_iteration`), builds the probe set,
and moves learner and actor states in and out of checkpoints; the errors it recovers from are its `RECOVERABLE`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from pathlib import Path

from learners.checkpoint import latest_checkpoint, save_checkpoint
from learners.config import TrainConfig
from learners.coordinator.actors import ActorBook
from learners.coordinator.evaluations import Evaluations, load_probe_set
from learners.coordinator.failures import HangBounds, RunStopped
from learners.coordinator.outputs import MetricsLog, iteration_record, learner_summary, write_summary
from learners.coordinator.plots import plot_returns
from learners.records import ProbeSet, UpdateStats
from learners.telemetry.coordinator import CoordinatorTelemetry, RunProgress
from learners.telemetry.metrics import with_run_id

log = logging.getLogger("mdpo")


class Runner:
    RECOVERABLE: tuple[type[BaseException], ...] = ()     # errors of an iteration that `_recover` rolls back from

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
        self.book = ActorBook(cfg.num_learners, cfg.num_actors)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        cfg.save(self.run_dir / "config.json")
        resume_from = self._latest_checkpoint() if self.resume else None
        # Rollout actors are seeded by the iteration they start at (schedule.actor_seed): a resumed run's actors
        # start at the checkpoint's, so it does not replay the episodes of the run's start.
        self.iteration = resume_from.state["iteration"] if resume_from else 0
        self._start_processes()
        if cfg.eval_every and cfg.probe_states:   # the same states at every evaluation, resumed runs included
            self.evals.use_probe(load_probe_set(self.run_dir, self._build_probe_set))
        if self.resume:
            self._restore(resume_from)
        else:
            self.metrics.start()
            self.checkpoint(0.0)    # iteration 0: every failure has a checkpoint to roll back to
        self.telemetry.attach(self.progress())   # serve /metrics, write the Prometheus targets files

    def progress(self) -> RunProgress:
        return RunProgress(self.iteration, list(self.env_steps), self.failures,
                           [info.get("metrics") or {} for info in self.learner_info],
                           [a for group in self.actors for a in group], len(self.evaluators), self.hangs)

    @property
    def evaluators(self) -> list:
        """Per learner, the rollout actor that hosts its Evaluator (actor 0); none when evaluation is off."""
        return [group[0] for group in self.actors] if self.cfg.eval_every else []

    def shutdown(self) -> None:
        self._stop_processes()
        self.learners, self.actors = [], []
        self.metrics.close()
        self.telemetry.close(clean=self.stop_signal is not None or self.iteration >= self.cfg.num_iterations
                             or self.error is not None)

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
                except self.RECOVERABLE as err:
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

    def _account(self, stats: list[UpdateStats]) -> None:
        """An iteration's updates into the run's totals: env steps, episode returns, sync traffic."""
        for i, s in enumerate(stats):
            self.env_steps[i] += s.env_steps
            self.returns[i].extend(s.episode_returns)
            self.sync_totals["syncs"] += s.syncs
            self.sync_totals["seconds"] += s.sync_seconds
            self.sync_totals["bytes_sent"] += s.sync_bytes_sent
            self.sync_totals["bytes_received"] += s.sync_bytes_received

    def _record(self, stats: list[UpdateStats]) -> dict:
        return iteration_record(self.iteration, self.env_steps, stats, self.returns, self.evals.last,
                                self.book.restarts, self.evals.take_measured())

    # ------------------------------------------------------ what a backend does
    def _start_processes(self) -> None:
        """Start the learners and rollout actors; fill in self.learners, self.actors, self.learner_info."""
        raise NotImplementedError

    def _stop_processes(self) -> None:
        raise NotImplementedError

    def _iteration(self) -> dict:
        """One iteration: rollouts, every learner's update, evaluations; returns its metrics.jsonl record."""
        raise NotImplementedError

    def _build_probe_set(self) -> ProbeSet:
        raise NotImplementedError

    def _recover(self, err: BaseException) -> None:
        """Roll the run back to its latest checkpoint after a RECOVERABLE error."""
        raise err

    def _learner_states(self) -> list[bytes]:
        """Each learner's checkpoint file (LearnerWorker.state's bytes)."""
        raise NotImplementedError

    def _actor_states(self) -> list[list[dict]]:
        """Each rollout actor's RolloutWorker.get_state(), per learner."""
        raise NotImplementedError

    def _load_learner_states(self, states: list[bytes]) -> None:
        raise NotImplementedError

    def _load_actor_states(self, states: list[list[dict]]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------ checkpointing
    def checkpoint(self, wall_seconds: float) -> None:
        learner_states = self._learner_states()
        # Each actor's state after the last rollout a learner consumed, from its ActorReport: no call to the actors
        # (a hung one cannot hold up the checkpoint), and with the policy lag exactly what the counted rollouts left
        # (the one in flight is redone on resume). Only the fresh actors of iteration 0 are asked.
        actor_states = self.book.states if self.iteration else self._actor_states()
        state = {"iteration": self.iteration, "env_steps": self.env_steps, "returns": [list(r) for r in self.returns],
                 "last_eval": self.evals.last, "sync_totals": self.sync_totals, "wall_seconds": wall_seconds,
                 "actors": actor_states, "actor_restarts": self.book.restarts, "failures": self.failures, "hangs": self.hangs}
        save_checkpoint(self.ckpt_dir, self.iteration, learner_states, state, self.cfg.keep_checkpoints)
        self.metrics.commit(self.iteration)

    def _latest_checkpoint(self):
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no valid checkpoint under {self.ckpt_dir}: nothing to resume")
        return ckpt

    def _restore(self, ckpt=None) -> None:
        """Back to `ckpt` (else the latest good checkpoint): the learners, the counters, the actors' state."""
        self.next_rollouts = None     # collected for weights the restored learners no longer have
        ckpt = ckpt or self._latest_checkpoint()
        if len(ckpt.learners) != self.cfg.num_learners:
            raise ValueError(f"{ckpt.path} holds {len(ckpt.learners)} learners, the config asks for {self.cfg.num_learners}")
        self._load_learner_states(ckpt.learners)
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
        self._load_actor_states(state["actors"])
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
