"""`mdpo bench`: where the time goes, measured in one run on this machine, with the model and config of a real run.

Each stage is measured alone, in the same kind of Ray process it runs in during training (same CPU reservation and
thread counts): the env (one actor's vector env, random actions), one rollout actor (env + CPU inference), the
learners (all of them at once on a synthetic batch, PPO + distillation over real gRPC, for every sync schedule).
Then the real Coordinator trains for a fixed number of iterations (policy lag off and on, then 1..cores actors
per learner), while a sampler records the resident memory of every process by kind. Ray is started once.

A stage figure is the best of a few repetitions (a burst of load from elsewhere slows a repetition, never speeds one
up); an end-to-end figure is the steady rate over whole iterations, after the first (start-up).

Figures (all env-step rates count every agent's steps, like summary.json's env_steps_per_second):
- bound of a stage = the whole run's env steps/s if that stage were the only cost: actors = actor rate x number of
  actors (at most one per core), learners = per-learner samples/s x learners / update epochs;
- pipeline efficiency = end-to-end rate / the slowest stage's bound; when the stages share the same cores (a small
  machine) they cannot all run at full speed at once, so `shared_core_bound` (1 / sum of 1/bound) is also given;
- sync fraction = time a learner is blocked on peers / its update time; latency = one exchange, request to last row;
- detached cost ratio = update time with distillation / (the PPO-only update + one forward pass of the network
  over the states the peer sends per iteration), all learners running at once as in training; the median over
  rounds that measure all three back to back (the best of each, from different moments, is also given);
- exact cost ratio = exact-mode update time / detached-mode update time at sync minibatch, the same learners and
  batch, the median over the same rounds (target EXACT_TARGET_RATIO in learners/bench/learner_stage.py: exact mode's extra compute and little more).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from learners.bench.memory import MemorySampler, cpu_seconds_by_kind, own_peak_rss_bytes
from learners.bench.device_costs import measure_costs
from learners.bench.learner_stage import measure_learners
from learners.bench.stages import BenchSize, measure_actor_stages
from learners.config import TrainConfig, preset
from learners.coordinator.cluster import init_local_ray, run_cpus
from learners.coordinator.evaluations import probe_due
from learners.coordinator.loop import Coordinator

SIZES = {
    # CI: the smoke preset's shape, smaller still, the fewest iterations that give each figure; ~1.5 min on 2 cores.
    "tiny": BenchSize("smoke", dict(num_envs=4, num_steps=32), iterations=3, scaling_iterations=2, learner_reps=2,
                      stage_seconds=1.0),
    "smoke": BenchSize("smoke", {}, iterations=6, scaling_iterations=4, learner_reps=5, stage_seconds=3.0),
    # The paper preset's per-iteration shape (64 envs x 256 steps, 8 minibatches of 2048, 3 epochs). The learner stage uses
    # 2 of the 8 minibatches (same minibatch, epochs and schedules, so the same per-sample cost) and the actor stage
    # 32-step rollouts of the 64 envs; the end-to-end runs are full paper iterations.
    "paper": BenchSize("paper", {}, iterations=3, scaling_iterations=3, learner_reps=3, stage_seconds=5.0,
                       learner_minibatches=2, actor_steps=32),
}


def bench_config(size: str, env_id: str | None = None, **overrides) -> TrainConfig:
    spec = SIZES[size]
    cfg = dataclasses.replace(preset(spec.preset), **spec.overrides)
    # Training only: no evaluation, no intermediate checkpoints, no /metrics endpoints, no progress bar.
    cfg = dataclasses.replace(cfg, eval_every=0, checkpoint_every=10**6, metrics_port=-1, progress=False,
                              **({"env_id": env_id} if env_id else {}), **overrides)
    return cfg.validate()


def steady_rate(records: list[dict], policy_lag: bool) -> tuple[float, list[dict]]:
    """Env steps/s after the first iteration (process start-up, first collection). With the lag the last
    iteration has no next collection to overlap, so the window ends one earlier: it holds as many collections
    as updates either way."""
    last = len(records) - (1 if policy_lag else 0)
    if last < 2:
        raise ValueError(f"{len(records)} iterations are too few for a steady-state rate (policy_lag={policy_lag})")
    a, b = records[0], records[last - 1]
    rate = (b["env_steps_total"] - a["env_steps_total"]) / (b["wall_seconds"] - a["wall_seconds"])
    return rate, records[1:last]


def measure_end_to_end(cfg: TrainConfig, iterations: int, run_dir: Path, sampler: MemorySampler | None = None) -> dict:
    cfg = dataclasses.replace(cfg, total_steps=iterations * cfg.batch_size, run_dir=str(run_dir))
    coordinator = Coordinator(cfg, run_dir)
    cpu: dict[int, dict[str, float]] = {}          # iteration -> CPU seconds used so far, per process kind

    def snapshot(record: dict) -> None:
        used = cpu[record["iteration"]] = cpu_seconds_by_kind()
        used["driver"] -= sampler.cpu_seconds if sampler else 0.0     # the bench's own sampling is not the driver's

    try:
        coordinator.start()
        coordinator.run(snapshot)
    finally:
        coordinator.shutdown()
    records = coordinator.metrics.records()
    rate, steady = steady_rate(records, cfg.policy_lag)
    learners = [l for r in steady for l in r["learners"]]
    update = sum(l["update_seconds"] for l in learners)
    walls = [r["wall_seconds"] for r in records]
    start, end = records[0], steady[-1]
    used = {k: cpu[end["iteration"]][k] - cpu[start["iteration"]][k] for k in cpu[start["iteration"]]}
    steps, wall = end["env_steps_total"] - start["env_steps_total"], end["wall_seconds"] - start["wall_seconds"]
    return {"env_steps_per_second": rate, "iterations": len(records), "steady_iterations": len(steady),
            # What the steady iterations cost in CPU time (robust to other load on the machine), and how busy
            # they kept the machine's cores (below 1 on an idle machine: bubbles in the pipeline).
            "cpu_seconds_per_1000_steps": {k: 1000 * v / steps for k, v in used.items() if v > 0},
            "cpu_utilization": sum(used.values()) / (wall * (os.cpu_count() or 1)),
            "iteration_seconds": float(np.mean(np.diff(walls[:len(steady) + 1]))),
            "update_seconds": update / len(learners),
            "collect_seconds": float(np.mean([l["collect_seconds"] for l in learners])),
            "sync_fraction": sum(l["sync_seconds"] for l in learners) / update,
            # Of which blocked in the first optimizer step: mostly waiting for the peer to start its update.
            "sync_first_step_fraction": sum(l["sync_first_step_seconds"] for l in learners) / update,
            # The driver's TensorBoard writing (learners/coordinator/tensorboard.py), per iteration and as a share
            # of the iteration: it runs between iterations, on the loop's critical path.
            "tensorboard_seconds_per_iteration": coordinator.metrics.tensorboard.seconds / len(records),
            "tensorboard_fraction": coordinator.metrics.tensorboard.seconds / records[-1]["wall_seconds"],
            "policy_lag": cfg.policy_lag, "actors_per_learner": cfg.num_actors}


def _bounds(cfg: TrainConfig, stages: dict, cores: int) -> dict:
    actors = cfg.num_learners * cfg.num_actors
    parallel = min(actors, cores)          # actors use one core each (one torch thread, one Procgen thread)
    bounds = {"env": stages["env"]["env_steps_per_second"] * parallel,
              "actors": stages["actor"]["env_steps_per_second"] * parallel,
              "learners": stages["learner"]["samples_per_second"] * cfg.num_learners / cfg.update_epochs}
    slowest = min(bounds, key=bounds.get)
    return {**bounds, "slowest_stage": slowest, "bound": bounds[slowest],
            "shared_core_bound": 1.0 / (1.0 / bounds["actors"] + 1.0 / bounds["learners"])}


def _end_to_end(cfg: TrainConfig, iterations: int, tmp: Path, memory: MemorySampler, bounds: dict, say) -> dict:
    """Whole runs of the config, policy lag off and on, with their efficiency against the stage bounds."""
    e2e = {}
    for lag in (False, True):
        name = f"policy_lag_{'on' if lag else 'off'}"
        say(f"end to end: {iterations} iterations, {name}")
        with memory.phase(name):
            e2e[name] = measure_end_to_end(dataclasses.replace(cfg, policy_lag=lag), iterations, tmp / name, memory)
        e2e[name]["memory_total_pss_peak_bytes"] = memory.summary(name)["total_pss_peak_bytes"]
        e2e[name]["efficiency"] = e2e[name]["env_steps_per_second"] / bounds["bound"]
        e2e[name]["efficiency_vs_shared_cores"] = e2e[name]["env_steps_per_second"] / bounds["shared_core_bound"]
    return e2e


def _scaling(cfg: TrainConfig, spec, max_actors: int, tmp: Path, memory: MemorySampler, say) -> list[dict]:
    """Whole runs with 1..max_actors actors per learner (those that divide the envs; the config's own is known)."""
    out = []
    for k in range(1, max_actors + 1):
        if k == cfg.num_actors or cfg.num_envs % k:
            continue
        say(f"actor scaling: {k} actors per learner")
        with memory.phase(f"scaling_{k}"):
            run = measure_end_to_end(dataclasses.replace(cfg, num_actors=k), spec.scaling_iterations,
                                     tmp / f"scaling-{k}", memory)
        out.append({"actors_per_learner": k, "env_steps_per_second": run["env_steps_per_second"]})
    return out


def _memory(cfg: TrainConfig, spec, memory: MemorySampler, stages: dict, e2e: dict) -> dict:
    training = memory.summary("policy_lag_off", "policy_lag_on")
    stage_memory = memory.summary("actor", "actor_evaluating", "actor_probing", "stages")
    # The end-to-end runs do not evaluate; in a run of the preset the first actor of each learner also
    # evaluates it, which adds what the stage measured to that actor's peak (never less than nothing).
    evaluators = cfg.num_learners if preset(spec.preset).eval_every else 0
    added = max(0, stages["evaluator"]["added_pss_bytes"])
    # A run of the preset as configured: policy lag off (the default), plus its evaluation.
    default_run = e2e["policy_lag_off"]["memory_total_pss_peak_bytes"]
    return {"training": training, "stages": stage_memory, "evaluators": evaluators,
            "evaluation_added_bytes": evaluators * added, "run_total_bytes": default_run + evaluators * added,
            "bench_process_peak_rss_bytes": own_peak_rss_bytes(), "sampler_cpu_seconds": memory.cpu_seconds}


def probe_cost(run: TrainConfig, probe: dict, e2e: dict) -> dict:
    """What the live mechanism metrics cost a run of the preset (`run`): its wall time from the measured end-to-end
    rate (start-up left out), its evaluations, each measuring the probe set in every learner's evaluator for the
    stage's measured seconds, either at every evaluation or as --probe-budget lets them (the coordinator's rule)."""
    iteration_seconds = run.batch_size * run.num_learners / e2e["env_steps_per_second"]
    wall = run.num_iterations * iteration_seconds
    due = [k * run.eval_every * iteration_seconds for k in range(1, run.num_iterations // run.eval_every + 1)] + [wall]
    per_round = run.num_learners * probe["seconds"]
    spent, rounds = 0.0, 0
    for t in due:
        if probe_due(spent, per_round if rounds else 0.0, run.probe_budget, t):
            spent, rounds = spent + per_round, rounds + 1
    return {"states": probe["states"], "build_seconds": probe["build_seconds"], "seconds_per_agent": probe["seconds"],
            "run_wall_seconds": wall, "evaluations": len(due), "rounds_within_budget": rounds,
            "budget": run.probe_budget, "budgeted_fraction": spent / wall,
            "every_evaluation_fraction": len(due) * per_round / wall, "added_pss_bytes": probe["added_pss_bytes"]}


def device_cost_rows(cfg: TrainConfig, spec: BenchSize, stages: dict) -> dict:
    """learners/bench/device_costs.py's figures on this machine's devices (bf16 beside fp32, except at the tiny
    size), and what they mean for sizing: the rollout actor cores that keep one learner busy."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    precisions = ("fp32",) if spec is SIZES["tiny"] else ("fp32", "bf16")
    shape = dict(num_steps=cfg.minibatch_size * 2 // cfg.num_envs, num_minibatches=2, update_epochs=1)
    costs = [c for d in devices
             for c in measure_costs(dataclasses.replace(cfg, **shape, microbatch_size=cfg.microbatch_size
                                                        if d == "cpu" else 0), d, precisions,
                                    min_seconds=spec.stage_seconds / 2)]
    sizing = []
    for c in costs:
        if c.stage == "update":
            consumed = c.samples_per_second / cfg.update_epochs      # env steps/s one learner trains on
            sizing.append({"device": c.device, "precision": c.precision, "learner_env_steps_per_second": consumed,
                           "actor_cores_local_inference": consumed / stages["actor"]["env_steps_per_second"],
                           "actor_cores_served_inference": consumed / stages["env"]["env_steps_per_second"]})
    return {"rows": [dataclasses.asdict(c) for c in costs], "sizing": sizing}


def run_bench(size: str = "smoke", env_id: str | None = None, iterations: int | None = None,
              max_actors: int | None = None, scaling: bool = True, work_dir: str | None = None,
              log=print) -> dict:
    spec = SIZES[size]
    cfg = bench_config(size, env_id)
    cores = os.cpu_count() or 1
    max_actors = min(max_actors or cores, cores)
    iterations = iterations or spec.iterations
    t_start, load_before = time.perf_counter(), os.getloadavg()

    def say(message: str) -> None:
        log(f"[bench {time.perf_counter() - t_start:6.1f}s] {message}")

    needed = run_cpus(cfg, max(max_actors, cfg.num_actors))
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_local_ray(max(cores, math.ceil(needed)), log_to_driver=False)
    out: dict = {"size": size, "env_id": cfg.env_id,
                 "machine": {"cores": cores, "python": platform.python_version(), "torch": torch.__version__,
                             "ray": ray.__version__, "torch_threads_per_learner": cfg.learner_threads or
                             max(1, int(cfg.learner_cpus))},
                 "config": {k: getattr(cfg, k) for k in ("num_learners", "num_actors", "num_envs", "num_steps",
                                                         "num_minibatches", "update_epochs", "microbatch_size",
                                                         "sync", "distill_mode", "alpha", "actor_cpus",
                                                         "learner_cpus")}}
    try:
        with MemorySampler() as memory, tempfile.TemporaryDirectory(dir=work_dir, prefix="mdpo-bench-") as tmp:
            say(f"stage: env and actor ({cfg.envs_per_actor} envs), then an evaluation beside collection")
            stages = measure_actor_stages(cfg, spec, memory)
            with memory.phase("stages"):
                say("stage: learners (every sync schedule, PPO only, forward passes)")
                learner = measure_learners(cfg, spec)
            stages["learner"] = learner.pop("learner")
            say("stage: per-sample costs by device and precision")
            out["device_costs"] = device_cost_rows(cfg, spec, stages)
            out.update(stages=stages, sync=learner["sync"], detached_cost=learner["detached_cost"],
                       exact_cost=learner["exact_cost"], wire=learner["wire"])
            out["bounds"] = _bounds(cfg, stages, cores)
            out["end_to_end"] = e2e = _end_to_end(cfg, iterations, Path(tmp), memory, out["bounds"], say)
            out["scaling"] = [{"actors_per_learner": cfg.num_actors,
                               "env_steps_per_second": e2e["policy_lag_off"]["env_steps_per_second"]}]
            if scaling:
                out["scaling"] += _scaling(cfg, spec, max_actors, Path(tmp), memory, say)
            out["scaling"].sort(key=lambda r: r["actors_per_learner"])
            out["memory"] = _memory(cfg, spec, memory, stages, e2e)
            out["probe_cost"] = probe_cost(preset(spec.preset), stages["probe"], e2e["policy_lag_off"])
    finally:
        if owns_ray:
            ray.shutdown()
    out["machine"]["load_average_before"] = list(load_before)
    out["machine"]["load_average_after"] = list(os.getloadavg())
    out["wall_seconds"] = time.perf_counter() - t_start
    return out


