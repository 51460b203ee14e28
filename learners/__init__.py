"""mdpo's learners, coordinator and tools. From Python:

    from learners import TrainConfig, train
    summary = train(TrainConfig(env_id="bigfish", total_steps=2_000_000), run_dir="runs/bigfish-1")
"""

from learners.config import ConfigError, TrainConfig, preset


def train(cfg: TrainConfig, run_dir=None, progress=None) -> dict:
    """learners/training.py's train (imported when called: `import learners` stays light)."""
    from learners.training import train as run

    return run(cfg, run_dir, progress)


__all__ = ["ConfigError", "TrainConfig", "preset", "train"]
