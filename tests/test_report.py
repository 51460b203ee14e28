"""`mdpo report`: its numbers equal the ones recomputed from the run directories' own logs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from learners.config import ConfigError, TrainConfig
from learners.study.procgen_scores import RETURN_RANGES, normalized_score
from learners.study.report import ReportConfig, build_report, group_runs, run_probe_curves, stats
from learners.study.runs import Run
from tests.study import CELLS, GAME, tiny_study

METHODS, SEEDS = ("mdpo", "ppo"), (1, 2)


# --- pure parts -------------------------------------------------------------------------------------------------

def test_stats_are_mean_and_sample_std_over_the_values_present():
    assert stats([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)), 2)
    assert stats([4.0]) == (4.0, None, 1)
    assert stats([None]) == (None, None, 0)


def test_normalized_score_uses_the_procgen_paper_constants():
    assert normalized_score("coinrun", "hard", 7.5) == 0.5
    assert normalized_score("starpilot", "easy", 2.5) == 0.0 and normalized_score("starpilot", "easy", 64.0) == 1.0
    assert normalized_score("fruitbot", "hard", -0.5 + 27.7 / 4) == pytest.approx(0.25)
    assert normalized_score("CartPole-v1", "hard", 100.0) is None
    assert normalized_score("coinrun", "exploration", 10.0) is None
    assert set(RETURN_RANGES["easy"]) == set(RETURN_RANGES["hard"]) and len(RETURN_RANGES["hard"]) == 16


def test_bad_runs_dirs_are_rejected_clearly(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        build_report(ReportConfig(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no run directories"):
        build_report(ReportConfig(tmp_path))
    run = tmp_path / "coinrun" / "mdpo" / "seed1"
    run.mkdir(parents=True)
    TrainConfig().save(run / "config.json")
    with pytest.raises(ConfigError, match="none of the 1 runs has completed.*--include-incomplete"):
        build_report(ReportConfig(tmp_path))


def test_one_game_in_two_distribution_modes_is_an_error():
    runs = [Run(Path(f"r{m}"), TrainConfig(distribution_mode=m), [], None, None, None) for m in ("easy", "hard")]
    with pytest.raises(ConfigError, match="different distribution modes"):
        group_runs(runs)


# --- the report of a real tiny study ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tiny_study(tmp_path_factory)


@pytest.fixture(scope="module")
def report_dir(study):
    assert study.report.returncode == 0, study.report.output
    return study.root / "report"


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def num(text: str) -> float | None:
    return None if text == "" else float(text)


def close(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9 * max(1, abs(b)))


def agent_mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def mean_std(values) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else None


def from_logs(root: Path, method: str, what: str) -> list:
    """Per seed, a run's value recomputed from its summary.json (mean over its two agents)."""
    values = []
    for seed in SEEDS:
        summary = json.loads((root / GAME / method / f"seed{seed}" / "summary.json").read_text())
        values.append(agent_mean(entry[what] for entry in summary["learners"]))
    return values


@pytest.mark.slow
def test_final_returns_table_equals_recomputation_from_summaries(study, report_dir):
    rows = {r["method"]: r for r in read_csv(report_dir / "final_returns.csv")}
    assert set(rows) == set(METHODS)                       # the failed `gpu` runs never completed: excluded
    # Not a comparison of empty values: chaser pays rewards even in these few iterations.
    assert any(num(rows[m]["final_test_mean"]) for m in METHODS) and all(rows[m]["final_train_mean"] for m in METHODS)
    for method in METHODS:
        row = rows[method]
        assert row["game"] == GAME and row["seeds"] == "2"
        for column, key in [("final_test", "final_test_return"), ("final_train", "final_train_return"),
                            ("generalization_gap", "generalization_gap")]:
            mean, std = mean_std(from_logs(study.root, method, key))
            assert close(num(row[f"{column}_mean"]), mean) and close(num(row[f"{column}_std"]), std), (method, column)
        test_mean, test_std = mean_std(from_logs(study.root, method, "final_test_return"))
        low, high = 0.5, 14.2                               # chaser, hard (Cobbe et al. 2020)
        assert close(num(row["normalized_test_mean"]), (test_mean - low) / (high - low))
        assert close(num(row["normalized_test_std"]), None if test_std is None else test_std / (high - low))
    norm = {r["method"]: r for r in read_csv(report_dir / "normalized_scores.csv")}
    for method in METHODS:
        assert norm[method]["games"] == "1"
        assert close(num(norm[method]["mean_normalized_score"]), num(rows[method]["normalized_test_mean"]))
    md = (report_dir / "final_returns.md").read_text()
    for method in METHODS:
        test_mean, _ = mean_std(from_logs(study.root, method, "final_test_return"))
        assert re.search(rf"\| {GAME} \| {method} \| 2 \| {test_mean:.2f}", md), md


