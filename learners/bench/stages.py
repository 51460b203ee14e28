"""`mdpo bench`'s stage measurements, each run inside the Ray process it measures (same CPU reservation and
thread counts as in training): one actor's env and rollout actor, then the learners (every sync schedule, exact
mode beside detached, PPO only, the forward pass), in interleaved rounds. The figures are defined in
learners/bench/measure.py's docstring."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.rollout import RolloutWorker, env_spec, remote_rollout_worker
from learners.bench.memory import MemorySampler
from learners.bench.synthetic import synthetic_rollout
from learners.config import TrainConfig, preset
from learners.learner_worker import LearnerWorker
from learners.model import make_agent
from learners.peer.wire import chunk_rows
from learners.records import Weights
from learners.schedule import IterationPlan


@dataclass(frozen=True)
class BenchSize:
    preset: str
    overrides: dict
    iterations: int              # end-to-end iterations per measured run (the first is warm-up)
    scaling_iterations: int
    learner_reps: int            # timed updates per sync schedule (after one warm-up)
    stage_seconds: float         # minimum timed seconds of the env and actor stages
    learner_minibatches: int = 0  # >0: synthetic batch of this many (full-size) minibatches instead of the whole batch
    actor_steps: int = 0          # >0: rollouts of this many steps in the actor stage (the rate does not depend on it)


def _best_rate(measure, min_seconds: float, min_reps: int = 3) -> float:
    """Highest rate over repeated windows: a burst of load from elsewhere on the machine slows some windows,
    never speeds one up. `measure()` returns (units, seconds)."""
    best, t0, reps = 0.0, time.perf_counter(), 0
    while time.perf_counter() - t0 < min_seconds or reps < min_reps:
        units, seconds = measure()
        best, reps = max(best, units / seconds), reps + 1
    return best


def _probe_env_rate(worker: RolloutWorker, min_seconds: float) -> float:
    env = worker.env
    env.step(env.action_space.sample())

    def window(steps: int = 20):
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(env.action_space.sample())
        return steps * env.num_envs, time.perf_counter() - t0

    return _best_rate(window, min_seconds)


def _probe_actor_rate(worker: RolloutWorker, weights: Weights, min_seconds: float) -> dict:
    worker.collect(weights)                                    # warm-up (and loads the weights)
    seconds = {"collect": 0.0, "inference": 0.0}     # sums only: a rollout is dropped once timed

    def window():
        rollout = worker.collect(weights)
        seconds["collect"] += rollout.collect_seconds
        seconds["inference"] += rollout.inference_seconds
        return rollout.env_steps, rollout.collect_seconds

    rate = _best_rate(window, min_seconds, min_reps=2)
    return {"env_steps_per_second": rate, "inference_fraction": seconds["inference"] / seconds["collect"]}


def _probe_update(worker: LearnerWorker, plan: IterationPlan, distill_mode: str) -> dict:
    """One update with `distill_mode` (every learner of the stage gets the same), so both objectives are measured
    side by side on the same learners and batch."""
    learner = worker.learner
    learner.cfg = dataclasses.replace(learner.cfg, distill_mode=distill_mode)
    if getattr(worker, "bench_rollout", None) is None:     # built in the learner's process: the driver stays lean
        worker.bench_rollout = synthetic_rollout(worker.id, learner.obs_shape, learner.obs_dtype, learner.num_actions,
                                                 worker.cfg.num_steps, worker.cfg.num_envs, seed=worker.id)
    stats = worker.update(plan, worker.bench_rollout)
    return {k: stats[k] for k in ("update_seconds", "sync_seconds", "sync_latencies", "syncs", "sync_bytes_sent",
                                  "sync_bytes_received", "samples")}


@torch.no_grad()
def _probe_forward(worker: LearnerWorker, rows: int) -> float:
    """Seconds for my network's forward pass over `rows` states, in the chunks a peer's request arrives in."""
    obs = worker.bench_rollout.obs.reshape(-1, *worker.bench_rollout.obs.shape[2:])
    step, done = chunk_rows(obs), 0
    t0 = time.perf_counter()
    while done < rows:
        n = min(step, rows - done, len(obs))
        worker.learner.agent.logits(torch.from_numpy(obs[:n]))
        done += n
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- stages
def measure_actor_stages(cfg: TrainConfig, spec: BenchSize, memory: MemorySampler) -> dict:
    """The env and actor bounds, in a first actor of a learner (the one that hosts its evaluator); then what one
    evaluation as the preset runs it, beside collection in that process, adds to the process's peak memory (the
    end-to-end runs train without evaluation, so this is added to their memory for a run of the preset)."""
    stage_cfg = dataclasses.replace(cfg, num_steps=spec.actor_steps or cfg.num_steps,
                                    eval_every=preset(spec.preset).eval_every or 1)
    obs_shape, obs_dtype, num_actions = env_spec(cfg)
    actor = remote_rollout_worker().options(num_cpus=cfg.actor_cpus).remote(
        stage_cfg, 0, 0, cfg.seed, 10**8)
    try:
        weights = Weights.from_module(0, make_agent(obs_shape, obs_dtype, num_actions))
        with memory.phase("actor"):
            actor_rate = ray.get(actor.__ray_call__.remote(_probe_actor_rate, weights, spec.stage_seconds))
            env_rate = ray.get(actor.__ray_call__.remote(_probe_env_rate, spec.stage_seconds))
            ray.get(actor.collect.remote(weights))           # the same work as below, without the evaluation
        with memory.phase("actor_evaluating"):
            pending = actor.evaluate.remote(weights)
            collects = 0
            while not collects or not ray.wait([pending], timeout=0)[0]:
                ray.get(actor.collect.remote(weights))
                collects += 1
            evaluation = ray.get(pending)
    finally:
        ray.kill(actor)
    pss = {phase: memory.summary(phase)["kinds"]["actor"]["peak_pss_bytes"] for phase in ("actor", "actor_evaluating")}
    return {"env": {"env_steps_per_second": env_rate, "envs": cfg.envs_per_actor},
            "actor": {**actor_rate, "envs": cfg.envs_per_actor, "steps_per_rollout": stage_cfg.num_steps},
            "evaluator": {"seconds": evaluation["seconds"], "episodes": len(evaluation["test_returns"]),
                          "env_steps": int(sum(evaluation["test_lengths"])), "collects_beside": collects,
                          "actor_peak_pss_bytes": pss["actor"], "evaluating_peak_pss_bytes": pss["actor_evaluating"],
                          "added_pss_bytes": pss["actor_evaluating"] - pss["actor"]}}


def sync_schedules(cfg: TrainConfig) -> list[str]:
    k = cfg.num_minibatches // 2
    return [cfg.sync] + [s for s in ("minibatch", str(k), "epoch", "iteration")
                         if s != cfg.sync and (not s.isdigit() or 1 < int(s) < cfg.num_minibatches)]


def _window_rows(plan: IterationPlan) -> int:
    """States sent to each peer per iteration under the plan's sync schedule."""
    total = 0
    for epoch in range(plan.update_epochs):
        perm = plan.permutation(epoch)
        total += sum(len(w) for j in range(plan.num_minibatches)
                     if (w := plan.sync_window(epoch, j, perm)) is not None)
    return total


