"""Data that crosses process boundaries: rollouts (actor -> learner), weights or a served policy (learner -> actor), an update's
statistics (learner -> coordinator), a rollout actor's own report (actor -> coordinator), and the probe set and an agent's
outputs on it (driver -> evaluator -> coordinator).

Plain dataclasses of numpy arrays, so Ray ships them through its object store without copies and
observations stay in their native dtype (uint8 frames for Procgen).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from learners.ppo import compute_gae


@dataclass
class Weights:
    version: int              # the learner's optimizer step count when the weights were taken
    state_dict: dict[str, np.ndarray]

    @classmethod
    def from_module(cls, version: int, module: torch.nn.Module) -> "Weights":
        return cls(version, {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()})

    def load_into(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in self.state_dict.items()})


@dataclass
class ServedPolicy:
    """What a rollout actor acts with under learner-served inference (--inference learner): its learner's weights
    `version`, which the learner serves itself (learners/inference.py); no weights travel."""
    learner_id: int
    version: int


@dataclass
class Rollout:
    """`num_steps` consecutive steps of one actor's `num_envs` environments, arrays shaped (T, N, ...)."""

    learner_id: int
    actor_id: int
    weights_version: int
    obs: np.ndarray           # observation before each action (uint8 frames or float vectors)
    actions: np.ndarray       # int64
    logprobs: np.ndarray      # float32, behaviour policy
    values: np.ndarray        # float32, behaviour value estimate
    rewards: np.ndarray       # float32, normalised+clipped (+ gamma*V(final obs) where an episode was truncated)
    dones: np.ndarray         # bool, the episode ended with this step's action
    next_value: np.ndarray    # (N,) float32, V of the state after the last step
    episode_returns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))   # raw, finished episodes
    episode_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    collect_seconds: float = 0.0
    inference_seconds: float = 0.0
    digest: str = ""          # frames_digest(obs), made by the actor when the run distills; "": not made

    @property
    def env_steps(self) -> int:
        return int(self.actions.size)


def frames_digest(obs: np.ndarray) -> str:
    """What tells a rollout's frames apart from those of the same iteration collected again (after a rollback, or a
    `collect` Ray ran again): the peers that hold them check it on every request (learners/peer/frames.py)."""
    return hashlib.blake2b(np.ascontiguousarray(obs).data, digest_size=16).hexdigest()


def batch_obs(rollouts: list[Rollout]) -> np.ndarray:
    """The observations of a batch made of `rollouts`, in its row order: the one place that order is set, for the
    learner that trains on them (Batch.from_rollouts) and the peers that answer for them (learners/peer/frames.py).
    One rollout is used in place: no copy of its frames (200 MB at the paper's shape)."""
    parts = [r.obs.reshape(-1, *r.obs.shape[2:]) for r in rollouts]
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))


def batch_digest(rollouts: list[Rollout]) -> str:
    """The digest of a batch's frames, from its rollouts' (made here where an actor did not make one)."""
    digests = [r.digest or frames_digest(r.obs) for r in rollouts]
    return digests[0] if len(digests) == 1 else hashlib.blake2b("".join(digests).encode(), digest_size=16).hexdigest()


def batch_frames(rollouts: list[Rollout]) -> tuple[np.ndarray, str]:
    """A batch's frames and their digest: what its learner's peers hold."""
    return batch_obs(rollouts), batch_digest(rollouts)


@dataclass
class ActorReport:
    """What a rollout actor says of itself after a rollout, straight to the coordinator (its second return value):
    a new pid for the same actor means Ray restarted it, and `state` is what a checkpoint keeps to continue it."""
    learner_id: int
    actor_id: int
    pid: int
    state: dict        # RolloutWorker.get_state(): reward-normaliser statistics, env steps; opaque to the coordinator


def series():
    """A per-sample list of an UpdateStats: summarised by the coordinator, not written to metrics.jsonl as is."""
    return field(default_factory=list, metadata={"series": True})


