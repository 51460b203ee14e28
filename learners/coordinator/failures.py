"""How a run ends early, and which failures it recovers from: a dead, hung or unreachable process is killed,
replaced and the run rolled back to its last checkpoint; a bug, bad input or a diverged loss stops it.

The decision is made from types that survive a Ray boundary (they pickle with their class and fields):
learners/peer/sync.py's SyncError, ProtocolError and PeerCallError (with its gRPC status code), and HangDetected.
"""

from __future__ import annotations

import time
from collections import deque

import ray

from learners.peer.sync import PeerCallError, ProtocolError, SyncError, SyncTimeout

# A derived hang bound: this many times the slowest recent iteration, never under the floor.
HANG_FACTOR = 5.0
HANG_WINDOW = 10          # iterations the slowest is taken over
FIRST_ITERATION_FLOORS = 4   # before any iteration is measured (process start-up, first collection): 4 x the floor
# Starting processes (imports, Ray worker start-up, CUDA init) on a loaded machine is slow, not hung: start-up calls
# wait at least this long even under a small --hang-timeout-s.
STARTUP_S = 120.0


class RunStopped(Exception):
    """SIGINT/SIGTERM arrived; a final checkpoint was written."""


class TrainingDiverged(RuntimeError):
    """A loss or logits went non-finite; the run stops and keeps its last good checkpoint."""


class HangDetected(RuntimeError):
    """Processes did not answer within the bound; they are treated as failed (killed, replaced, rolled back)."""

    def __init__(self, what: str, waited_s: float, bound_s: float, stuck: tuple = ()):
        super().__init__(what, waited_s, bound_s, stuck)
        self.what, self.waited_s, self.bound_s, self.stuck = what, waited_s, bound_s, stuck

    def __str__(self) -> str:
        which = f" (stuck: {', '.join(map(str, self.stuck))})" if self.stuck else ""
        return f"{self.what}{which} did not answer within {self.waited_s:.0f}s (bound {self.bound_s:.0f}s)"


def is_hang(err: BaseException) -> bool:
    """A process that did not answer in time (the coordinator's bound, a peer's sync wait or gRPC deadline), as
    opposed to one seen dead."""
    cause = getattr(err, "cause", None)
    return (isinstance(err, HangDetected) or isinstance(cause, SyncTimeout)
            or isinstance(cause, PeerCallError) and cause.code_name == "DEADLINE_EXCEEDED")


def is_process_failure(err: BaseException) -> bool:
    """A dead, hung or unreachable process (directly, or as its peer saw it), as opposed to a bug or bad input."""
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.GetTimeoutError, HangDetected)):
        return True
    cause = getattr(err, "cause", None)
    if isinstance(cause, ProtocolError):
        return False           # the peer is there and wrong: restarting it would not help
    if isinstance(cause, PeerCallError):
        return cause.peer_lost
    return isinstance(cause, (SyncError, ray.exceptions.RayActorError))


class HangBounds:
    """How long the coordinator waits on another process: --hang-timeout-s if set, else derived from the run."""

    def __init__(self, fixed_s: float, floor_s: float):
        self.fixed_s, self.floor_s = fixed_s, floor_s
        self.recent: deque[float] = deque(maxlen=HANG_WINDOW)    # seconds of the latest iterations

    def observe(self, iteration_seconds: float) -> None:
        self.recent.append(iteration_seconds)

    def reset(self) -> None:
        """New processes start up again: the next iteration gets the first-iteration bound."""
        self.recent.clear()

    @property
    def startup_seconds(self) -> float:
        return max(self.seconds, STARTUP_S)

    @property
    def seconds(self) -> float:
        if self.fixed_s:   # the first iteration after a (re)start also starts processes
            return self.fixed_s if self.recent else max(self.fixed_s, STARTUP_S)
        if not self.recent:
            return FIRST_ITERATION_FLOORS * self.floor_s
        return max(self.floor_s, HANG_FACTOR * max(self.recent))


def wait_all(refs: list, bound_s: float | None = None, what: str = "tasks") -> list:
    """ray.get that fails as soon as any task fails (a dead learner must not leave us waiting on its peer), and
    with `bound_s` raises HangDetected once that long has passed with some still running."""
    pending, done = list(refs), {}
    t0 = time.monotonic()
    while pending:
        left = None if bound_s is None else bound_s - (time.monotonic() - t0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=None if left is None else max(0.0, left))
        if not ready:
            stuck = tuple(i for i, r in enumerate(refs) if r not in done)
            raise HangDetected(what, time.monotonic() - t0, bound_s, stuck)
        done[ready[0]] = ray.get(ready[0])
    return [done[r] for r in refs]


def await_rollouts(weights: list, rollouts: list[list], bound_s: float, kill_actor) -> None:
    """Wait until every rollout of `rollouts` (per learner, per actor) is in the object store, within the hang
    bound. Past it, the actors still collecting are hung: `kill_actor(learner, actor, waited_s)`, after which Ray
    restarts them and collects the rollout again, and the wait goes on. The learners are not involved: their
    updates start only once every rollout is there, so a hung actor never makes a learner wait on its peer.
    The rollouts need the learners' `weights` first: a learner that does not hand them over is the one hung."""
    t0 = time.monotonic()
    ready, _ = ray.wait(weights, num_returns=len(weights), timeout=bound_s, fetch_local=False)
    if len(ready) < len(weights):
        handed = set(ready)
        stuck = tuple(i for i, w in enumerate(weights) if w not in handed)
        raise HangDetected("learner weights", time.monotonic() - t0, bound_s, stuck)
    flat = [r for group in rollouts for r in group]
    while True:
        t0 = time.monotonic()
        ready, _ = ray.wait(flat, num_returns=len(flat), timeout=bound_s, fetch_local=False)
        if len(ready) == len(flat):
            return
        done = set(ready)
        for i, group in enumerate(rollouts):
            for a, ref in enumerate(group):
                if ref not in done:
                    kill_actor(i, a, time.monotonic() - t0)
