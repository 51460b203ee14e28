"""The peers' frames a learner holds (learners/peer/frames.py): keyed by peer, iteration and digest, awaited when a
peer's request comes first, let go when no request can name them any more."""

import threading
import time

import numpy as np
import pytest
import torch

from learners.peer.frames import PeerFrames
from learners.peer.sync import SyncError, SyncTimeout


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)


def test_held_by_iteration_and_digest_awaited_and_let_go():
    held = PeerFrames(0, torch.device("cpu"), timeout_s=0.3)
    a, b = frames(1), frames(2)
    held.hold(1, 0, a, "digest-a")
    np.testing.assert_array_equal(held.get(1, 0, "digest-a").numpy(), a)          # the very frames, in their order
    with pytest.raises(SyncError, match="re-collected"):
        held.get(1, 0, "digest-b")                         # other frames for the same iteration: refused
    with pytest.raises(SyncTimeout, match="did not arrive"):
        held.get(2, 0, "digest-a")                         # never handed over: refused after the bound

    later = threading.Timer(0.1, held.hold, (2, 1, b, "digest-b"))    # a request that comes before its frames
    later.start()
    t0 = time.perf_counter()
    np.testing.assert_array_equal(held.get(2, 1, "digest-b").numpy(), b)
    assert time.perf_counter() - t0 >= 0.05
    assert held.nbytes == a.nbytes + b.nbytes

    held.release(0)                                        # every update of iteration 0 is over
    assert held.nbytes == b.nbytes
    with pytest.raises(SyncTimeout):
        held.get(1, 0, "digest-a")
    held.hold(2, 2, a, "digest-a2")                        # a newer iteration of the same peer replaces older ones
    assert held.nbytes == a.nbytes
    held.reset()                                           # a restore: nothing held
    assert held.nbytes == 0
