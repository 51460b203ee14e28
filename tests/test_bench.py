"""`mdpo bench`: every figure is measured, finite and consistent with what it is computed from (the tiny size, so it
runs in CI and cannot rot), plus the pieces of arithmetic and the memory sampler on their own."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from learners.bench.measure import SIZES, _bounds, bench_config, steady_rate
from learners.bench.learner_stage import sync_schedules
from learners.bench.table import format_table
from learners.bench.memory import MemorySampler, process_kind
from learners.config import preset

FRAME_BYTES = 64 * 64 * 3


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "bench", "--size", "tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout, time.monotonic() - t0


@pytest.mark.slow
def test_tiny_bench_measures_every_stage_and_the_bounds_follow_from_them(tiny):
    r, table, _ = tiny
    cfg = bench_config("tiny")
    s, b = r["stages"], r["bounds"]
    assert r["size"] == "tiny" and r["machine"]["cores"] == os.cpu_count()
    assert positive(s["env"]["env_steps_per_second"]) and s["env"]["envs"] == cfg.envs_per_actor
    assert positive(s["actor"]["env_steps_per_second"]) and 0 < s["actor"]["inference_fraction"] < 1
    assert positive(s["learner"]["samples_per_second"])
    # The actor stage steps the same vector env plus inference, so it cannot be faster than the env alone.
    assert s["actor"]["env_steps_per_second"] < s["env"]["env_steps_per_second"]
    parallel = min(cfg.num_learners * cfg.num_actors, os.cpu_count())
    assert b["actors"] == pytest.approx(s["actor"]["env_steps_per_second"] * parallel)
    assert b["learners"] == pytest.approx(s["learner"]["samples_per_second"] * cfg.num_learners / cfg.update_epochs)
    assert b["bound"] == min(b["env"], b["actors"], b["learners"]) == b[b["slowest_stage"]]
    assert b["shared_core_bound"] == pytest.approx(1 / (1 / b["actors"] + 1 / b["learners"]))
    assert b["shared_core_bound"] < b["bound"]


@pytest.mark.slow
def test_tiny_bench_served_inference_device_costs_and_sizing(tiny):
    r, table, _ = tiny
    cfg = bench_config("tiny")
    s = r["stages"]
    served = s["actor_served"]
    assert positive(served["env_steps_per_second"]) and 0 < served["inference_fraction"] < 1
    assert served["ratio_to_local"] == pytest.approx(served["env_steps_per_second"] / s["actor"]["env_steps_per_second"])
    assert served["env_steps_per_second"] < s["env"]["env_steps_per_second"]
    rows = r["device_costs"]["rows"]
    assert {(c["device"], c["precision"], c["stage"]) for c in rows} >= {
        ("cpu", "fp32", stage) for stage in ("update", "forward", "served inference")}
    assert all(positive(c["samples_per_second"]) for c in rows)
    update = next(c for c in rows if c["device"] == "cpu" and c["stage"] == "update")
    z = next(z for z in r["device_costs"]["sizing"] if z["device"] == "cpu")
    assert z["learner_env_steps_per_second"] == pytest.approx(update["samples_per_second"] / cfg.update_epochs)
    assert z["actor_cores_local_inference"] == pytest.approx(z["learner_env_steps_per_second"]
                                                             / s["actor"]["env_steps_per_second"])
    assert z["actor_cores_served_inference"] < z["actor_cores_local_inference"]
    for line in ("actor with learner-served inference", "served / local inference", "per-sample costs",
                 "cores with local inference"):
        assert line in table


@pytest.mark.slow
def test_tiny_bench_end_to_end_efficiency_and_scaling(tiny):
    r, _, _ = tiny
    for lag in ("off", "on"):
        e = r["end_to_end"][f"policy_lag_{lag}"]
        assert e["policy_lag"] is (lag == "on") and e["iterations"] == SIZES["tiny"].iterations
        assert e["steady_iterations"] == SIZES["tiny"].iterations - (2 if lag == "on" else 1)
        assert positive(e["env_steps_per_second"]) and positive(e["iteration_seconds"])
        assert positive(e["update_seconds"]) and positive(e["collect_seconds"])
        assert 0 <= e["sync_first_step_fraction"] <= e["sync_fraction"] < 1
        cpu = e["cpu_seconds_per_1000_steps"]
        assert {"driver", "learner", "actor"} <= set(cpu) and all(positive(v) for v in cpu.values())
        assert 0 < e["cpu_utilization"] <= 1.05            # CPU used in the window <= wall x cores
        assert positive(e["tensorboard_seconds_per_iteration"]) and 0 < e["tensorboard_fraction"] < 1
        assert e["efficiency"] == pytest.approx(e["env_steps_per_second"] / r["bounds"]["bound"])
        assert e["efficiency_vs_shared_cores"] == pytest.approx(e["env_steps_per_second"] /
                                                                r["bounds"]["shared_core_bound"])
    counts = [x["actors_per_learner"] for x in r["scaling"]]
    assert counts == [k for k in range(1, os.cpu_count() + 1) if bench_config("tiny").num_envs % k == 0]
    assert all(positive(x["env_steps_per_second"]) for x in r["scaling"])
    assert r["scaling"][0]["env_steps_per_second"] == r["end_to_end"]["policy_lag_off"]["env_steps_per_second"]


@pytest.mark.slow
def test_tiny_bench_sync_costs_per_schedule(tiny):
    r, _, _ = tiny
    cfg = bench_config("tiny")
    mbs = cfg.minibatch_size
    expected = {"minibatch": (cfg.num_minibatches * cfg.update_epochs, mbs),
                "epoch": (cfg.update_epochs, cfg.batch_size), "iteration": (1, cfg.batch_size)}
    assert set(r["sync"]) == set(expected) == set(sync_schedules(cfg))
    for sync, (per_iteration, states) in expected.items():
        x = r["sync"][sync]
        assert x["syncs_per_iteration"] == per_iteration
        assert 0 < x["latency_p50_seconds"] <= x["latency_p99_seconds"]
        # Each sync sends `states` int32 row indices and receives as many rows of 15 float32 logits (plus framing):
        # no frames (the peer holds them).
        assert states * (4 + 15 * 4) <= x["bytes_per_sync"] <= 1.2 * states * (4 + 15 * 4) + 4096
        assert x["bytes_per_sync"] < states * FRAME_BYTES / 100
        assert 0 <= x["sync_fraction"] < 1 and positive(x["exchange_fraction"]) and positive(x["samples_per_second"])
    w = r["wire"]       # one minibatch sync over loopback gRPC, v2's messages beside v1's frames
    assert w["rows"] == mbs and w["syncs_per_iteration"] == cfg.num_minibatches * cfg.update_epochs
    assert w["v2_rows_and_logits"]["bytes"] < mbs * (4 + 15 * 4) * 1.2 + 4096
    assert w["v1_frames"]["bytes"] > mbs * FRAME_BYTES
    assert 0 < w["v2_rows_and_logits"]["seconds"] and w["ratio"] == pytest.approx(
        w["v2_rows_and_logits"]["seconds"] / w["v1_frames"]["seconds"])
    assert w["peer_frames_held_bytes"] == cfg.batch_size * FRAME_BYTES * (cfg.num_learners - 1)
    assert "wire: one minibatch sync" in format_table(r)
    d = r["detached_cost"]
    assert d["forward_rows"] == cfg.batch_size * cfg.update_epochs * (cfg.num_learners - 1)
    assert d["best_ratio"] == pytest.approx(d["update_seconds"] / (d["ppo_only_seconds"] + d["forward_seconds"]))
    assert len(d["rounds"]) == SIZES["tiny"].learner_reps
    for x in d["rounds"]:     # each round measured all three; the best of each is no slower than any round's
        assert x["ratio"] == pytest.approx(x["update_seconds"] / (x["ppo_only_seconds"] + x["forward_seconds"]))
        for k in ("update_seconds", "ppo_only_seconds", "forward_seconds"):
            assert d[k] <= x[k]
    assert d["ratio"] == pytest.approx(float(np.median([x["ratio"] for x in d["rounds"]])))
    assert positive(d["ppo_only_seconds"]) and positive(d["forward_seconds"])
    # Exact mode beside detached mode at sync minibatch, in the same rounds.
    e = r["exact_cost"]
    assert len(e["rounds"]) == SIZES["tiny"].learner_reps and e["target"] == 1.55
    for x in e["rounds"]:
        assert x["ratio"] == pytest.approx(x["exact_seconds"] / x["detached_seconds"]) and positive(x["exact_seconds"])
        assert e["exact_seconds"] <= x["exact_seconds"] and e["detached_seconds"] <= x["detached_seconds"]
    assert e["ratio"] == pytest.approx(float(np.median([x["ratio"] for x in e["rounds"]])))
    assert positive(e["samples_per_second"]) and 0 <= e["sync_fraction"] < 1
    assert "exact cost: exact / detached update (sync minibatch), median" in format_table(r)


@pytest.mark.slow
def test_tiny_bench_memory_table_json_and_time(tiny):
    r, table, wall = tiny
    mem = r["memory"]["training"]
    kinds = mem["kinds"]
    assert {"driver", "learner", "actor", "ray"} <= set(kinds)
    assert kinds["driver"]["processes"] == 1
    # two end-to-end runs, each with 2 learners and 2 actors of their own
    assert kinds["learner"]["processes"] >= 4 and kinds["actor"]["processes"] >= 4
    for kind, x in kinds.items():
        assert x["peak_rss_bytes"] >= x["peak_pss_bytes"] > 0, kind
    assert kinds["learner"]["peak_rss_bytes"] > 100 * 2**20           # torch + an IMPALA-CNN at least
    assert mem["total_pss_peak_bytes"] >= max(x["peak_pss_bytes"] for x in kinds.values()) and mem["samples"] > 10
    # Evaluation runs inside the first actor of each learner: no process of its own.
    assert "evaluator" not in kinds and "evaluator" not in r["memory"]["stages"]["kinds"]
    # The smoke preset evaluates every iteration: what one evaluation beside collection added to its actor's peak,
    # measured in the stage phase, is added once per learner.
    ev = r["stages"]["evaluator"]
    assert ev["episodes"] == bench_config("tiny").eval_episodes and ev["collects_beside"] >= 1
    assert ev["added_pss_bytes"] == ev["evaluating_peak_pss_bytes"] - ev["actor_peak_pss_bytes"]
    assert ev["actor_peak_pss_bytes"] > 100 * 2**20            # torch + Procgen's assets at least
    off, on = (r["end_to_end"][f"policy_lag_{x}"]["memory_total_pss_peak_bytes"] for x in ("off", "on"))
    assert max(off, on) == mem["total_pss_peak_bytes"]
    assert r["memory"]["evaluators"] == 2
    assert r["memory"]["evaluation_added_bytes"] == 2 * max(0, ev["added_pss_bytes"])
    assert r["memory"]["run_total_bytes"] == off + r["memory"]["evaluation_added_bytes"]
    assert r["wall_seconds"] < wall
    # The live mechanism metrics: an evaluation that also measures the smoke preset's probe set, its cost over a run
    # of the preset (every evaluation measuring, and as the budget lets them), its added memory.
    p = r["probe_cost"]
    assert p["states"] == preset("smoke").probe_states and p["seconds_per_agent"] > 0 and p["build_seconds"] > 0
    assert p["evaluations"] == 5 and 1 <= p["rounds_within_budget"] <= 5 and p["budget"] == 0.02
    assert p["every_evaluation_fraction"] == pytest.approx(5 * 2 * p["seconds_per_agent"] / p["run_wall_seconds"])
    assert p["budgeted_fraction"] == pytest.approx(p["rounds_within_budget"] * 2 * p["seconds_per_agent"]
                                                   / p["run_wall_seconds"])
    assert p["added_pss_bytes"] == r["stages"]["probe"]["added_pss_bytes"]
    for row in ("env bound", "actor bound", "learner bound", "end to end, policy lag off", "pipeline efficiency",
                "sync minibatch: latency p50 / p99", "of which in the first step", "detached cost", "actor scaling",
                "evaluation in a rollout actor", "a run of the preset", f"probe set ({p['states']} states)", "within --probe-budget"):
        assert row in table
    assert table.endswith(format_table(r) + "\n")


def test_steady_rate_skips_warm_up_and_with_the_lag_the_last_iteration():
    records = [{"iteration": i, "env_steps_total": 100 * i, "wall_seconds": w}
               for i, w in zip(range(1, 6), [10.0, 12.0, 14.0, 16.0, 17.0])]
    rate, steady = steady_rate(records, policy_lag=False)
    assert rate == pytest.approx(400 / 7) and [r["iteration"] for r in steady] == [2, 3, 4, 5]
    rate, steady = steady_rate(records, policy_lag=True)
    assert rate == pytest.approx(300 / 6) and [r["iteration"] for r in steady] == [2, 3, 4]
    with pytest.raises(ValueError):
        steady_rate(records[:2], policy_lag=True)


def test_bounds_pick_the_slowest_stage():
    cfg = bench_config("tiny")
    stages = {"env": {"env_steps_per_second": 9000.0}, "actor": {"env_steps_per_second": 500.0},
              "learner": {"samples_per_second": 100.0}}
    b = _bounds(cfg, stages, cores=2)
    assert b["actors"] == 1000 and b["learners"] == 200 and b["slowest_stage"] == "learners" and b["bound"] == 200
    assert b["shared_core_bound"] == pytest.approx(1 / (1 / 1000 + 1 / 200))
    assert _bounds(cfg, stages, cores=1)["actors"] == 500


def test_memory_sampler_sees_a_child_process_peak_and_its_kind():
    code = "import numpy as np, time; a = np.ones(150 * 2**20 // 8); time.sleep(1.5)"
    with MemorySampler(interval_s=0.05, tree_interval_s=0.2) as sampler:   # the child is found within 0.2 s
        with sampler.phase("child"):
            proc = subprocess.Popen([sys.executable, "-c", code])
            proc.wait(60)
    summary = sampler.summary("child")
    assert summary["kinds"]["driver"]["processes"] == 1
    assert summary["kinds"]["ray"]["peak_rss_bytes"] >= 150 * 2**20        # unknown children count as "ray"
    assert summary["total_pss_peak_bytes"] >= 150 * 2**20 and summary["samples"] >= 5
    import psutil
    assert process_kind(psutil.Process(), os.getpid()) == "driver"
    assert np.isfinite(summary["total_pss_peak_bytes"])


@pytest.mark.slow
def test_a_saved_result_is_redrawn_without_measuring(tiny, tmp_path):
    r, table, _ = tiny
    saved, png = tmp_path / "bench.json", tmp_path / "bench.png"
    saved.write_text(json.dumps(r))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "bench", "--from", str(saved), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert format_table(r) in proc.stdout and "Started a local Ray" not in proc.stderr
    assert time.monotonic() - t0 < r["wall_seconds"]          # nothing re-measured
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 800 and image[..., :3].std() > 0.05   # drawn, not blank


@pytest.mark.parametrize("args, says", [
    (["--from", "{tmp}/missing.json"], "no such file"),
    (["--from", "{tmp}/not-a-result.json"], "is not a result of `mdpo bench --json`"),
    (["--plot", "{tmp}/no/such/dir/x.png"], "does not exist"),
    (["--json", "{tmp}/no/such/dir/x.json"], "does not exist"),
    (["--iterations", "2"], "must be >= 3"),
])
def test_bad_bench_arguments_fail_before_any_measurement(tmp_path, args, says):
    (tmp_path / "not-a-result.json").write_text('{"size": "tiny"}')
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "bench", *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert "Started a local Ray" not in proc.stderr


@pytest.mark.slow
def test_embedded_ray_workers_inherit_the_malloc_arena_limit(monkeypatch):
    """Learners and actors of an embedded Ray run with two malloc arenas (less memory, same speed); a value the
    user set is kept."""
    import ray

    from learners.coordinator.cluster import init_local_ray

    def worker_env() -> str | None:
        return os.environ.get("MALLOC_ARENA_MAX")

    for user_value, expected in ((None, "2"), ("4", "4")):
        if user_value is None:
            monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
        else:
            monkeypatch.setenv("MALLOC_ARENA_MAX", user_value)
        assert not ray.is_initialized()
        init_local_ray(1)
        try:
            assert ray.get(ray.remote(num_cpus=0)(worker_env).remote()) == expected
        finally:
            ray.shutdown()
