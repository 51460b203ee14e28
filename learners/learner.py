"""One MDPO learner: its policy, Adam, and the PPO + distillation update (README "Architecture", "Fidelity").

The math alone: the peers' logits come from one narrow interface (`Peers`: asked at each sync point for the rows of
a window, then per micro-batch), and it gets one hook before each optimizer step (exact mode's peer gradients) and
one around it (a peer may be reading my weights). Serving, weight snapshots, threads and the wire live in
learners/peer/ (PeerEndpoint.update runs an update with a `Peers` over gRPC or in process). learners/reference.py
is the same update of every learner at once in one process.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np
import torch
from torch.distributions import Categorical

import learners.ppo as ppo
from learners.config import TrainConfig
from learners.errors import NonFiniteError
from learners.model import make_agent
from learners.records import Batch, Rollout, UpdateStats
from learners.schedule import IterationPlan

__all__ = ["Learner", "NonFiniteError", "Peers"]
LOSS_TERMS = ("loss", "policy_loss", "value_loss", "entropy", "kl_peer")


class Peers(Protocol):
    """What one update sees of its peers."""
    peer_ids: list[int]

    def sync(self, iteration: int, sync_index: int, step: int, window: np.ndarray, perm: np.ndarray) -> None:
        """Sync point `sync_index` of `iteration`, at my optimizer step `step`: the peers' logits on `window` (rows of
        my batch, used in `perm`'s order) at their step `step` are on their way."""

    def logits(self, rows: np.ndarray, start: int) -> dict[int, torch.Tensor]:
        """Each peer's logits on `rows`, the micro-batch at `start` of the current minibatch (exact mode: leaves that
        collect d loss / d peer logits)."""

    def before_step(self, mb: np.ndarray) -> None:
        """The minibatch's backward is done: exact mode sends the peers their gradients and adds theirs to mine."""

    def optimizer_step(self, step: Callable[[], None]) -> None:
        """Run `step` (it changes my weights) when no peer is reading them."""

    def finish(self) -> dict:
        """The update's sync traffic, as UpdateStats fields."""


