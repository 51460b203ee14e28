"""A learner's side of its syncs, and its weights version.

The training thread and the gRPC server's threads meet here: which peers have read my weights at which step, the
copies of my weights kept for peers that read late (detached mode), my logits served to a peer with their graphs,
chunk by chunk, until the peer's gradient for them comes back, and the sum of those gradients' backward passes
(exact mode), and the step counter those all refer to. The learner's one lock
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


# Exact mode: my logits served to a peer keep their graph until the peer's gradient for them is back. A peer sends
# the gradient of each chunk (one micro-batch of its rows) as soon as its backward has it, so a few chunks' graphs
# are in flight at a time, not a minibatch's (gigabytes at the paper's shape); the serving waits for room.
GRAPHS_IN_FLIGHT = 4


class PeerState:
    def __init__(self, learner_id: int, steps_per_iteration: int, timeout_s: float):
        self.id, self.steps_per_iteration, self.timeout_s = learner_id, steps_per_iteration, timeout_s
        self.step = 0                      # optimizer steps taken: the weights version
        self.peer_ids: set[int] = set()
        self._cond = threading.Condition()
        self._served: Counter[int] = Counter()                 # step -> peers whose logits request was answered
        self._graphs: dict[tuple[int, int, int], torch.Tensor] = {}   # exact: (peer, step, chunk) -> my logits
        self._applying: set[tuple[int, int, int]] = set()             # exact: chunks being backpropagated now
        self._grad_sums: dict[int, list[torch.Tensor | None]] = {}     # exact: step -> the peers' share of my .grad
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
        """Exact-mode barrier: every peer has read my weights at `step` and sent the gradient of every chunk back."""
        need = len(self.peer_ids)

        def open_graphs() -> int:
            return sum(1 for (_, s, _) in self._graphs if s == step)

        with self._cond:
            if not self._cond.wait_for(lambda: self._served[step] >= need and not open_graphs(),
                                       timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: peers did not complete the sync at step {step} within "
                                  f"{self.timeout_s}s (served {self._served[step]}/{need}, {open_graphs()} chunks "
                                  "without their gradient); is a peer down?")

    def take_grads(self, step: int) -> list[torch.Tensor | None]:
        """Exact mode: the peers' gradients of `step` backpropagated into my parameters, summed (one per
        parameter, None where none reached it), handed over once."""
        with self._cond:
            return self._grad_sums.pop(step, [])

    def advance(self, optimizer_step: Callable[[], T]) -> tuple[T, float]:
        """Run `optimizer_step` (which changes my live weights) once no peer is reading them, and move to the next
        weights version. Returns its result and the seconds waited for readers."""
        with self._cond:
            t0 = time.perf_counter()
            self._cond.wait_for(lambda: not self._live_readers)
            waited = time.perf_counter() - t0
            result = optimizer_step()
            self._graphs = {k: v for k, v in self._graphs.items() if k[1] > self.step}
            self._grad_sums = {k: v for k, v in self._grad_sums.items() if k > self.step}
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
            self._graphs.clear()
            self._grad_sums.clear()
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

    def served(self, sync: SyncPoint) -> None:
        """A peer's logits request is answered (exact mode: every chunk is served, its graph kept)."""
        with self._cond:
            self._served[sync.step] += 1
            if self._served[sync.step] >= len(self.peer_ids) and sync.step in self._snapshots:
                self._free_snapshots.append(self._snapshots.pop(sync.step))   # read by every peer
            self._cond.notify_all()

    def keep_graph(self, sync: SyncPoint, chunk: int, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Exact mode: `forward()`, my logits of `chunk` for a peer with their graph, kept until its gradient comes
        back. Runs once fewer than GRAPHS_IN_FLIGHT of that peer's chunks are waiting for theirs."""
        key = (sync.peer_id, sync.step)
        with self._cond:
            if not self._cond.wait_for(lambda: sum(k[:2] == key for k in self._graphs) < GRAPHS_IN_FLIGHT,
                                       timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: peer {sync.peer_id} sent no gradient for my logits of step "
                                  f"{sync.step} within {self.timeout_s}s")
        logits = forward()
        with self._cond:
            self._graphs[(*key, chunk)] = logits
        return logits

    def apply_grad(self, sync: SyncPoint, chunk: int, grad: np.ndarray, params: list[torch.Tensor]) -> None:
        """Exact mode: a peer's d(its loss)/d(my logits of `chunk`), backpropagated here (the caller's thread) into a
        sum of my own, apart from .grad, which my training thread is filling meanwhile (take_grads)."""
        if sync.peer_id not in self.peer_ids:
            raise SyncError(f"learner {self.id}: unknown peer id {sync.peer_id}")
        key = (sync.peer_id, sync.step, chunk)
        with self._cond:
            logits = self._graphs.get(key)
            if logits is None or self.step != sync.step or key in self._applying:
                raise SyncError(f"learner {self.id}: no logits kept for peer {sync.peer_id} at step {sync.step}, "
                                f"chunk {chunk} (at step {self.step})")
            if grad.shape != tuple(logits.shape):
                raise ProtocolError(f"peer {sync.peer_id} sent a gradient of shape {grad.shape} for the "
                                    f"{tuple(logits.shape)} logits of chunk {chunk} it was sent")
            self._applying.add(key)
        try:
            grads = torch.autograd.grad(logits, params, torch.from_numpy(grad).to(logits.device), allow_unused=True)
        finally:
            with self._cond:
                self._applying.discard(key)
        with self._cond:
            if self._graphs.pop(key, None) is None:      # dropped meanwhile (a reset): the sum is not wanted
                return
            total = self._grad_sums.setdefault(sync.step, [None] * len(params))
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] = g if total[i] is None else total[i] + g
            self._cond.notify_all()
