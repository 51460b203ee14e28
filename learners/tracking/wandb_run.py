"""A run in Weights & Biases (`--track wandb`): online with an API key, or WANDB_MODE=offline with no network
(the run is kept in RUN_DIR/wandb/ for `wandb sync`). Scalars are the TensorBoard tags at env steps per agent, so
W&B's sections follow the tag prefixes (charts/, losses/, sync/) as for cleanrl's runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from learners.config import ConfigError, TrainConfig
from learners.tracking.identity import run_name, tags_of

log = logging.getLogger("mdpo")
MODES = ("online", "offline", "disabled", "shared")


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError('--track wandb needs the wandb package: pip install "mdpo[wandb]" (or pip install wandb)'
                          ) from None
    return wandb


class WandbRun:
    SEES_WHAT_IT_HOLDS = False      # a resumed offline run cannot be asked what an earlier session sent it

    @staticmethod
    def check(cfg: TrainConfig, run_dir: Path) -> None:
        wandb = _import_wandb()
        mode = os.environ.get("WANDB_MODE", "online")
        if mode not in MODES:
            raise ConfigError(f"WANDB_MODE={mode!r} is not a W&B mode; use online or offline (no network; "
                              "`wandb sync` uploads the run later)")
        if mode in ("online", "shared"):
            # A missing or bad key, an unreachable server: found now, not when the run's first iterations are done
            try:
                why = None if wandb.login(verify=True, timeout=20, prompt=False) else "no API key configured"
            except Exception as err:
                why = f"{type(err).__name__}: {err}"
            if why:
                raise ConfigError(f"--track wandb: cannot log in to W&B ({why}). Set WANDB_API_KEY or run `wandb "
                                  "login`; with no network set WANDB_MODE=offline (then `wandb sync "
                                  "RUN_DIR/wandb/offline-run-*` uploads the run)")

    def __init__(self, cfg: TrainConfig, run_dir: Path, saved: dict):
        wandb = _import_wandb()
        tags = tags_of(cfg)
        self.run = wandb.init(
            project=cfg.track_project, dir=str(run_dir), name=run_name(cfg, run_dir), group=cfg.track_group or None,
            job_type="train", tags=[tags["game"], f"alpha={tags['alpha']}", tags["distill_mode"], f"seed{cfg.seed}"],
            config=cfg.to_dict(), id=saved.get("id"), resume="allow", allow_val_change=True, reinit="create_new",
            mode=os.environ.get("WANDB_MODE", "online"),    # as checked (wandb's own settings are read once a process)
            settings=wandb.Settings(console="off", save_code=False, quiet=True))
        self.last_step = -1
        where = self.run.url or f"{Path(self.run.dir).parent} (upload it with `wandb sync {Path(self.run.dir).parent}`)"
        log.info("W&B run %s: %s", self.run.id, where)

    @staticmethod
    def close_left_open(saved: dict) -> None:
        """Nothing to do: a W&B run is closed only by the process that ran it; the server marks one whose process
        died as crashed, and `wandb sync` uploads an offline one as it is."""

    def ids(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}

    def log(self, points: list[tuple[int, dict[str, float]]], unsure: bool = False) -> None:
        # One call per step, so a send cut off by an error is retried from the first step this run did not take
        for step, scalars in points:
            if step > self.last_step:
                self.run.log(scalars, step=step)
                self.last_step = step

    def finish(self, summary: dict, files: list[Path], status: str) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.summary.update({"completed": bool(summary.get("completed")), "iterations": summary.get("iterations")})
        for learner in summary.get("learners", []):
            for key in ("final_train_return", "final_test_return", "generalization_gap"):
                if learner.get(key) is not None:
                    self.run.summary[f"final/{key.removeprefix('final_')}/agent{learner['id']}"] = learner[key]
        self.run.finish(exit_code=0 if status == "completed" else 1)
