"""What a run leaves for the tools researchers compare runs in: TensorBoard event files in RUN_DIR/tensorboard/
(read back with TensorBoard's own reader), W&B offline runs and MLflow file stores (`--track wandb,mlflow`, read
back from W&B's files and with MLflow's client), and the Python entry point `from learners import train`."""

import dataclasses
import json
import shutil
import sys

import pytest

from learners.coordinator.tensorboard import LEARNER_TAGS, RUN_TAGS, SYNC_LATENCY_TAG
from tests.helpers import check_tensorboard_matches_metrics, expected_points, free_port, same_points
from tests.tracker_readers import check_trackers_match_metrics, mlflow_history, mlflow_run, wandb_run

BATCH = 1024     # cartpole preset: 8 envs x 128 steps


def test_python_entry_point_trains_and_tensorboard_wandb_and_mlflow_hold_every_tag(tmp_path, monkeypatch):
    """(A resumed run's and a rolled-back run's event files and trackers: tests/test_train_e2e.py and
    tests/test_faults.py.)"""
    from learners import TrainConfig, preset, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    cfg = dataclasses.replace(preset("cartpole"), total_steps=2 * BATCH, eval_every=1, checkpoint_every=1,
                              metrics_port=-1, progress=False, track="wandb,mlflow", track_group="g/cartpole/mdpo")
    assert isinstance(cfg, TrainConfig)
    seen = []
    summary = train(cfg, run_dir=run, progress=seen.append)
    assert summary["completed"] and summary["iterations"] == 2 and [r["iteration"] for r in seen] == [1, 2]
    assert summary["env_steps"]["per_agent"] == [2 * BATCH] * 2
    assert train(cfg, run_dir=run) == summary          # a finished run: its summary, nothing started
    scalars = check_tensorboard_matches_metrics(run)
    for agent in ("agent0", "agent1"):
        for tag in [*LEARNER_TAGS.values(), SYNC_LATENCY_TAG]:
            assert f"{tag}/{agent}" in scalars, f"{tag}/{agent} missing"
    assert set(RUN_TAGS.values()) <= set(scalars)
    assert [s for s, _ in scalars["charts/episodic_return/agent0"]] == [BATCH, 2 * BATCH]
    wb, (client, mlrun) = check_trackers_match_metrics(run)        # the same tags, steps and values as TensorBoard
    assert wb["project"] == "mdpo" and wb["group"] == "g/cartpole/mdpo" and "seed1" in wb["tags"]
    assert mlrun.info.experiment_id == client.get_experiment_by_name("mdpo").experiment_id
    assert mlrun.data.tags["mdpo.game"] == "CartPole-v1" and mlrun.info.run_name == "run"
    parent = client.get_run(mlrun.data.tags["mlflow.parentRunId"])        # MLflow groups runs as nested runs
    assert parent.info.run_name == "g/cartpole/mdpo" and parent.data.tags["mdpo.role"] == "group"
    assert (tmp_path / "mlruns").is_dir()           # the default store: mlruns/ beside the run directory

    # `mdpo report` reads a run from its event files when it has no metrics.jsonl: the same curves.
    from learners.study.report import run_curve
    from learners.study.runs import load_run

    events_only = tmp_path / "events-only"
    shutil.copytree(run, events_only)
    (events_only / "metrics.jsonl").unlink()
    for split in ("train", "test"):
        from_jsonl, from_events = run_curve(load_run(run), split), run_curve(load_run(events_only), split)
        # every iteration has a train return; a test return from the first evaluation on (it finishes later)
        assert len(from_jsonl) == {"train": 2, "test": 1}[split] and from_events == pytest.approx(from_jsonl, rel=1e-6)


