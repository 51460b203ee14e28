"""One MDPO learner: its policy, Adam, and the PPO + distillation update (PAPER.md, step 3).

Plain class, no Ray, no gRPC: peers are reached through `PeerLink` objects (gRPC clients in
production, see distill_service.py), and the peer side of a sync is `serve_logits`/`apply_peer_grad`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch
from torch.distributions import Categorical

from learners import ppo
from learners.batch import Batch, Rollout, Weights
from learners.config import TrainConfig
from learners.model import make_agent
from learners.schedule import IterationPlan


@dataclass(frozen=True)
class SyncPoint:
    peer_id: int       # learner id of the caller
    iteration: int
    sync_index: int
    step: int          # optimizer step both sides are at


class SyncError(RuntimeError):
    """A sync request does not fit this learner's state (wrong peer, wrong step, timed out)."""


class NonFiniteError(RuntimeError):
    """A loss or logits went NaN/inf: the update is aborted before the optimizer step."""


@dataclass
class SyncStats:
    """Per-learner distillation traffic during one update."""
    syncs: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    staleness: list[int] = field(default_factory=list)   # optimizer steps since the peer's logits were made


class PeerLink(Protocol):
    peer_id: int

    def fetch_logits(self, sync: SyncPoint, obs: np.ndarray, keep_graph: bool) -> tuple[np.ndarray, int, int]:
        """The peer's logits on `obs`; also (bytes sent, bytes received)."""

    def send_grad(self, sync: SyncPoint, grad: np.ndarray) -> int:
        """Exact mode: d(my loss)/d(peer logits) back to the peer; returns bytes sent."""