@pytest.mark.slow
def test_curves_equal_recomputation_from_metrics(study, report_dir):
    rows = read_csv(report_dir / "curves.csv")
    for method in METHODS:
        for split in ("train", "test"):
            per_step: dict[int, list] = {}
            for seed in SEEDS:
                for line in (study.root / GAME / method / f"seed{seed}" / "metrics.jsonl").open():
                    record = json.loads(line)
                    value = agent_mean(entry[f"{split}_return"] for entry in record["learners"])
                    if value is not None:
                        per_step.setdefault(record["env_steps"], []).append(value)
            got = [r for r in rows if r["method"] == method and r["split"] == split]
            assert [int(r["env_steps"]) for r in got] == sorted(per_step)
            for r in got:
                mean, std = mean_std(per_step[int(r["env_steps"])])
                assert close(num(r["mean"]), mean) and close(num(r["std"]), std)
                assert int(r["n"]) == len(per_step[int(r["env_steps"])])
    assert any(r["split"] == "test" for r in rows)         # evaluations did land in the curves


@pytest.mark.slow
def test_robustness_table_equals_recomputation_from_the_analyses(study, report_dir):
    rows = {r["method"]: r for r in read_csv(report_dir / "robustness.csv")}
    for method in METHODS:
        analyses = [json.loads((study.root / GAME / method / f"seed{s}" / "analysis" / "robustness.json")
                               .read_text()) for s in SEEDS]
        for variant in ("no_backgrounds", "monochrome_assets"):
            mean, std = mean_std([np.mean(a["robustness_tv"][variant]) for a in analyses])
            assert close(num(rows[method][f"tv_{variant}_mean"]), mean)
            assert close(num(rows[method][f"tv_{variant}_std"]), std)
        mean, std = mean_std([a["agreement_tv"] for a in analyses])
        assert close(num(rows[method]["agreement_tv_mean"]), mean) and close(num(rows[method]["agreement_tv_std"]), std)


@pytest.mark.slow
def test_report_has_the_figures_and_lists_what_it_left_out(study, report_dir):
    # probe-<game>: the mechanism metrics every cell measured live (the first evaluation always measures).
    for name in ["returns.png", "returns.svg", "generalization_gap.png", "generalization_gap.svg", "robustness.png",
                 "robustness.svg", f"tsne-{GAME}.png", f"probe-{GAME}.png", f"probe-{GAME}.svg", "probe_curves.csv"]:
        path = report_dir / name
        assert path.stat().st_size > (100 if name.endswith(".csv") else 1000), name
        if not name.endswith(".csv"):
            assert path.read_bytes().startswith(b"\x89PNG" if name.endswith("png") else b"<?xml")
    md = (report_dir / "report.md").read_text()
    for image in re.findall(r"\]\(([^)]+)\)", md):
        assert (report_dir / image).exists(), image
    assert "Excluded (not completed)" in md and f"{GAME}/gpu/seed1" in md
    assert f"{len(CELLS)} runs from" in md


