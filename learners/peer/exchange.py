"""One update's traffic with the peers, seen from the learner that asks: the `Peers` a Learner's update talks to.

At each sync point the learner asks every peer for its logits on a window of its batch's rows (the peers hold its
frames: learners/peer/frames.py), streamed back while it computes (learners/peer/fetch.py); each micro-batch then
takes the peers' logits on its own rows. Detached mode keeps the latest logits per sample as plain targets; exact
mode turns each peer's logits on a micro-batch into a leaf that collects d(KL)/d(peer logits), which goes back to the
peer as soon as that micro-batch's backward is done (the peer keeps the graph of only a few chunks of its logits at a
time), while the peer's gradients for my logits come in and are added to mine before my optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from learners.peer.fetch import PeerFetch
from learners.peer.state import PeerState
from learners.peer.sync import SyncPoint


class PeerLink(Protocol):
    peer_id: int

    def fetch_logits(self, sync: SyncPoint, frames_digest: str, rows: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     rows_per_chunk: int | None = None) -> tuple[np.ndarray, int, int]:
        """The peer's logits on rows `rows` of my batch (whose frames it holds); also (bytes sent, bytes received).
        `on_chunk` sees each chunk as it arrives; `rows_per_chunk` caps the rows per streamed message."""

    def send_grads(self, sync: SyncPoint, chunks: Iterable[tuple[int, np.ndarray]]) -> int:
        """Exact mode: d(my loss)/d(peer logits) back to the peer, chunk by chunk as `chunks` yields them (chunk i:
        the rows of the i-th chunk of logits it sent); returns bytes sent."""


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
    first_step_seconds: float | None = None

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time spent inside counts as sync time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def fields(self) -> dict:
        """As UpdateStats fields."""
        return dict(syncs=self.syncs, sync_seconds=self.seconds, sync_first_step_seconds=self.first_step_seconds or 0.0,
                    sync_latencies=self.latencies, sync_bytes_sent=self.bytes_sent,
                    sync_bytes_received=self.bytes_received,
                    staleness_mean=float(np.mean(self.staleness)) if self.staleness else 0.0,
                    staleness_max=int(max(self.staleness, default=0)))


class GradStream:
    """Exact mode: the gradients for one peer's logits of one sync, put chunk by chunk as my backward passes make
    them, read by the call that sends them (a stream the training thread never waits on until the step)."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self._queue = timeout_s, queue.SimpleQueue()

    def put(self, chunk: int, grad: np.ndarray) -> None:
        self._queue.put((chunk, grad))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        # Bounded: an update that failed between two chunks never closes its streams.
        while (item := self._queue.get(timeout=self.timeout_s)) is not None:
            yield item