def _both_done(updates: list[dict]) -> float:
    """The learners update side by side; an update is done when every one is."""
    return max(s["update_seconds"] for s in updates)


def measure_learners(cfg: TrainConfig, spec: BenchSize) -> dict:
    if spec.learner_minibatches:
        cfg = dataclasses.replace(cfg, num_steps=cfg.minibatch_size * spec.learner_minibatches // cfg.num_envs,
                                  num_minibatches=spec.learner_minibatches)
    obs_shape, obs_dtype, num_actions = env_spec(cfg)
    remote = ray.remote(LearnerWorker).options(num_cpus=cfg.learner_cpus, max_concurrency=2)
    learners = [remote.remote(cfg, i, obs_shape, obs_dtype, num_actions) for i in range(cfg.num_learners)]
    iteration = 0

    def run(sync: str, distill: bool = True, mode: str = "detached") -> list[dict]:
        nonlocal iteration
        plan = IterationPlan.for_iteration(cfg, iteration, sync=sync, distill=distill)
        iteration += 1
        return ray.get([l.__ray_call__.remote(_probe_update, plan, mode) for l in learners])

    # Exact mode (the paper preset's objective) needs a sync at every minibatch; it is measured beside detached
    # mode at that schedule, in the same rounds.
    exact = cfg.distilling
    try:
        infos = ray.get([l.info.remote() for l in learners])
        ray.get([l.connect.remote({i["id"]: i["address"] for i in infos}) for l in learners])
        run(cfg.sync)                                                   # warm-up: builds the synthetic batches
        if exact:
            run("minibatch", mode="exact")
        plan = IterationPlan(0, 0, cfg.batch_size, cfg.num_minibatches, cfg.update_epochs, cfg.sync, True, 0.0)
        rows = _window_rows(plan) * (cfg.num_learners - 1)
        # Interleaved rounds, every measurement in each: a slow spell on the machine hits all of them alike.
        by_sync: dict[str, list[list[dict]]] = {sync: [] for sync in sync_schedules(cfg)}
        ppo_reps, forward_reps, exact_reps = [], [], []
        for _ in range(spec.learner_reps):
            for sync, reps in by_sync.items():
                reps.append(run(sync))                                   # one entry per learner
            if exact:
                exact_reps.append(run("minibatch", mode="exact"))
            # The detached-mode budget: the PPO-only update plus a forward pass over the states peers send.
            ppo_reps.append(_both_done(run(cfg.sync, distill=False)))
            forward_reps.append(max(ray.get([l.__ray_call__.remote(_probe_forward, rows) for l in learners])))
        schedules = {}
        for sync, reps in by_sync.items():
            flat = [s for rep in reps for s in rep]
            latencies = [x for s in flat for x in s["sync_latencies"]]
            update, syncs = sum(s["update_seconds"] for s in flat), sum(s["syncs"] for s in flat)
            wall = min(_both_done(rep) for rep in reps)        # fastest repetition, as in _best_rate
            schedules[sync] = {
                "samples_per_second": flat[0]["samples"] / wall,
                "syncs_per_iteration": syncs / len(flat),
                "latency_p50_seconds": float(np.percentile(latencies, 50)),
                "latency_p99_seconds": float(np.percentile(latencies, 99)),
                "bytes_per_sync": sum(s["sync_bytes_sent"] + s["sync_bytes_received"] for s in flat) / syncs,
                "sync_fraction": sum(s["sync_seconds"] for s in flat) / update,
                "exchange_fraction": sum(latencies) / update,
                "update_seconds": wall,
            }
        ppo_only, forward = min(ppo_reps), min(forward_reps)
        detached = schedules[cfg.sync]
        detached_reps = [_both_done(rep) for rep in by_sync[cfg.sync]]
        exact_cost = _exact_cost(exact_reps, by_sync["minibatch"]) if exact else None
    finally:
        for l in learners:
            try:
                ray.get(l.stop.remote(), timeout=10)
            except ray.exceptions.RayError:
                pass          # already gone: nothing to stop
            ray.kill(l)
    rounds = [{"update_seconds": update, "ppo_only_seconds": ppo, "forward_seconds": fwd, "ratio": update / (ppo + fwd)}
              for update, ppo, fwd in zip(detached_reps, ppo_reps, forward_reps)]
    # The learner bound is that of the objective the preset trains with.
    own = exact_cost if cfg.distill_mode == "exact" and exact_cost else detached
    return {
        "exact_cost": exact_cost,
        "learner": {"samples_per_second": own["samples_per_second"], "learners": cfg.num_learners,
                    "batch": cfg.batch_size, "minibatch": cfg.minibatch_size, "epochs": cfg.update_epochs,
                    "microbatch": cfg.microbatch_size, "sync": cfg.sync, "distill_mode": cfg.distill_mode},
        "sync": schedules,
        "detached_cost": {"update_seconds": detached["update_seconds"], "ppo_only_seconds": ppo_only,
                          "forward_seconds": forward, "forward_rows": rows,
                          "ratio": float(np.median([r["ratio"] for r in rounds])), "rounds": rounds,
                          "best_ratio": detached["update_seconds"] / (ppo_only + forward)},
    }


# Exact mode also backpropagates through the peer's forward pass on my states: ~1.46x detached mode's compute at
# the paper shape, so an iteration should take that and little more (issue 12).
EXACT_TARGET_RATIO = 1.55


def _exact_cost(exact_reps: list[list[dict]], detached_reps: list[list[dict]]) -> dict:
    """Exact-mode update time against detached mode's at the same schedule (minibatch), round by round."""
    rounds = [{"exact_seconds": _both_done(e), "detached_seconds": _both_done(d),
               "ratio": _both_done(e) / _both_done(d)} for e, d in zip(exact_reps, detached_reps)]
    wall = min(r["exact_seconds"] for r in rounds)
    flat = [s for rep in exact_reps for s in rep]
    return {"ratio": float(np.median([r["ratio"] for r in rounds])), "rounds": rounds, "target": EXACT_TARGET_RATIO,
            "exact_seconds": wall, "detached_seconds": min(r["detached_seconds"] for r in rounds),
            "samples_per_second": flat[0]["samples"] / wall,
            "sync_fraction": sum(s["sync_seconds"] for s in flat) / sum(s["update_seconds"] for s in flat)}
