"""How a run ends early, and which failures it recovers from: a dead or unreachable process is restarted and the
run rolled back to its last checkpoint; a bug, bad input or a diverged loss stops it."""

from __future__ import annotations

import grpc
import ray

from learners.peer.sync import SyncError


class RunStopped(Exception):
    """SIGINT/SIGTERM arrived; a final checkpoint was written."""


class TrainingDiverged(RuntimeError):
    """A loss or logits went non-finite; the run stops and keeps its last good checkpoint."""


def is_process_failure(err: Exception) -> bool:
    """A dead or unreachable actor (directly, or seen by its peer as a failed sync), as opposed to a bug."""
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(cause, (SyncError, grpc.RpcError, ray.exceptions.RayActorError))


def wait_all(refs: list) -> list:
    """ray.get that fails as soon as any task fails (a dead learner must not leave us waiting on its peer)."""
    pending, done = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done[ready[0]] = ray.get(ready[0])
    return [done[r] for r in refs]
