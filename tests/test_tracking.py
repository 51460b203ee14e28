"""What a run leaves for the tools researchers compare runs in: TensorBoard event files in RUN_DIR/tensorboard/
(read back with TensorBoard's own reader), and the Python entry point `from learners import train`."""

import dataclasses
import shutil

import pytest

from learners.coordinator.tensorboard import LEARNER_TAGS, RUN_TAGS, SYNC_LATENCY_TAG
from tests.helpers import check_tensorboard_matches_metrics

BATCH = 1024     # cartpole preset: 8 envs x 128 steps


def test_python_entry_point_trains_and_tensorboard_holds_every_tag(tmp_path):
    """(A resumed run's and a rolled-back run's event files: tests/test_train_e2e.py and tests/test_faults.py.)"""
    from learners import TrainConfig, preset, train

    run = tmp_path / "run"
    cfg = dataclasses.replace(preset("cartpole"), total_steps=2 * BATCH, eval_every=1, checkpoint_every=1,
                              metrics_port=-1, progress=False)
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
