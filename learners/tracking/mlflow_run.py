"""A run in MLflow (`--track mlflow`): a tracking server, a database, or a file store with no network (the default:
mlruns/ beside the run directory). With --track-group the run is nested under a parent run of that name, MLflow's
way of grouping runs (a sweep's seeds of one game and method)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from learners.config import ConfigError, TrainConfig
from learners.tracking.identity import run_name, tags_of

log = logging.getLogger("mdpo")
GROUP_TAG, ROLE_TAG, PARENT_TAG = "mdpo.group", "mdpo.role", "mlflow.parentRunId"
STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
BATCH = 1000        # MLflow's limit of metrics per log_batch call


def tracking_uri(cfg: TrainConfig, run_dir: Path) -> str:
    uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return (Path(run_dir).resolve().parent / "mlruns").as_uri()
    return uri if urlparse(uri).scheme else Path(uri).resolve().as_uri()     # a plain path is a file store


def client_for(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError('--track mlflow needs MLflow: pip install "mdpo[mlflow]" (the mlflow-skinny client), '
                          "or pip install mlflow") from None
    if urlparse(uri).scheme == "file":
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a file store is what runs with no
        # server or network need, so asking for one (or the default) turns it on for this process.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


@contextmanager
def _fail_fast():
    """A server that does not answer fails the check in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:                  # another run created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def group_run(client, experiment: str, group: str) -> str:
    """The parent run of `group` in `experiment`, made the first time (a sweep makes its groups' before its cells)."""
    query = f"tags.`{GROUP_TAG}` = '{group}' and tags.`{ROLE_TAG}` = 'group'"
    found = client.search_runs([experiment], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    parent = client.create_run(experiment, run_name=group, tags={GROUP_TAG: group, ROLE_TAG: "group"})
    client.set_terminated(parent.info.run_id, "FINISHED")       # a container: its children are the runs
    return parent.info.run_id


def make_groups(cells: list[tuple[TrainConfig, Path]]) -> None:
    for uri, project, group in sorted({(tracking_uri(cfg, run_dir), cfg.track_project, cfg.track_group)
                                       for cfg, run_dir in cells if cfg.track_group}):
        client = client_for(uri)
        group_run(client, experiment_id(client, project), group)


class MlflowRun:
    SEES_WHAT_IT_HOLDS = True       # its store is asked which points a cut-off send left there

    @staticmethod
    def check(cfg: TrainConfig, run_dir: Path) -> None:
        uri = tracking_uri(cfg, run_dir)
        scheme = urlparse(uri).scheme
        if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            try:
                import sqlalchemy  # noqa: F401
            except ImportError:
                raise ConfigError(f"MLflow tracking URI {uri}: a database store needs the full MLflow package "
                                  "(pip install mlflow); or use a server (http://...) or a file store (file:/path)"
                                  ) from None
        client = client_for(uri)
        try:
            with _fail_fast():
                client.search_experiments(max_results=1)
        except Exception as err:
            raise ConfigError(f"--track mlflow: MLflow at {uri} does not answer ({type(err).__name__}: "
                              f"{str(err)[:300]}). Check --mlflow-tracking-uri / $MLFLOW_TRACKING_URI, or use a "
                              "file store that needs no server, e.g. --mlflow-tracking-uri file:runs/mlruns") from None

    def __init__(self, cfg: TrainConfig, run_dir: Path, saved: dict):
        self.client = client_for(tracking_uri(cfg, run_dir))
        if saved.get("run_id") and saved.get("tracking_uri") == self.client.tracking_uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = experiment_id(self.client, cfg.track_project)
        tags = {f"mdpo.{k}": v for k, v in tags_of(cfg).items()}
        if cfg.track_group:
            tags[PARENT_TAG] = group_run(self.client, experiment, cfg.track_group)
        self.run_id = self.client.create_run(experiment, run_name=run_name(cfg, run_dir), tags=tags).info.run_id
        log.info("MLflow run %s in experiment %s at %s", self.run_id, cfg.track_project, self.client.tracking_uri)
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in cfg.to_dict().items()]
        for i in range(0, len(params), 100):            # MLflow's limit of params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    @staticmethod
    def close_left_open(saved: dict) -> None:
        if saved.get("run_id") and saved.get("tracking_uri"):
            client = client_for(saved["tracking_uri"])
            if client.get_run(saved["run_id"]).info.status == "RUNNING":
                client.set_terminated(saved["run_id"], "FAILED")

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}

    def log(self, points: list[tuple[int, dict[str, float]]], unsure: bool = False) -> None:
        """`unsure`: a send of some of these points was cut off (an error, or the driver killed), so the points the
        store already holds are left out; a batch can land in part."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for step, scalars in points for tag, value in scalars.items()]
        if unsure:
            held = {(m.key, m.step) for tag in {m.key for m in metrics}
                    for m in self.client.get_metric_history(self.run_id, tag)}
            metrics = [m for m in metrics if (m.key, m.step) not in held]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def finish(self, summary: dict, files: list[Path], status: str) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, STATUS[status])
