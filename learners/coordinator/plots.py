"""PNG plots of a run: train and test return per agent over env steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_returns(records: list[dict], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    num_learners = len(records[0]["learners"]) if records else 0
    for i in range(num_learners):
        color = f"C{i}"
        steps = [r["env_steps"] for r in records]
        train = [r["learners"][i]["train_return"] for r in records]
        ax.plot(steps, train, color=color, label=f"agent {i} train")
        test = [(r["env_steps"], r["learners"][i]["test_return"]) for r in records
                if r["learners"][i].get("test_return") is not None]
        if test:
            ax.plot(*zip(*test), color=color, linestyle="--", marker="o", markersize=3, label=f"agent {i} test")
    ax.set_xlabel("env steps per agent")
    ax.set_ylabel("episode return")
    ax.set_title(title or "MDPO returns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
