"""TLS, mutual TLS and the shared token on the learners' channel, with real certificates and servers."""

import grpc
import numpy as np
import pytest

from learners.config import ConfigError, TrainConfig
from learners.peer.client import PeerClient
from learners.peer.security import ChannelSecurity
from learners.peer.sync import SyncPoint
from tests.helpers import LearnerPair, make_certificates

ROWS = np.array([2, 0, 5])
DIGEST = {}     # port -> the digest of the batch of learner 0 that the server there holds


def cfg(**kw):
    return TrainConfig(env_id="CartPole-v1", num_envs=4, num_steps=8, num_minibatches=2, update_epochs=1,
                       rpc_timeout_s=5, sync_timeout_s=5, **kw)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("other"))


def security(certs, mtls=False, token=None):
    return ChannelSecurity(certs["cert"].read_bytes(), certs["key"].read_bytes(), certs["ca"].read_bytes(), mtls, token)


def fetch(port, sec):
    client = PeerClient(1, 0, f"127.0.0.1:{port}", 5, sec)
    try:
        return client.fetch_logits(SyncPoint(0, 0, 0, 0), DIGEST.get(port, ""), ROWS, keep_graph=False)[0]
    finally:
        client.close()


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_tls_pair_trains_and_wrong_or_missing_credentials_are_rejected(certs, other_certs, mtls):
    sec = security(certs, mtls=mtls, token="s3cret")
    pair = LearnerPair(cfg(), (4,), "float32", 2, security=sec)
    port = pair.ports[1]
    DIGEST[port] = pair.give_frames(0)[1]
    try:
        assert fetch(port, sec).shape == (3, 2)
        # plaintext client against a TLS server
        with pytest.raises(grpc.RpcError) as err:
            fetch(port, ChannelSecurity(token="s3cret"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA refuses the server certificate
        with pytest.raises(grpc.RpcError) as err:
            fetch(port, security(other_certs, mtls=mtls, token="s3cret"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # wrong token over a valid TLS channel
        with pytest.raises(grpc.RpcError) as err:
            fetch(port, security(certs, mtls=mtls, token="guess"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        if mtls:   # trusts the CA but presents no client certificate
            no_client_cert = ChannelSecurity(None, None, certs["ca"].read_bytes(), False, "s3cret")
            client = PeerClient(1, 0, f"127.0.0.1:{port}", 5, no_client_cert)
            client.channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(certs["ca"].read_bytes()))
            from protos import distill_pb2_grpc as pb_grpc
            client.stub = pb_grpc.DistillStub(client.channel)
            with pytest.raises(grpc.RpcError) as err:
                client.fetch_logits(SyncPoint(0, 0, 0, 0), DIGEST[port], ROWS, keep_graph=False)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            client.close()
        assert fetch(port, sec).shape == (3, 2)        # still serving
    finally:
        pair.close()


def test_token_on_plaintext_loopback():
    sec = ChannelSecurity(token="tok")
    pair = LearnerPair(cfg(), (4,), "float32", 2, security=sec)
    DIGEST[pair.ports[1]] = pair.give_frames(0)[1]
    try:
        assert fetch(pair.ports[1], sec).shape == (3, 2)
        for wrong in (ChannelSecurity(), ChannelSecurity(token="tok2")):
            with pytest.raises(grpc.RpcError) as err:
                fetch(pair.ports[1], wrong)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        pair.close()


def test_security_never_shows_secrets(certs):
    text = repr(security(certs, token="very-secret-token"))
    assert "very-secret-token" not in text and "PRIVATE KEY" not in text


def test_tls_config_validation(certs, tmp_path):
    with pytest.raises(ConfigError, match="needs all of"):
        cfg(grpc_tls_cert=str(certs["cert"])).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        cfg(grpc_tls_cert=str(tmp_path / "nope.pem"), grpc_tls_key=str(certs["key"]), grpc_tls_ca=str(certs["ca"])).validate()
    cfg(grpc_tls_cert=str(certs["cert"]), grpc_tls_key=str(certs["key"]), grpc_tls_ca=str(certs["ca"]),
        grpc_mtls=True).validate()