@pytest.mark.slow
def test_report_names_each_method_from_its_runs_config(report_dir):
    """The sweep's default methods are the authors' MDPO and their PPO baseline; the report says so."""
    md = (report_dir / "report.md").read_text()
    section = md.split("## Methods", 1)[1]
    assert re.search(r"\| mdpo \| MDPO, the authors' objective \(alpha 1; the KL gradient flows into both", section)
    assert re.search(r"\| ppo \| PPO baseline \(the authors' ppo.py: alpha 0, each agent's loss not halved", section)


# --- probe curves, from synthetic run directories (no training) ---------------------------------------------

def probe(tv_nb, tv_mono, cka_nb, cka_mono, agreement=None, cka=None) -> dict:
    """A metrics.jsonl `probe` block; per-variant values are lists over learner ids, pair values one "0-1" pair."""
    return {"weights_version": 3, "states": 8, "training_level_fraction": 0.0,
            "robustness_tv": {"no_backgrounds": tv_nb, "monochrome_assets": tv_mono},
            "render_cka": {"no_backgrounds": cka_nb, "monochrome_assets": cka_mono},
            "agreement_tv": {} if agreement is None else {"0-1": agreement},
            **({} if cka is None else {"cka": {"0-1": cka}})}


def synthetic_run(root: Path, game: str, method: str, seed: int, probes: list[dict | None], learners: int = 2):
    """A completed run directory as `mdpo train` leaves it, one metrics.jsonl record per entry of `probes` (None:
    a record without a `probe` block), at env steps 512, 1024, ..."""
    run = root / game / method / f"seed{seed}"
    run.mkdir(parents=True)
    TrainConfig(env_id=game, seed=seed, num_learners=learners, alpha=0.0 if method == "ppo" else 1.0,
                distill_mode="exact").save(run / "config.json")
    agents = [{"id": i, "train_return": 1.0, "test_return": 0.5} for i in range(learners)]
    with (run / "metrics.jsonl").open("w") as f:
        for i, block in enumerate(probes):
            record = {"iteration": i + 1, "env_steps": 512 * (i + 1), "learners": agents}
            if block is not None:
                record["probe"] = block
            f.write(json.dumps(record) + "\n")
    finals = [{"id": i, "final_train_return": 1.0, "final_test_return": 0.5, "generalization_gap": 0.5}
              for i in range(learners)]
    (run / "summary.json").write_text(json.dumps({"completed": True, "learners": finals}))


