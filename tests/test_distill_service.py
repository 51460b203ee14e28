"""The learner's gRPC service with real servers on 127.0.0.1."""

import grpc
import numpy as np
import pytest
import torch

from learners.config import TrainConfig
from learners.peer.client import PeerClient
from learners.peer.wire import to_ndarray
from learners.peer.sync import SyncPoint
from learners.schedule import IterationPlan
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc
from tests.helpers import (LearnerPair, assert_same_parameters, peer_channel, reference_of, reference_update,
                           synthetic_rollout)

IMAGE = ((64, 64, 3), "uint8", 15)


@pytest.fixture
def image_pair():
    cfg = TrainConfig(env_id="coinrun", num_envs=16, num_steps=64, num_minibatches=2, update_epochs=1,
                      rpc_timeout_s=30, sync_timeout_s=2)
    pair = LearnerPair(cfg, *IMAGE)
    yield pair
    pair.close()


def test_logits_over_grpc_equal_local_forward_on_the_held_frames_and_only_rows_and_logits_travel(image_pair):
    server = image_pair.learners[1]
    client = image_pair.client(0, 1)
    obs, digest = image_pair.give_frames(0)                   # 1024 frames of learner 0's, held by learner 1
    rows = np.random.default_rng(0).permutation(len(obs))[:800]
    chunks = []
    logits, sent, received = client.fetch_logits(SyncPoint(0, 0, 0, 0), digest, rows, keep_graph=False,
                                                 on_chunk=chunks.append, rows_per_chunk=96)
    with torch.no_grad():
        expected = server.agent.logits(torch.from_numpy(obs[rows])).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert [len(c) for c in chunks] == [96] * 8 + [32]        # streamed in the chunks asked for
    assert 4 * len(rows) < sent < 4 * len(rows) + 512         # the request: int32 rows and a sync point, no frames
    assert logits.nbytes < received < logits.nbytes + 64 * len(chunks)


def _call(pair, request):
    channel = peer_channel(f"127.0.0.1:{pair.ports[1]}")
    try:
        return list(pb_grpc.DistillStub(channel).PeerLogits(request, timeout=10))
    finally:
        channel.close()


FRAMES = {}      # the digest of the batch of learner 0's that learner 1 holds in the test at hand


def _request(rows=np.arange(2, dtype=np.int32), peer_id=0, step=0, iteration=0, digest=None):
    return pb.LogitsRequest(sync=pb.SyncPoint(peer_id=peer_id, iteration=iteration, step=step),
                            frames_digest=FRAMES["digest"] if digest is None else digest,
                            rows=rows if isinstance(rows, pb.NDArray) else to_ndarray(rows))


@pytest.mark.parametrize("request_of,code", [
    (lambda: _request(np.arange(2, dtype=np.float32)), grpc.StatusCode.INVALID_ARGUMENT),   # rows not integers
    (lambda: _request(np.zeros((2, 2), np.int32)), grpc.StatusCode.INVALID_ARGUMENT),      # rows not 1-D
    (lambda: _request(pb.NDArray(dtype="int32", shape=[5], data=b"xx")),
     grpc.StatusCode.INVALID_ARGUMENT),                                                     # bytes do not fit shape
    (lambda: _request(pb.NDArray(dtype="object", shape=[1], data=b"x")),
     grpc.StatusCode.INVALID_ARGUMENT),                                                     # dtype not allowed
    (lambda: _request(np.array([0, 1024], np.int32)), grpc.StatusCode.INVALID_ARGUMENT),   # row beyond the batch
    (lambda: _request(np.array([-1], np.int32)), grpc.StatusCode.INVALID_ARGUMENT),        # negative row
    (lambda: _request(peer_id=7), grpc.StatusCode.FAILED_PRECONDITION),                    # unknown peer
    (lambda: _request(peer_id=1), grpc.StatusCode.FAILED_PRECONDITION),                    # itself
    (lambda: _request(step=5), grpc.StatusCode.FAILED_PRECONDITION),                       # step not in iteration 0
    (lambda: _request(iteration=40, step=80), grpc.StatusCode.FAILED_PRECONDITION),        # unknown weight version
    (lambda: _request(digest="0" * 32), grpc.StatusCode.FAILED_PRECONDITION),              # other frames (re-collected)
    (lambda: _request(iteration=1, step=1), grpc.StatusCode.FAILED_PRECONDITION),          # frames never handed over
    (lambda: _request(np.zeros(3_000_000, np.int32)), grpc.StatusCode.RESOURCE_EXHAUSTED), # message > gRPC's limit
])
def test_malformed_requests_are_rejected_and_the_server_stays_up(image_pair, request_of, code):
    FRAMES["digest"] = image_pair.give_frames(0)[1]
    with pytest.raises(grpc.RpcError) as err:
        _call(image_pair, request_of())
    assert err.value.code() == code, err.value.details()
    assert len(_call(image_pair, _request())) == 1      # still serving