class Learner:
    def __init__(self, cfg: TrainConfig, learner_id: int, obs_shape: tuple[int, ...], obs_dtype: str,
                 num_actions: int, device: str = "cpu"):
        self.cfg = cfg
        self.id = learner_id
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed * 1000 + learner_id)
        self.agent = make_agent(obs_shape, obs_dtype, num_actions).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        self.num_actions = num_actions
        self.obs_shape, self.obs_dtype = tuple(obs_shape), obs_dtype
        self.step = 0                  # optimizer steps taken: the weights version
        self.iteration = 0             # iterations completed
        self.peers: list[PeerLink] = []
        self.peer_ids: set[int] = set()
        self._cond = threading.Condition()
        self._served: Counter[int] = Counter()       # step -> peers whose logits request was answered
        self._grads_in: Counter[int] = Counter()     # step -> peers whose gradient was applied (exact mode)
        self._kept: dict[tuple[int, int], list[torch.Tensor]] = {}   # (peer, step) -> logits with graph
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.num_learners - 1), thread_name_prefix="peer")

    # ----------------------------------------------------------------- peers
    def connect(self, peers: list[PeerLink]) -> None:
        self.peers = peers
        self.peer_ids = {p.peer_id for p in peers}

    @property
    def loss_scale(self) -> float:
        # The authors minimise 0.5 * (loss_A + loss_B) over both networks; each learner owns its share.
        return 1.0 / self.cfg.num_learners

    def weights(self) -> Weights:
        with self._cond:
            return Weights.from_module(self.step, self.agent)

    # ---------------------------------------------------------------- update
    def update(self, rollouts: list[Rollout], plan: IterationPlan) -> dict:
        """One iteration of PPO epochs over this learner's rollouts, syncing with peers as planned."""
        cfg = self.cfg
        batch = Batch.from_rollouts(rollouts, cfg.gamma, cfg.gae_lambda)
        if batch.size != plan.batch_size:
            raise ValueError(f"learner {self.id}: got {batch.size} samples, plan expects {plan.batch_size}")
        for group in self.optimizer.param_groups:
            group["lr"] = plan.learning_rate
        distill = plan.distill and bool(self.peers)
        exact = distill and cfg.distill_mode == "exact"
        targets = {p.peer_id: np.zeros((batch.size, self.num_actions), np.float32) for p in self.peers}
        target_step = {p.peer_id: np.full(batch.size, -1, np.int64) for p in self.peers}
        stats, sync_stats, sync_index = [], SyncStats(), 0
        t_start = time.perf_counter()

        for epoch in range(plan.update_epochs):
            perm = plan.permutation(epoch)
            for j in range(plan.num_minibatches):
                mb = perm[j * plan.minibatch_size:(j + 1) * plan.minibatch_size]
                window = plan.sync_window(epoch, j, perm) if distill else None
                peer_logits: dict[int, torch.Tensor] = {}
                sync = None
                if window is not None:
                    sync = SyncPoint(self.id, plan.iteration, sync_index, self.step)
                    sync_index += 1
                    fetched = self._fetch_from_peers(sync, batch.obs, window, exact, sync_stats)
                    for pid, logits in fetched.items():
                        if exact:   # window == mb: the peer's logits stay live for the gradient
                            peer_logits[pid] = torch.from_numpy(logits).to(self.device).requires_grad_(True)
                        else:
                            targets[pid][window] = logits
                            target_step[pid][window] = self.step
                if distill and not exact:
                    peer_logits = {pid: torch.from_numpy(t[mb]).to(self.device) for pid, t in targets.items()}
                    sync_stats.staleness.extend(int(self.step - target_step[pid][mb].min()) for pid in targets)
                elif exact:
                    sync_stats.staleness.extend(0 for _ in peer_logits)
                stats.append(self._minibatch_step(batch, mb, peer_logits, sync, exact, sync_stats))

        self.iteration = plan.iteration + 1
        out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        out.update(
            learner_id=self.id, step=self.step, iteration=self.iteration, samples=batch.size * plan.update_epochs,
            explained_variance=ppo.explained_variance(batch.values, batch.returns), learning_rate=plan.learning_rate,
            update_seconds=time.perf_counter() - t_start, syncs=sync_stats.syncs, sync_seconds=sync_stats.seconds,
            sync_latencies=sync_stats.latencies, sync_bytes_sent=sync_stats.bytes_sent,
            sync_bytes_received=sync_stats.bytes_received,
            staleness_mean=float(np.mean(sync_stats.staleness)) if sync_stats.staleness else 0.0,
            staleness_max=int(max(sync_stats.staleness, default=0)),
        )
        return out

    def _minibatch_step(self, batch: Batch, mb: np.ndarray, peer_logits: dict[int, torch.Tensor],
                        sync: SyncPoint | None, exact: bool, sync_stats: SyncStats) -> dict:
        cfg, dev = self.cfg, self.device
        obs = torch.from_numpy(batch.obs[mb]).to(dev)
        actions = torch.from_numpy(batch.actions[mb]).to(dev)
        old_logprob = torch.from_numpy(batch.logprobs[mb]).to(dev)
        old_value = torch.from_numpy(batch.values[mb]).to(dev)
        returns = torch.from_numpy(batch.returns[mb]).to(dev)
        advantages = ppo.normalize_advantages(torch.from_numpy(batch.advantages[mb]).to(dev))

        logits, value = self.agent(obs)
        new_logprob = Categorical(logits=logits).log_prob(actions)
        pg_loss = ppo.policy_loss(new_logprob, old_logprob, advantages, cfg.clip_coef)
        v_loss = ppo.value_loss(value, old_value, returns, cfg.clip_coef if cfg.clip_vloss else None)
        entropy = ppo.entropy(logits)
        kl = (torch.stack([ppo.kl_to_peer(p, logits) for p in peer_logits.values()]).mean()
              if peer_logits else torch.zeros((), device=dev))
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy + self.cfg.alpha * kl
        if not torch.isfinite(loss) or not torch.isfinite(logits).all():
            raise NonFiniteError(f"learner {self.id}: non-finite loss {loss.item()} at step {self.step}; "
                                 "update aborted before the optimizer step")

        with self._cond:   # a peer's gradient may be accumulating into the same .grad
            (loss * self.loss_scale).backward()
        if exact:
            t0 = time.perf_counter()
            futures = [self._pool.submit(p.send_grad, sync, peer_logits[p.peer_id].grad.cpu().numpy())
                       for p in self.peers]
            sync_stats.bytes_sent += sum(f.result() for f in futures)
            sync_stats.seconds += time.perf_counter() - t0
        if sync is not None:
            t0 = time.perf_counter()
            self._wait_for_peers(sync.step, grads=exact)
            sync_stats.seconds += time.perf_counter() - t0

        with self._cond:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"learner {self.id}: non-finite gradient norm at step {self.step}; update aborted")
            self.optimizer.step()
            # Zeroed in the same critical section so a peer's gradient for the next step is never wiped.
            self.optimizer.zero_grad(set_to_none=True)
            self._kept = {k: v for k, v in self._kept.items() if k[1] > self.step}
            self._served.pop(self.step, None)
            self._grads_in.pop(self.step, None)
            self.step += 1
            self._cond.notify_all()

        approx_kl, clipfrac = ppo.ppo_diagnostics(new_logprob, old_logprob, cfg.clip_coef)
        return dict(loss=loss.item(), policy_loss=pg_loss.item(), value_loss=v_loss.item(), entropy=entropy.item(),
                    kl_peer=kl.item(), approx_kl=approx_kl, clipfrac=clipfrac, grad_norm=float(grad_norm))

    def _fetch_from_peers(self, sync: SyncPoint, obs: np.ndarray, window: np.ndarray, keep_graph: bool,
                          sync_stats: SyncStats) -> dict[int, np.ndarray]:
        t0 = time.perf_counter()
        # A contiguous window (whole batch) is sent as a view: no copy of a 200 MB rollout.
        window_obs = obs if len(window) == len(obs) and (window == np.arange(len(obs))).all() else obs[window]
        futures = {p.peer_id: self._pool.submit(p.fetch_logits, sync, window_obs, keep_graph) for p in self.peers}
        out = {}
        for pid, fut in futures.items():
            logits, sent, received = fut.result()
            if logits.shape != (len(window), self.num_actions) or not np.isfinite(logits).all():
                raise NonFiniteError(f"learner {self.id}: peer {pid} returned bad logits "
                                     f"(shape {logits.shape}, finite={np.isfinite(logits).all()})")
            out[pid] = logits
            sync_stats.bytes_sent += sent
            sync_stats.bytes_received += received
        elapsed = time.perf_counter() - t0
        sync_stats.syncs += 1
        sync_stats.seconds += elapsed
        sync_stats.latencies.append(elapsed)
        return out

    def _wait_for_peers(self, step: int, grads: bool) -> None:
        """Barrier: every peer has read my weights at `step` (and, in exact mode, sent its gradient)."""
        need = len(self.peers)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._served[step] >= need and (not grads or self._grads_in[step] >= need),
                timeout=self.cfg.sync_timeout_s)
        if not ok:
            raise SyncError(f"learner {self.id}: peers did not complete the sync at step {step} within "
                            f"{self.cfg.sync_timeout_s}s (served {self._served[step]}/{need}, "
                            f"gradients {self._grads_in[step]}/{need}); is a peer down?")

    # ----------------------------------------------------------- peer side
    @property
    def steps_per_iteration(self) -> int:
        return self.cfg.update_epochs * self.cfg.num_minibatches

    def _check_sync(self, sync: SyncPoint) -> None:
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id} (peers: {sorted(self.peer_ids)})")
        if sync.step < 0 or sync.step // self.steps_per_iteration != sync.iteration:
            raise SyncError(f"learner {self.id}: step {sync.step} does not belong to iteration {sync.iteration}")
        with self._cond:
            if sync.step > self.step + self.steps_per_iteration:
                raise SyncError(f"learner {self.id}: unknown weight version {sync.step} (at step {self.step})")
            self._cond.wait_for(lambda: self.step >= sync.step, timeout=self.cfg.sync_timeout_s)
            if self.step != sync.step:
                raise SyncError(f"learner {self.id}: sync for step {sync.step} but this learner is at step {self.step}")

    def serve_logits(self, sync: SyncPoint, chunks: Iterable[np.ndarray], keep_graph: bool) -> Iterator[np.ndarray]:
        """Logits of my policy on a peer's observations, chunk by chunk, at exactly step `sync.step`.

        My own update does not step past `sync.step` until this stream finished (see _wait_for_peers),
        so every chunk sees the same weights.
        """
        self._check_sync(sync)
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
                with torch.no_grad():
                    logits = self.agent.logits(x)
            yield logits.detach().cpu().numpy()
        with self._cond:
            if keep_graph:
                self._kept[(sync.peer_id, sync.step)] = kept
            self._served[sync.step] += 1
            self._cond.notify_all()

    def apply_peer_grad(self, sync: SyncPoint, grad: np.ndarray) -> None:
        """Exact mode: backpropagate a peer's d(loss)/d(my logits) into my parameters' gradients."""
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id}")
        with self._cond:
            kept = self._kept.pop((sync.peer_id, sync.step), None)
            if kept is None or self.step != sync.step:
                raise SyncError(f"learner {self.id}: no logits kept for peer {sync.peer_id} at step {sync.step} "
                                f"(at step {self.step})")
            rows = sum(len(k) for k in kept)
            if grad.shape != (rows, self.num_actions):
                self._kept[(sync.peer_id, sync.step)] = kept
                raise SyncError(f"gradient of shape {grad.shape} does not match the logits sent ({rows}, {self.num_actions})")
            grads = np.split(grad, np.cumsum([len(k) for k in kept])[:-1])
            torch.autograd.backward(kept, [torch.from_numpy(np.ascontiguousarray(g)).to(self.device) for g in grads])
            self._grads_in[sync.step] += 1
            self._cond.notify_all()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