def test_bad_input_to_the_python_entry_point_fails_before_anything_starts(tmp_path):
    from learners import ConfigError, TrainConfig, train

    with pytest.raises(ConfigError, match="--precision"):
        train(TrainConfig(env_id="CartPole-v1", precision="fp8"), run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------ trackers' bad input, faults
def _no_module(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)       # `import name` now raises ImportError


def _mlflow_server_that_does_not_answer():
    return f"http://127.0.0.1:{free_port()}"        # nothing listens there: connection refused


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("track, setup, message", [
    ("tensorboard", None, "always written"),
    ("wandb,wandb", None, "twice"),
    ("wandb,comet", None, "unknown tracker 'comet'"),
    ("wandb", lambda mp: _no_module(mp, "wandb"), r'pip install "mdpo\[wandb\]"'),
    ("wandb", lambda mp: mp.setenv("WANDB_MODE", "sometimes"), "not a W&B mode"),
    ("wandb", lambda mp: mp.setenv("WANDB_MODE", "online"), "cannot log in to W&B.*WANDB_MODE=offline"),
    ("mlflow", lambda mp: _no_module(mp, "mlflow", "mlflow.tracking"), r'pip install "mdpo\[mlflow\]"'),
    ("mlflow", lambda mp: mp.setenv("MLFLOW_TRACKING_URI", _mlflow_server_that_does_not_answer()), "does not answer"),
    pytest.param("mlflow", lambda mp: mp.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"), "full MLflow package",
                 marks=pytest.mark.skipif(_has("sqlalchemy"), reason="sqlalchemy is here: a database store works")),
])
def test_a_bad_tracker_setting_fails_before_anything_starts(tmp_path, monkeypatch, track, setup, message):
    from learners import ConfigError, preset, train

    monkeypatch.setenv("HOME", str(tmp_path))            # no W&B credentials from this machine's ~/.netrc
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    if setup:
        setup(monkeypatch)
    cfg = dataclasses.replace(preset("cartpole"), metrics_port=-1, progress=False, track=track)
    with pytest.raises(ConfigError, match=message):
        train(cfg, run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_group_name_mlflow_cannot_search_for_is_refused_with_the_config():
    from learners import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--track-group \"it's\": quotes cannot be in a group name"):
        TrainConfig(env_id="CartPole-v1", track="mlflow", track_group="it's").validate()


def _record(i: int) -> dict:
    return {"iteration": i, "env_steps": 1024 * i, "env_steps_total": 2048 * i, "env_steps_per_second": 100.0 + i,
            "learners": [{"id": 0, "loss": 1.0 / i, "train_return": 10.0 * i, "sync_latency": {"p50": 0.01}}]}


def test_a_failing_tracker_costs_a_warning_and_catches_up_at_the_next_checkpoint(tmp_path, caplog):
    """MLflow's real file store made to fail (its run's metrics folder replaced by a file): the commit logs a
    warning and keeps what it could not send; the next one sends it; the history ends exactly metrics.jsonl's."""
    from learners.config import TrainConfig
    from learners.tracking import Tracking

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [_record(i) for i in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.json").write_text("{}")
    cfg = TrainConfig(env_id="CartPole-v1", track="mlflow", mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(),
                      run_id="r")
    tracking = Tracking(cfg, run_dir)
    tracking.open(new=True)
    tracking.commit(records[:1])
    client, run = mlflow_run(run_dir)
    metrics_dir = next((tmp_path / "mlruns").glob(f"*/{run.info.run_id}/metrics"))
    shutil.move(metrics_dir, tmp_path / "aside")
    metrics_dir.write_text("not a folder")
    tracking.commit(records[:3])
    assert "mlflow: could not log iterations 2-3" in caplog.text
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["sent_iteration"] == 1
    metrics_dir.unlink()
    shutil.move(tmp_path / "aside", metrics_dir)
    tracking.commit(records)
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["sent_iteration"] == 4
    tracking.end({"completed": False, "error": {"type": "X", "message": "y"}})
    same_points(mlflow_history(client, client.get_run(run.info.run_id)), expected_points(run_dir), "MLflow")
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_a_sweep_groups_each_game_and_method_over_its_seeds(tmp_path, monkeypatch):
    """W&B groups, MLflow parent runs (made by the sweep before any cell starts): one per game and method."""
    from learners.study.sweep import SweepConfig, expand
    from learners.tracking import Tracking, prepare_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = SweepConfig(runs_dir=tmp_path / "study", games=["CartPole-v1"], seeds=[1, 2], preset="cartpole",
                        overrides={"track": "wandb,mlflow"}).validate()
    cells = expand(sweep)
    assert {c.config.track_group for c in cells} == {"study/CartPole-v1/mdpo", "study/CartPole-v1/ppo"}
    assert {c.config.mlflow_tracking_uri for c in cells} == {(tmp_path / "mlruns").as_uri()}
    prepare_sweep([(c.config, c.run_dir) for c in cells])
    for cell in [c for c in cells if c.method == "mdpo"]:        # the two seeds of one group
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n")
        tracking = Tracking(cell.config, cell.run_dir)
        tracking.open(new=True)
        tracking.commit([_record(1)])
        tracking.end({"completed": True})
    parents = set()
    for cell in [c for c in cells if c.method == "mdpo"]:
        assert wandb_run(cell.run_dir)["group"] == "study/CartPole-v1/mdpo"
        client, run = mlflow_run(cell.run_dir)
        parents.add(run.data.tags["mlflow.parentRunId"])
        assert run.data.tags["mdpo.seed"] == str(cell.seed)
    groups = client.search_runs([run.info.experiment_id], "tags.`mdpo.role` = 'group'")
    assert sorted(g.info.run_name for g in groups) == ["study/CartPole-v1/mdpo", "study/CartPole-v1/ppo"]
    assert len(parents) == 1 and parents <= {g.info.run_id for g in groups}


def test_a_resume_from_before_what_a_tracker_has_starts_a_new_run_with_the_whole_history(tmp_path, monkeypatch, caplog):
    """The checkpoint a tracker was sent at is lost (damaged on disk): the run continues from an older one and redoes
    iterations the tracker already has; neither W&B nor MLflow takes points back, so each gets a new run."""
    from learners.config import TrainConfig
    from learners.tracking import Tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    cfg = TrainConfig(env_id="CartPole-v1", track="wandb,mlflow", mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(),
                      run_id="r")
    first = Tracking(cfg, run_dir)
    first.open(new=True)
    first.commit([_record(i) for i in range(1, 5)])
    old = json.loads((run_dir / "tracking.json").read_text())
    first.close()                                   # the driver dies; checkpoint 4 is found damaged on resume

    redone = [_record(1), _record(2), *({**_record(i), "env_steps_per_second": 1.0} for i in (3, 4))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in redone))
    second = Tracking(cfg, run_dir)
    second.open(new=False, iteration=2)
    second.commit(redone)
    second.end({"completed": True})
    new = json.loads((run_dir / "tracking.json").read_text())
    assert new["wandb"]["id"] != old["wandb"]["id"] and new["mlflow"]["run_id"] != old["mlflow"]["run_id"]
    assert "holds iterations up to 4 but the run continues from checkpoint 2" in caplog.text
    same_points(wandb_run(run_dir)["history"], expected_points(run_dir), "W&B")
    client, run = mlflow_run(run_dir)
    same_points(mlflow_history(client, run), expected_points(run_dir), "MLflow")
    assert client.get_run(old["mlflow"]["run_id"]).info.status == "FAILED"     # as the first session closed it


class _Killed(BaseException):
    """The driver SIGKILLed: nothing after it in the commit runs (not an error a tracker's warning catches)."""


@pytest.mark.parametrize("killed", ["mlflow", "wandb"])
@pytest.mark.parametrize("resume_at", [4, 2])
def test_a_driver_killed_mid_send_leaves_every_point_once(tmp_path, monkeypatch, caplog, killed, resume_at):
    """The driver killed while a tracker takes checkpoint 4's iterations, before tracking.json says it has them (a
    fresh-clone CI run hit this: MLflow then held iterations 3 and 4 twice). Resumed from checkpoint 4, MLflow is
    asked what it holds and gets the rest in the same run; a W&B run cannot say, so W&B starts a new run with the
    whole history. Resumed from checkpoint 2 (4 damaged), either may hold redone iterations: a new run."""
    from learners.config import TrainConfig
    from learners.tracking import Tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    order = "wandb,mlflow" if killed == "wandb" else "mlflow,wandb"       # the killed one's send comes first
    cfg = TrainConfig(env_id="CartPole-v1", track=order, mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(),
                      run_id="r")
    first = Tracking(cfg, run_dir)
    first.open(new=True)
    first.commit([_record(1), _record(2)])
    run = first.runs[killed]
    sent = run.log

    def log_part_then_die(points, unsure=False):
        step, scalars = points[-1]           # iteration 3 whole, of iteration 4 one tag: a batch landed in part
        sent([*points[:-1], (step, dict(list(scalars.items())[:1]))], unsure)
        raise _Killed

    run.log = log_part_then_die
    with pytest.raises(_Killed):
        first.commit([_record(i) for i in range(1, 5)])
    old = json.loads((run_dir / "tracking.json").read_text())
    assert old[killed] | {"sent_iteration": 2, "sending_iteration": 4} == old[killed]
    first.runs["wandb"].run.finish(exit_code=1)       # its service would go down with the driver

    redone = {i: _record(i) if i <= resume_at else {**_record(i), "env_steps_per_second": 1.0} for i in range(1, 7)}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in redone.values()))
    second = Tracking(cfg, run_dir)
    second.open(new=False, iteration=resume_at)
    second.commit(list(redone.values()))
    second.end({"completed": True})
    new = json.loads((run_dir / "tracking.json").read_text())
    assert "sending_iteration" not in new["wandb"] and "sending_iteration" not in new["mlflow"]
    same_points(wandb_run(run_dir)["history"], expected_points(run_dir), "W&B")
    client, mlflow = mlflow_run(run_dir)
    same_points(mlflow_history(client, mlflow), expected_points(run_dir), "MLflow")
    # The tracker killed first never got iterations 3-4 and goes on in its run
    assert (new["mlflow"]["run_id"] == old["mlflow"]["run_id"]) == (killed == "wandb" or resume_at == 4)
    assert (new["wandb"]["id"] == old["wandb"]["id"]) == (killed == "mlflow")
    if resume_at == 2:
        assert f"{killed} may hold iterations up to 4 but the run continues from checkpoint 2" in caplog.text
    elif killed == "wandb":
        assert "stopped while sending iterations 3-4, and a wandb run cannot say which it got" in caplog.text
    if new["mlflow"]["run_id"] != old["mlflow"]["run_id"]:
        # the run the killed driver left open is marked failed once it is replaced
        assert client.get_run(old["mlflow"]["run_id"]).info.status == "FAILED"
