"""`mdpo bench`'s learner stage: the learners of a run, on synthetic batches, timed update by update in
interleaved rounds: every sync schedule, exact mode beside detached mode, PPO alone, and the forward pass over the
states the peers send. Each probe runs inside the learner's own Ray process. The figures are defined in
learners/bench/measure.py's docstring."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import ray
import torch

from actors.rollout import env_spec
from learners.bench.stages import BenchSize
from learners.bench.synthetic import synthetic_rollout
from learners.bench.wire import transport_cost
from learners.config import TrainConfig
from learners.learner_worker import LearnerWorker
from learners.records import UpdateStats
from learners.schedule import IterationPlan


def _probe_update(worker: LearnerWorker, plan: IterationPlan, distill_mode: str) -> UpdateStats:
    """One update with `distill_mode` (every learner of the stage gets the same), so both objectives are measured
    side by side on the same learners and batch."""
    learner = worker.learner
    worker.cfg = learner.cfg = worker.endpoint.cfg = dataclasses.replace(learner.cfg, distill_mode=distill_mode)
    if getattr(worker, "bench_rollouts", None) is None:    # built in the learner's process: the driver stays lean
        # Every learner's batch, built from its id: mine to train on, my peers' to hold, as the coordinator hands
        # them over each iteration.
        worker.bench_rollouts = {i: synthetic_rollout(i, learner.obs_shape, learner.obs_dtype, learner.num_actions,
                                                      worker.cfg.num_steps, worker.cfg.num_envs, seed=i)
                                 for i in [worker.id, *worker.endpoint.peer_ids]}
    for peer in worker.endpoint.peer_ids:
        worker.hold_peer_frames(plan.iteration, peer, worker.bench_rollouts[peer])
    return worker.update(plan, worker.bench_rollouts[worker.id])


@torch.no_grad()
def _probe_forward(worker: LearnerWorker, rows: int) -> float:
    """Seconds for my network's forward pass over `rows` states, in the chunks a peer's logits stream back in."""
    rollout = worker.bench_rollouts[worker.id]
    obs = rollout.obs.reshape(-1, *rollout.obs.shape[2:])
    step, done = max(1, (worker.cfg.microbatch_size or worker.cfg.minibatch_size) // 2), 0
    t0 = time.perf_counter()
    while done < rows:
        n = min(step, rows - done, len(obs))
        worker.learner.agent.logits(torch.from_numpy(obs[:n]))
        done += n
    return time.perf_counter() - t0


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


def _both_done(updates: list[UpdateStats]) -> float:
    """The learners update side by side; an update is done when every one is."""
    return max(s.update_seconds for s in updates)


def _schedule_figures(reps: list[list[UpdateStats]]) -> dict:
    """One sync schedule's figures over its rounds (each round: one update per learner)."""
    flat = [s for rep in reps for s in rep]
    latencies = [x for s in flat for x in s.sync_latencies]
    update, syncs = sum(s.update_seconds for s in flat), sum(s.syncs for s in flat)
    wall = min(_both_done(rep) for rep in reps)        # fastest repetition, as in _best_rate
    return {
        "samples_per_second": flat[0].samples / wall,
        "syncs_per_iteration": syncs / len(flat),
        "latency_p50_seconds": float(np.percentile(latencies, 50)),
        "latency_p99_seconds": float(np.percentile(latencies, 99)),
        "bytes_per_sync": sum(s.sync_bytes_sent + s.sync_bytes_received for s in flat) / syncs,
        "sync_fraction": sum(s.sync_seconds for s in flat) / update,
        "exchange_fraction": sum(latencies) / update,
        "update_seconds": wall,
    }


