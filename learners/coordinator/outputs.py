"""What a run leaves in its directory besides checkpoints: metrics.jsonl (one record per iteration), summary.json
and returns.png. The records hold exactly the iterations the latest checkpoint covers, plus those trained since."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def summarize(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "mean": float(np.mean(values))}


def generalization_gap(train: float | None, test: float | None) -> float | None:
    """Train minus test return (levels seen in training vs unseen ones); None until both are known."""
    return None if train is None or test is None else train - test


class MetricsLog:
    """metrics.jsonl: appended once per iteration, cut back to a checkpoint's iteration on a rollback."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, iteration: int) -> None:
        """Keep the records up to `iteration`: those past a checkpoint would be counted twice once redone."""
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= iteration]
            self.path.write_text("".join(line + "\n" for line in kept))


def learner_summary(i: int, device: str, returns, last_eval: dict | None) -> dict:
    train = float(np.mean(returns)) if returns else None
    test = last_eval["test_return"] if last_eval else None
    return {"id": i, "device": device, "final_train_return": train, "final_test_return": test,
            "final_test_weights_version": last_eval["weights_version"] if last_eval else None,
            "generalization_gap": generalization_gap(train, test)}


def write_summary(run_dir: Path, summary: dict) -> dict:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
