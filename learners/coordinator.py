"""The coordinator: starts actors and learners on Ray, runs the iteration loop, schedules syncs,
evaluates without blocking, checkpoints, and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray

from actors.rollout import Evaluator, RolloutWorker, env_spec
from learners.checkpoint import latest_checkpoint, save_checkpoint
from learners.config import TrainConfig
from learners.learner_worker import LearnerWorker
from learners.plots import plot_returns
from learners.schedule import IterationPlan

log = logging.getLogger("mdpo")


class RunStopped(Exception):
    """SIGINT/SIGTERM arrived; a final checkpoint was written."""


def connect_ray(cfg: TrainConfig) -> None:
    """Join the cluster at cfg.ray_address (or RAY_ADDRESS), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    needed = cfg.num_learners * (cfg.learner_cpus + cfg.num_actors * cfg.actor_cpus)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False, log_to_driver=True)


def summarize(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "mean": float(np.mean(values))}


class Coordinator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.learners: list = []
        self.actors: list[list] = []
        self.evaluators: list = []
        self.iteration = 0
        self.env_steps = [0] * cfg.num_learners
        self.returns = [deque(maxlen=cfg.return_window) for _ in range(cfg.num_learners)]
        self.last_eval: list[dict | None] = [None] * cfg.num_learners
        self.evals_in_flight: dict = {}
        self.sync_totals = {"syncs": 0, "seconds": 0.0, "bytes_sent": 0, "bytes_received": 0}
        self.wall_offset = 0.0
        self.stop_signal: int | None = None
        self.learner_info: list[dict] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        cfg.save(self.run_dir / "config.json")
        obs_shape, obs_dtype, num_actions = env_spec(cfg)
        connect_ray(cfg)
        resources = ray.cluster_resources()
        gpu = cfg.device != "cpu" and resources.get("GPU", 0) >= cfg.num_learners
        learner_opts = {"num_cpus": cfg.learner_cpus, "num_gpus": 1 if gpu else 0}
        if resources.get("learner", 0) >= cfg.num_learners:   # compose/KubeRay nodes advertise a learner slot
            learner_opts["resources"] = {"learner": 1}
        log.info("placing learners with %s", learner_opts)
        remote_learner = ray.remote(LearnerWorker)
        token = os.environ.get(cfg.grpc_token_env) or None     # read here, handed over, never stored
        self.learners = [remote_learner.options(**learner_opts).remote(cfg, i, obs_shape, obs_dtype, num_actions, token)
                         for i in range(cfg.num_learners)]
        self.learner_info = ray.get([l.info.remote() for l in self.learners])
        addresses = {info["id"]: info["address"] for info in self.learner_info}
        if cfg.distilling:
            ray.get([l.connect.remote(addresses) for l in self.learners])
        remote_actor = ray.remote(RolloutWorker).options(num_cpus=cfg.actor_cpus, max_restarts=3, max_task_retries=3)
        self.actors = [[remote_actor.remote(cfg, i, a, self._actor_seed(i, a)) for a in range(cfg.num_actors)]
                       for i in range(cfg.num_learners)]
        if cfg.eval_every:
            remote_eval = ray.remote(Evaluator).options(num_cpus=0)
            self.evaluators = [remote_eval.remote(cfg, i, self._eval_seed(i)) for i in range(cfg.num_learners)]
        if self.resume:
            self._restore()
        elif self.metrics_path.exists():
            self.metrics_path.unlink()

    def _actor_seed(self, learner: int, actor: int) -> int:
        # Shifted by the iteration so a resumed run does not replay the same episodes.
        return self.cfg.seed * 1_000_003 + learner * 1009 + actor * 17 + self.iteration

    def _eval_seed(self, learner: int) -> int:
        return 10**8 + self.cfg.seed * 1009 + learner   # disjoint from every training seed

    def shutdown(self) -> None:
        for learner in self.learners:
            try:
                ray.get(learner.stop.remote(), timeout=10)
            except Exception as err:  # a dead learner has nothing left to stop
                log.warning("learner stop failed: %s", err)
        for handle in [a for group in self.actors for a in group] + self.evaluators + self.learners:
            ray.kill(handle)
        self.learners, self.actors, self.evaluators = [], [], []

    # ------------------------------------------------------------- the loop
    def run(self, progress=None) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter() - self.wall_offset
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            while self.iteration < cfg.num_iterations and self.stop_signal is None:
                record = self._iteration()
                record["wall_seconds"] = time.perf_counter() - t_start
                record["env_steps_per_second"] = sum(self.env_steps) / record["wall_seconds"]
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if progress:
                    progress(record)
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.num_iterations:
                    self.checkpoint(time.perf_counter() - t_start)
            if self.stop_signal is not None:
                self.checkpoint(time.perf_counter() - t_start)
            else:
                self._final_eval()
            summary = self.write_outputs(time.perf_counter() - t_start)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stop_signal is not None:
            raise RunStopped(f"stopped by signal {self.stop_signal} at iteration {self.iteration}; checkpoint written")
        return summary

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:   # second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("signal %s: finishing iteration %d, then checkpointing and stopping", signum, self.iteration + 1)

    def _iteration(self) -> dict:
        cfg, it = self.cfg, self.iteration
        lr = cfg.learning_rate * (1 - it / cfg.num_iterations) if cfg.anneal_lr else cfg.learning_rate
        plan = IterationPlan(iteration=it, shuffle_seed=cfg.seed * 7919 + it, batch_size=cfg.batch_size,
                             num_minibatches=cfg.num_minibatches, update_epochs=cfg.update_epochs, sync=cfg.sync,
                             distill=cfg.distilling, learning_rate=lr)
        weights = [l.weights.remote() for l in self.learners]
        rollouts = [[a.collect.remote(weights[i]) for a in self.actors[i]] for i in range(cfg.num_learners)]
        stats = ray.get([l.update.remote(plan, *rollouts[i]) for i, l in enumerate(self.learners)])
        self.iteration = it + 1
        for i, s in enumerate(stats):
            self.env_steps[i] += s["env_steps"]
            self.returns[i].extend(s["episode_returns"])
            self.sync_totals["syncs"] += s["syncs"]
            self.sync_totals["seconds"] += s["sync_seconds"]
            self.sync_totals["bytes_sent"] += s["sync_bytes_sent"]
            self.sync_totals["bytes_received"] += s["sync_bytes_received"]
        self._poll_evals()
        if cfg.eval_every and self.iteration % cfg.eval_every == 0:
            self._launch_evals()
        return self._record(stats)

    def _record(self, stats: list[dict]) -> dict:
        learners = []
        for i, s in enumerate(stats):
            train = float(np.mean(self.returns[i])) if self.returns[i] else None
            test = self.last_eval[i]["test_return"] if self.last_eval[i] else None
            entry = {k: v for k, v in s.items() if k not in ("episode_returns", "episode_lengths", "sync_latencies")}
            entry.update(id=i, train_return=train, episodes=len(s["episode_returns"]), test_return=test,
                         test_weights_version=self.last_eval[i]["weights_version"] if self.last_eval[i] else None,
                         generalization_gap=None if train is None or test is None else train - test,
                         sync_latency=summarize(s["sync_latencies"]))
            learners.append(entry)
        return {"iteration": self.iteration, "env_steps": self.env_steps[0], "env_steps_total": sum(self.env_steps),
                "learners": learners}

    # ----------------------------------------------------------- evaluation
    def _launch_evals(self) -> None:
        for i, evaluator in enumerate(self.evaluators):
            if i not in self.evals_in_flight.values():
                self.evals_in_flight[evaluator.evaluate.remote(self.learners[i].weights.remote())] = i

    def _poll_evals(self, timeout: float = 0) -> None:
        if not self.evals_in_flight:
            return
        ready, _ = ray.wait(list(self.evals_in_flight), num_returns=len(self.evals_in_flight), timeout=timeout)
        for ref in ready:
            i = self.evals_in_flight.pop(ref)
            self.last_eval[i] = ray.get(ref)

    def _final_eval(self) -> None:
        """The summary's test return is that of the final weights: wait for one last evaluation."""
        if not self.evaluators:
            return
        self._poll_evals(timeout=600)          # let in-flight evaluations finish first
        self._launch_evals()
        self._poll_evals(timeout=600)

    # ------------------------------------------------------ checkpointing
    def checkpoint(self, wall_seconds: float) -> Path:
        learner_states = ray.get([l.state.remote() for l in self.learners])
        actor_states = [ray.get([a.get_state.remote() for a in group]) for group in self.actors]
        state = {"iteration": self.iteration, "env_steps": self.env_steps, "returns": [list(r) for r in self.returns],
                 "last_eval": self.last_eval, "sync_totals": self.sync_totals, "wall_seconds": wall_seconds,
                 "actors": actor_states}
        return save_checkpoint(self.ckpt_dir, self.iteration, learner_states, state, self.cfg.keep_checkpoints)

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no valid checkpoint under {self.ckpt_dir}: nothing to resume")
        if len(ckpt.learners) != self.cfg.num_learners:
            raise ValueError(f"{ckpt.path} holds {len(ckpt.learners)} learners, the config asks for {self.cfg.num_learners}")
        ray.get([l.load_state.remote(data) for l, data in zip(self.learners, ckpt.learners)])
        state = ckpt.state
        self.iteration = state["iteration"]
        self.env_steps = state["env_steps"]
        for window, values in zip(self.returns, state["returns"]):
            window.extend(values)
        self.last_eval = state["last_eval"]
        self.sync_totals = state["sync_totals"]
        self.wall_offset = state["wall_seconds"]
        ray.get([a.set_state.remote(s) for group, states in zip(self.actors, state["actors"])
                 for a, s in zip(group, states)])
        # Metrics past the checkpoint would be counted twice: keep only what the checkpoint covers.
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= self.iteration]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        log.info("resumed from %s at iteration %d (%d env steps per agent)", ckpt.path, self.iteration, self.env_steps[0])

    # ------------------------------------------------------------- outputs
    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_outputs(self, wall_seconds: float) -> dict:
        cfg, records = self.cfg, self.records()
        if records:
            plot_returns(records, self.run_dir / "returns.png", title=f"{cfg.env_id}  alpha={cfg.alpha}  {cfg.distill_mode}")
        summary = {
            "env_id": cfg.env_id, "env_steps": {"total": sum(self.env_steps), "per_agent": self.env_steps},
            "wall_seconds": wall_seconds, "env_steps_per_second": sum(self.env_steps) / max(wall_seconds, 1e-9),
            "iterations": self.iteration, "syncs": self.sync_totals["syncs"],
            "sync_seconds_total": self.sync_totals["seconds"], "sync_bytes_sent": self.sync_totals["bytes_sent"],
            "sync_bytes_received": self.sync_totals["bytes_received"], "distill_mode": cfg.distill_mode,
            "alpha": cfg.alpha, "sync": cfg.sync, "completed": self.iteration >= cfg.num_iterations,
            "learners": [
                {"id": i, "device": self.learner_info[i]["device"] if self.learner_info else "unknown",
                 "final_train_return": float(np.mean(self.returns[i])) if self.returns[i] else None,
                 "final_test_return": self.last_eval[i]["test_return"] if self.last_eval[i] else None,
                 "final_test_weights_version": self.last_eval[i]["weights_version"] if self.last_eval[i] else None}
                for i in range(cfg.num_learners)],
        }
        for entry in summary["learners"]:
            train, test = entry["final_train_return"], entry["final_test_return"]
            entry["generalization_gap"] = None if train is None or test is None else train - test
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
