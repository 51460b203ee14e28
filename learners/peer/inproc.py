"""A PeerLink to a peer in the same process: its PeerEndpoint called directly, no gRPC. For the tests that check the
learners' math through their real exchange without a wire, and for debugging one in a debugger."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from learners.peer.endpoint import PeerEndpoint
from learners.peer.sync import SyncPoint


class InProcessLink:
    def __init__(self, peer: PeerEndpoint):
        self.peer, self.peer_id = peer, peer.id

    def fetch_logits(self, sync: SyncPoint, frames_digest: str, rows: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     rows_per_chunk: int | None = None) -> tuple[np.ndarray, int, int]:
        chunks = []
        for logits in self.peer.serve_logits(sync, frames_digest, rows, keep_graph, rows_per_chunk or 0):
            chunks.append(logits)
            if on_chunk is not None:
                on_chunk(logits)
        return np.concatenate(chunks), 0, 0

    def send_grads(self, sync: SyncPoint, chunks: Iterable[tuple[int, np.ndarray]]) -> int:
        for chunk, grad in chunks:
            self.peer.apply_peer_grad(sync, chunk, np.ascontiguousarray(grad, np.float32))
        return 0
