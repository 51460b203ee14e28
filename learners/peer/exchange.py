"""One update's traffic with the peers, seen from the learner that asks: the requesting side of every sync.

At each sync point the learner asks every peer for its logits on a window of its states (learners/peer/fetch.py
streams them in while it computes); each micro-batch then takes the peers' logits on its own rows. Detached mode
keeps the latest logits per sample as plain targets; exact mode turns each peer's logits on the minibatch into a
leaf that collects d(KL)/d(peer logits), which goes back to the peer after the backward pass.
"""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from learners.peer.fetch import IndexedRows, PeerFetch
from learners.peer.sync import SyncPoint


class PeerLink(Protocol):
    peer_id: int

    def fetch_logits(self, sync: SyncPoint, obs: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     max_rows: int | None = None) -> tuple[np.ndarray, int, int]:
        """The peer's logits on `obs`; also (bytes sent, bytes received). `on_chunk` sees each chunk as it arrives;
        `max_rows` caps the rows per streamed message."""

    def send_grad(self, sync: SyncPoint, grad: np.ndarray) -> int:
        """Exact mode: d(my loss)/d(peer logits) back to the peer; returns bytes sent."""


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

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time spent inside counts as sync time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


class PeerExchange:
    """The requesting side of one update's syncs with `peers` (none: no distillation this update)."""

    def __init__(self, peers: list[PeerLink], pool: ThreadPoolExecutor, obs: np.ndarray, num_actions: int,
                 exact: bool, stream_rows: int, timeout_s: float, device: torch.device):
        self.peers, self.pool, self.obs, self.num_actions, self.exact = peers, pool, obs, num_actions, exact
        self.stream_rows, self.timeout_s, self.device = stream_rows, timeout_s, device
        self.stats = SyncStats()
        size = len(obs)
        self.targets = {p.peer_id: np.zeros((size, num_actions), np.float32) for p in peers}
        self.target_step = {p.peer_id: np.full(size, -1, np.int64) for p in peers}
        self.position = np.zeros(size, np.int64)      # sample -> its row in the latest sync's stream
        self.fetches: list[PeerFetch] = []
        self.live: dict[int, torch.Tensor] = {}       # exact mode: the peers' logits on this minibatch, as leaves

    def begin(self, sync: SyncPoint, window: np.ndarray, perm: np.ndarray) -> None:
        """Ask every peer for its logits on `window` at `sync`, streamed in the order the minibatches use it (each
        waits only for its own rows); the previous sync's streams are closed first."""
        self.finish()
        order = perm if len(window) == len(self.obs) else window
        self.position[order] = np.arange(len(order))

        def store(pid: int, indices: np.ndarray, logits: np.ndarray) -> None:
            self.targets[pid][indices] = logits
            self.target_step[pid][indices] = sync.step

        rows = IndexedRows(self.obs, order)
        # Exact mode keeps the peers' logits on the whole window as one leaf and so waits for all of them:
        # full-size messages, fewer round trips (the peer's core computes them meanwhile).
        max_rows = None if self.exact else self.stream_rows
        self.fetches = [PeerFetch(p.peer_id, order, self.num_actions, None if self.exact else store) for p in self.peers]
        for peer, fetch in zip(self.peers, self.fetches):
            self.pool.submit(fetch.run, functools.partial(peer.fetch_logits, max_rows=max_rows), sync, rows, self.exact)

    def logits(self, rows: np.ndarray, start: int) -> dict[int, torch.Tensor]:
        """The peers' logits on `rows`, the micro-batch starting at `start` of the current minibatch."""
        with self.stats.blocked():
            if self.exact:   # the window is this minibatch: one leaf per peer, sliced per micro-batch
                for fetch in self.fetches:
                    if fetch.peer_id not in self.live:
                        fetch.wait(len(fetch.logits), self.timeout_s)
                        self.live[fetch.peer_id] = torch.from_numpy(fetch.logits).to(self.device).requires_grad_(True)
                return {pid: leaf[start:start + len(rows)] for pid, leaf in self.live.items()}
            if self.fetches:
                need = int(self.position[rows].max()) + 1
                for fetch in self.fetches:
                    fetch.wait(need, self.timeout_s)
        return {pid: torch.from_numpy(t[rows]).to(self.device) for pid, t in self.targets.items()}

    def backward_done(self, sync: SyncPoint | None, mb: np.ndarray, step: int) -> None:
        """The minibatch's backward pass is over: account staleness; exact mode sends each peer d(loss)/d(its
        logits)."""
        if not self.exact:
            self.stats.staleness.extend(int(step - self.target_step[pid][mb].min()) for pid in self.targets)
            return
        self.stats.staleness.extend(0 for _ in self.live)
        with self.stats.blocked():
            futures = [self.pool.submit(p.send_grad, sync, self.live[p.peer_id].grad.cpu().numpy()) for p in self.peers]
            self.stats.bytes_sent += sum(f.result() for f in futures)
        self.live = {}

    def finish(self) -> None:
        """Account a sync whose rows have all been used (waiting out a stream that is still closing)."""
        if not self.fetches:
            return
        with self.stats.blocked():
            for fetch in self.fetches:
                fetch.join(self.timeout_s)
                self.stats.bytes_sent += fetch.sent
                self.stats.bytes_received += fetch.received
        self.stats.syncs += 1
        self.stats.latencies.append(max(f.latency for f in self.fetches))
        self.fetches = []