def test_a_request_for_more_than_one_batch_is_rejected(image_pair):
    FRAMES["digest"] = image_pair.give_frames(0)[1]
    with pytest.raises(grpc.RpcError) as err:
        _call(image_pair, _request(np.zeros(1152, np.int32)))    # 1152 > 1024 states
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "oversized" in err.value.details()


def test_gradient_without_kept_logits_is_rejected(image_pair):
    client = image_pair.client(0, 1)
    with pytest.raises(grpc.RpcError) as err:
        client.send_grads(SyncPoint(0, 0, 0, 0), [(0, np.zeros((2, 15), np.float32))])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_gradient_of_the_wrong_shape_is_a_protocol_error_and_invalid_argument(image_pair):
    """A peer that returns a gradient for more rows than it asked for broke the contract: ProtocolError locally,
    INVALID_ARGUMENT on the wire (never divergence, never 'peer gone')."""
    from learners.peer.sync import ProtocolError

    client, server = image_pair.client(0, 1), image_pair.endpoints[1]
    _, digest = image_pair.give_frames(0)
    sync = SyncPoint(0, 0, 0, 0)
    client.fetch_logits(sync, digest, np.arange(6), keep_graph=True, rows_per_chunk=4)   # chunks of 4 and 2 rows
    with pytest.raises(ProtocolError, match="shape"):
        server.apply_peer_grad(sync, 0, np.zeros((5, 15), np.float32))
    with pytest.raises(grpc.RpcError) as err:
        client.send_grads(sync, [(1, np.zeros((4, 15), np.float32))])     # chunk 1 had 2 rows
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.send_grads(sync, [(0, np.zeros((4, 15), np.float32)), (1, np.zeros((2, 15), np.float32))]) > 0
    with pytest.raises(grpc.RpcError) as err:                                  # each chunk's gradient is taken once
        client.send_grads(sync, [(0, np.zeros((4, 15), np.float32))])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_exact_mode_keeps_the_graphs_of_a_few_chunks_at_a_time(image_pair):
    """The server computes a chunk with its graph only while fewer than GRAPHS_IN_FLIGHT chunks wait for their
    gradient: a minibatch's graph is never held whole (gigabytes at the paper's shape)."""
    from learners.peer.state import GRAPHS_IN_FLIGHT

    client, server = image_pair.client(0, 1), image_pair.endpoints[1]
    _, digest = image_pair.give_frames(0)
    sync, arrived = SyncPoint(0, 0, 0, 0), []
    with pytest.raises(Exception, match="sent no gradient"):          # no gradient ever comes: the stream stops
        client.fetch_logits(sync, digest, np.arange(40), keep_graph=True, rows_per_chunk=4, on_chunk=arrived.append)
    assert len(arrived) == GRAPHS_IN_FLIGHT and len(server.state._graphs) == GRAPHS_IN_FLIGHT


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


@pytest.mark.parametrize("mode", ["detached", "exact"])
def test_three_learners_each_distill_toward_every_peer(mode):
    cfg = TrainConfig(env_id="CartPole-v1", num_learners=3, num_envs=4, num_steps=8, num_minibatches=2,
                      update_epochs=1, distill_mode=mode, learning_rate=1e-2, rpc_timeout_s=30, sync_timeout_s=30)
    plan = IterationPlan(0, 3, cfg.batch_size, 2, 1, "minibatch", True, cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 8, 4, i) for i in range(3)]
    pair = LearnerPair(cfg, (4,), "float32", 2)
    try:
        reference, optimizers = reference_of(pair)
        stats = pair.update_all(rollouts, plan)
        assert [s.syncs for s in stats] == [2, 2, 2]
        assert all(len(e.links) == 2 for e in pair.endpoints)
        assert all(s.step == 2 for s in stats)
        expected = reference_update(reference, optimizers, rollouts, cfg, plan)    # each toward the mean KL of two
        for learner, ref, s, e in zip(pair.learners, reference, stats, expected):
            assert_same_parameters(learner.agent, ref)
            assert s.kl_peer == pytest.approx(e["kl_peer"], rel=1e-4) and s.kl_peer > 0
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