def test_probe_curves_are_means_over_agents_pairs_then_seeds(tmp_path):
    # mdpo, two learners: seed 2's measurement at 1024 steps did not complete (no probe block there).
    synthetic_run(tmp_path, "chaser", "mdpo", 1, [
        probe([0.1, 0.3], [0.2, 0.4], [0.9, 0.7], [0.5, 0.7], agreement=0.05, cka=0.8),
        probe([0.1, 0.1], [0.3, 0.3], [0.8, 0.8], [0.6, 0.6], agreement=0.04, cka=0.9)])
    synthetic_run(tmp_path, "chaser", "mdpo", 2, [
        probe([0.3, 0.5], [0.4, 0.4], [0.7, 0.7], [0.5, 0.5], agreement=0.07, cka=0.6), None])
    # An mdpo run from before the probe: it counts in the returns, never in a probe curve.
    synthetic_run(tmp_path, "chaser", "mdpo", 3, [None, None])
    # ppo, one learner per run: robustness and render CKA, no pair metrics (agreement_tv {} and cka absent).
    synthetic_run(tmp_path, "chaser", "ppo", 1, [probe([0.4], [0.6], [0.5], [0.3])] * 2, learners=1)
    synthetic_run(tmp_path, "chaser", "ppo", 2, [probe([0.2], [0.2], [0.7], [0.3])] * 2, learners=1)
    # A game none of whose runs has a probe record.
    synthetic_run(tmp_path, "bigfish", "mdpo", 1, [None, None])

    paths = build_report(ReportConfig(tmp_path))
    out = tmp_path / "report"
    rows = {(r["game"], r["method"], r["metric"], r["variant"], int(r["env_steps"])): r
            for r in read_csv(out / "probe_curves.csv")}

    def check(key, mean, std, n):
        row = rows[key]
        assert close(num(row["mean"]), mean) and close(num(row["std"]), std) and int(row["n"]) == n, (key, row)

    # Hand-computed: the mean over agents (or pairs) per run, then mean and sample std over the seeds present.
    check(("chaser", "mdpo", "robustness_tv", "no_backgrounds", 512), 0.3, np.sqrt(0.02), 2)           # 0.2, 0.4
    check(("chaser", "mdpo", "robustness_tv", "monochrome_assets", 512), 0.35, np.sqrt(0.005), 2)      # 0.3, 0.4
    check(("chaser", "mdpo", "render_cka", "no_backgrounds", 512), 0.75, np.sqrt(0.005), 2)            # 0.8, 0.7
    check(("chaser", "mdpo", "agreement_tv", "", 512), 0.06, np.sqrt(0.0002), 2)                       # 0.05, 0.07
    check(("chaser", "mdpo", "cka", "", 512), 0.7, np.sqrt(0.02), 2)                                   # 0.8, 0.6
    check(("chaser", "mdpo", "robustness_tv", "no_backgrounds", 1024), 0.1, None, 1)                   # seed 1 only
    check(("chaser", "mdpo", "cka", "", 1024), 0.9, None, 1)
    check(("chaser", "ppo", "robustness_tv", "no_backgrounds", 1024), 0.3, np.sqrt(0.02), 2)           # 0.4, 0.2
    check(("chaser", "ppo", "render_cka", "monochrome_assets", 512), 0.3, 0.0, 2)
    assert len(rows) == 2 * 6 + 2 * 4                       # mdpo: 6 curves x 2 steps; ppo: 4 curves x 2 steps
    assert not any(k[1] == "ppo" and k[2] in ("agreement_tv", "cka") for k in rows)   # no pair curves for PPO
    assert not any(k[0] == "bigfish" for k in rows)

    for name in ["probe-chaser.png", "probe-chaser.svg"]:
        assert (out / name).stat().st_size > 1000 and paths[name.replace(".", "_")] == out / name
    assert not list(out.glob("probe-bigfish*"))             # no probe records at all: no figure
    md = (out / "report.md").read_text()
    assert "![probe chaser](probe-chaser.png)" in md
    assert "No probe records (runs from before the probe, or with it off): bigfish" in md
    for image in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / image).exists(), image


def test_a_study_without_probe_records_reports_as_before(tmp_path):
    synthetic_run(tmp_path, "chaser", "mdpo", 1, [None, None])
    synthetic_run(tmp_path, "chaser", "ppo", 1, [{}, None])           # an empty block counts as none
    paths = build_report(ReportConfig(tmp_path))
    out = tmp_path / "report"
    assert "probe_csv" not in paths and not (out / "probe_curves.csv").exists() and not list(out.glob("probe-*"))
    md = (out / "report.md").read_text()
    assert "probe states" not in md and "](probe-" not in md
    assert (out / "returns.png").exists() and read_csv(out / "curves.csv")


def test_probe_pair_metrics_average_every_pair_of_three_learners():
    record = {"env_steps": 256, "learners": [], "probe": {
        "robustness_tv": {"no_backgrounds": [0.1, 0.2, 0.6]},
        "agreement_tv": {"0-1": 0.1, "0-2": 0.2, "1-2": 0.6}, "cka": {"0-1": 0.9, "0-2": 0.6, "1-2": 0.6}}}
    curves = run_probe_curves(Run(Path("r"), TrainConfig(num_learners=3), [record], None, None, None))
    assert {key: curve[256] for key, curve in curves.items()} == pytest.approx(
        {("robustness_tv", "no_backgrounds"): 0.3, ("agreement_tv", ""): 0.3, ("cka", ""): 0.7})
