"""`mdpo sweep`: the grid, cell states on disk, resource budgeting, and a real interrupted/resumed/skipping sweep."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import torch

from learners.cli import build_parser, main
from learners.config import ConfigError, TrainConfig
from learners.study.sweep import Method, SweepConfig, cell_status, expand, parse_axis, train_command
from learners.study.sweep_runner import SweepRunner, cell_resources, fits
from tests.helpers import free_port
from tests.study import CELLS, GAME, GRID, TINY, tiny_study


def sweep(tmp_path: Path, **kw) -> SweepConfig:
    values = dict(runs_dir=tmp_path, games=["coinrun"], seeds=[1, 2], overrides={"total_steps": 1024})
    return SweepConfig(**(values | kw))


# --- the grid ---------------------------------------------------------------------------------------------------

def test_grid_is_games_x_methods_x_axes_x_seeds_seed_major(tmp_path):
    cfg = sweep(tmp_path, games=["coinrun", "starpilot"], axes={"learning_rate": [5e-4, 1e-3]})
    cells = expand(cfg.validate())
    assert len(cells) == 2 * 2 * 2 * 2
    assert [c.seed for c in cells[:8]] == [1] * 8                    # every comparison of seed 1 comes first
    names = {c.name for c in cells}
    assert "starpilot/ppo/learning_rate=0.001/seed2" in names
    cell = next(c for c in cells if c.name == "coinrun/mdpo/learning_rate=0.0005/seed1")
    assert cell.config.alpha == 1.0 and cell.config.learning_rate == 5e-4 and cell.config.seed == 1
    assert cell.config.env_id == "coinrun" and cell.config.total_steps == 1024
    assert cell.run_dir == tmp_path / cell.name and cell.label == "mdpo learning_rate=0.0005"
    assert next(c for c in cells if c.method == "ppo").config.alpha == 0.0
    assert len({c.config.run_id for c in cells}) == len(cells)       # Prometheus labels never collide


def test_presets_methods_and_overrides_stack_in_that_order(tmp_path):
    cfg = sweep(tmp_path, preset="smoke", methods=[Method.parse("exact:distill_mode=exact,alpha=0.5")],
                overrides={"num_envs": 4, "num_minibatches": 2})
    [cell, _] = expand(cfg.validate())
    assert (cell.config.num_steps, cell.config.num_envs) == (64, 4)   # preset value, fixed override
    assert (cell.config.distill_mode, cell.config.alpha) == ("exact", 0.5)


def test_the_cell_command_reproduces_the_cell_config(tmp_path):
    """`mdpo train`'s own parser reads the command back into exactly the cell's config."""
    cfg = sweep(tmp_path, preset="smoke", axes={"anneal_lr": [True]}, overrides={"ent_coef": 0.02})
    for cell in expand(cfg.validate()):
        cmd = train_command(cell, "127.0.0.1:6379", resume=False)
        args = build_parser().parse_args(cmd[3:])
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
        assert dataclasses.replace(TrainConfig(**given), ray_address="", progress=False) == cell.config
        assert given["ray_address"] == "127.0.0.1:6379"
        resume = train_command(cell, "127.0.0.1:6379", resume=True)
        assert resume[3:6] == ["train", "--resume", str(cell.run_dir)]


@pytest.mark.parametrize("kw, message", [
    (dict(axes={"lerning_rate": [1e-3]}), "unknown axis 'lerning_rate'.*Did you mean learning_rate"),
    (dict(axes={"seed": [1, 2]}), "managed by the sweep"),
    (dict(axes={"alpha": [0.5]}), "method mdpo sets alpha, which is also an axis"),
    (dict(overrides={"alpha": 0.5}), "method mdpo sets alpha, which is also an axis or a fixed override"),
    (dict(overrides={"env_id": "coinrun"}), "set per cell by the sweep"),
    (dict(seeds=[1, 1]), "--seeds lists a value twice"),
    (dict(games=[]), "--games needs at least one value"),
    (dict(max_concurrent=-1), "--max-concurrent"),
])
def test_bad_grids_are_rejected_with_the_reason(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        sweep(tmp_path, **kw).validate()


def test_method_and_axis_specs():
    assert Method.parse("ppo") == Method("ppo", {"alpha": 0.0})
    assert Method.parse("dml:alpha=2,sync=epoch") == Method("dml", {"alpha": 2.0, "sync": "epoch"})
    assert parse_axis("anneal_lr=true,false") == ("anneal_lr", [True, False])
    assert parse_axis("num_envs=8,16") == ("num_envs", [8, 16])
    for spec, message in [("a2c", "unknown method"), ("x:alpha", "expected FIELD=VALUE"), ("x/y:alpha=1", "method name"),
                          ("x:alpha=high", "cannot read 'high' as float")]:
        with pytest.raises(ConfigError, match=message):
            Method.parse(spec)
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_axis("learning_rate")


def test_a_bad_cell_config_is_caught_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="cell coinrun/mdpo/num_envs=6/seed1: --num-envs 6 must be divisible"):
        expand(sweep(tmp_path, axes={"num_envs": [6]}, overrides={"num_actors": 4}).validate())
    with pytest.raises(ConfigError, match="Unknown Procgen game 'coinrn'"):
        expand(sweep(tmp_path, games=["coinrn"]).validate())


# --- cell states on disk --------------------------------------------------------------------------------------

def test_cell_status_new_done_resume_restart_and_conflict(tmp_path):
    [cell, *_] = expand(sweep(tmp_path).validate())
    assert cell_status(cell) == ("new", "")
    cell.run_dir.mkdir(parents=True)
    saved = dataclasses.replace(cell.config, ray_address="10.0.0.1:6379", progress=True, run_id="other")
    saved.save(cell.run_dir / "config.json")                         # fields that do not change results may differ
    assert cell_status(cell)[0] == "new"                                 # never checkpointed: start over
    manifest = cell.run_dir / "checkpoints" / "ckpt-000002" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    assert cell_status(cell)[0] == "resume"
    (cell.run_dir / "summary.json").write_text(json.dumps({"completed": False}))
    assert cell_status(cell)[0] == "resume"
    (cell.run_dir / "summary.json").write_text(json.dumps({"completed": True}))
    assert cell_status(cell)[0] == "done"
    other_version = cell.config.to_dict()                 # a field added since, and one this version lacks
    other_version.pop("gae_lambda")
    other_version["future_option"] = 3
    (cell.run_dir / "config.json").write_text(json.dumps(other_version))
    assert cell_status(cell)[0] == "done"
    dataclasses.replace(cell.config, learning_rate=1e-3).save(cell.run_dir / "config.json")
    status, reason = cell_status(cell)
    assert status == "conflict" and "learning_rate=0.001 (sweep: 0.0005)" in reason


def test_resource_budget():
    cfg = TrainConfig(num_learners=2, learner_cpus=0.5, actor_cpus=0.25, num_actors=2)
    assert cell_resources(cfg, {"CPU": 8}) == {"CPU": 2.0}
    assert cell_resources(cfg, {"CPU": 8, "GPU": 2, "learner": 2}) == {"CPU": 2.0, "GPU": 2.0, "learner": 2.0}
    assert cell_resources(dataclasses.replace(cfg, device="cpu"), {"CPU": 8, "GPU": 2}) == {"CPU": 2.0}
    assert fits({"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 4.0})
    assert not fits({"CPU": 2.0}, {"CPU": 2.5}, {"CPU": 4.0})
    assert not fits({"CPU": 1.0, "GPU": 1.0}, {}, {"CPU": 4.0})


def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    port = free_port()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: nothing answers"):
        SweepRunner(sweep(tmp_path, ray_address=f"127.0.0.1:{port}"), out=io.StringIO()).run()


# --- a real sweep -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tiny_study(tmp_path_factory)


def statuses(root: Path) -> dict[str, dict]:
    return {c["cell"]: c for c in json.loads((root / "sweep-status.json").read_text())["cells"]}


def cells_with(event: str, output: str) -> set[str]:
    """Cells of the sweep's progress lines `... | <event> <cell>`."""
    return {line.rsplit(" ", 1)[1] for line in output.splitlines() if line.startswith("sweep:") and f"| {event} " in line}


