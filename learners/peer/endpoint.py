"""A learner's end of the peer exchange: it asks its peers (through PeerLinks: gRPC clients, or in-process links)
and answers them (`serve_logits`, `apply_peer_grad`: learners/peer/service.py puts them on gRPC).

What the asking and the answering sides share lives here: my weights version and the syncs in progress
(PeerState), my peers' frames (PeerFrames), and the threads the requests run in. The Learner sees none of it:
`update` gives each of its updates a PeerExchange (the `Peers` of learners/learner.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from learners.config import TrainConfig
from learners.learner import Learner
from learners.peer.exchange import PeerExchange, PeerLink
from learners.peer.frames import PeerFrames
from learners.peer.state import PeerState
from learners.peer.sync import SyncPoint
from learners.records import Batch, Rollout, Weights, batch_digest, batch_frames
from learners.schedule import IterationPlan


class PeerEndpoint:
    def __init__(self, learner: Learner):
        cfg: TrainConfig = learner.cfg
        self.learner, self.cfg, self.id = learner, cfg, learner.id
        self.state = PeerState(learner.id, cfg.update_epochs * cfg.num_minibatches, cfg.sync_timeout_s)
        self.state.step = learner.step
        self.frames = PeerFrames(learner.id, learner.device, cfg.sync_timeout_s)
        self.links: list[PeerLink] = []
        self._params = list(learner.agent.parameters())
        # Per peer, a logits request and (exact mode) the stream of gradients back.
        self._pool = ThreadPoolExecutor(max_workers=2 * max(1, cfg.num_learners - 1), thread_name_prefix="peer")

    @property
    def peer_ids(self) -> set[int]:
        return self.state.peer_ids

    def connect(self, links: list[PeerLink]) -> None:
        self.links = links
        self.state.peer_ids = {link.peer_id for link in links}

    # ------------------------------------------------------- training thread
    def update(self, rollouts: list[Rollout], plan: IterationPlan):
        """The learner's update of `plan.iteration` on `rollouts`, meeting the peers at the plan's sync points."""
        cfg, learner = self.cfg, self.learner
        batch = Batch.from_rollouts(rollouts, cfg.gamma, cfg.gae_lambda)
        links = self.links if plan.distill else []
        exchange = PeerExchange(links, self.state, learner.agent, self._pool, batch.size,
                                batch_digest(rollouts) if links else "", learner.num_actions,
                                cfg.distill_mode == "exact", cfg.microbatch_size or cfg.minibatch_size,
                                cfg.sync_timeout_s, learner.device)
        return learner.update(batch, plan, exchange)

    def hold_frames(self, peer_id: int, iteration: int, rollouts: list[Rollout]) -> None:
        if peer_id not in self.peer_ids:
            raise ValueError(f"learner {self.id}: frames from {peer_id}, not a peer (peers: {sorted(self.peer_ids)})")
        self.frames.hold(peer_id, iteration, *batch_frames(rollouts))

    def weights(self) -> Weights:
        return self.state.weights(self.learner.agent)

    def reset(self) -> None:
        """After the learner loaded a checkpoint: every sync in progress and every frame held is dropped."""
        self.state.reset(self.learner.step)
        self.frames.reset()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------ server threads
    def serve_logits(self, sync: SyncPoint, frames_digest: str, rows: np.ndarray, keep_graph: bool,
                     rows_per_chunk: int = 0) -> Iterator[np.ndarray]:
        """Logits of my policy on rows `rows` of peer `sync.peer_id`'s frames, chunk by chunk, at exactly step
        `sync.step`.

        Exact mode (`keep_graph`): my live weights; each chunk keeps its graph until the peer's gradient for it is
        back, a few chunks at a time (PeerState.keep_graph), and my update does not step past `sync.step` until all
        are (PeerState.wait_for_peers). Detached mode: my weights at `sync.step`, kept or live (PeerState.weights_at),
        so I need not wait for the peer.
        """
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} of shape {rows.shape}")
        if len(rows) > self.cfg.batch_size:
            raise ValueError(f"oversized request: {len(rows)} rows, more than one batch ({self.cfg.batch_size} states)")
        self.state.check(sync, wait=keep_graph)
        frames = self.frames.get(sync.peer_id, sync.iteration, frames_digest)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(frames)):
            raise ValueError(f"rows out of range: the batch has {len(frames)} rows")
        index = torch.from_numpy(rows.astype(np.int64)).to(frames.device)
        per_chunk = rows_per_chunk if rows_per_chunk > 0 else max(1, len(rows))
        for chunk, start in enumerate(range(0, len(rows), per_chunk)):
            x = frames[index[start:start + per_chunk]].to(self.learner.device)
            if keep_graph:     # my live weights: I stay at sync.step until every chunk's gradient is back
                logits = self.state.keep_graph(sync, chunk, lambda: self.learner.agent.logits(x))
            else:
                with self.state.weights_at(sync.step, self.learner.agent) as net, torch.no_grad():
                    logits = net.logits(x)
            yield logits.detach().cpu().numpy()
        self.state.served(sync)

    def apply_peer_grad(self, sync: SyncPoint, chunk: int, grad: np.ndarray) -> None:
        """Exact mode: a peer's d(loss)/d(my logits of `chunk`), checked and backpropagated in this thread into a sum
        apart from .grad (PeerState.apply_grad); my training thread adds it before its optimizer step."""
        self.state.apply_grad(sync, chunk, grad, self._params)
