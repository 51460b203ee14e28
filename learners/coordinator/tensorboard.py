"""TensorBoard event files in RUN_DIR/tensorboard/, written by the driver from each iteration's metrics.jsonl record,
so a run shows up in the tool the authors' code, cleanrl and Sample Factory write to. Tags are cleanrl's where they
overlap, with the agent last (`charts/episodic_return/agent0`, `losses/value_loss/agent1`); the x axis is env
steps per agent.

A rollback or a resume redoes iterations: the writer is reopened with TensorBoard's purge step just past the
checkpoint, so readers drop the events written after it and no step appears twice.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"

# metrics.jsonl learner field -> tag (agent appended)
LEARNER_TAGS = {
    "train_return": "charts/episodic_return",
    "test_return": "charts/test_episodic_return",
    "generalization_gap": "charts/generalization_gap",
    "learning_rate": "charts/learning_rate",
    "loss": "losses/loss",
    "policy_loss": "losses/policy_loss",
    "value_loss": "losses/value_loss",
    "entropy": "losses/entropy",
    "kl_peer": "losses/kl_peer",
    "approx_kl": "losses/approx_kl",
    "clipfrac": "losses/clipfrac",
    "explained_variance": "losses/explained_variance",
    "grad_norm": "losses/grad_norm",
    "sync_seconds": "sync/blocked_seconds",
    "sync_bytes_sent": "sync/bytes_sent",
    "sync_bytes_received": "sync/bytes_received",
}
# run-level record field -> tag
RUN_TAGS = {"env_steps_per_second": "charts/SPS", "env_steps_total": "charts/env_steps_total"}
SYNC_LATENCY_TAG = "sync/latency_p50_seconds"


def scalars_of(record: dict) -> dict[str, float]:
    """tag -> value of one metrics.jsonl record (fields that are not numbers yet, e.g. no test return, are left out)."""
    out = {tag: record[field] for field, tag in RUN_TAGS.items() if field in record}
    for learner in record["learners"]:
        agent = f"agent{learner['id']}"
        for field, tag in LEARNER_TAGS.items():
            out[f"{tag}/{agent}"] = learner.get(field)
        out[f"{SYNC_LATENCY_TAG}/{agent}"] = (learner.get("sync_latency") or {}).get("p50")
    out.update(probe_scalars(record.get("probe")))
    return {tag: float(v) for tag, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def probe_scalars(probe: dict | None) -> dict[str, float]:
    """tag -> value of a record's mechanism metrics (actors/probes.py): per agent and rendering variant
    (`probe/robustness_tv/no_backgrounds/agent0`), per pair of agents (`probe/cka/agents0-1`)."""
    if not probe:
        return {}
    out = {"probe/weights_version": probe["weights_version"]}
    for name in ("robustness_tv", "render_cka"):
        for variant, values in probe.get(name, {}).items():
            out.update({f"probe/{name}/{variant}/agent{i}": v for i, v in enumerate(values)})
    for name in ("agreement_tv", "cka"):
        out.update({f"probe/{name}/agents{pair}": v for pair, v in probe.get(name, {}).items()})
    return out


class TensorBoardLog:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / TENSORBOARD_DIR
        self.writer = None
        self.seconds = 0.0          # spent writing, for `mdpo bench`

    def open(self, env_steps_done: int) -> None:
        """(Re)start at a checkpoint that covers `env_steps_done` env steps per agent: later events are purged."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.writer = SummaryWriter(str(self.path), purge_step=env_steps_done + 1)

    def write(self, record: dict) -> None:
        t0 = time.perf_counter()
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, record["env_steps"])
        self.writer.flush()        # one flush per iteration: a live TensorBoard sees it at once
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of a run's event files, as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