@pytest.mark.slow
def test_an_interrupted_sweep_stops_its_cells_with_a_checkpoint_and_the_rerun_resumes_them(study):
    assert study.interrupted.returncode == 130, study.interrupted.output
    assert "stopping" in study.interrupted.output
    interrupted = cells_with("interrupted", study.interrupted.output)
    assert interrupted and interrupted <= set(CELLS), study.interrupted.output
    assert not cells_with("done", study.interrupted.output)
    # Phase 2 resumes the interrupted cells that had checkpointed (at least the one whose checkpoint triggered
    # the SIGINT) and starts the others fresh.
    resumed, started = cells_with("resumed", study.resumed.output), cells_with("started", study.resumed.output)
    assert resumed and resumed <= interrupted, study.resumed.output
    assert started == set(CELLS) - resumed
    for cell in resumed:
        log = (study.root / cell / "train.log").read_text()
        assert log.count("=== mdpo sweep") == 2 and "--resume" in log and "resumed from" in log
        # The probe set is built once; the resumed session measures the same states, from the run directory.
        assert log.count("probe set:") == 1 and (study.root / cell / "probes.npz").exists(), log[-3000:]


@pytest.mark.slow
def test_the_rerun_finishes_the_grid_without_losing_or_repeating_iterations(study):
    assert study.resumed.returncode == 0, study.resumed.output
    assert "sweep: 4/4 done (0 skipped) | 0 running | 0 failed" in study.resumed.output
    for cell in CELLS:
        summary = json.loads((study.root / cell / "summary.json").read_text())
        assert summary["completed"] is True and summary["env_steps"]["per_agent"] == [512, 512]
        iterations = [json.loads(line)["iteration"] for line in (study.root / cell / "metrics.jsonl").open()]
        assert iterations == list(range(1, 5))
        assert json.loads((study.root / cell / "sweep-cell.json").read_text())["label"] in ("mdpo", "ppo")
    # A cell reserves 2 x (0.25 + 0.25) = 1 CPU; the sweep's local cluster has os.cpu_count() CPUs.
    running = [int(part.split()[0]) for line in study.resumed.output.splitlines() if line.startswith("sweep:")
               for part in line.split("|") if part.strip().endswith("running")]
    assert max(running) == min(4, os.cpu_count() or 1)


