"""Sync points between peer learners and the errors of an exchange.

A sync point is an optimizer step of both learners: a peer's request for step s is answered with the weights of
exactly step s. What can go wrong is told apart by type, so the coordinator decides from the type whether a peer is
gone (recover) or wrong (a bug: stop).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyncPoint:
    peer_id: int       # learner id of the caller
    iteration: int
    sync_index: int
    step: int          # optimizer step both sides are at


class SyncError(RuntimeError):
    """A sync request does not fit this learner's state (wrong peer, wrong step, timed out): a peer is gone, late or
    restarted."""


class ProtocolError(RuntimeError):
    """A peer broke the exchange's contract (rows of the wrong shape or count, non-finite logits): a bug in the peer,
    not a divergence of training and not a lost peer."""
