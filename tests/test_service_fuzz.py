"""Property-based: random and mutated messages thrown at a live learner server never crash it and are
answered with a proper status (OK, INVALID_ARGUMENT, FAILED_PRECONDITION, or gRPC's own size limit)."""

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learners.config import TrainConfig
from learners.peer.wire import to_ndarray
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc
from tests.helpers import peer_channel, LearnerPair

ACCEPTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server():
    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                      rpc_timeout_s=10, sync_timeout_s=0.2)
    pair = LearnerPair(cfg, (4,), "float32", 2)
    channel = peer_channel(f"127.0.0.1:{pair.ports[1]}")
    HELD["digest"] = pair.give_frames(0)[1]          # learner 1 holds a batch of learner 0's: valid requests exist
    yield pb_grpc.DistillStub(channel)
    channel.close()
    pair.close()


def status_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


HELD = {}


def valid(rows: int = 2) -> pb.LogitsRequest:
    return pb.LogitsRequest(sync=pb.SyncPoint(peer_id=0), frames_digest=HELD["digest"],
                            rows=to_ndarray(np.arange(rows, dtype=np.int32)))


def alive(stub) -> bool:
    return len(list(stub.PeerLogits(valid(), timeout=10))) == 1


ndarrays = st.builds(
    pb.NDArray,
    dtype=st.sampled_from(["float32", "int32", "uint8", "float64", "int64", "object", "<U4", "", "complex64"]),
    shape=st.lists(st.integers(-3, 40), max_size=4),
    data=st.binary(max_size=512))
syncs = st.builds(pb.SyncPoint, peer_id=st.integers(-2, 3), iteration=st.integers(-1, 3),
                  sync_index=st.integers(-1, 5), step=st.integers(-2, 8))
logits_requests = st.builds(pb.LogitsRequest, sync=syncs, frames_digest=st.one_of(st.just("held"), st.text(max_size=40)),
                            rows=ndarrays, keep_graph=st.booleans(), rows_per_chunk=st.integers(-5, 1 << 30))
grad_chunks = st.builds(pb.GradChunk, sync=syncs, chunk_index=st.integers(-1, 3), num_chunks=st.integers(-1, 3),
                        grad=ndarrays)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=logits_requests)
def test_random_logits_requests(server, msg):
    if msg.frames_digest == "held":
        msg.frames_digest = HELD["digest"]       # past the digest check, so the rest of the request is looked at
    assert status_of(lambda: list(server.PeerLogits(msg, timeout=10))) in ACCEPTED
    assert alive(server)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(grad_chunks, max_size=3))
def test_random_gradients(server, msgs):
    assert status_of(lambda: server.PeerGrad(iter(msgs), timeout=10)) in ACCEPTED
    assert alive(server)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       rows=st.integers(1, 6))
def test_mutated_valid_requests(server, flips, rows):
    raw = bytearray(valid(rows).SerializeToString())
    for pos, value in flips:
        raw[pos % len(raw)] = value
    msg = pb.LogitsRequest()
    try:
        msg.ParseFromString(bytes(raw))
    except Exception:   # not even a protobuf any more: gRPC would not deliver it as one
        return
    code = status_of(lambda: list(server.PeerLogits(msg, timeout=10)))
    assert code in ACCEPTED
    assert alive(server)
