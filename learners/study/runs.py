"""Reading run directories written by `mdpo train`: config, per-iteration metrics, summary, sweep cell, analysis.

A run's game is its Procgen game (or Gymnasium id); its method label is the one the sweep recorded in
`sweep-cell.json`, else the built-in method its config is (`ppo` for alpha 0, `mdpo` for exact, `dml` for detached). A run's value of a per-agent quantity is the
mean over its agents that have one (None if none has).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from learners.config import ConfigError, TrainConfig

CELL_FILE = "sweep-cell.json"
ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "robustness.json"


def game_name(env_id: str) -> str:
    """`coinrun` for any Procgen id of coinrun; other ids with path-unsafe characters replaced."""
    from actors.envs import is_procgen, procgen_game

    return procgen_game(env_id) if is_procgen(env_id) else env_id.replace(":", "-").replace("/", "-")


def method_label(config: TrainConfig) -> str:
    """The built-in method a config is (learners/study/sweep.py METHODS): ppo, mdpo (exact) or dml (detached)."""
    if not config.distilling:
        return "ppo"
    return "mdpo" if config.distill_mode == "exact" else "dml"


def describe_method(config: TrainConfig) -> str:
    """What a run's objective is, in the paper's words, from its config (the report's legend)."""
    if not config.distilling:
        return "PPO baseline (the authors' ppo.py: alpha 0, each agent's loss not halved, gradient clipped at " \
               f"{config.max_grad_norm:g})"
    if config.distill_mode == "exact":
        return f"MDPO, the authors' objective (alpha {config.alpha:g}; the KL gradient flows into both networks)"
    return f"DML, classic deep mutual learning (alpha {config.alpha:g}; the peer's distribution a fixed target)"


def mean_or_none(values) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


@dataclass
class Run:
    path: Path
    config: TrainConfig
    records: list[dict]
    summary: dict | None
    cell: dict | None
    analysis: dict | None

    @property
    def game(self) -> str:
        return game_name(self.config.env_id)

    @property
    def method(self) -> str:
        return self.cell["label"] if self.cell else method_label(self.config)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def completed(self) -> bool:
        return bool(self.summary and self.summary.get("completed") is True)

    def final(self, key: str) -> float | None:
        """Mean over agents of the summary's `final_train_return`, `final_test_return` or `generalization_gap`."""
        if not self.summary:
            return None
        return mean_or_none(entry.get(key) for entry in self.summary["learners"])


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory, else every run directory below it (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such directory")
    if is_run_dir(root):
        return [root]
    return sorted(p.parent for p in root.rglob("config.json") if "checkpoints" not in p.parts)


def load_run(path: Path) -> Run:
    path = Path(path)
    try:
        config = TrainConfig.load(path / "config.json")
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{path / 'config.json'}: cannot load the run's config ({err})") from None
    return Run(path, config, read_records(path), _read_json(path / "summary.json"), _read_json(path / CELL_FILE),
               _read_json(path / ANALYSIS_DIR / ANALYSIS_FILE))


def read_records(path: Path) -> list[dict]:
    """A run's per-iteration records: metrics.jsonl, else (a run directory that kept only its event files) the
    train and test returns of its TensorBoard event files, in metrics.jsonl's shape."""
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    from learners.coordinator.tensorboard import LEARNER_TAGS, TENSORBOARD_DIR, read_scalars

    if not (path / TENSORBOARD_DIR).is_dir():
        return []
    scalars = read_scalars(path)
    by_step: dict[int, dict[int, dict]] = {}       # env steps -> agent -> fields
    for field in ("train_return", "test_return"):
        prefix = LEARNER_TAGS[field] + "/agent"
        for tag, points in scalars.items():
            if tag.startswith(prefix) and tag[len(prefix):].isdigit():
                for step, value in points:
                    by_step.setdefault(step, {}).setdefault(int(tag[len(prefix):]), {})[field] = value
    return [{"iteration": i + 1, "env_steps": step,
             "learners": [{"id": agent, **fields} for agent, fields in sorted(by_step[step].items())]}
            for i, step in enumerate(sorted(by_step))]


def load_runs(root: Path) -> list[Run]:
    dirs = find_run_dirs(root)
    if not dirs:
        raise ConfigError(f"{root}: no run directories (directories with a config.json) found")
    return [load_run(d) for d in dirs]
