"""The learner's gRPC service with real servers on 127.0.0.1."""

import grpc
import numpy as np
import pytest
import torch

from learners.config import TrainConfig
from learners.peer.client import PeerClient
from learners.peer.wire import MAX_MESSAGE_BYTES, to_ndarray
from learners.peer.sync import SyncPoint
from learners.schedule import IterationPlan
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc
from tests.helpers import peer_channel, LearnerPair, synthetic_rollout

IMAGE = ((64, 64, 3), "uint8", 15)


@pytest.fixture
def image_pair():
    cfg = TrainConfig(env_id="coinrun", num_envs=16, num_steps=64, num_minibatches=2, update_epochs=1,
                      rpc_timeout_s=30, sync_timeout_s=2)
    pair = LearnerPair(cfg, *IMAGE)
    yield pair
    pair.close()


def test_logits_over_grpc_equal_local_forward_even_beyond_message_limit(image_pair):
    server = image_pair.learners[1]
    client = image_pair.learners[0].peers[0]
    obs = np.random.default_rng(0).integers(0, 256, (800, 64, 64, 3), dtype=np.uint8)
    assert obs.nbytes > MAX_MESSAGE_BYTES           # must be chunked to get through
    logits, sent, received = client.fetch_logits(SyncPoint(0, 0, 0, 0), obs, keep_graph=False)
    with torch.no_grad():
        expected = server.agent.logits(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert sent > obs.nbytes and received > logits.nbytes


def _call(pair, msgs):
    channel = peer_channel(f"127.0.0.1:{pair.ports[1]}")
    try:
        return list(pb_grpc.DistillStub(channel).PeerLogits(iter(msgs), timeout=10))
    finally:
        channel.close()


def _chunk(obs, peer_id=0, step=0, index=0):
    return pb.ObsChunk(sync=pb.SyncPoint(peer_id=peer_id, step=step), chunk_index=index, num_chunks=1,
                       obs=to_ndarray(obs))


GOOD = np.zeros((2, 64, 64, 3), np.uint8)


@pytest.mark.parametrize("msg,code", [
    (_chunk(GOOD.astype(np.float32)), grpc.StatusCode.INVALID_ARGUMENT),               # wrong dtype
    (_chunk(np.zeros((2, 32, 32, 3), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT),     # wrong shape
    (pb.ObsChunk(sync=pb.SyncPoint(peer_id=0), obs=pb.NDArray(dtype="uint8", shape=[5, 64, 64, 3], data=b"xx")),
     grpc.StatusCode.INVALID_ARGUMENT),                                                  # bytes do not fit shape
    (pb.ObsChunk(sync=pb.SyncPoint(peer_id=0), obs=pb.NDArray(dtype="object", shape=[1], data=b"x")),
     grpc.StatusCode.INVALID_ARGUMENT),                                                  # dtype not allowed
    (_chunk(GOOD, peer_id=7), grpc.StatusCode.FAILED_PRECONDITION),                     # unknown peer
    (_chunk(GOOD, peer_id=1), grpc.StatusCode.FAILED_PRECONDITION),                     # itself
    (_chunk(GOOD, step=5), grpc.StatusCode.FAILED_PRECONDITION),                        # step not in iteration 0
    (pb.ObsChunk(sync=pb.SyncPoint(peer_id=0, iteration=40, step=80), obs=to_ndarray(GOOD)),
     grpc.StatusCode.FAILED_PRECONDITION),                                               # unknown weight version
    (_chunk(np.zeros((700, 64, 64, 3), np.uint8)), grpc.StatusCode.RESOURCE_EXHAUSTED), # message > gRPC's limit
    (_chunk(GOOD, index=3), grpc.StatusCode.INVALID_ARGUMENT),                          # chunk out of order
])
def test_malformed_requests_are_rejected_and_the_server_stays_up(image_pair, msg, code):
    with pytest.raises(grpc.RpcError) as err:
        _call(image_pair, [msg])
    assert err.value.code() == code, err.value.details()
    assert len(_call(image_pair, [_chunk(GOOD)])) == 1      # still serving


def test_stream_larger_than_one_batch_is_rejected(image_pair):
    chunks = [_chunk(np.zeros((128, 64, 64, 3), np.uint8), index=i) for i in range(9)]   # 1152 > 1024 states
    with pytest.raises(grpc.RpcError) as err:
        _call(image_pair, chunks)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "oversized" in err.value.details()


def test_gradient_without_kept_logits_is_rejected(image_pair):
    client = image_pair.learners[0].peers[0]
    with pytest.raises(grpc.RpcError) as err:
        client.send_grad(SyncPoint(0, 0, 0, 0), np.zeros((2, 15), np.float32))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_gradient_of_the_wrong_shape_is_a_protocol_error_and_invalid_argument(image_pair):
    """A peer that returns a gradient for more rows than it was sent broke the contract: ProtocolError locally,
    INVALID_ARGUMENT on the wire (never divergence, never 'peer gone')."""
    from learners.peer.sync import ProtocolError

    client, server = image_pair.learners[0].peers[0], image_pair.learners[1]
    obs = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    sync = SyncPoint(0, 0, 0, 0)
    client.fetch_logits(sync, obs, keep_graph=True)              # the server keeps 4 rows' logits for me
    with pytest.raises(ProtocolError, match="shape"):
        server.apply_peer_grad(sync, np.zeros((5, 15), np.float32))
    with pytest.raises(grpc.RpcError) as err:
        client.send_grad(sync, np.zeros((5, 15), np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.send_grad(sync, np.zeros((4, 15), np.float32))       # the right shape is still taken


@pytest.mark.parametrize("sync,expected_syncs,expected_staleness", [
    ("minibatch", 4, 0), ("epoch", 2, 1), ("iteration", 1, 3), ("2", 2, 1)])
def test_detached_schedules_sync_counts_and_staleness(sync, expected_syncs, expected_staleness):
    cfg = TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2,
                      sync=sync, rpc_timeout_s=30, sync_timeout_s=30)
    plan = IterationPlan(0, 3, cfg.batch_size, 2, 2, sync, True, 1e-3)
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        stats = pair.update_all([synthetic_rollout(i, (4,), "float32", 2, 8, 4, i) for i in range(2)], plan)
        for s in stats:
            assert s.syncs == expected_syncs
            assert s.staleness_max == expected_staleness
            assert s.kl_peer > 0 and s.sync_bytes_sent > 0
    finally:
        pair.close()


def test_three_learners_each_distill_toward_every_peer():
    cfg = TrainConfig(env_id="CartPole-v1", num_learners=3, num_envs=4, num_steps=8, num_minibatches=2,
                      update_epochs=1, rpc_timeout_s=30, sync_timeout_s=30)
    plan = IterationPlan(0, 3, cfg.batch_size, 2, 1, "minibatch", True, 1e-3)
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        stats = pair.update_all([synthetic_rollout(i, (4,), "float32", 2, 8, 4, i) for i in range(3)], plan)
        assert [s.syncs for s in stats] == [2, 2, 2]
        assert all(len(l.peers) == 2 for l in pair.learners)
        assert all(s.step == 2 for s in stats)
    finally:
        pair.close()


def test_alpha_zero_sends_nothing():
    cfg = TrainConfig(env_id="CartPole-v1", alpha=0.0, num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1)
    plan = IterationPlan(0, 3, cfg.batch_size, 2, 1, "minibatch", cfg.distilling, 1e-3)
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        stats = pair.update_all([synthetic_rollout(i, (4,), "float32", 2, 8, 4, i) for i in range(2)], plan)
        assert all(s.syncs == 0 and s.sync_bytes_sent == 0 and s.kl_peer == 0 for s in stats)
    finally:
        pair.close()
