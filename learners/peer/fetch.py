"""A peer's logits streaming in while the learner computes: the overlap that keeps syncs off the critical path.

At a sync point the learner asks every peer for its logits on a window of its rows and goes on with its own
forward pass; a pool thread drops each chunk of the reply stream into place as it arrives. The window is asked for in
the order the minibatches will consume it, so a (micro)batch waits only for its own rows, and only the time spent
blocked counts as sync time. The math is unchanged: every target still comes from the peer at the sync step.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from learners.peer.sync import ProtocolError, SyncTimeout


class PeerFetch:
    """One peer's logits on `order` (sample indices, in stream order), filled in by `run` in a pool thread.

    `on_rows(peer_id, indices, logits)` is called (in the pool thread) for each chunk; `wait(n)` returns once the
    first n rows are in, re-raising whatever went wrong in the exchange.
    """

    def __init__(self, peer_id: int, order: np.ndarray, num_actions: int,
                 on_rows: Callable[[int, np.ndarray, np.ndarray], None] | None = None):
        self.peer_id, self.order, self.on_rows = peer_id, order, on_rows
        self.logits = np.empty((len(order), num_actions), np.float32)
        self.ready = 0                   # rows received so far
        self.done = False
        self.error: BaseException | None = None
        self.sent = self.received = 0    # bytes
        self.latency = 0.0               # request to last chunk, seconds
        self._cond = threading.Condition()

    def _on_chunk(self, chunk: np.ndarray) -> None:
        start, stop = self.ready, self.ready + len(chunk)
        if chunk.shape[1:] != self.logits.shape[1:] or stop > len(self.logits) or not np.isfinite(chunk).all():
            raise ProtocolError(f"peer {self.peer_id} returned bad logits (chunk of shape {chunk.shape} at row "
                                 f"{start} of {len(self.logits)}, finite={bool(np.isfinite(chunk).all())})")
        self.logits[start:stop] = chunk
        if self.on_rows is not None:
            self.on_rows(self.peer_id, self.order[start:stop], chunk)
        with self._cond:
            self.ready = stop
            self._cond.notify_all()

    def run(self, fetch_logits: Callable, sync, frames_digest: str, rows: np.ndarray, keep_graph: bool) -> None:
        """Pool-thread body: `fetch_logits(sync, frames_digest, rows, keep_graph, on_chunk=...)` of a PeerLink."""
        t0 = time.perf_counter()
        try:
            logits, self.sent, self.received = fetch_logits(sync, frames_digest, rows, keep_graph,
                                                            on_chunk=self._on_chunk)
            if self.ready != len(self.logits) or len(logits) != len(self.logits):
                raise ProtocolError(f"peer {self.peer_id} returned {len(logits)} rows of logits, expected "
                                     f"{len(self.logits)}")
        except BaseException as err:   # re-raised in the training thread by wait()
            self.error = err
        finally:
            self.latency = time.perf_counter() - t0
            with self._cond:
                self.done = True
                self._cond.notify_all()

    def join(self, timeout_s: float) -> None:
        """Wait for the whole exchange (the stream closed, byte counts and latency set)."""
        with self._cond:
            finished = self._cond.wait_for(lambda: self.done, timeout=timeout_s)
        if self.error is not None:
            raise self.error
        if not finished:
            raise SyncTimeout(f"the exchange with peer {self.peer_id} did not finish within {timeout_s}s")

    def wait(self, rows: int, timeout_s: float) -> None:
        with self._cond:
            arrived = self._cond.wait_for(lambda: self.ready >= rows or self.done, timeout=timeout_s)
        if self.error is not None:
            raise self.error
        if not arrived or self.ready < rows:
            raise SyncTimeout(f"peer {self.peer_id} sent {self.ready} of {rows} rows of logits within {timeout_s}s")