@dataclass
class UpdateStats:
    """One learner's account of one update, learner -> coordinator. The scalars are the learner's entry in
    metrics.jsonl; the series are per-sample lists the coordinator summarises."""
    learner_id: int
    step: int                      # optimizer steps after the update: the weights version
    iteration: int                 # iterations completed
    samples: int                   # batch size x epochs
    # loss terms and PPO diagnostics, means over the update's minibatches
    loss: float
    policy_loss: float
    value_loss: float
    entropy: float
    kl_peer: float
    approx_kl: float
    clipfrac: float
    grad_norm: float
    explained_variance: float
    learning_rate: float
    update_seconds: float
    # distillation traffic (learners/peer/exchange.py: SyncStats)
    syncs: int = 0
    sync_seconds: float = 0.0
    sync_first_step_seconds: float = 0.0
    sync_bytes_sent: int = 0
    sync_bytes_received: int = 0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    sync_latencies: list[float] = series()
    # the rollouts trained on (filled in by the learner process)
    env_steps: int = 0
    collect_seconds: float = 0.0
    inference_seconds: float = 0.0
    version_lag: int = 0           # optimizer steps between the behaviour policy and the weights the update started from
    episode_returns: list[float] = series()
    episode_lengths: list[int] = series()

    def scalars(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("series")}

    def with_rollouts(self, rollouts: list[Rollout], step_before: int) -> "UpdateStats":
        """These stats with the account of the rollouts trained on; `step_before`: the optimizer step the update
        started from."""
        return replace(
            self, env_steps=sum(r.env_steps for r in rollouts),
            episode_returns=np.concatenate([r.episode_returns for r in rollouts]).tolist(),
            episode_lengths=np.concatenate([r.episode_lengths for r in rollouts]).tolist(),
            collect_seconds=max(r.collect_seconds for r in rollouts),
            inference_seconds=sum(r.inference_seconds for r in rollouts),
            version_lag=max(step_before - r.weights_version for r in rollouts))


@dataclass
class Batch:
    """Several rollouts flattened to (B, ...) with advantages and returns, ready for minibatching."""

    obs: np.ndarray
    actions: np.ndarray
    logprobs: np.ndarray
    values: np.ndarray
    advantages: np.ndarray
    returns: np.ndarray

    @property
    def size(self) -> int:
        return len(self.actions)

    def to(self, device: torch.device) -> "Batch":
        """The batch as torch tensors on `device` (a learner moves it once per update). On the CPU they share the
        arrays' memory; to a GPU they go through pinned host memory with non-blocking copies, uint8 frames as they
        are (a quarter of fp32's bytes)."""
        def move(array: np.ndarray) -> torch.Tensor:
            with warnings.catch_warnings():    # a rollout's frames are Ray's read-only buffer: read, never written
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                tensor = torch.from_numpy(array)
            return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], gamma: float, gae_lambda: float) -> "Batch":
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("actions", "logprobs", "values", "advantages", "returns")}
        for r in rollouts:
            advantages, returns = compute_gae(r.rewards, r.values, r.dones, r.next_value, gamma, gae_lambda)
            for name, array in (("actions", r.actions), ("logprobs", r.logprobs), ("values", r.values),
                                ("advantages", advantages), ("returns", returns)):
                parts[name].append(array.reshape(-1, *array.shape[2:]))
        return cls(obs=batch_obs(rollouts), **{k: np.ascontiguousarray(v[0] if len(v) == 1 else np.concatenate(v))
                                               for k, v in parts.items()})


@dataclass
class ProbeSet:
    """The fixed states the live mechanism metrics are measured on (actors/probes.py): uint8 frames per rendering
    (`default` first; Procgen's variants after it), driver -> evaluators through Ray's object store, kept in the
    run directory as probes.npz so a resumed run measures the same states."""
    env_id: str
    seed: int
    renderings: dict[str, np.ndarray]
    training_level_fraction: float | None     # of its states on training levels; None where levels do not exist

    @property
    def states(self) -> int:
        return len(next(iter(self.renderings.values())))

    def to_npz(self) -> bytes:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, env_id=self.env_id, seed=self.seed, names=np.array(list(self.renderings)),
                 training_level_fraction=np.nan if self.training_level_fraction is None else self.training_level_fraction,
                 **{f"obs_{name}": obs for name, obs in self.renderings.items()})
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, path) -> "ProbeSet":
        with np.load(path) as f:
            fraction = float(f["training_level_fraction"])
            return cls(str(f["env_id"]), int(f["seed"]), {str(n): f[f"obs_{n}"] for n in f["names"]},
                       None if np.isnan(fraction) else fraction)


@dataclass
class ProbeOutput:
    """One agent's outputs on a ProbeSet, evaluator -> coordinator: action probabilities and encoder features per
    rendering, for the weights of `weights_version` (the coordinator pairs the agents of one version)."""
    learner_id: int
    weights_version: int
    probs: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    seconds: float = 0.0                  # the forward passes took (the coordinator's --probe-budget counts them)
