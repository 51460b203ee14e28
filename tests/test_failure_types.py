"""Errors that cross a Ray boundary keep their class and fields (they pickle), so the coordinator tells a lost or
hung process (recover) from a bug or bad input (stop) by type (learners/coordinator/failures.py)."""

import pickle

import grpc
import numpy as np
import pytest
import ray

from learners.config import TrainConfig
from learners.coordinator.failures import HangDetected, TrainingDiverged, is_process_failure, wait_all
from learners.learner import NonFiniteError
from learners.peer.sync import PeerCallError, ProtocolError, SyncError, SyncPoint, SyncTimeout
from tests.helpers import LearnerPair

ERRORS = [SyncError("learner 1: sync for step 4 but this learner is at step 3"),
          SyncTimeout("learner 0: peers did not complete the sync at step 8 within 10s"),
          ProtocolError("peer 1 returned 2 rows of logits, expected 4"),
          PeerCallError(1, "PeerLogits", "DEADLINE_EXCEEDED", "Deadline Exceeded", 10.0),
          PeerCallError(1, "PeerGrad", "INVALID_ARGUMENT", "gradients must be finite float32", 0.1),
          NonFiniteError("learner 0: non-finite loss nan at step 7"),
          HangDetected("learner updates", 31.0, 30.0, (1,)),
          TrainingDiverged("diverged")]


def fields(err: BaseException) -> dict:
    return {k: v for k, v in vars(err).items() if not k.startswith("_")}


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_round_trips_through_pickle(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and fields(back) == fields(err)
    if isinstance(err, PeerCallError):
        assert back.code() == grpc.StatusCode[err.code_name] and back.details() == err.details()


def test_a_real_grpc_failure_becomes_a_peer_call_error_with_its_code():
    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                      rpc_timeout_s=5, sync_timeout_s=1)
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        client, (_, digest) = pair.client(0, 1), pair.give_frames(0)
        with pytest.raises(PeerCallError) as refused:           # step 50 is not in iteration 0
            client.fetch_logits(SyncPoint(0, 0, 0, 50), digest, np.arange(2), keep_graph=False)
        pair.servers[1].stop(None).wait(5)
        with pytest.raises(PeerCallError) as gone:
            client.fetch_logits(SyncPoint(0, 0, 0, 0), digest, np.arange(2), keep_graph=False)
    finally:
        pair.close()
    assert refused.value.code_name == "FAILED_PRECONDITION" and refused.value.peer_id == 1
    assert gone.value.code_name == "UNAVAILABLE" and gone.value.peer_lost
    back = pickle.loads(pickle.dumps(gone.value))
    assert back.code() == grpc.StatusCode.UNAVAILABLE and back.method == "PeerLogits"


@ray.remote
def _raise(err: BaseException):
    raise err


def test_through_ray_the_cause_keeps_its_type_and_decides_recovery(local_ray):
    recover = {"SyncError": True, "SyncTimeout": True, "ProtocolError": False, "PeerCallError:DEADLINE_EXCEEDED": True,
               "PeerCallError:INVALID_ARGUMENT": False, "NonFiniteError": False, "HangDetected": True,
               "TrainingDiverged": False}
    for err in ERRORS:
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            ray.get(_raise.remote(err))
        cause = caught.value.cause
        assert type(cause) is type(err) and fields(cause) == fields(err), caught.value
        name = type(err).__name__ + (f":{err.code_name}" if isinstance(err, PeerCallError) else "")
        assert is_process_failure(caught.value) is recover[name], name
    assert is_process_failure(HangDetected("x", 1.0, 1.0))


def test_wait_all_past_its_bound_names_what_is_still_running(local_ray):
    @ray.remote
    def sleepy(seconds):
        import time
        time.sleep(seconds)
        return seconds

    with pytest.raises(HangDetected) as hang:
        wait_all([sleepy.remote(0), sleepy.remote(30)], bound_s=2.0, what="the test's tasks")
    assert hang.value.stuck == (1,) and hang.value.waited_s >= 1.9 and "the test's tasks" in str(hang.value)
