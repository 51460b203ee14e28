"""`mdpo report RUNS_DIR`: the study's figures and tables from run directories.

Definitions (every number is recomputable from the run directories):
- a run's final train/test return and generalization gap: summary.json's per-agent values, averaged over the
  run's agents that have one (see learners/study/runs.py);
- a run's curves: per iteration of metrics.jsonl, the mean over agents of `train_return` and `test_return`
  (the latest finished evaluation), at that record's `env_steps` (per agent);
- per game and method: mean and sample standard deviation (ddof 1; empty for one seed) over the runs (seeds);
- Procgen's normalized score (learners/study/procgen_scores.py) of the mean final test return, and its mean over
  the games of each method;
- robustness (after `mdpo analyze`): a run's total-variation distance per rendering variant and the agreement
  between its agents, averaged over agents, then mean and std over seeds;
- probe curves (the paper's mechanism, measured live on the run's fixed probe states): per metrics.jsonl record
  that has a `probe` block, at its `env_steps`, robustness TV and render CKA per rendering variant averaged over
  agents, agreement TV and CKA between agents averaged over pairs; then mean, std and count over the seeds that
  have a value at that step. Records, runs and metrics without a value give no point (see run_probe_curves).
Only completed runs count unless include_incomplete is set; excluded runs are listed in report.md.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from learners.config import ConfigError
from learners.study.procgen_scores import normalized_score, return_range
from learners.study.report_plots import plot_bars, plot_curves, plot_probe, plot_tsne
from learners.study.runs import ANALYSIS_DIR, Run, describe_method, load_runs, mean_or_none

FINAL_COLUMNS = ["game", "method", "seeds", "final_test_mean", "final_test_std", "final_train_mean", "final_train_std",
                 "generalization_gap_mean", "generalization_gap_std", "normalized_test_mean", "normalized_test_std"]
CURVE_COLUMNS = ["game", "method", "split", "env_steps", "mean", "std", "n"]
PROBE_COLUMNS = ["game", "method", "metric", "variant", "env_steps", "mean", "std", "n"]
# Probe metrics per rendering variant (a list over learner ids) and per pair of learners ("i-j" -> value).
PROBE_VARIANT_METRICS = ("robustness_tv", "render_cka")
PROBE_PAIR_METRICS = ("agreement_tv", "cka")


@dataclass
class ReportConfig:
    runs_dir: Path
    """Directory holding run directories (searched recursively)."""
    out_dir: Path | None = None
    """Where the report goes (default RUNS_DIR/report)."""
    include_incomplete: bool = False
    """Also count runs whose summary.json does not say completed."""

    def validate(self) -> "ReportConfig":
        self.runs_dir = Path(self.runs_dir)
        if not self.runs_dir.is_dir():
            raise ConfigError(f"RUNS_DIR {self.runs_dir} is not a directory")
        self.out_dir = Path(self.out_dir) if self.out_dir else self.runs_dir / "report"
        return self


def stats(values) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None below two values, count) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.game, run.method)].append(run)
    modes: dict[str, set] = defaultdict(set)
    for (game, _), members in groups.items():
        modes[game] |= {r.config.distribution_mode for r in members}
    mixed = {g: sorted(m) for g, m in modes.items() if len(m) > 1}
    if mixed:
        raise ConfigError(f"runs of one game use different distribution modes {mixed}; report one mode at a time")
    return {key: sorted(groups[key], key=lambda r: (r.seed, str(r.path))) for key in sorted(groups)}


def final_rows(groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    rows = []
    for (game, method), runs in groups.items():
        test, test_std, _ = stats(r.final("final_test_return") for r in runs)
        train, train_std, _ = stats(r.final("final_train_return") for r in runs)
        gap, gap_std, _ = stats(r.final("generalization_gap") for r in runs)
        mode = runs[0].config.distribution_mode
        bounds = return_range(game, mode)
        rows.append({"game": game, "method": method, "seeds": len(runs), "final_test_mean": test,
                     "final_test_std": test_std, "final_train_mean": train, "final_train_std": train_std,
                     "generalization_gap_mean": gap, "generalization_gap_std": gap_std,
                     "normalized_test_mean": normalized_score(game, mode, test),
                     "normalized_test_std": None if bounds is None or test_std is None
                     else test_std / (bounds[1] - bounds[0])})
    return rows


def normalized_rows(rows: list[dict]) -> list[dict]:
    """Per method: mean normalized test score over the games that have Procgen constants."""
    by_method: dict[str, list] = defaultdict(list)
    for row in rows:
        if row["normalized_test_mean"] is not None:
            by_method[row["method"]].append(row["normalized_test_mean"])
    return [{"method": m, "games": len(v), "mean_normalized_score": sum(v) / len(v)} for m, v in sorted(by_method.items())]


def run_curve(run: Run, split: str) -> dict[int, float]:
    """env_steps -> mean over agents of `<split>_return` at that iteration (iterations without one left out)."""
    points = {}
    for record in run.records:
        value = mean_or_none(entry.get(f"{split}_return") for entry in record["learners"])
        if value is not None:
            points[int(record["env_steps"])] = value
    return points


def over_seeds(curves: list[dict[int, float]]) -> list[dict]:
    """Per env_steps at which any run has a point: mean, std and count over the runs (seeds) that have one."""
    per_step: dict[int, list] = defaultdict(list)
    for curve in curves:
        for step, value in curve.items():
            per_step[step].append(value)
    rows = []
    for step in sorted(per_step):
        mean, std, n = stats(per_step[step])
        rows.append({"env_steps": step, "mean": mean, "std": std, "n": n})
    return rows


def curve_rows(groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    rows = []
    for (game, method), runs in groups.items():
        for split in ("train", "test"):
            for point in over_seeds([run_curve(run, split) for run in runs]):
                rows.append({"game": game, "method": method, "split": split, **point})
    return rows


def run_probe_curves(run: Run) -> dict[tuple[str, str], dict[int, float]]:
    """(metric, variant) -> env_steps -> the run's value; variant is "" for the pair metrics.

    Only records with a `probe` block count (the probe runs at evaluations, and old runs have none); a metric
    that is absent or empty (pair metrics of a one-learner run, variants of a non-Procgen env) gives no point. An
    undefined CKA (NaN: a constant representation) stays NaN, a gap in the figure rather than a hidden agent."""
    curves: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for record in run.records:
        probe = record.get("probe")
        if not probe:
            continue
        step = int(record["env_steps"])
        for metric in PROBE_VARIANT_METRICS:
            for variant, per_agent in (probe.get(metric) or {}).items():
                value = mean_or_none(per_agent)
                if value is not None:
                    curves[(metric, variant)][step] = value
        for metric in PROBE_PAIR_METRICS:
            value = mean_or_none((probe.get(metric) or {}).values())
            if value is not None:
                curves[(metric, "")][step] = value
    return curves


def probe_rows(groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    """Per game, method, metric and variant: the probe curve over seeds (methods without probe records: no rows)."""
    rows = []
    for (game, method), runs in groups.items():
        per_run = [run_probe_curves(run) for run in runs]
        for metric, variant in sorted({key for curves in per_run for key in curves}):
            for point in over_seeds([curves.get((metric, variant), {}) for curves in per_run]):
                rows.append({"game": game, "method": method, "metric": metric, "variant": variant, **point})
    return rows


def robustness_rows(groups: dict[tuple[str, str], list[Run]]) -> tuple[list[dict], list[str]]:
    """Per game and method: TV per rendering variant and agent agreement, over the analysed runs."""
    variants = sorted({v for runs in groups.values() for r in runs if r.analysis for v in r.analysis["robustness_tv"]})
    rows = []
    for (game, method), runs in groups.items():
        analysed = [r for r in runs if r.analysis]
        if not analysed:
            continue
        row = {"game": game, "method": method, "seeds": len(analysed)}
        for v in variants:
            row[f"tv_{v}_mean"], row[f"tv_{v}_std"], _ = stats(
                mean_or_none(r.analysis["robustness_tv"][v]) if v in r.analysis["robustness_tv"] else None
                for r in analysed)
        row["agreement_tv_mean"], row["agreement_tv_std"], _ = stats(r.analysis["agreement_tv"] for r in analysed)
        rows.append(row)
    return rows, variants


# ------------------------------------------------------------------------------------------------- writing
def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])
    return path


def _pm(mean, std, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def final_markdown(rows: list[dict], norm: list[dict]) -> str:
    table = markdown_table(
        ["game", "method", "seeds", "final test return", "final train return", "generalization gap", "normalized test"],
        [[r["game"], r["method"], str(r["seeds"]), _pm(r["final_test_mean"], r["final_test_std"]),
          _pm(r["final_train_mean"], r["final_train_std"]),
          _pm(r["generalization_gap_mean"], r["generalization_gap_std"]),
          _pm(r["normalized_test_mean"], r["normalized_test_std"], 3)] for r in rows])
    if norm:
        table += "\n" + markdown_table(["method", "games", "mean normalized test score"],
                                       [[n["method"], str(n["games"]), f"{n['mean_normalized_score']:.3f}"] for n in norm])
    return table


def robustness_markdown(rows: list[dict], variants: list[str]) -> str:
    return markdown_table(
        ["game", "method", "seeds"] + [f"TV {v}" for v in variants] + ["agreement TV (agent A vs B)"],
        [[r["game"], r["method"], str(r["seeds"])] + [_pm(r[f"tv_{v}_mean"], r[f"tv_{v}_std"], 3) for v in variants]
         + [_pm(r["agreement_tv_mean"], r["agreement_tv_std"], 3)] for r in rows])


def _probe_section(groups: dict[tuple[str, str], list[Run]], out: Path) -> tuple[dict[str, Path], list[str]]:
    """probe_curves.csv and one probe-<game> figure per game with probe records; nothing when no run has any."""
    rows = probe_rows(groups)
    if not rows:
        return {}, []
    paths = {"probe_csv": write_csv(out / "probe_curves.csv", rows, PROBE_COLUMNS)}
    md = ["## The mechanism over training (probe states, mean ± std over seeds)\n",
          "Measured at evaluations on each run's fixed probe states. Top row: total-variation distance between "
          "action distributions, of each agent across renderings (robustness; lower is more robust) and between "
          "agents (agreement). Bottom row: linear CKA between encoder features, of each agent across renderings "
          "(1 = the same representation) and between agents. Methods without probe records have no curve.\n"]
    games = sorted({g for g, _ in groups})
    for game in games:
        game_rows = [r for r in rows if r["game"] == game]
        if game_rows:
            paths |= plot_probe(game_rows, game, out / f"probe-{game}")
            md.append(f"![probe {game}](probe-{game}.png)\n")
    missing = [g for g in games if not any(r["game"] == g for r in rows)]
    if missing:
        md.append("No probe records (runs from before the probe, or with it off): " + ", ".join(missing) + "\n")
    return paths, md


def _tsne_figure(game: str, groups: dict[tuple[str, str], list[Run]], out_dir: Path) -> Path | None:
    """MDPO agents vs PPO agents: per method, the agents of its lowest-seed analysed run."""
    import numpy as np

    panels = []
    for (g, method), runs in groups.items():
        analysed = [r for r in runs if g == game and r.analysis and (r.path / ANALYSIS_DIR / "tsne.npz").exists()]
        if analysed:
            run = analysed[0]
            data = np.load(run.path / ANALYSIS_DIR / "tsne.npz")
            for agent, coords in enumerate(data["coords"]):
                panels.append((f"{method} seed {run.seed} agent {agent}", coords, data["rendering"],
                               [str(x) for x in data["renderings"]]))
    if not panels:
        return None
    return plot_tsne(panels, out_dir / f"tsne-{game}.png", f"{game}: t-SNE of encoder features on test-level states")


def method_descriptions(runs: list[Run]) -> dict[str, str]:
    """Method label -> what its runs ran (the authors' MDPO, DML or the authors' PPO baseline); labels whose runs
    disagree list every variant."""
    described: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        described[run.method].add(describe_method(run.config))
    return {m: "; ".join(sorted(d)) for m, d in sorted(described.items())}


def build_report(cfg: ReportConfig) -> dict[str, Path]:
    """Write the report; returns name -> path of everything written."""
    cfg.validate()
    runs = load_runs(cfg.runs_dir)
    included = [r for r in runs if r.completed or cfg.include_incomplete]
    excluded = [r for r in runs if r not in included]
    if not included:
        raise ConfigError(f"{cfg.runs_dir}: none of the {len(runs)} runs has completed; finish them "
                          "(`mdpo sweep` resumes them) or pass --include-incomplete")
    groups = group_runs(included)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = final_rows(groups), curve_rows(groups)
    norm = normalized_rows(rows)
    robust, variants = robustness_rows(groups)
    paths = {"final_csv": write_csv(out / "final_returns.csv", rows, FINAL_COLUMNS),
             "curves_csv": write_csv(out / "curves.csv", curves, CURVE_COLUMNS),
             "normalized_csv": write_csv(out / "normalized_scores.csv", norm, ["method", "games", "mean_normalized_score"])}
    (out / "final_returns.md").write_text(final_markdown(rows, norm))
    paths["final_md"] = out / "final_returns.md"
    paths |= plot_curves(curves, out / "returns")
    paths |= plot_bars(rows, "generalization_gap", "train minus test return", "Generalization gap (final)",
                       out / "generalization_gap")
    md = ["# MDPO generalization report\n",
          f"{len(included)} runs from `{cfg.runs_dir}`: games {', '.join(sorted({r.game for r in included}))}; "
          f"methods {', '.join(sorted({r.method for r in included}))}; "
          f"seeds {', '.join(str(s) for s in sorted({r.seed for r in included}))}.\n"]
    md += ["## Methods\n", markdown_table(["method", "what it is (from its runs' config)"],
                                           [[m, d] for m, d in method_descriptions(included).items()])]
    if excluded:
        md.append("Excluded (not completed): " + ", ".join(f"`{r.path}`" for r in excluded) + "\n")
    md += ["## Returns over training (mean ± std over seeds)\n", "![returns](returns.png)\n"]
    probe_paths, probe_md = _probe_section(groups, out)
    paths |= probe_paths
    md += probe_md
    md += ["## Final returns, normalized score, generalization gap\n", final_markdown(rows, norm),
           "\n![generalization gap](generalization_gap.png)\n"]
    if robust:
        paths["robustness_csv"] = write_csv(out / "robustness.csv", robust, list(robust[0]))
        (out / "robustness.md").write_text(robustness_markdown(robust, variants))
        paths["robustness_md"] = out / "robustness.md"
        paths |= plot_bars(robust, [f"tv_{v}" for v in variants] + ["agreement_tv"], "total-variation distance",
                           "Robustness (TV across renderings) and agent agreement", out / "robustness")
        md += ["## Robustness to rendering and agreement between agents\n",
               "Mean total-variation distance between a policy's action distributions on the same test-level states "
               "rendered differently (lower is more robust), and between the two agents' distributions.\n",
               robustness_markdown(robust, variants), "\n![robustness](robustness.png)\n"]
        for game in sorted({g for g, _ in groups}):
            tsne = _tsne_figure(game, groups, out)
            if tsne:
                paths[f"tsne_{game}"] = tsne
                md.append(f"![t-SNE {game}]({tsne.name})\n")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md))
    return paths
