"""One MDPO learner: its policy, Adam, and the PPO + distillation update (PAPER.md, step 3).

Plain class, no Ray, no gRPC: peers are reached through `PeerLink` objects (gRPC clients in
production, see learners/peer/), and the peer side of a sync is `serve_logits`/`apply_peer_grad`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch.distributions import Categorical

from learners import ppo
from learners.records import Batch, Rollout, Weights
from learners.config import TrainConfig
from learners.model import make_agent
from learners.peer.fetch import IndexedRows, PeerFetch
from learners.peer.sync import SyncError, SyncPoint
from learners.schedule import IterationPlan


# Detached mode: weights kept for sync steps my peers have not read yet, so I step on without waiting for them.
# Two let me run one sync ahead of the slowest peer; a learner further ahead waits (backpressure, sync time).
SNAPSHOT_SLOTS = 2


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
    # Blocked during the first optimizer step of the update: mostly waiting for a peer that started later (its
    # rollouts arrived later), which the barrier turns into sync time.
    first_step_seconds: float = 0.0


class PeerLink(Protocol):
    peer_id: int

    def fetch_logits(self, sync: SyncPoint, obs: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     max_rows: int | None = None) -> tuple[np.ndarray, int, int]:
        """The peer's logits on `obs`; also (bytes sent, bytes received). `on_chunk` sees each chunk as it arrives;
        `max_rows` caps the rows per streamed message."""

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
        self._grads_queued: dict[tuple[int, int], np.ndarray] = {}   # (peer, step) -> its d(loss)/d(those logits)
        self._snapshots: dict[int, torch.nn.Module] = {}   # detached mode: step -> my weights at that step
        self._free_snapshots: list[torch.nn.Module] = []
        self._live_readers = 0                             # detached-mode streams reading self.agent right now
        self.snapshot_reads = 0                            # chunks served from kept weights
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.num_learners - 1), thread_name_prefix="peer")

    # ----------------------------------------------------------------- peers
    def connect(self, peers: list[PeerLink]) -> None:
        self.peers = peers
        self.peer_ids = {p.peer_id for p in peers}

    @property
    def loss_scale(self) -> float:
        # The authors minimise 0.5 * (loss_A + loss_B) over both networks; each learner owns its share. Their PPO
        # baseline (ppo.py) is one agent whose loss is not halved: with no distillation each learner is that agent,
        # so its gradient meets the 0.5 clip at full size.
        return 1.0 / self.cfg.num_learners if self.cfg.distilling else 1.0

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
        position = np.zeros(batch.size, np.int64)       # sample -> its row in the latest sync's stream
        stats, sync_stats, sync_index, fetches = [], SyncStats(), 0, []
        t_start = time.perf_counter()

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
                        self._keep_snapshot(sync.step, sync_stats)
                    self._finish_fetches(fetches, sync_stats)
                    # Stream the window in the order the minibatches use it: each waits only for its own rows.
                    order = perm if len(window) == batch.size else window
                    position[order] = np.arange(len(order))
                    fetches = self._start_fetches(sync, batch.obs, order, exact, targets, target_step)
                stats.append(self._minibatch_step(batch, mb, fetches, position, targets, target_step, sync, exact,
                                                  distill, sync_stats))
                if epoch == 0 and j == 0:
                    sync_stats.first_step_seconds = sync_stats.seconds
        self._finish_fetches(fetches, sync_stats)

        self.iteration = plan.iteration + 1
        out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        out.update(
            learner_id=self.id, step=self.step, iteration=self.iteration, samples=batch.size * plan.update_epochs,
            explained_variance=ppo.explained_variance(batch.values, batch.returns), learning_rate=plan.learning_rate,
            update_seconds=time.perf_counter() - t_start, syncs=sync_stats.syncs, sync_seconds=sync_stats.seconds,
            sync_first_step_seconds=sync_stats.first_step_seconds,
            sync_latencies=sync_stats.latencies, sync_bytes_sent=sync_stats.bytes_sent,
            sync_bytes_received=sync_stats.bytes_received,
            staleness_mean=float(np.mean(sync_stats.staleness)) if sync_stats.staleness else 0.0,
            staleness_max=int(max(sync_stats.staleness, default=0)),
        )
        return out

    def _minibatch_step(self, batch: Batch, mb: np.ndarray, fetches: list[PeerFetch], position: np.ndarray,
                        targets: dict[int, np.ndarray], target_step: dict[int, np.ndarray], sync: SyncPoint | None,
                        exact: bool, distill: bool, sync_stats: SyncStats) -> dict:
        """One optimizer step on minibatch `mb`, its forward/backward in micro-batches of cfg.microbatch_size.

        Every loss term is a mean over the minibatch, so micro-batch c contributes its mean weighted by
        len(c)/len(mb) and the accumulated gradient is that of one pass (advantages are normalized over the whole
        minibatch first). Peer logits are awaited only after this micro-batch's own forward pass.
        """
        cfg, dev = self.cfg, self.device
        advantages = ppo.normalize_advantages(torch.from_numpy(batch.advantages[mb]).to(dev))
        size = cfg.microbatch_size or len(mb)
        live: dict[int, torch.Tensor] = {}      # exact mode: the peers' logits on mb, as leaves that collect the KL grad
        totals: Counter[str] = Counter()
        new_logprobs = []
        try:
            for start in range(0, len(mb), size):
                rows = mb[start:start + size]
                weight = len(rows) / len(mb)
                actions = torch.from_numpy(batch.actions[rows]).to(dev)
                old_logprob = torch.from_numpy(batch.logprobs[rows]).to(dev)
                logits, value = self.agent(torch.from_numpy(batch.obs[rows]).to(dev))
                new_logprob = Categorical(logits=logits).log_prob(actions)
                pg_loss = ppo.policy_loss(new_logprob, old_logprob, advantages[start:start + size], cfg.clip_coef)
                v_loss = ppo.value_loss(value, torch.from_numpy(batch.values[rows]).to(dev),
                                        torch.from_numpy(batch.returns[rows]).to(dev),
                                        cfg.clip_coef if cfg.clip_vloss else None)
                entropy = ppo.entropy(logits)
                peer_logits = self._peer_logits(fetches, rows, start, position, targets, exact, live,
                                                sync_stats) if distill else {}
                kl = (torch.stack([ppo.kl_to_peer(p, logits) for p in peer_logits.values()]).mean()
                      if peer_logits else torch.zeros((), device=dev))
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy + cfg.alpha * kl
                if not torch.isfinite(loss) or not torch.isfinite(logits).all():
                    raise NonFiniteError(f"learner {self.id}: non-finite loss {loss.item()} at step {self.step}; "
                                         "update aborted before the optimizer step")
                (loss * (weight * self.loss_scale)).backward()
                for name, term in (("loss", loss), ("policy_loss", pg_loss), ("value_loss", v_loss),
                                   ("entropy", entropy), ("kl_peer", kl)):
                    totals[name] += weight * term.item()
                new_logprobs.append(new_logprob.detach())
        except BaseException:
            with self._cond:
                self.optimizer.zero_grad(set_to_none=True)   # drop the part of the gradient accumulated so far
            raise
        if exact:
            sync_stats.staleness.extend(0 for _ in live)
        elif distill:
            sync_stats.staleness.extend(int(self.step - target_step[pid][mb].min()) for pid in targets)

        if exact:
            t0 = time.perf_counter()
            futures = [self._pool.submit(p.send_grad, sync, live[p.peer_id].grad.cpu().numpy()) for p in self.peers]
            sync_stats.bytes_sent += sum(f.result() for f in futures)
            sync_stats.seconds += time.perf_counter() - t0
        if exact:   # the peers' gradients flow into this step: it waits for every one of them
            t0 = time.perf_counter()
            self._wait_for_peers(sync.step)
            sync_stats.seconds += time.perf_counter() - t0
            self._backprop_peer_grads(sync.step)

        with self._cond:
            if self._live_readers:   # a peer's chunk is being computed on these weights (served before a snapshot)
                t0 = time.perf_counter()
                self._cond.wait_for(lambda: not self._live_readers)
                sync_stats.seconds += time.perf_counter() - t0
            grad_norm = torch.nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"learner {self.id}: non-finite gradient norm at step {self.step}; update aborted")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._kept = {k: v for k, v in self._kept.items() if k[1] > self.step}
            self._grads_queued = {k: v for k, v in self._grads_queued.items() if k[1] > self.step}
            self._grads_in.pop(self.step, None)
            self.step += 1
            need = len(self.peers)
            self._served = Counter({s: n for s, n in self._served.items() if s >= self.step or n < need})
            self._cond.notify_all()

        new_logprob = torch.cat(new_logprobs)
        approx_kl, clipfrac = ppo.ppo_diagnostics(new_logprob, torch.from_numpy(batch.logprobs[mb]).to(dev),
                                                  cfg.clip_coef)
        return dict(totals, approx_kl=approx_kl, clipfrac=clipfrac, grad_norm=float(grad_norm))

    def _peer_logits(self, fetches: list[PeerFetch], rows: np.ndarray, start: int, position: np.ndarray,
                     targets: dict[int, np.ndarray], exact: bool, live: dict[int, torch.Tensor],
                     sync_stats: SyncStats) -> dict[int, torch.Tensor]:
        """The peers' logits on `rows` (micro-batch starting at `start` of the minibatch); time blocked on rows
        that have not streamed in yet is sync time."""
        t0 = time.perf_counter()
        if exact:   # the window is this minibatch: one leaf per peer, sliced per micro-batch
            for fetch in fetches:
                if fetch.peer_id not in live:
                    fetch.wait(len(fetch.logits), self.cfg.sync_timeout_s)
                    live[fetch.peer_id] = torch.from_numpy(fetch.logits).to(self.device).requires_grad_(True)
            sync_stats.seconds += time.perf_counter() - t0
            return {pid: leaf[start:start + len(rows)] for pid, leaf in live.items()}
        if fetches:
            need = int(position[rows].max()) + 1
            for fetch in fetches:
                fetch.wait(need, self.cfg.sync_timeout_s)
        sync_stats.seconds += time.perf_counter() - t0
        return {pid: torch.from_numpy(t[rows]).to(self.device) for pid, t in targets.items()}

    def _start_fetches(self, sync: SyncPoint, obs: np.ndarray, order: np.ndarray, exact: bool,
                       targets: dict[int, np.ndarray], target_step: dict[int, np.ndarray]) -> list[PeerFetch]:
        """Ask every peer for its logits on obs[order]; chunks land in `targets` as they arrive (detached mode)."""
        def store(pid: int, indices: np.ndarray, logits: np.ndarray) -> None:
            targets[pid][indices] = logits
            target_step[pid][indices] = sync.step

        rows = IndexedRows(obs, order)
        # Detached: chunks of half a micro-batch, so the rows the first micro-batch needs are back about when its
        # forward ends. Exact mode keeps the peers' logits on the whole window as one leaf and so waits for all of
        # them: full-size messages, fewer round trips (the peer's core computes them meanwhile).
        stream_rows = None if exact else max(1, (self.cfg.microbatch_size or self.cfg.minibatch_size) // 2)
        fetches = [PeerFetch(p.peer_id, order, self.num_actions, None if exact else store) for p in self.peers]
        for peer, fetch in zip(self.peers, fetches):
            self._pool.submit(fetch.run, functools.partial(peer.fetch_logits, max_rows=stream_rows), sync, rows, exact)
        return fetches

    def _finish_fetches(self, fetches: list[PeerFetch], sync_stats: SyncStats) -> None:
        """Account a sync whose rows have all been used (waiting out a stream that is still closing)."""
        if not fetches:
            return
        t0 = time.perf_counter()
        for fetch in fetches:
            fetch.join(self.cfg.sync_timeout_s)
            sync_stats.bytes_sent += fetch.sent
            sync_stats.bytes_received += fetch.received
        sync_stats.seconds += time.perf_counter() - t0
        sync_stats.syncs += 1
        sync_stats.latencies.append(max(f.latency for f in fetches))

    def _keep_snapshot(self, step: int, sync_stats: SyncStats) -> None:
        """Detached mode, at my sync step: keep a copy of my weights for the peers that have not read them yet, so
        I do not wait for them before my optimizer step. Waits (sync time) only when every slot is still unread."""
        need = len(self.peers)
        t0 = time.perf_counter()
        with self._cond:
            if self._served[step] >= need or step in self._snapshots:
                return                            # every peer already read my live weights at this step
            ok = self._cond.wait_for(lambda: len(self._snapshots) < SNAPSHOT_SLOTS, timeout=self.cfg.sync_timeout_s)
            if not ok:
                raise SyncError(f"learner {self.id}: peers did not read my weights of steps {sorted(self._snapshots)} "
                                f"within {self.cfg.sync_timeout_s}s; is a peer down?")
            net = self._free_snapshots.pop() if self._free_snapshots else copy.deepcopy(self.agent).requires_grad_(False)
            net.load_state_dict(self.agent.state_dict())     # copies into the slot's tensors in place
            self._snapshots[step] = net
            self._cond.notify_all()
        sync_stats.seconds += time.perf_counter() - t0

    @contextlib.contextmanager
    def _weights_at(self, step: int) -> Iterator[torch.nn.Module]:
        """Detached mode: my network at exactly `step`, kept or live. Live weights are read only while I am at
        `step`, and my optimizer step waits for the read to end."""
        with self._cond:
            if not self._cond.wait_for(lambda: step in self._snapshots or self.step >= step,
                                       timeout=self.cfg.sync_timeout_s):
                raise SyncError(f"learner {self.id}: did not reach step {step} within {self.cfg.sync_timeout_s}s "
                                f"(at step {self.step})")
            net = self._snapshots.get(step)
            if net is None and self.step != step:
                raise SyncError(f"learner {self.id}: weights of step {step} are not kept (at step {self.step})")
            live = net is None
            self.snapshot_reads += not live
            if live:
                net = self.agent
                self._live_readers += 1
        try:
            yield net
        finally:
            if live:
                with self._cond:
                    self._live_readers -= 1
                    self._cond.notify_all()

    def state_dict(self) -> dict:
        """What a checkpoint keeps of me: weights, Adam state, and my counters (the weights' version)."""
        return {"learner_id": self.id, "step": self.step, "iteration": self.iteration,
                "model": self.agent.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); every sync in progress is dropped first (its step is about to change)."""
        if state["learner_id"] != self.id:
            raise ValueError(f"checkpoint is for learner {state['learner_id']}, not {self.id}")
        self.forget_syncs()
        self.agent.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.iteration = int(state["step"]), int(state["iteration"])

    def forget_syncs(self) -> None:
        """Drop every sync in progress (kept weights, counts): my step is about to be set from a checkpoint."""
        with self._cond:
            self._free_snapshots.extend(self._snapshots.values())
            self._snapshots.clear()
            self._served.clear()
            self._grads_in.clear()
            self._kept.clear()
            self._grads_queued.clear()

    def _wait_for_peers(self, step: int) -> None:
        """Exact-mode barrier: every peer has read my weights at `step` and sent its gradient back."""
        need = len(self.peers)
        with self._cond:
            ok = self._cond.wait_for(lambda: self._served[step] >= need and self._grads_in[step] >= need,
                                     timeout=self.cfg.sync_timeout_s)
        if not ok:
            raise SyncError(f"learner {self.id}: peers did not complete the sync at step {step} within "
                            f"{self.cfg.sync_timeout_s}s (served {self._served[step]}/{need}, "
                            f"gradients {self._grads_in[step]}/{need}); is a peer down?")

    # ----------------------------------------------------------- peer side
    @property
    def steps_per_iteration(self) -> int:
        return self.cfg.update_epochs * self.cfg.num_minibatches

    def _check_sync(self, sync: SyncPoint, wait: bool) -> None:
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id} (peers: {sorted(self.peer_ids)})")
        if sync.step < 0 or sync.step // self.steps_per_iteration != sync.iteration:
            raise SyncError(f"learner {self.id}: step {sync.step} does not belong to iteration {sync.iteration}")
        with self._cond:
            if sync.step > self.step + self.steps_per_iteration:
                raise SyncError(f"learner {self.id}: unknown weight version {sync.step} (at step {self.step})")
            if not wait:
                return
            self._cond.wait_for(lambda: self.step >= sync.step, timeout=self.cfg.sync_timeout_s)
            if self.step != sync.step:
                raise SyncError(f"learner {self.id}: sync for step {sync.step} but this learner is at step {self.step}")

    def serve_logits(self, sync: SyncPoint, chunks: Iterable[np.ndarray], keep_graph: bool) -> Iterator[np.ndarray]:
        """Logits of my policy on a peer's observations, chunk by chunk, at exactly step `sync.step`.

        Exact mode (`keep_graph`): my live weights; my update does not step past `sync.step` until the peer's
        gradient is back (see _wait_for_peers). Detached mode: my weights at `sync.step`, kept or live
        (_weights_at), so I need not wait for the peer.
        """
        self._check_sync(sync, wait=keep_graph)
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
                with self._weights_at(sync.step) as net, torch.no_grad():
                    logits = net.logits(x)
            yield logits.detach().cpu().numpy()
        with self._cond:
            if keep_graph:
                self._kept[(sync.peer_id, sync.step)] = kept
            self._served[sync.step] += 1
            if self._served[sync.step] >= len(self.peers) and sync.step in self._snapshots:
                self._free_snapshots.append(self._snapshots.pop(sync.step))   # read by every peer
            self._cond.notify_all()

    def apply_peer_grad(self, sync: SyncPoint, grad: np.ndarray) -> None:
        """Exact mode: a peer's d(loss)/d(my logits), checked and queued; my training thread backpropagates it
        before its optimizer step (_backprop_peer_grads). Backpropagating here, in the server's thread, would make my
        own update wait for it on my core while the peer, done first, idles."""
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id}")
        with self._cond:
            kept = self._kept.get((sync.peer_id, sync.step))
            if kept is None or self.step != sync.step or (sync.peer_id, sync.step) in self._grads_queued:
                raise SyncError(f"learner {self.id}: no logits kept for peer {sync.peer_id} at step {sync.step} "
                                f"(at step {self.step})")
            rows = sum(len(k) for k in kept)
            if grad.shape != (rows, self.num_actions):
                raise SyncError(f"gradient of shape {grad.shape} does not match the logits sent ({rows}, {self.num_actions})")
            self._grads_queued[(sync.peer_id, sync.step)] = grad
            self._grads_in[sync.step] += 1
            self._cond.notify_all()

    def _backprop_peer_grads(self, step: int) -> None:
        """Exact mode, in my training thread: the peers' gradients of step `step` into my parameters' .grad."""
        with self._cond:
            queued = [(self._kept.pop(key), self._grads_queued.pop(key)) for key in list(self._grads_queued)
                      if key[1] == step]
        for kept, grad in queued:
            grads = np.split(grad, np.cumsum([len(k) for k in kept])[:-1])
            torch.autograd.backward(kept, [torch.from_numpy(np.ascontiguousarray(g)).to(self.device) for g in grads])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
