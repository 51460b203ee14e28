"""A learner's gRPC server cannot be stalled by callers that are not its peers, by idle streams, or by one peer
taking every thread (learners/peer/guard.py), against real servers on 127.0.0.1."""

import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from learners.config import ConfigError, TrainConfig
from learners.peer import guard
from learners.peer.sync import SyncPoint
from protos import distill_pb2_grpc as pb_grpc
from tests.helpers import LearnerPair, peer_channel

ROWS = np.array([2, 0, 5])


def cfg() -> TrainConfig:
    return TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                       rpc_timeout_s=20, sync_timeout_s=5)


class IdleStreams:
    """Gradient streams that open and never send a message (what a port scanner or a stuck client leaves)."""

    def __init__(self, channel: grpc.Channel, n: int):
        self.release = threading.Event()
        self.calls = []

        def silent():
            self.release.wait()
            return
            yield

        stub = pb_grpc.DistillStub(channel)
        for _ in range(n):
            self.calls.append(stub.PeerGrad.future(silent(), timeout=60))

    def codes(self, timeout: float = 20) -> list:
        out = []
        for call in self.calls:
            try:
                call.result(timeout)
                out.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                out.append(err.code())
        return out

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def ask(pair) -> tuple:
    """Learner 0's logits request to learner 1, for rows ROWS of a batch learner 1 holds."""
    _, digest = pair.give_frames(0)
    return pair.client(0, 1).fetch_logits(SyncPoint(0, 0, 0, 0), digest, ROWS, keep_graph=False)


@pytest.fixture
def pair():
    p = LearnerPair(cfg(), (4,), "float32", 2)
    yield p
    p.close()


def test_a_flood_of_idle_strangers_does_not_delay_the_peer(pair):
    channel = grpc.insecure_channel(f"127.0.0.1:{pair.ports[1]}")
    flood = IdleStreams(channel, 32)
    try:
        t0 = time.perf_counter()
        logits, _, _ = ask(pair)
        assert logits.shape == (3, 2) and time.perf_counter() - t0 < 5
        assert set(flood.codes()) == {grpc.StatusCode.PERMISSION_DENIED}     # turned away, not left waiting
        assert pair.servers[1].guard.refused["not a peer"] >= 32
    finally:
        flood.close()
        channel.close()


def test_a_silent_stream_from_a_peer_is_cancelled_after_the_first_message_deadline(monkeypatch):
    monkeypatch.setattr(guard, "FIRST_MESSAGE_S", 0.5)
    p = LearnerPair(cfg(), (4,), "float32", 2)
    channel = peer_channel(f"127.0.0.1:{p.ports[1]}", peer_id=0)
    try:
        flood = IdleStreams(channel, 3)
        t0 = time.perf_counter()
        assert set(flood.codes()) == {grpc.StatusCode.CANCELLED}
        assert time.perf_counter() - t0 < 5
        flood.close()
        logits, _, _ = ask(p)
        assert logits.shape == (3, 2)
    finally:
        channel.close()
        p.close()


def test_one_peer_gets_a_bounded_share_of_the_server(pair):
    channel = peer_channel(f"127.0.0.1:{pair.ports[1]}", peer_id=0)
    held = IdleStreams(channel, guard.CALLS_PER_PEER)
    try:
        time.sleep(0.5)                                   # the held streams are in their handlers
        with pytest.raises(grpc.RpcError) as err:
            ask(pair)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert pair.servers[1].guard.refused["over the per-peer limit"] == 1
    finally:
        held.close()
        channel.close()
    deadline = time.time() + 10
    while pair.servers[1].guard.in_flight[0] and time.time() < deadline:   # the held calls end and free their slots
        time.sleep(0.05)
    logits, _, _ = ask(pair)
    assert logits.shape == (3, 2)


def test_health_checks_stay_open_to_anyone(pair):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{pair.ports[1]}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_binding_beyond_loopback_needs_a_token_or_tls(monkeypatch, tmp_path):
    from learners.coordinator.cluster import is_loopback, preflight
    from learners.peer.security import channel_token

    def config(**kw) -> TrainConfig:
        return TrainConfig(env_id="CartPole-v1", **kw).validate()

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("node")
    monkeypatch.delenv("MDPO_GRPC_TOKEN", raising=False)
    for host in ("0.0.0.0", "node"):
        with pytest.raises(ConfigError, match="MDPO_GRPC_TOKEN.*--grpc-allow-insecure"):
            preflight(config(grpc_host=host))
    preflight(config(grpc_host="localhost"))                                   # loopback: no token needed
    preflight(config(grpc_host="0.0.0.0", grpc_allow_insecure=True))           # the explicit opt-out
    monkeypatch.setenv("MDPO_GRPC_TOKEN", "t0k")
    preflight(config(grpc_host="0.0.0.0"))
    monkeypatch.delenv("MDPO_GRPC_TOKEN")
    token = tmp_path / "token"
    with_file = config(grpc_host="0.0.0.0", grpc_token_file=str(token))
    with pytest.raises(ConfigError, match="missing or empty"):       # checked where the driver runs, before a start
        preflight(with_file)
    token.write_text("from-a-file\n")
    preflight(with_file)
    assert channel_token(with_file) == "from-a-file"


def test_grpc_host_node_binds_the_address_of_the_ray_node_only():
    """`--grpc-host node` (compose, KubeRay): the server listens on the node's address, not on every interface;
    tests/test_deploy_cluster.py checks it on hosts of their own."""
    import ray

    from learners.telemetry.metrics import advertised_host, bind_host

    node_ip = ray.util.get_node_ip_address()
    assert bind_host("node") == node_ip == advertised_host("node")
    assert bind_host("0.0.0.0") == "0.0.0.0" and bind_host("127.0.0.1") == "127.0.0.1"
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port(f"{bind_host('node')}:0")
    try:
        server.start()
        with socket.create_connection((node_ip, port), timeout=5):
            pass
        if node_ip != "127.0.0.1":      # bound to the node's address: loopback is not listening
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        server.stop(0)
