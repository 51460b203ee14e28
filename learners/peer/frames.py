"""My peers' observations, held once per iteration, so only logits cross the wire at a sync.

The coordinator hands every learner its peers' rollouts of the iteration (Ray object references: on one node the
frames are not copied, across nodes Ray moves them once) beside each update. A peer's logits request names rows of
its batch and the frames it trains on (iteration and digest): a rollback or a re-run `collect` makes other frames
for the same iteration, and a request for frames I do not hold is refused, never answered on the wrong states.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from learners.peer.sync import SyncError, SyncTimeout


class PeerFrames:
    def __init__(self, learner_id: int, device: torch.device, timeout_s: float):
        self.id, self.device, self.timeout_s = learner_id, device, timeout_s
        self._held: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}   # (peer, iteration) -> (digest, frames)
        self._cond = threading.Condition()

    def hold(self, peer_id: int, iteration: int, obs: np.ndarray, digest: str) -> None:
        """Peer `peer_id`'s frames of `iteration`, in its batch's row order (records.batch_frames). Frames of its
        earlier iterations go: every sync of those ended before the coordinator started this iteration."""
        with warnings.catch_warnings():      # Ray's read-only buffer: read, never written
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            frames = torch.from_numpy(obs)
        if self.device.type == "cuda":
            frames = frames.pin_memory().to(self.device, non_blocking=True)
        with self._cond:
            self._held = {(p, i): v for (p, i), v in self._held.items() if p != peer_id or i >= iteration}
            self._held[(peer_id, iteration)] = (digest, frames)
            self._cond.notify_all()

    def get(self, peer_id: int, iteration: int, digest: str) -> torch.Tensor:
        """The frames a request names, once they are here (a peer may start its update before my copy arrives)."""
        with self._cond:
            if not self._cond.wait_for(lambda: (peer_id, iteration) in self._held, timeout=self.timeout_s):
                raise SyncTimeout(f"learner {self.id}: peer {peer_id}'s frames of iteration {iteration} did not "
                                  f"arrive within {self.timeout_s}s (holding {sorted(self._held)})")
            held, frames = self._held[(peer_id, iteration)]
        if held != digest:
            raise SyncError(f"learner {self.id}: peer {peer_id} asks for frames {digest[:12]} of iteration {iteration}, "
                            f"I hold {held[:12]} (re-collected after a failure?)")
        return frames

    def release(self, iteration: int) -> None:
        """Every peer's update of `iteration` is over: its frames go (they would otherwise stay in Ray's object store
        beside the next iteration's rollouts, 200 MB a learner at the paper's shape)."""
        with self._cond:
            self._held = {(p, i): v for (p, i), v in self._held.items() if i > iteration}

    def reset(self) -> None:
        """After a restore: the iterations held are redone with new frames."""
        with self._cond:
            self._held.clear()

    @property
    def nbytes(self) -> int:
        with self._cond:
            return sum(frames.numel() * frames.element_size() for _, frames in self._held.values())
