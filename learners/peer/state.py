"""A learner's side of its syncs, and its weights version.

The training thread and the gRPC server's threads meet here: which peers have read my weights at which step, the
copies of my weights kept for peers that read late (detached mode), which of a peer's rows I served until the
peer's gradient for my logits on them comes back (exact mode), and the step counter those all refer to. The learner's one lock
lives in this class and no other code takes it.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from learners.peer.sync import ProtocolError, SyncError, SyncPoint, SyncTimeout
from learners.records import Weights

# Detached mode: weights kept for sync steps my peers have not read yet, so I step on without waiting for them.
# Two let me run one sync ahead of the slowest peer; a learner further ahead waits (backpressure, sync time).
SNAPSHOT_SLOTS = 2

T = TypeVar("T")


@dataclass
class KeptLogits:
    """Exact mode: the states I served a peer my logits on at one step (rows `index` of its `frames`), and the peer's
    d(its loss)/d(those logits) once it has come back. Not the logits' graph: a minibatch's graph at the paper's
    shape is gigabytes, so the forward pass is done again, a micro-batch at a time, when the gradient is here
    (PeerExchange.before_step; my weights have not moved meanwhile)."""
    frames: torch.Tensor
    index: torch.Tensor
    grad: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.index)


class PeerState:
    def __init__(self, learner_id: int, steps_per_iteration: int, timeout_s: float):
        self.id, self.steps_per_iteration, self.timeout_s = learner_id, steps_per_iteration, timeout_s
        self.step = 0                      # optimizer steps taken: the weights version
        self.peer_ids: set[int] = set()
        self._cond = threading.Condition()
        self._served: Counter[int] = Counter()                 # step -> peers whose logits request was answered
        self._kept: dict[tuple[int, int], KeptLogits] = {}     # (peer, step) -> exact mode's kept logits
        self._snapshots: dict[int, torch.nn.Module] = {}       # detached mode: step -> my weights at that step
        self._free_snapshots: list[torch.nn.Module] = []
        self._live_readers = 0                                 # detached-mode reads of the live weights right now
        self.snapshot_reads = 0                                # chunks served from kept weights

    @property
    def kept_snapshots(self) -> list[int]:
        with self._cond:
            return sorted(self._snapshots)

    # ------------------------------------------------------- training thread
    def weights(self, agent: torch.nn.Module) -> Weights:
        """My weights with the step they belong to (never torn by an optimizer step in between)."""
        with self._cond:
            return Weights.from_module(self.step, agent)

    def keep_snapshot(self, step: int, agent: torch.nn.Module) -> None:
        """Detached mode, at my sync step: keep a copy of my weights for the peers that have not read them yet, so
        I do not wait for them before my optimizer step. Waits only when every slot is still unread."""
        with self._cond:
            if self._served[step] >= len(self.peer_ids) or step in self._snapshots:
                return                            # every peer already read my live weights at this step
            if not self._cond.wait_for(lambda: len(self._snapshots) < SNAPSHOT_SLOTS, timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: peers did not read my weights of steps {sorted(self._snapshots)} "
                                f"within {self.timeout_s}s; is a peer down?")
            net = self._free_snapshots.pop() if self._free_snapshots else copy.deepcopy(agent).requires_grad_(False)
            net.load_state_dict(agent.state_dict())     # copies into the slot's tensors in place
            self._snapshots[step] = net
            self._cond.notify_all()

    def wait_for_peers(self, step: int) -> None:
        """Exact-mode barrier: every peer has read my weights at `step` and sent its gradient back."""
        need = len(self.peer_ids)

        def grads_in() -> int:
            return sum(1 for (_, s), k in self._kept.items() if s == step and k.grad is not None)

        with self._cond:
            if not self._cond.wait_for(lambda: self._served[step] >= need and grads_in() >= need,
                                       timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: peers did not complete the sync at step {step} within "
                                f"{self.timeout_s}s (served {self._served[step]}/{need}, gradients {grads_in()}/{need}); "
                                "is a peer down?")

    def take_grads(self, step: int) -> list[KeptLogits]:
        """Exact mode: the kept logits of `step` with the gradients the peers sent for them, handed over once."""
        with self._cond:
            keys = [key for key, kept in self._kept.items() if key[1] == step and kept.grad is not None]
            return [self._kept.pop(key) for key in keys]

    def advance(self, optimizer_step: Callable[[], T]) -> tuple[T, float]:
        """Run `optimizer_step` (which changes my live weights) once no peer is reading them, and move to the next
        weights version. Returns its result and the seconds waited for readers."""
        with self._cond:
            t0 = time.perf_counter()
            self._cond.wait_for(lambda: not self._live_readers)
            waited = time.perf_counter() - t0
            result = optimizer_step()
            self._kept = {k: v for k, v in self._kept.items() if k[1] > self.step}
            self.step += 1
            need = len(self.peer_ids)
            self._served = Counter({s: n for s, n in self._served.items() if s >= self.step or n < need})
            self._cond.notify_all()
        return result, waited

    def reset(self, step: int) -> None:
        """Drop every sync in progress (kept weights, logits, counts) and set my step, as from a checkpoint."""
        with self._cond:
            self._free_snapshots.extend(self._snapshots.values())
            self._snapshots.clear()
            self._served.clear()
            self._kept.clear()
            self.step = step
            self._cond.notify_all()

    # ------------------------------------------------------ server threads
    def check(self, sync: SyncPoint, wait: bool) -> None:
        """A peer's request fits me: a known peer, a step of its iteration, not beyond my next iteration; with
        `wait`, block until I am at exactly that step (exact mode serves live weights only)."""
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id} (peers: {sorted(self.peer_ids)})")
        if sync.step < 0 or sync.step // self.steps_per_iteration != sync.iteration:
            raise SyncError(f"learner {self.id}: step {sync.step} does not belong to iteration {sync.iteration}")
        with self._cond:
            if sync.step > self.step + self.steps_per_iteration:
                raise SyncError(f"learner {self.id}: unknown weight version {sync.step} (at step {self.step})")
            if not wait:
                return
            self._cond.wait_for(lambda: self.step >= sync.step, timeout=self.timeout_s)
            if self.step != sync.step:
                raise SyncError(f"learner {self.id}: sync for step {sync.step} but this learner is at step {self.step}")

    @contextlib.contextmanager
    def weights_at(self, step: int, agent: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """My network at exactly `step`, kept (detached mode) or live. Live weights are read only while I am at
        `step`, and my optimizer step (advance) waits for the read to end."""
        with self._cond:
            if not self._cond.wait_for(lambda: step in self._snapshots or self.step >= step, timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: did not reach step {step} within {self.timeout_s}s "
                                f"(at step {self.step})")
            net = self._snapshots.get(step)
            if net is None and self.step != step:
                raise SyncError(f"learner {self.id}: weights of step {step} are not kept (at step {self.step})")
            live = net is None
            self.snapshot_reads += not live
            if live:
                net = agent
                self._live_readers += 1
        try:
            yield net
        finally:
            if live:
                with self._cond:
                    self._live_readers -= 1
                    self._cond.notify_all()

    def served(self, sync: SyncPoint, kept: KeptLogits | None) -> None:
        """A peer's logits request is answered; exact mode keeps which states, for the gradient to come."""
        with self._cond:
            if kept is not None:
                self._kept[(sync.peer_id, sync.step)] = kept
            self._served[sync.step] += 1
            if self._served[sync.step] >= len(self.peer_ids) and sync.step in self._snapshots:
                self._free_snapshots.append(self._snapshots.pop(sync.step))   # read by every peer
            self._cond.notify_all()

    def queue_grad(self, sync: SyncPoint, grad: np.ndarray, num_actions: int) -> None:
        """Exact mode: a peer's gradient for the logits I kept for it at `sync.step`, checked and queued."""
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id}")
        with self._cond:
            kept = self._kept.get((sync.peer_id, sync.step))
            if kept is None or self.step != sync.step or kept.grad is not None:
                raise SyncError(f"learner {self.id}: no logits kept for peer {sync.peer_id} at step {sync.step} "
                                f"(at step {self.step})")
            if grad.shape != (kept.rows, num_actions):
                raise ProtocolError(f"peer {sync.peer_id} sent a gradient of shape {grad.shape} for the "
                                    f"({kept.rows}, {num_actions}) logits it was sent")
            kept.grad = grad
            self._cond.notify_all()
