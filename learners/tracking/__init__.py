"""Experiment trackers beside TensorBoard: `--track wandb,mlflow` sends a run to Weights & Biases and/or MLflow.

Each tracker gets the resolved config when its run starts, every iteration's scalars (the TensorBoard tags, at env
steps per agent) and at the end returns.png and summary.json. It gets an iteration once the checkpoint covering it
is written (`commit`): the iterations after a checkpoint are redone after a rollback or a crash, and neither W&B
nor MLflow can take points back. So a tracker's history is always metrics.jsonl's, never a rolled-back draft of it;
TensorBoard and Prometheus are the views that follow every iteration live.

RUN_DIR/tracking.json remembers each tracker's run and the last iteration it has, so a resumed run continues the
same W&B/MLflow run from there. A send is written there before it starts (`sending_iteration`) and confirmed after,
so a driver killed mid-send leaves a tracker that *may* hold part of it: MLflow is asked what it holds, a W&B run
(which cannot say) is replaced by a new one with the whole history. A tracker that fails mid-run (its server down,
say) costs a warning, never the training run: what it missed is sent at the next checkpoint, or when the run is
resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from learners.config import TrainConfig
from learners.coordinator.tensorboard import scalars_of
from learners.files import atomic_write
from learners.tracker_names import tracker_names

log = logging.getLogger("mdpo")

STATE_FILE = "tracking.json"


def tracker_class(name: str):
    if name == "wandb":
        from learners.tracking.wandb_run import WandbRun
        return WandbRun
    from learners.tracking.mlflow_run import MlflowRun
    return MlflowRun


def preflight(cfg: TrainConfig, run_dir: Path) -> None:
    """The trackers' packages and settings, checked before anything starts (ConfigError says what to fix)."""
    for name in tracker_names(cfg.track):
        tracker_class(name).check(cfg, Path(run_dir))


def prepare_sweep(cells: list[tuple[TrainConfig, Path]]) -> None:
    """A sweep's tracker checks, once before any cell starts; its MLflow groups are made up front, so concurrent
    cells find them instead of racing to make them."""
    tracked = [(cfg, run_dir) for cfg, run_dir in cells if cfg.track]
    if not tracked:
        return
    preflight(*tracked[0])
    if "mlflow" in tracker_names(tracked[0][0].track):
        from learners.tracking.mlflow_run import make_groups
        make_groups(tracked)


class Tracking:
    """The run's trackers and how far each has got (RUN_DIR/tracking.json)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.names = tracker_names(cfg.track)
        self.path = self.run_dir / STATE_FILE
        self.runs: dict = {}           # name -> open tracker run
        self.state: dict[str, dict] = {}

    def open(self, new: bool, iteration: int = 0) -> None:
        """Start each tracker's run (`new`: a fresh run, whatever tracking.json says), or continue the one it names
        from checkpoint `iteration`. A tracker that already has iterations past it (the checkpoint they were sent at
        was lost since, e.g. damaged on disk) gets a new run with the whole history: neither tool takes points back."""
        if not self.names:
            return
        if not self.state and not new and self.path.exists():
            self.state = json.loads(self.path.read_text())
        for name in self.names:
            saved = {} if new else self.state.get(name, {})
            sent, sending = saved.get("sent_iteration", 0), saved.get("sending_iteration", 0)
            if max(sent, sending) > iteration:
                log.warning("%s %s iterations up to %d but the run continues from checkpoint %d: starting a new %s "
                            "run with the whole history (the old one, %s, keeps the lost iterations)", name,
                            "may hold" if sending > sent else "holds", max(sent, sending), iteration, name,
                            saved.get("id") or saved.get("run_id"))
                if name in self.runs:
                    self._finish(name, {"error": "superseded"}, with_files=False)
                else:
                    self._close_left_open(name, saved)
                saved = {}
            elif sending > sent and name not in self.runs and not tracker_class(name).SEES_WHAT_IT_HOLDS:
                log.warning("%s: the last session was stopped while sending iterations %d-%d, and a %s run cannot say "
                            "which it got: starting a new %s run with the whole history (the old one is %s)", name,
                            sent + 1, sending, name, name, saved.get("id") or saved.get("run_id"))
                saved = {}
            if name in self.runs:
                continue
            try:
                run = tracker_class(name)(self.cfg, self.run_dir, saved)
            except Exception as err:       # the training run goes on; this tracker is retried when it is resumed
                log.warning("%s tracking is off for this session: %s: %s", name, type(err).__name__, err)
                continue
            self.runs[name] = run
            same = all(saved.get(k) == v for k, v in run.ids().items())    # else a new run: it gets every record
            self.state[name] = {**run.ids(), **({k: v for k, v in saved.items() if k.endswith("_iteration")}
                                                if same else {"sent_iteration": 0})}
        self._save()

    def commit(self, records: list[dict]) -> None:
        """Send each tracker the records it does not have yet (those a checkpoint covers)."""
        for name, run in self.runs.items():
            state = self.state[name]
            todo = [r for r in records if r["iteration"] > state["sent_iteration"]]
            if not todo:
                continue
            # Written ahead: were the driver killed mid-send, the next session knows this tracker may hold part of it
            unsure = state.get("sending_iteration", 0) > state["sent_iteration"]
            state["sending_iteration"] = max(state.get("sending_iteration", 0), todo[-1]["iteration"])
            self._save()
            try:
                run.log([(r["env_steps"], scalars_of(r)) for r in todo], unsure=unsure)
            except Exception as err:
                log.warning("%s: could not log iterations %d-%d (sent again at the next checkpoint): %s: %s", name,
                            todo[0]["iteration"], todo[-1]["iteration"], type(err).__name__, err)
                continue
            state["sent_iteration"] = todo[-1]["iteration"]
            if state["sending_iteration"] <= state["sent_iteration"]:
                del state["sending_iteration"]
            self._save()

    def end(self, summary: dict) -> None:
        """The run's files and how it ended; then the trackers' runs are closed."""
        for name in list(self.runs):
            self._finish(name, summary)

    def close(self) -> None:
        """Close runs `end` did not (the driver is going down on an error it could not write a summary for)."""
        self.end({"error": "the run ended without a summary"})

    def _finish(self, name: str, summary: dict, with_files: bool = True) -> None:
        run = self.runs.pop(name, None)
        if run is None:
            return
        files = [p for p in (self.run_dir / n for n in ("returns.png", "summary.json", "config.json"))
                 if with_files and p.exists()]
        status = "completed" if summary.get("completed") else "failed" if summary.get("error") else "stopped"
        try:
            run.finish(summary, files, status)
        except Exception as err:
            log.warning("%s: could not finish its run: %s: %s", name, type(err).__name__, err)

    def _close_left_open(self, name: str, saved: dict) -> None:
        """The run a killed driver left open, now superseded: marked failed where the tracker can be told so."""
        try:
            tracker_class(name).close_left_open(saved)
        except Exception as err:
            log.warning("%s: could not close the superseded run: %s: %s", name, type(err).__name__, err)

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self.state, indent=2) + "\n")
