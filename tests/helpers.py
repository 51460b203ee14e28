"""Small builders shared by the tests."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from learners.bench.synthetic import synthetic_rollout  # noqa: F401  (the tests' batches, as the bench's)
from learners.config import TrainConfig
from learners.records import Batch, batch_frames
from learners.reference import mdpo_update
from learners.learner import Learner
from learners.peer.client import PeerClient
from learners.peer.endpoint import PeerEndpoint
from learners.peer.inproc import InProcessLink
from learners.peer.guard import PEER_ID_KEY
from learners.peer.security import ChannelSecurity
from learners.peer.service import serve


def system_tool(name: str, package: str) -> str:
    """Path of a system binary the tests use; in CI (CI set) a missing one fails, elsewhere it skips."""
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed ({package}; `make system-deps` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class _AsPeer(grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, metadata: list[tuple[str, str]]):
        self.metadata = metadata

    def _with(self, details):
        return details._replace(metadata=[*(details.metadata or []), *self.metadata])

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with(details), requests)


def peer_channel(address: str, peer_id: int = 0) -> grpc.Channel:
    """A raw channel whose calls say they come from configured peer `peer_id` (what PeerClient sends), for tests
    that hand-craft requests."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _AsPeer([(PEER_ID_KEY, str(peer_id))]))


class LearnerPair:
    """N learners in this process, each with its PeerEndpoint, wired to each other: over real gRPC servers on
    127.0.0.1 (`wire="grpc"`), or directly (`wire="inproc"`: learners/peer/inproc.py)."""

    def __init__(self, cfg: TrainConfig, obs_shape, obs_dtype, num_actions: int, security=None, device: str = "cpu",
                 wire: str = "grpc"):
        security = security or ChannelSecurity()
        self.cfg = cfg
        self.learners = [Learner(cfg, i, obs_shape, obs_dtype, num_actions, device) for i in range(cfg.num_learners)]
        self.endpoints = [PeerEndpoint(learner) for learner in self.learners]
        self.servers, self.ports, self.clients = [], [], []
        if wire == "inproc":
            for endpoint in self.endpoints:
                endpoint.connect([InProcessLink(p) for p in self.endpoints if p is not endpoint])
            return
        for endpoint in self.endpoints:
            server, port = serve(endpoint, "127.0.0.1", 0, security)
            self.servers.append(server)
            self.ports.append(port)
        for endpoint in self.endpoints:
            peers = [PeerClient(p, endpoint.id, f"127.0.0.1:{self.ports[p]}", cfg.rpc_timeout_s, security)
                     for p in range(cfg.num_learners) if p != endpoint.id]
            for c in peers:
                c.wait_ready(10)
            endpoint.connect(peers)
            self.clients.extend(peers)

    def client(self, asker: int = 0, peer: int = 1):
        """Learner `asker`'s link to learner `peer`."""
        return next(link for link in self.endpoints[asker].links if link.peer_id == peer)

    def give_frames(self, asker: int = 0, iteration: int = 0, seed: int = 0) -> tuple[np.ndarray, str]:
        """A synthetic batch of learner `asker`'s, held by all its peers as iteration `iteration`'s: what a logits
        request names rows of. Returns (its frames, their digest)."""
        learner = self.learners[asker]
        rollout = synthetic_rollout(asker, learner.obs_shape, learner.obs_dtype, learner.num_actions,
                                    self.cfg.num_steps, self.cfg.num_envs, seed=seed)
        for endpoint in self.endpoints:
            if asker in endpoint.peer_ids:
                endpoint.hold_frames(asker, iteration, [rollout])
        return batch_frames([rollout])

    def hold_frames(self, rollouts, iteration: int) -> None:
        """What the coordinator does beside each update: every learner gets its peers' rollouts of the iteration."""
        for endpoint in self.endpoints:
            for p in endpoint.peer_ids:
                endpoint.hold_frames(p, iteration, [rollouts[p]])

    def update_all(self, rollouts, plan, delays=None) -> list[dict]:
        """Every learner's update in a thread of its own; learner i starts `delays[i]` seconds late."""
        results, errors = [None] * len(self.learners), []
        self.hold_frames(rollouts, plan.iteration)

        def run(i):
            try:
                time.sleep(delays[i] if delays else 0)
                results[i] = self.endpoints[i].update([rollouts[i]], plan)
            except BaseException as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.learners))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results

    def close(self):
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.stop(None)
        for endpoint in self.endpoints:
            endpoint.close()


def reference_of(pair: LearnerPair) -> tuple[list, list]:
    """Copies of the pair's agents and Adams as they are now: the start of learners/reference.py's update."""
    agents = [copy.deepcopy(l.agent) for l in pair.learners]
    optimizers = []
    for agent, learner in zip(agents, pair.learners):
        opt = torch.optim.Adam(agent.parameters(), lr=pair.cfg.learning_rate, eps=pair.cfg.adam_eps)
        opt.load_state_dict(learner.optimizer.state_dict())
        optimizers.append(opt)
    return agents, optimizers


def reference_update(agents, optimizers, rollouts, cfg: TrainConfig, plan) -> list[dict]:
    """learners/reference.py's update of `agents` on one rollout each."""
    batches = [Batch.from_rollouts([r], cfg.gamma, cfg.gae_lambda) for r in rollouts]
    return mdpo_update(agents, optimizers, batches, cfg, plan)


def assert_same_parameters(net, reference, rtol=1e-4, atol=1e-5):
    """Every parameter of `net` equals the one of `reference` in the same place."""
    for (name, p), ref_p in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=rtol, atol=atol, msg=name)


def make_certificates(directory, hosts=("127.0.0.1", "localhost")):
    """A throwaway CA plus a certificate (server and client use) signed by it, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("mdpo test CA")).issuer_name(name("mdpo test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(validity[0]).not_valid_after(validity[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder().subject_name(name("mdpo learner")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1])
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: directory / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


# (fault, injected, survived, transitions lost) rows filled by tests/test_faults.py, printed by conftest.
FAULT_REPORT: list[tuple[str, int, int, int]] = []


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(env steps per agent, value)] of a run's metrics.jsonl records, as every tracker should hold them."""
    from learners.coordinator.tensorboard import scalars_of

    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars_of(record).items():
            expected.setdefault(tag, []).append((record["env_steps"], value))
    return expected


def same_points(got: dict, expected: dict, who: str) -> None:
    assert set(got) == set(expected), f"{who}: tags differ: {sorted(set(got) ^ set(expected))}"
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], f"{who} {tag}: steps {[s for s, _ in got[tag]]}"
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), f"{who} {tag}"


def check_tensorboard_matches_metrics(run_dir: Path) -> dict:
    """Every metrics.jsonl record is in the event files once, at its env steps per agent, with its values (read
    with TensorBoard's own EventAccumulator)."""
    from learners.coordinator.tensorboard import read_scalars

    scalars = read_scalars(run_dir)
    same_points(scalars, expected_points(run_dir), "TensorBoard")
    return scalars