def measure_learners(cfg: TrainConfig, spec: BenchSize) -> dict:
    if spec.learner_minibatches:
        cfg = dataclasses.replace(cfg, num_steps=cfg.minibatch_size * spec.learner_minibatches // cfg.num_envs,
                                  num_minibatches=spec.learner_minibatches)
    obs_shape, obs_dtype, num_actions = env_spec(cfg)
    remote = ray.remote(LearnerWorker).options(num_cpus=cfg.learner_cpus, max_concurrency=2)
    learners = [remote.remote(cfg, i, obs_shape, obs_dtype, num_actions) for i in range(cfg.num_learners)]
    iteration = 0

    def run(sync: str, distill: bool = True, mode: str = "detached") -> list[UpdateStats]:
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
        by_sync: dict[str, list[list[UpdateStats]]] = {sync: [] for sync in sync_schedules(cfg)}
        ppo_reps, forward_reps, exact_reps = [], [], []
        for _ in range(spec.learner_reps):
            for sync, reps in by_sync.items():
                reps.append(run(sync))                                   # one entry per learner
            if exact:
                exact_reps.append(run("minibatch", mode="exact"))
            # The detached-mode budget: the PPO-only update plus a forward pass over the states peers send.
            ppo_reps.append(_both_done(run(cfg.sync, distill=False)))
            forward_reps.append(max(ray.get([l.__ray_call__.remote(_probe_forward, rows) for l in learners])))
        held = ray.get([l.__ray_call__.remote(lambda w: w.endpoint.frames.nbytes) for l in learners])
    finally:
        for l in learners:
            try:
                ray.get(l.stop.remote(), timeout=10)
            except ray.exceptions.RayError:
                pass          # already gone: nothing to stop
            ray.kill(l)
    result = _learner_result(cfg, by_sync, exact_reps, ppo_reps, forward_reps, rows)
    result["wire"] = _wire_figures(cfg, obs_shape, num_actions, held, len(by_sync["minibatch"][0][0].sync_latencies))
    return result


def _wire_figures(cfg: TrainConfig, obs_shape: tuple, num_actions: int, held: list[int], syncs: int) -> dict:
    """A minibatch sync's transport, protocol v2 beside v1's frames (learners/bench/wire.py), per sync and per
    iteration, and the peers' frames each learner now holds instead (Ray moves them once an iteration, across nodes
    when the learners are on different ones)."""
    cost = transport_cost(obs_shape, cfg.minibatch_size, num_actions, exact=cfg.distill_mode == "exact")
    return {**cost, "syncs_per_iteration": syncs,
            "v2_seconds_per_iteration": cost["v2_rows_and_logits"]["seconds"] * syncs,
            "v1_seconds_per_iteration": cost["v1_frames"]["seconds"] * syncs,
            "peer_frames_held_bytes": max(held), "peer_frames_moved_bytes_per_iteration": max(held)}


def _learner_result(cfg: TrainConfig, by_sync: dict[str, list[list[UpdateStats]]], exact_reps: list,
                    ppo_reps: list[float], forward_reps: list[float], rows: int) -> dict:
    schedules = {sync: _schedule_figures(reps) for sync, reps in by_sync.items()}
    ppo_only, forward = min(ppo_reps), min(forward_reps)
    detached = schedules[cfg.sync]
    detached_reps = [_both_done(rep) for rep in by_sync[cfg.sync]]
    exact_cost = _exact_cost(exact_reps, by_sync["minibatch"]) if exact_reps else None
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


def _exact_cost(exact_reps: list[list[UpdateStats]], detached_reps: list[list[UpdateStats]]) -> dict:
    """Exact-mode update time against detached mode's at the same schedule (minibatch), round by round."""
    rounds = [{"exact_seconds": _both_done(e), "detached_seconds": _both_done(d),
               "ratio": _both_done(e) / _both_done(d)} for e, d in zip(exact_reps, detached_reps)]
    wall = min(r["exact_seconds"] for r in rounds)
    flat = [s for rep in exact_reps for s in rep]
    return {"ratio": float(np.median([r["ratio"] for r in rounds])), "rounds": rounds, "target": EXACT_TARGET_RATIO,
            "exact_seconds": wall, "detached_seconds": min(r["detached_seconds"] for r in rounds),
            "samples_per_second": flat[0].samples / wall,
            "sync_fraction": sum(s.sync_seconds for s in flat) / sum(s.update_seconds for s in flat)}
