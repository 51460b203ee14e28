"""The coordinator's plan for one iteration: minibatch order and where the peers sync."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from learners.config import minibatches_per_sync


@dataclass(frozen=True)
class IterationPlan:
    iteration: int
    shuffle_seed: int              # the same for every learner: same minibatch order (the authors' joint update, README "Fidelity")
    batch_size: int
    num_minibatches: int
    update_epochs: int
    sync: str                      # "minibatch" | "epoch" | "iteration" | "<k>"
    distill: bool                  # False: no distillation traffic at all (alpha == 0)
    learning_rate: float

    @classmethod
    def for_iteration(cls, cfg, iteration: int, **changes) -> "IterationPlan":
        """The plan of `iteration` of a run configured by `cfg` (a TrainConfig): its shuffle seed, schedule, and the
        learning rate (annealed linearly to 0 with cfg.anneal_lr); `changes` overrides fields (the bench's probes)."""
        lr = cfg.learning_rate * (1 - iteration / cfg.num_iterations) if cfg.anneal_lr else cfg.learning_rate
        plan = cls(iteration=iteration, shuffle_seed=cfg.seed * 7919 + iteration, batch_size=cfg.batch_size,
                   num_minibatches=cfg.num_minibatches, update_epochs=cfg.update_epochs, sync=cfg.sync,
                   distill=cfg.distilling, learning_rate=lr)
        return dataclasses.replace(plan, **changes) if changes else plan

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.batch_size)

    def sync_window(self, epoch: int, minibatch: int, perm: np.ndarray) -> np.ndarray | None:
        """Sample indices whose peer logits are refreshed before this minibatch, or None if no sync here.

        `epoch`/`iteration` refresh the whole batch (in sample order, so chunks are contiguous slices);
        every-k refreshes the states of the next k minibatches.
        """
        if not self.distill:
            return None
        if self.sync == "iteration":
            return np.arange(self.batch_size) if (epoch, minibatch) == (0, 0) else None
        if self.sync == "epoch":
            return np.arange(self.batch_size) if minibatch == 0 else None
        k = minibatches_per_sync(self.sync)
        if minibatch % k:
            return None
        mbs = self.minibatch_size
        return perm[minibatch * mbs: min(minibatch + k, self.num_minibatches) * mbs]

    def sync_points(self) -> int:
        return sum(self.sync_window(e, j, self.permutation(e)) is not None
                   for e in range(self.update_epochs) for j in range(self.num_minibatches))


def actor_seed(cfg, learner: int, actor: int, iteration: int) -> int:
    """The env seed of a rollout actor started at `iteration`. Shifted by the iteration so a resumed run does not
    replay the same episodes. With same_levels, actor a of every learner gets the same seed: the agents play the same
    level sequence, as the authors' do (their main.py seeds both agents' envs with args.seed)."""
    return cfg.seed * 1_000_003 + (0 if cfg.same_levels else learner * 1009) + actor * 17 + iteration


def eval_seed(cfg, learner: int) -> int:
    """The seed of a learner's evaluation envs: disjoint from every training seed."""
    return 10**8 + cfg.seed * 1009 + learner
