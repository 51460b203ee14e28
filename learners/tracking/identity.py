"""What a run is called and tagged as in every tracker (its own module: the trackers import it, and the package's
__init__ imports the trackers)."""

from __future__ import annotations

from pathlib import Path

from learners.config import TrainConfig


def run_name(cfg: TrainConfig, run_dir: Path) -> str:
    return cfg.run_id or Path(run_dir).resolve().name


def tags_of(cfg: TrainConfig) -> dict[str, str]:
    """What a run is, for the trackers' filters and tables."""
    tags = {"game": cfg.env_id.removeprefix("procgen:"), "seed": str(cfg.seed), "alpha": str(cfg.alpha),
            "distill_mode": cfg.distill_mode if cfg.distilling else "none"}
    return {**tags, "group": cfg.track_group} if cfg.track_group else tags
