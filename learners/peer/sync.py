"""Sync points between peer learners and the errors of an exchange.

A sync point is an optimizer step of both learners: a peer's request for step s is answered with the weights of
exactly step s. What can go wrong is told apart by type, so the coordinator decides from the type whether a peer is
gone (recover) or wrong (a bug: stop).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class SyncPoint:
    peer_id: int       # learner id of the caller
    iteration: int
    sync_index: int
    step: int          # optimizer step both sides are at


class SyncError(RuntimeError):
    """A sync request does not fit this learner's state (wrong peer, wrong step, timed out): a peer is gone, late or
    restarted."""


class SyncTimeout(SyncError):
    """A peer did not do its part of a sync within the bound: gone or hung."""


class ProtocolError(RuntimeError):
    """A peer broke the exchange's contract (rows of the wrong shape or count, non-finite logits): a bug in the peer,
    not a divergence of training and not a lost peer."""


# gRPC status codes that mean the peer is gone, hung or restarted (out of step), not that a request was wrong.
PEER_LOST_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "FAILED_PRECONDITION",
                             "RESOURCE_EXHAUSTED", "UNKNOWN"})


class PeerCallError(grpc.RpcError):
    """A call to a peer learner failed at the gRPC level. Plain data (peer, method, status code name, details), so
    it pickles across a Ray boundary with its class and code; gRPC's own error object does not. Like that object it
    answers code() and details()."""

    def __init__(self, peer_id: int, method: str, code: str, details: str, seconds: float = 0.0):
        super().__init__(peer_id, method, code, details, seconds)
        self.peer_id, self.method, self.code_name, self.message, self.seconds = peer_id, method, code, details, seconds

    def __str__(self) -> str:
        return (f"{self.method} to peer learner {self.peer_id} failed after {self.seconds:.1f}s: "
                f"{self.code_name}: {self.message}")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code_name]

    def details(self) -> str:
        return self.message

    @property
    def peer_lost(self) -> bool:
        """The peer is gone, hung or out of step (recover by restarting); otherwise the request itself was wrong."""
        return self.code_name in PEER_LOST_CODES

    @classmethod
    def from_rpc(cls, peer_id: int, method: str, err: grpc.RpcError, seconds: float = 0.0) -> "PeerCallError":
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        return cls(peer_id, method, code.name if code is not None else "UNKNOWN", str(details or ""), seconds)
