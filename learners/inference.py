"""Learner-served inference (--inference learner): a learner runs the policy for its own rollout actors, batched
across them on its device, with the weights it already holds; the actors only step their environments.

Plain class, no Ray: LearnerWorker.infer is the Ray entry point (each actor's call runs in a thread of the learner's
actor and blocks here until its batch is done). The actors step in lock-step, so the serving thread waits, for a
moment, until every actor has asked, and answers them all with one forward pass.

Weights by version: a rollout is collected with one version (`load` makes it servable, the coordinator hands its
number to the actors). With --policy-lag the next iteration's rollouts are still being collected with the previous
version when the new one is loaded, so two versions are kept.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

KEPT_VERSIONS = 2


class StaleVersion(LookupError):
    """A request for weights this server no longer (or never) held: a bug in the coordinator's hand-over."""


@dataclass
class _Request:
    version: int
    obs: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    values: np.ndarray | None = None
    error: BaseException | None = None


class InferenceServer:
    def __init__(self, agent: torch.nn.Module, device: torch.device, clients: int, max_wait_s: float = 0.002,
                 timeout_s: float = 300.0):
        self.template, self.device = agent, torch.device(device)
        self.clients, self.max_wait_s, self.timeout_s = clients, max_wait_s, timeout_s
        self.nets: dict[int, torch.nn.Module] = {}     # version -> a frozen copy of the weights
        self.batches = 0                               # forward passes run (requests / batches = batching achieved)
        self.requests = 0
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)
        self._thread.start()

    def load(self, version: int, agent: torch.nn.Module) -> None:
        """Make `agent`'s current weights servable as `version` (the oldest kept version makes room)."""
        with self._cond:
            if version in self.nets:
                return
            if len(self.nets) >= KEPT_VERSIONS:
                net = self.nets.pop(min(self.nets))
            else:
                net = copy.deepcopy(self.template).requires_grad_(False).eval()
            net.load_state_dict(agent.state_dict())
            self.nets[version] = net

    def reset(self) -> None:
        """Weights were restored: version numbers may now name other weights."""
        with self._cond:
            self.nets.clear()

    def infer(self, version: int, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, values) as float32 numpy arrays for one actor's observations, at weights `version`."""
        request = _Request(version, obs)
        with self._cond:
            if version not in self.nets:
                raise StaleVersion(f"weights version {version} is not served (kept: {sorted(self.nets)})")
            self._pending.append(request)
            self._cond.notify_all()
        if not request.done.wait(self.timeout_s):
            raise TimeoutError(f"no inference result within {self.timeout_s:.0f}s")
        if request.error is not None:
            raise request.error
        return request.logits, request.values

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                # every actor asks at about the same time: a short wait fills the batch
                self._cond.wait_for(lambda: len(self._pending) >= self.clients or self._closed, self.max_wait_s)
                batch, self._pending = self._pending, []
                nets = {r.version: self.nets.get(r.version) for r in batch}
            for version, net in nets.items():
                self._forward(net, [r for r in batch if r.version == version])

    @torch.no_grad()
    def _forward(self, net: torch.nn.Module | None, requests: list[_Request]) -> None:
        try:
            if net is None:
                raise StaleVersion(f"weights version {requests[0].version} was dropped while requests waited")
            obs = torch.from_numpy(np.concatenate([r.obs for r in requests]))
            if self.device.type == "cuda":     # uint8 frames cross to the GPU as they are, a quarter of fp32
                obs = obs.pin_memory().to(self.device, non_blocking=True)
            logits, values = net(obs)
            logits, values = logits.cpu().numpy(), values.cpu().numpy()
            self.batches += 1
            self.requests += len(requests)
            start = 0
            for r in requests:
                r.logits, r.values = logits[start:start + len(r.obs)], values[start:start + len(r.obs)]
                start += len(r.obs)
        except BaseException as err:   # every waiting actor gets the error, none waits for its timeout
            for r in requests:
                r.error = err
        for r in requests:
            r.done.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
