"""`mdpo bench`'s actor stages, each run inside the Ray process it measures (same CPU reservation and thread
counts as in training): one actor's env, the rollout actor (local inference, and learner-served inference from a
learner of its own), and the evaluator beside it. The learner stage is
learners/bench/learner_stage.py; the figures are defined in learners/bench/measure.py's docstring."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import ray

from actors.rollout import RolloutWorker, env_spec, remote_rollout_worker
from learners.bench.memory import MemorySampler
from learners.config import TrainConfig, preset
from learners.learner_worker import LearnerWorker
from learners.model import make_agent
from learners.records import Weights


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


def _probe_actor_rate(worker: RolloutWorker, weights, min_seconds: float, learner=None) -> dict:
    """`weights`: Weights (local inference) or a ServedPolicy answered by `learner` (learner-served inference)."""
    worker.collect(weights, learner)                           # warm-up (and loads the weights)
    seconds = {"collect": 0.0, "inference": 0.0}     # sums only: a rollout is dropped once timed

    def window():
        rollout, _ = worker.collect(weights, learner)
        seconds["collect"] += rollout.collect_seconds
        seconds["inference"] += rollout.inference_seconds
        return rollout.env_steps, rollout.collect_seconds

    rate = _best_rate(window, min_seconds, min_reps=2)
    return {"env_steps_per_second": rate, "inference_fraction": seconds["inference"] / seconds["collect"]}


def _served_actor_rate(cfg: TrainConfig, actor, min_seconds: float) -> dict:
    """The same actor with learner-served inference (--inference learner): its learner, on its own CPUs as in
    training, runs the network; the actor steps its envs and waits for each step's answer over a Ray call."""
    obs_shape, obs_dtype, num_actions = env_spec(cfg)
    served_cfg = dataclasses.replace(cfg, inference="learner", alpha=0.0, num_actors=1)
    learner = ray.remote(LearnerWorker).options(num_cpus=cfg.learner_cpus, max_concurrency=3).remote(
        served_cfg, 0, obs_shape, obs_dtype, num_actions)
    try:
        policy = ray.get(learner.policy.remote())
        return ray.get(actor.__ray_call__.remote(_probe_actor_rate, policy, min_seconds, learner))
    finally:
        ray.kill(learner)


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
            served_rate = _served_actor_rate(stage_cfg, actor, spec.stage_seconds)
        evaluation, collects = _evaluate_beside_collection(actor, weights, memory, "actor_evaluating")
        # The same evaluation measuring the preset's probe set (actors/probes.py): its forward passes on their own,
        # the set's building apart (once a run), and what holding set and outputs adds to the process's peak.
        t0 = time.perf_counter()
        probe = ray.get(actor.probe_set.remote()) if stage_cfg.probe_states else None
        build_seconds = time.perf_counter() - t0
        probed, _ = _evaluate_beside_collection(actor, weights, memory, "actor_probing", probe)
    finally:
        ray.kill(actor)
    pss = {phase: memory.summary(phase)["kinds"]["actor"]["peak_pss_bytes"]
           for phase in ("actor", "actor_evaluating", "actor_probing")}
    return {"env": {"env_steps_per_second": env_rate, "envs": cfg.envs_per_actor},
            "actor": {**actor_rate, "envs": cfg.envs_per_actor, "steps_per_rollout": stage_cfg.num_steps},
            "actor_served": {**served_rate, "ratio_to_local": served_rate["env_steps_per_second"]
                             / actor_rate["env_steps_per_second"]},
            "evaluator": {"seconds": evaluation["seconds"], "episodes": len(evaluation["test_returns"]),
                          "env_steps": int(sum(evaluation["test_lengths"])), "collects_beside": collects,
                          "actor_peak_pss_bytes": pss["actor"], "evaluating_peak_pss_bytes": pss["actor_evaluating"],
                          "added_pss_bytes": pss["actor_evaluating"] - pss["actor"]},
            "probe": {"states": stage_cfg.probe_states, "build_seconds": build_seconds,
                      "seconds": probed["probe"].seconds if probe else 0.0, "probing_peak_pss_bytes": pss["actor_probing"],
                      "added_pss_bytes": pss["actor_probing"] - pss["actor_evaluating"]}}


def _evaluate_beside_collection(actor, weights, memory: MemorySampler, phase: str, probe=None) -> tuple[dict, int]:
    """One evaluation (with the probe set, if given) while the same actor keeps collecting, as in training."""
    with memory.phase(phase):
        pending = actor.evaluate.remote(weights, probe)
        collects = 0
        while not collects or not ray.wait([pending], timeout=0)[0]:
            ray.get(actor.collect.remote(weights))
            collects += 1
        return ray.get(pending), collects
