"""What the learner's work costs per sample, by device and precision, without Ray or Procgen (so the GPU check's
tier 1 can run where neither is installed; `mdpo bench` adds these rows too):

- update: one PPO update over a synthetic batch (epochs x minibatches, micro-batches as configured), per sample
  of the batch times epochs;
- forward at the actor batch: the network's forward pass over one rollout actor's envs (local inference);
- served inference: learners/inference.py's server answering `num_actors` actor threads at once, one batch a
  step (learner-served inference without its transport).

Each figure is the best of repetitions that last at least `min_seconds` in all (a burst of load elsewhere slows a
repetition, never speeds one up); ratios between rows are taken from the same run.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from learners.bench.synthetic import synthetic_rollout
from learners.config import TrainConfig
from learners.inference import InferenceServer
from learners.learner import Learner
from learners.model import make_agent
from learners.schedule import IterationPlan

PROCGEN_FRAMES = (64, 64, 3)
NUM_ACTIONS = 15


@dataclass
class Cost:
    device: str
    precision: str
    stage: str              # update | forward | served inference
    batch: int              # samples per call
    samples_per_second: float

    @property
    def microseconds_per_sample(self) -> float:
        return 1e6 / self.samples_per_second


def _best(run, samples: int, min_seconds: float, min_reps: int = 3) -> float:
    """samples/s of the fastest call of `run` (each call handles `samples`), after one warm-up call."""
    run()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < min_seconds:
        t0 = time.perf_counter()
        run()
        took = time.perf_counter() - t0
        best, spent, reps = min(best, took), spent + took, reps + 1
    return samples / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def update_cost(cfg: TrainConfig, device: str, min_seconds: float, min_reps: int = 3,
                frames: tuple = PROCGEN_FRAMES) -> Cost:
    dev = torch.device(device)
    learner = Learner(dataclasses.replace(cfg, alpha=0.0), 0, frames, "uint8", NUM_ACTIONS, device=device)
    rollout = synthetic_rollout(0, frames, "uint8", NUM_ACTIONS, cfg.num_steps, cfg.num_envs, seed=0)
    plan = IterationPlan.for_iteration(cfg, 0)

    def run():
        learner.update([rollout], plan)
        _sync(dev)
    rate = _best(run, cfg.batch_size * cfg.update_epochs, min_seconds, min_reps)
    return Cost(device, cfg.precision, "update", cfg.minibatch_size, rate)


@torch.no_grad()
def forward_cost(cfg: TrainConfig, device: str, batch: int, min_seconds: float, min_reps: int = 3,
                 frames: tuple = PROCGEN_FRAMES) -> Cost:
    dev = torch.device(device)
    agent = make_agent(frames, "uint8", NUM_ACTIONS, precision=cfg.precision).to(dev).eval()
    obs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *frames), dtype=np.uint8))

    def run():
        logits, values = agent(obs.to(dev))
        logits.cpu(), values.cpu()          # as an actor needs them: on the host
    return Cost(device, cfg.precision, "forward", batch, _best(run, batch, min_seconds, min_reps))


def served_cost(cfg: TrainConfig, device: str, clients: int, batch: int, min_seconds: float, min_reps: int = 3,
                frames: tuple = PROCGEN_FRAMES, steps: int = 8) -> Cost:
    """`clients` threads, each asking for `batch` states at a time, `steps` times per call."""
    agent = make_agent(frames, "uint8", NUM_ACTIONS, precision=cfg.precision).to(torch.device(device))
    server = InferenceServer(agent, torch.device(device), clients)
    server.load(0, agent)
    obs = np.random.default_rng(0).integers(0, 256, (batch, *frames), dtype=np.uint8)

    def client():
        for _ in range(steps):
            server.infer(0, obs)

    def run():
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    try:
        rate = _best(run, clients * batch * steps, min_seconds, min_reps)
    finally:
        server.close()
    return Cost(device, cfg.precision, "served inference", clients * batch, rate)


def measure_costs(cfg: TrainConfig, device: str, precisions=("fp32", "bf16"), min_seconds: float = 1.0,
                  min_reps: int = 3, frames: tuple = PROCGEN_FRAMES) -> list[Cost]:
    """Every stage in every precision, the precisions back to back per stage so they meet the same machine state."""
    rows = []
    for stage in ("update", "forward", "served inference"):
        for precision in precisions:
            c = dataclasses.replace(cfg, precision=precision)
            timing = dict(min_seconds=min_seconds, min_reps=min_reps, frames=frames)
            if stage == "update":
                rows.append(update_cost(c, device, **timing))
            elif stage == "forward":
                rows.append(forward_cost(c, device, c.envs_per_actor, **timing))
            else:
                rows.append(served_cost(c, device, c.num_actors, c.envs_per_actor, **timing))
    return rows


def format_costs(rows: list[Cost]) -> str:
    lines = [f"{'device':7s} {'precision':9s} {'stage':17s} {'batch':>6s} {'samples/s':>11s} {'us/sample':>10s}"]
    for r in rows:
        lines.append(f"{r.device:7s} {r.precision:9s} {r.stage:17s} {r.batch:6d} {r.samples_per_second:11,.0f} "
                     f"{r.microseconds_per_sample:10.1f}")
    by = {(r.device, r.stage, r.precision): r for r in rows}
    for (device, stage, precision), r in by.items():
        if precision == "bf16" and (device, stage, "fp32") in by:
            lines.append(f"  {device} {stage}: bf16 / fp32 = {r.samples_per_second / by[device, stage, 'fp32'].samples_per_second:.2f}x")
    return "\n".join(lines)