@pytest.mark.slow
def test_finished_cells_are_skipped_and_failures_are_recorded_and_shown(study):
    phase = study.with_failures
    out = phase.output
    assert phase.returncode == 1, out
    assert "4 already done" in out and "(4 skipped)" in out
    for cell in CELLS:                                  # not rerun: summaries untouched, no new attempt logged
        assert (study.root / cell / "summary.json").stat().st_mtime_ns == study.mtimes_before_phase3[cell]
        assert (study.root / cell / "train.log").read_text().count("=== mdpo sweep") <= 2
    cells = statuses(study.root)
    assert all(cells[c]["status"] == "skipped" for c in CELLS)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the `gpu` cells do not fail here")
    for seed in (1, 2):
        gpu = cells[f"{GAME}/gpu/seed{seed}"]
        assert gpu["status"] == "failed" and gpu["exit_code"] not in (0, None)
        assert f"FAILED {GAME}/gpu/seed{seed}" in out
    assert "no visible GPU" in out                      # the log tail is shown
    assert "0/6" not in out and "4/6 done (4 skipped) | 0 running | 2 failed" in out


@pytest.mark.slow
def test_a_finished_grid_returns_at_once_without_starting_ray(study, capsys):
    """The original grid again through the CLI, in process: every cell is skipped, no cluster is started."""
    status = (study.root / "sweep-status.json").read_text()     # phase 3's, which other tests read
    try:
        assert main(["sweep", str(study.root), *GRID, *TINY]) == 0
    finally:
        (study.root / "sweep-status.json").write_text(status)
    out = capsys.readouterr().out
    assert "4 cells" in out and "0 to run" in out and "cluster" not in out
    assert "sweep: 4/4 done (4 skipped) | 0 running | 0 failed | 0 pending" in out