class Learner:
    def __init__(self, cfg: TrainConfig, learner_id: int, obs_shape: tuple[int, ...], obs_dtype: str,
                 num_actions: int, device: str = "cpu"):
        self.cfg, self.id, self.device = cfg, learner_id, torch.device(device)
        torch.manual_seed(cfg.seed * 1000 + learner_id)
        self.agent = make_agent(obs_shape, obs_dtype, num_actions, cfg.precision).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        self.num_actions, self.obs_shape, self.obs_dtype = num_actions, tuple(obs_shape), obs_dtype
        self.step = 0                  # optimizer steps taken: the weights version
        self.iteration = 0             # iterations completed

    @property
    def loss_scale(self) -> float:
        # The authors minimise 0.5 * (loss_A + loss_B) over both networks; each learner owns its share. Their PPO
        # baseline (ppo.py) is one agent whose loss is not halved: with no distillation each learner is that agent,
        # so its gradient meets the 0.5 clip at full size.
        return 1.0 / self.cfg.num_learners if self.cfg.distilling else 1.0

    def update(self, rollouts: list[Rollout] | Batch, plan: IterationPlan, peers: Peers | None = None) -> UpdateStats:
        """One iteration of PPO epochs over this learner's batch, syncing with `peers` where the plan says."""
        cfg, t_start = self.cfg, time.perf_counter()
        batch = rollouts if isinstance(rollouts, Batch) else Batch.from_rollouts(rollouts, cfg.gamma, cfg.gae_lambda)
        if batch.size != plan.batch_size:
            raise ValueError(f"learner {self.id}: got {batch.size} samples, plan expects {plan.batch_size}")
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        distill = plan.distill and peers is not None and bool(peers.peer_ids)
        on_device = batch.to(self.device)    # once per update
        steps, sync_index = [], 0
        for epoch in range(plan.update_epochs):
            perm = plan.permutation(epoch)
            for j in range(plan.num_minibatches):
                mb = perm[j * plan.minibatch_size:(j + 1) * plan.minibatch_size]
                window = plan.sync_window(epoch, j, perm) if distill else None
                if window is not None:
                    peers.sync(plan.iteration, sync_index, self.step, window, perm)
                    sync_index += 1
                steps.append(self._minibatch_step(on_device, mb, peers, distill))
        sync_stats = peers.finish() if peers is not None else {}
        self.iteration = plan.iteration + 1
        return UpdateStats(
            learner_id=self.id, step=self.step, iteration=self.iteration, samples=batch.size * plan.update_epochs,
            **{k: float(np.mean([s[k] for s in steps])) for k in steps[0]},
            explained_variance=ppo.explained_variance(batch.values, batch.returns), learning_rate=plan.learning_rate,
            update_seconds=time.perf_counter() - t_start, **sync_stats)

    def _minibatch_step(self, batch: Batch, mb: np.ndarray, peers: Peers | None, distill: bool) -> dict:
        """One optimizer step on minibatch `mb`, its forward/backward in micro-batches of cfg.microbatch_size.

        Every loss term is a mean over the minibatch, so micro-batch c contributes its mean weighted by
        len(c)/len(mb) and the accumulated gradient is that of one pass (advantages are normalized over the whole
        minibatch first). Peer logits are asked for only after this micro-batch's own forward pass. `batch` holds
        tensors on my device (Batch.to); the loss terms stay there until one host sync after the last micro-batch
        (on a GPU each .item() would stall the queue of kernels).
        """
        cfg = self.cfg
        rows_on_device = torch.from_numpy(mb).to(self.device)
        advantages = ppo.normalize_advantages(batch.advantages[rows_on_device])
        size = cfg.microbatch_size or len(mb)
        totals: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        new_logprobs = []
        try:
            for start in range(0, len(mb), size):
                rows = slice(start, start + size)
                terms, new_logprob = self._micro_batch_loss(batch, rows_on_device[rows], advantages[rows],
                                                            peers.logits(mb[rows], start) if distill else {})
                weight = min(size, len(mb) - start) / len(mb)
                (terms["loss"] * (weight * self.loss_scale)).backward()
                finite &= torch.isfinite(terms.pop("finite"))
                for name, term in terms.items():
                    totals[name] = totals.get(name, 0.0) + weight * term.detach()
                new_logprobs.append(new_logprob.detach())
            approx_kl, clipfrac = ppo.ppo_diagnostics(torch.cat(new_logprobs), batch.logprobs[rows_on_device],
                                                      cfg.clip_coef)
            *values, ok = torch.stack([*totals.values(), approx_kl, clipfrac, finite.float()]).tolist()  # the sync
            if not ok:
                raise NonFiniteError(f"learner {self.id}: non-finite loss {values[0]} at step {self.step}; "
                                     "update aborted before the optimizer step")
            if distill:
                peers.before_step(mb)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"learner {self.id}: non-finite gradient norm at step {self.step}; update aborted")
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)   # drop the part of the gradient accumulated so far
            raise
        if peers is not None:
            peers.optimizer_step(self.optimizer.step)
        else:
            self.optimizer.step()
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return dict(zip([*totals, "approx_kl", "clipfrac"], values), grad_norm=float(grad_norm))

    def _micro_batch_loss(self, batch: Batch, rows: torch.Tensor, advantages: torch.Tensor,
                          peer_logits: dict[int, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The paper's loss on one micro-batch: PPO's clipped surrogate, value loss and entropy bonus, plus alpha
        times the mean KL(peer || self) over the peers' logits on these rows. Also "finite": a value that is
        non-finite when the loss or the logits are."""
        cfg = self.cfg
        logits, value = self.agent(batch.obs[rows])
        new_logprob = Categorical(logits=logits).log_prob(batch.actions[rows])
        pg_loss = ppo.policy_loss(new_logprob, batch.logprobs[rows], advantages, cfg.clip_coef)
        v_loss = ppo.value_loss(value, batch.values[rows], batch.returns[rows], cfg.clip_coef if cfg.clip_vloss else None)
        entropy = ppo.entropy(logits)
        kl = (torch.stack([ppo.kl_to_peer(p, logits) for p in peer_logits.values()]).mean()
              if peer_logits else torch.zeros((), device=self.device))
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy + cfg.alpha * kl
        finite = loss.detach() + logits.detach().sum() * 0.0     # NaN/inf in any logit makes the sum so
        return dict(zip(LOSS_TERMS, (loss, pg_loss, v_loss, entropy, kl)), finite=finite), new_logprob

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint keeps of me: weights, Adam state, and my counters (the weights' version)."""
        return {"learner_id": self.id, "step": self.step, "iteration": self.iteration,
                "model": self.agent.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["learner_id"] != self.id:
            raise ValueError(f"checkpoint is for learner {state['learner_id']}, not {self.id}")
        self.agent.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.iteration = int(state["step"]), int(state["iteration"])
