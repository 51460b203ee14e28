"""What a run leaves in its directory besides checkpoints: metrics.jsonl (one record per iteration), summary.json
and returns.png. The records hold exactly the iterations the latest checkpoint covers, plus those trained since."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from learners.coordinator.tensorboard import TensorBoardLog
from learners.tracking import Tracking


def summarize(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "mean": float(np.mean(values))}


def generalization_gap(train: float | None, test: float | None) -> float | None:
    """Train minus test return (levels seen in training vs unseen ones); None until both are known."""
    return None if train is None or test is None else train - test


class MetricsLog:
    """The per-iteration records: metrics.jsonl, appended once per iteration and cut back to a checkpoint's iteration
    on a rollback, the same records as TensorBoard scalars (learners/coordinator/tensorboard.py), and for the
    --track trackers once a checkpoint covers them (learners/tracking/)."""

    def __init__(self, run_dir: Path, cfg):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = TensorBoardLog(run_dir)
        self.tracking = Tracking(cfg, run_dir)

    def start(self) -> None:
        """A new run: no records yet."""
        self.path.unlink(missing_ok=True)
        self.tensorboard.open(0)
        self.tracking.open(new=True)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tensorboard.write(record)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, iteration: int) -> None:
        """Keep the records up to `iteration`: those past a checkpoint would be counted twice once redone."""
        kept = [r for r in self.records() if r["iteration"] <= iteration]
        if self.path.exists():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard.open(kept[-1]["env_steps"] if kept else 0)
        self.tracking.open(new=False, iteration=iteration)

    def commit(self, iteration: int) -> None:
        """A checkpoint covers the records up to `iteration`: no rollback can take them back now."""
        if self.tracking.names:
            self.tracking.commit([r for r in self.records() if r["iteration"] <= iteration])

    def end(self, summary: dict) -> None:
        self.tracking.end(summary)

    def close(self) -> None:
        self.tensorboard.close()
        self.tracking.close()


def iteration_record(iteration: int, env_steps: list[int], stats: list, returns: list, last_eval: list,
                     actor_restarts: list[int], probe: dict | None = None) -> dict:
    """An iteration's line of metrics.jsonl: each learner's UpdateStats scalars with the run's view of it, and the
    mechanism metrics (`probe`, actors/probes.py) of the weights version they name when a measurement came in."""
    learners = []
    for i, s in enumerate(stats):
        train = float(np.mean(returns[i])) if returns[i] else None
        test = last_eval[i]["test_return"] if last_eval[i] else None
        learners.append({
            **s.scalars(), "id": i, "actor_restarts": actor_restarts[i], "train_return": train,
            "episodes": len(s.episode_returns), "test_return": test,
            "test_weights_version": last_eval[i]["weights_version"] if last_eval[i] else None,
            "generalization_gap": generalization_gap(train, test), "sync_latency": summarize(s.sync_latencies)})
    return {"iteration": iteration, "env_steps": env_steps[0], "env_steps_total": sum(env_steps), "learners": learners,
            **({"probe": probe} if probe else {})}


def learner_summary(i: int, device: str, returns, last_eval: dict | None) -> dict:
    train = float(np.mean(returns)) if returns else None
    test = last_eval["test_return"] if last_eval else None
    return {"id": i, "device": device, "final_train_return": train, "final_test_return": test,
            "final_test_weights_version": last_eval["weights_version"] if last_eval else None,
            "generalization_gap": generalization_gap(train, test)}


def write_summary(run_dir: Path, summary: dict) -> dict:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prior_run(cfg, run_dir: Path) -> str:
    """What `mdpo train --run-dir D` finds in D, so that rerunning the same command (by hand, a resubmitted Ray
    job, KubeRay's retries) never throws work away: "new" (nothing there yet), "resume" (a run of this config
    with a checkpoint), "finished" (that run is complete). A run of another config is refused, never overwritten.
    Fields a resume may change (placement, the budget) do not count as another config."""
    from learners.checkpoint import latest_checkpoint
    from learners.config import RESUME_MAY_CHANGE, ConfigError, TrainConfig

    saved_path = Path(run_dir) / "config.json"
    if not saved_path.exists():
        return "new"
    saved = TrainConfig.load(saved_path)
    differ = {f: (getattr(saved, f), getattr(cfg, f)) for f in saved.to_dict()
              if f not in RESUME_MAY_CHANGE | {"run_id", "run_dir"} and getattr(saved, f) != getattr(cfg, f)}
    if differ:
        shown = ", ".join(f"{f}: {a!r} there, {b!r} now" for f, (a, b) in sorted(differ.items()))
        raise ConfigError(f"{run_dir} holds a run of another config ({shown}); nothing was changed. Pick another "
                          f"--run-dir, or continue that run as it was with: mdpo train --resume {run_dir}")
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        return "new"
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if ckpt.iteration >= cfg.num_iterations and summary.get("completed") and summary.get("iterations") == ckpt.iteration:
        return "finished"
    return "resume"
