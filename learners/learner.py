"""One MDPO learner: its policy, Adam, and the PPO + distillation update (README "Architecture", "Fidelity").

Plain class, no Ray, no gRPC: peers are reached through `PeerLink` objects (gRPC clients in production); the
requesting side of a sync is learners/peer/exchange.py, the serving side (`serve_logits`, `apply_peer_grad`) keeps
its state in learners/peer/state.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.distributions import Categorical

import learners.ppo as ppo
from learners.config import TrainConfig
from learners.model import make_agent
from learners.peer.exchange import PeerExchange, PeerLink
from learners.peer.state import PeerState
from learners.peer.sync import SyncPoint
from learners.records import Batch, Rollout, UpdateStats, Weights
from learners.schedule import IterationPlan

LOSS_TERMS = ("loss", "policy_loss", "value_loss", "entropy", "kl_peer")


class NonFiniteError(RuntimeError):
    """A loss or logits went NaN/inf: the update is aborted before the optimizer step."""


class Learner:
    def __init__(self, cfg: TrainConfig, learner_id: int, obs_shape: tuple[int, ...], obs_dtype: str,
                 num_actions: int, device: str = "cpu"):
        self.cfg = cfg
        self.id = learner_id
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed * 1000 + learner_id)
        self.agent = make_agent(obs_shape, obs_dtype, num_actions, cfg.precision).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        self.num_actions = num_actions
        self.obs_shape, self.obs_dtype = tuple(obs_shape), obs_dtype
        self.iteration = 0             # iterations completed
        self.peers: list[PeerLink] = []
        self.peer_state = PeerState(learner_id, cfg.update_epochs * cfg.num_minibatches, cfg.sync_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.num_learners - 1), thread_name_prefix="peer")

    @property
    def step(self) -> int:
        """Optimizer steps taken: the weights version."""
        return self.peer_state.step

    def connect(self, peers: list[PeerLink]) -> None:
        self.peers = peers
        self.peer_state.peer_ids = {p.peer_id for p in peers}

    @property
    def loss_scale(self) -> float:
        # The authors minimise 0.5 * (loss_A + loss_B) over both networks; each learner owns its share. Their PPO
        # baseline (ppo.py) is one agent whose loss is not halved: with no distillation each learner is that agent,
        # so its gradient meets the 0.5 clip at full size.
        return 1.0 / self.cfg.num_learners if self.cfg.distilling else 1.0

    def weights(self) -> Weights:
        return self.peer_state.weights(self.agent)

    # ---------------------------------------------------------------- update
    def update(self, rollouts: list[Rollout], plan: IterationPlan) -> UpdateStats:
        """One iteration of PPO epochs over this learner's rollouts, syncing with peers as planned."""
        cfg, t_start = self.cfg, time.perf_counter()
        batch = Batch.from_rollouts(rollouts, cfg.gamma, cfg.gae_lambda)
        if batch.size != plan.batch_size:
            raise ValueError(f"learner {self.id}: got {batch.size} samples, plan expects {plan.batch_size}")
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        distill = plan.distill and bool(self.peers)
        exact = distill and cfg.distill_mode == "exact"
        # Detached: chunks of half a micro-batch, so the rows the first micro-batch needs are back about when its
        # forward ends.
        exchange = PeerExchange(self.peers if distill else [], self._pool, batch.obs, self.num_actions, exact,
                                max(1, (cfg.microbatch_size or cfg.minibatch_size) // 2), cfg.sync_timeout_s,
                                self.device)
        on_device = batch.to(self.device)    # once per update; the exchange sends the host copy's frames
        steps, sync_index = [], 0
        for epoch in range(plan.update_epochs):
            perm = plan.permutation(epoch)
            for j in range(plan.num_minibatches):
                mb = perm[j * plan.minibatch_size:(j + 1) * plan.minibatch_size]
                window = plan.sync_window(epoch, j, perm) if distill else None
                sync = None
                if window is not None:
                    sync = SyncPoint(self.id, plan.iteration, sync_index, self.step)
                    sync_index += 1
                    if not exact:
                        with exchange.stats.blocked():
                            self.peer_state.keep_snapshot(sync.step, self.agent)
                    exchange.begin(sync, window, perm)
                steps.append(self._minibatch_step(on_device, mb, exchange if distill else None, sync))
                if epoch == 0 and j == 0:
                    exchange.stats.first_step_seconds = exchange.stats.seconds
        exchange.finish()
        self.iteration = plan.iteration + 1
        return self._stats(steps, batch, plan, exchange, time.perf_counter() - t_start)

    def _stats(self, steps: list[dict], batch: Batch, plan: IterationPlan, exchange: PeerExchange,
               seconds: float) -> UpdateStats:
        sync = exchange.stats
        return UpdateStats(
            learner_id=self.id, step=self.step, iteration=self.iteration, samples=batch.size * plan.update_epochs,
            **{k: float(np.mean([s[k] for s in steps])) for k in steps[0]},
            explained_variance=ppo.explained_variance(batch.values, batch.returns), learning_rate=plan.learning_rate,
            update_seconds=seconds, syncs=sync.syncs, sync_seconds=sync.seconds,
            sync_first_step_seconds=sync.first_step_seconds, sync_latencies=sync.latencies,
            sync_bytes_sent=sync.bytes_sent, sync_bytes_received=sync.bytes_received,
            staleness_mean=float(np.mean(sync.staleness)) if sync.staleness else 0.0,
            staleness_max=int(max(sync.staleness, default=0)))

    def _minibatch_step(self, batch: Batch, mb: np.ndarray, exchange: PeerExchange | None,
                        sync: SyncPoint | None) -> dict:
        """One optimizer step on minibatch `mb`, its forward/backward in micro-batches of cfg.microbatch_size.

        Every loss term is a mean over the minibatch, so micro-batch c contributes its mean weighted by
        len(c)/len(mb) and the accumulated gradient is that of one pass (advantages are normalized over the whole
        minibatch first). Peer logits are awaited only after this micro-batch's own forward pass. `batch` holds
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
                terms, new_logprob = self._micro_batch_loss(batch, mb[start:start + size],
                                                            rows_on_device[start:start + size],
                                                            advantages[start:start + size],
                                                            exchange.logits if exchange else None, start)
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
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)   # drop the part of the gradient accumulated so far
            raise
        if exchange is not None:
            exchange.backward_done(sync, mb, self.step)
        if exchange is not None and exchange.exact:   # the peers' gradients flow into this step: wait for them all
            with exchange.stats.blocked():
                self.peer_state.wait_for_peers(sync.step)
            self._backprop_peer_grads(sync.step)
        grad_norm = self._optimizer_step(exchange)
        return dict(zip([*totals, "approx_kl", "clipfrac"], values), grad_norm=grad_norm)

    def _micro_batch_loss(self, batch: Batch, rows: np.ndarray, rows_on_device: torch.Tensor, advantages: torch.Tensor,
                          peer_logits, start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The paper's loss on one micro-batch: PPO's clipped surrogate, value loss and entropy bonus, plus alpha
        times the mean KL(peer || self) over the peers (`peer_logits(rows, start)`; None: no distillation). Also
        "finite": a value that is non-finite when the loss or the logits are."""
        cfg, dev = self.cfg, self.device
        logits, value = self.agent(batch.obs[rows_on_device])
        new_logprob = Categorical(logits=logits).log_prob(batch.actions[rows_on_device])
        pg_loss = ppo.policy_loss(new_logprob, batch.logprobs[rows_on_device], advantages, cfg.clip_coef)
        v_loss = ppo.value_loss(value, batch.values[rows_on_device], batch.returns[rows_on_device],
                                cfg.clip_coef if cfg.clip_vloss else None)
        entropy = ppo.entropy(logits)
        peers = peer_logits(rows, start) if peer_logits else {}
        kl = (torch.stack([ppo.kl_to_peer(p, logits) for p in peers.values()]).mean()
              if peers else torch.zeros((), device=dev))
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy + cfg.alpha * kl
        finite = loss.detach() + logits.detach().sum() * 0.0     # NaN/inf in any logit makes the sum so
        return dict(zip(LOSS_TERMS, (loss, pg_loss, v_loss, entropy, kl)), finite=finite), new_logprob

    def _optimizer_step(self, exchange: PeerExchange | None) -> float:
        """Clip, check and apply the accumulated gradient; the new weights are the next version."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.agent.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"learner {self.id}: non-finite gradient norm at step {self.step}; update aborted")
        _, waited = self.peer_state.advance(self.optimizer.step)
        if exchange is not None:   # a peer's chunk was being computed on these weights
            exchange.stats.seconds += waited
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _backprop_peer_grads(self, step: int) -> None:
        """Exact mode, in my training thread: the peers' gradients of step `step` into my parameters' .grad.
        (Backpropagating in the server's thread would make my own update wait for it on my core while the peer,
        done first, idles.)"""
        for kept in self.peer_state.take_grads(step):
            grads = np.split(kept.grad, np.cumsum([len(k) for k in kept.logits])[:-1])
            torch.autograd.backward(kept.logits,
                                    [torch.from_numpy(np.ascontiguousarray(g)).to(self.device) for g in grads])

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint keeps of me: weights, Adam state, and my counters (the weights' version)."""
        return {"learner_id": self.id, "step": self.step, "iteration": self.iteration,
                "model": self.agent.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); every sync in progress is dropped (its step is about to change)."""
        if state["learner_id"] != self.id:
            raise ValueError(f"checkpoint is for learner {state['learner_id']}, not {self.id}")
        self.agent.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.peer_state.reset(int(state["step"]))

    # ----------------------------------------------------------- peer side
    def serve_logits(self, sync: SyncPoint, chunks: Iterable[np.ndarray], keep_graph: bool) -> Iterator[np.ndarray]:
        """Logits of my policy on a peer's observations, chunk by chunk, at exactly step `sync.step`.

        Exact mode (`keep_graph`): my live weights; my update does not step past `sync.step` until the peer's
        gradient is back (PeerState.wait_for_peers). Detached mode: my weights at `sync.step`, kept or live
        (PeerState.weights_at), so I need not wait for the peer.
        """
        self.peer_state.check(sync, wait=keep_graph)
        kept: list[torch.Tensor] = []
        rows = 0
        for obs in chunks:
            if obs.shape[1:] != self.obs_shape or obs.dtype != np.dtype(self.obs_dtype):
                raise ValueError(f"observations of shape {obs.shape[1:]} {obs.dtype}, expected {self.obs_shape} "
                                 f"{self.obs_dtype}")
            rows += len(obs)
            if rows > self.cfg.batch_size:
                raise ValueError(f"oversized request: more than one batch ({self.cfg.batch_size} states)")
            if obs.dtype.kind == "f" and not np.isfinite(obs).all():
                raise ValueError("observations contain NaN or inf")
            x = torch.from_numpy(obs).to(self.device)
            if keep_graph:
                logits = self.agent.logits(x)
                kept.append(logits)
            else:
                with self.peer_state.weights_at(sync.step, self.agent) as net, torch.no_grad():
                    logits = net.logits(x)
            yield logits.detach().cpu().numpy()
        self.peer_state.served(sync, kept if keep_graph else None)

    def apply_peer_grad(self, sync: SyncPoint, grad: np.ndarray) -> None:
        """Exact mode: a peer's d(loss)/d(my logits), checked and queued; my training thread backpropagates it
        before its optimizer step (_backprop_peer_grads)."""
        self.peer_state.queue_grad(sync, grad, self.num_actions)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
