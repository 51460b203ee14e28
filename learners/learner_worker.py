"""The learner process: a Learner, its end of the peer exchange (learners/peer/endpoint.py) and their gRPC server.
Only plumbing; the math is in learner.py."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import torch

from learners.inference import InferenceServer
from learners.records import Rollout, ServedPolicy, UpdateStats, Weights
from learners.checkpoint import tensors_from_bytes, tensors_to_bytes
from learners.config import TrainConfig
from learners.peer.client import PeerClient
from learners.peer.endpoint import PeerEndpoint
from learners.peer.security import ChannelSecurity
from learners.peer.service import serve
from learners.learner import Learner, NonFiniteError
from learners.model import warn_if_emulated_bf16
from learners.schedule import IterationPlan
from learners.telemetry.learner import LearnerTelemetry
from learners.telemetry.metrics import advertised_host, bind_host


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but this learner has no visible GPU")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def serves_inference(cfg: TrainConfig, device: str) -> bool:
    """--inference learner, or auto on a GPU (there batched inference is ~free beside the update; on a CPU it
    would take the learner's cores)."""
    return cfg.inference == "learner" or (cfg.inference == "auto" and device == "cuda")


class LearnerWorker:
    def __init__(self, cfg: TrainConfig, learner_id: int, obs_shape: tuple[int, ...], obs_dtype: str, num_actions: int,
                 token: str | None = None):
        torch.set_num_threads(cfg.learner_threads or max(1, int(cfg.learner_cpus)))
        self.cfg, self.id = cfg, learner_id
        self.device = resolve_device(cfg.device)
        warn_if_emulated_bf16(cfg.precision, self.device, f"learner {learner_id}")
        self.learner = Learner(cfg, learner_id, obs_shape, obs_dtype, num_actions, self.device)
        self.endpoint = PeerEndpoint(self.learner)
        port = cfg.grpc_port + learner_id if cfg.grpc_port else 0
        # The token comes as an argument, not in cfg, so it never lands in config.json or a log.
        self.security = ChannelSecurity.from_config(cfg, token)
        self.telemetry = LearnerTelemetry(cfg, learner_id, self.device)   # its /metrics endpoint (learners/telemetry/metrics.py)
        self.server, self.port = serve(self.endpoint, bind_host(cfg.grpc_host), port, self.security,
                                       interceptors=(self.telemetry.grpc_server_interceptor(),))
        self.clients: list[PeerClient] = []
        self.inference = (InferenceServer(self.learner.agent, self.learner.device, cfg.num_actors,
                                          timeout_s=cfg.rpc_timeout_s) if serves_inference(cfg, self.device) else None)

    def address(self) -> str:
        return f"{advertised_host(self.cfg.grpc_host)}:{self.port}"

    def info(self) -> dict:
        return {"id": self.id, "device": self.device, "pid": os.getpid(), "host": socket.gethostname(),
                "address": self.address(), "metrics": self.telemetry.endpoint(),
                "inference": "actor" if self.inference is None else "learner"}

    def connect(self, addresses: dict[int, str]) -> None:
        self.clients = [PeerClient(pid, self.id, addr, self.cfg.rpc_timeout_s, self.security,
                                   interceptors=self.telemetry.grpc_client_interceptors())
                        for pid, addr in sorted(addresses.items()) if pid != self.id]
        for client in self.clients:
            client.wait_ready(self.cfg.rpc_timeout_s)
        self.endpoint.connect(self.clients)

    def weights(self) -> Weights:
        return self.endpoint.weights()

    def hold_peer_frames(self, iteration: int, peer_id: int, *rollouts: Rollout) -> int:
        """Peer `peer_id`'s rollouts of `iteration` (Ray references, resolved here): its frames, which its logits
        requests name rows of. Returns the bytes of peer frames I hold."""
        self.endpoint.hold_frames(peer_id, iteration, list(rollouts))
        return self.endpoint.frames.nbytes

    def release_peer_frames(self, iteration: int) -> None:
        """Every learner's update of `iteration` is over: the peers' frames of it are no longer asked for."""
        self.endpoint.frames.release(iteration)

    def policy(self) -> Weights | ServedPolicy:
        """What my rollout actors collect the next rollout with: my weights, or (learner-served inference) their
        version, which I then serve."""
        if self.inference is None:
            return self.endpoint.weights()
        self.inference.load(self.learner.step, self.learner.agent)
        return ServedPolicy(self.id, self.learner.step)

    def infer(self, version: int, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, values) for a rollout actor's observations, batched with my other actors' requests."""
        if self.inference is None:
            raise RuntimeError(f"learner {self.id} does not serve inference (--inference {self.cfg.inference}, "
                               f"device {self.device})")
        return self.inference.infer(version, obs)

    def update(self, plan: IterationPlan, *rollouts: Rollout) -> UpdateStats:
        started, step_before = time.perf_counter(), self.learner.step
        try:
            stats = self.endpoint.update(list(rollouts), plan)
        except NonFiniteError:
            self.telemetry.record_nonfinite()
            raise
        stats = stats.with_rollouts(rollouts, step_before)
        self.telemetry.record_update(stats, rollouts, started, step_before)
        return stats

    def state(self) -> bytes:
        return tensors_to_bytes({**self.learner.state_dict(), "torch_rng": torch.get_rng_state()})

    def load_state(self, data: bytes) -> int:
        state = tensors_from_bytes(data)
        self.learner.load_state_dict(state)
        self.endpoint.reset()
        if self.inference is not None:
            self.inference.reset()
        torch.set_rng_state(state["torch_rng"])
        return self.learner.step

    def stop(self) -> None:
        if self.inference is not None:
            self.inference.close()
        for client in self.clients:
            client.close()
        self.server.stop(grace=1.0).wait(5)
        self.endpoint.close()
        self.telemetry.close()