class PeerExchange:
    """The `Peers` (learners/learner.py) of one update over `links` (none: no distillation this update)."""

    def __init__(self, links: list[PeerLink], state: PeerState, agent: torch.nn.Module, pool: ThreadPoolExecutor,
                 batch_size: int, frames_digest: str, num_actions: int, exact: bool, microbatch_rows: int,
                 timeout_s: float, device: torch.device):
        self.links, self.state, self.agent, self.pool = links, state, agent, pool
        self.digest, self.num_actions, self.exact = frames_digest, num_actions, exact
        # Detached: chunks of half a micro-batch, so the rows the first micro-batch needs are back about when its
        # forward ends. Exact: chunks of one micro-batch, each with its gradient.
        self.stream_rows, self.microbatch_rows = max(1, microbatch_rows // 2), microbatch_rows
        self.timeout_s, self.device = timeout_s, device
        self.peer_ids = [link.peer_id for link in links]
        self.stats = SyncStats()
        self.targets = {pid: np.zeros((batch_size, num_actions), np.float32) for pid in self.peer_ids}
        self.target_step = {pid: np.full(batch_size, -1, np.int64) for pid in self.peer_ids}
        self.position = np.zeros(batch_size, np.int64)      # sample -> its row in the latest sync's stream
        self.fetches: list[PeerFetch] = []
        self.sync_point: SyncPoint | None = None
        self.live: dict[int, torch.Tensor] = {}       # exact mode: the peers' logits on this micro-batch, as leaves
        self.live_chunk = 0
        self.streams: dict[int, GradStream] = {}      # exact mode: this sync's gradients to each peer
        self.sends: list = []

    def sync(self, iteration: int, sync_index: int, step: int, window: np.ndarray, perm: np.ndarray) -> None:
        """Ask every peer for its logits on `window` at `step`, streamed in the order the minibatches use it (each
        waits only for its own rows); the previous sync's streams are closed first. Detached mode first keeps my
        weights of this step for peers that read them after I have stepped on."""
        self._close_sync()
        sync = self.sync_point = SyncPoint(self.state.id, iteration, sync_index, step)
        if not self.exact:
            with self.stats.blocked():
                self.state.keep_snapshot(step, self.agent)
        order = perm if len(window) == len(self.position) else window
        self.position[order] = np.arange(len(order))

        def store(pid: int, indices: np.ndarray, logits: np.ndarray) -> None:
            self.targets[pid][indices] = logits
            self.target_step[pid][indices] = step

        # Exact mode asks for chunks of one micro-batch: the gradient of each goes back as soon as my backward
        # has it, and frees the peer's graph of it.
        rows_per_chunk = self.microbatch_rows if self.exact else self.stream_rows
        self.fetches = [PeerFetch(link.peer_id, order, self.num_actions, None if self.exact else store)
                        for link in self.links]
        for link, fetch in zip(self.links, self.fetches):
            self.pool.submit(fetch.run, functools.partial(link.fetch_logits, rows_per_chunk=rows_per_chunk), sync,
                             self.digest, order, self.exact)

    def logits(self, rows: np.ndarray, start: int) -> dict[int, torch.Tensor]:
        with self.stats.blocked():
            if self.exact:   # this micro-batch's chunk of each peer's logits, as a leaf for d(KL)/d(peer logits)
                self._send_grads()                # the previous micro-batch's backward is done
                for fetch in self.fetches:
                    fetch.wait(start + len(rows), self.timeout_s)
                self.live_chunk = start // self.microbatch_rows
                self.live = {f.peer_id: torch.from_numpy(f.logits[start:start + len(rows)]).to(self.device)
                             .requires_grad_(True) for f in self.fetches}
                return dict(self.live)
            if self.fetches:
                need = int(self.position[rows].max()) + 1
                for fetch in self.fetches:
                    fetch.wait(need, self.timeout_s)
        return {pid: torch.from_numpy(t[rows]).to(self.device) for pid, t in self.targets.items()}

    def _send_grads(self) -> None:
        """Exact mode: each peer's d(loss)/d(its logits) of the micro-batch just done, onto the sync's streams (opened
        with the first: a stream's first message must come soon, learners/peer/guard.py)."""
        if not self.live:
            return
        if not self.streams:
            self.streams = {link.peer_id: GradStream(self.timeout_s) for link in self.links}
            self.sends = [self.pool.submit(link.send_grads, self.sync_point, self.streams[link.peer_id])
                          for link in self.links]
        for pid, leaf in self.live.items():
            self.streams[pid].put(self.live_chunk, leaf.grad.cpu().numpy())
        self.live = {}

    def before_step(self, mb: np.ndarray) -> None:
        """Account staleness; exact mode sends the last gradients, waits for every peer's gradient for my logits
        (backpropagated as they came, learners/peer/state.py: apply_grad) and adds their sum to mine."""
        if not self.exact:
            self.stats.staleness.extend(int(self.state.step - self.target_step[pid][mb].min()) for pid in self.targets)
            return
        self.stats.staleness.extend(0 for _ in self.links)
        with self.stats.blocked():
            self._send_grads()
            for stream in self.streams.values():
                stream.close()
            self.stats.bytes_sent += sum(f.result(timeout=self.timeout_s) for f in self.sends)
            self.streams, self.sends = {}, []
            self.state.wait_for_peers(self.sync_point.step)
        for param, grad in zip(self.agent.parameters(), self.state.take_grads(self.sync_point.step)):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)

    def optimizer_step(self, step: Callable[[], None]) -> None:
        _, waited = self.state.advance(step)
        self.stats.seconds += waited          # a peer's chunk was being computed on these weights
        if self.stats.first_step_seconds is None:
            self.stats.first_step_seconds = self.stats.seconds

    def _close_sync(self) -> None:
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

    def finish(self) -> dict:
        self._close_sync()
        return self.stats.fields()
