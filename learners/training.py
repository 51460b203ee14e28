"""One training run from Python: `from learners import train` (the `mdpo train` command uses the same steps).

    from learners import TrainConfig, train
    summary = train(TrainConfig(env_id="bigfish", total_steps=2_000_000), run_dir="runs/bigfish-1")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from learners.config import TrainConfig

log = logging.getLogger("mdpo")


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.env_id.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> str:
    """What to do in `run_dir` ("new", "resume" or "finished"; another config there is refused with ConfigError),
    and the checks that need the machine or network, before anything starts."""
    from learners.coordinator.cluster import preflight
    from learners.coordinator.outputs import prior_run
    from learners.tracking import preflight as tracking_preflight

    found = "resume" if resume else prior_run(cfg, run_dir)
    if found == "resume" and not resume:
        log.warning("%s holds this run with a checkpoint: resuming it (the same command run again continues "
                    "where it stopped)", run_dir)
    if found != "finished":
        preflight(cfg)
        tracking_preflight(cfg, run_dir)
    return found


def make_coordinator(cfg: TrainConfig, run_dir: Path, resume: bool = False):
    """The run's coordinator for cfg.backend: Ray actors (learners/coordinator/loop.py) or every role in this process
    (learners/local.py); both are learners/coordinator/runner.py's Runner."""
    if cfg.backend == "local":
        from learners.local import LocalCoordinator

        return LocalCoordinator(cfg, run_dir, resume)
    from learners.coordinator.loop import Coordinator

    return Coordinator(cfg, run_dir, resume)


def train(cfg: TrainConfig, run_dir: str | Path | None = None, progress=None) -> dict:
    """Train `cfg` (on cfg.ray_address's Ray cluster, else an embedded local one; with cfg.backend "local" in this
    process) and return the run's summary (summary.json). A run directory that holds this run is continued, a
    finished one returned at once; bad input raises ConfigError before anything starts. `progress(record)` is
    called after every iteration with its metrics.jsonl record."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir)).validate()
    found = prepare(cfg, run_dir)
    if found == "finished":
        log.info("%s holds this run, finished: nothing to do", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    coordinator = make_coordinator(cfg, run_dir, resume=found == "resume")
    try:
        coordinator.start()
        return coordinator.run(progress)
    finally:
        coordinator.shutdown()
