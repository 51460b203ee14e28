"""`mdpo analyze RUN_DIR`: robustness of a run's policies to task-irrelevant rendering, and agent agreement.

On test-level states (num_levels 0: the full level distribution, seeds disjoint from training and evaluation):
- robustness, the paper's quantity: mean over states s of TV(pi(.|render_default(s)), pi(.|render_variant(s))),
  per agent and per rendering variant, on paired observations of the same game states (actors/render_pairs.py);
- agreement: mean over states of TV(pi_A(.|s), pi_B(.|s)) for each pair of agents, default rendering;
- a t-SNE of each agent's encoder features on a subsample of those states, under the default rendering and the
  first variant (a robust encoder maps both renderings of a state to the same place).
TV(p, q) = 1/2 sum_a |p(a) - q(a)|, in [0, 1]. Results go to RUN_DIR/analysis/: robustness.json, tsne.npz,
tsne.png. With driver `random` the states depend only on the game and the seed, so every run of a game is
measured on the same states.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from actors.envs import ProcgenVectorEnv, is_procgen
from actors.probes import (PROBE_VARIANTS, TEST_SEED_OFFSET, action_probs, collect_paired_observations, encoder_features,
                           training_level_fraction, tv_distance)
from actors.render_pairs import DEFAULT_RENDERING, RENDER_VARIANTS
from learners.checkpoint import latest_checkpoint, tensors_from_bytes
from learners.config import ConfigError
from learners.model import Agent, make_agent
from learners.study.report_plots import plot_tsne
from learners.study.runs import ANALYSIS_DIR, ANALYSIS_FILE, find_run_dirs, load_run

PROCGEN_OBS = ProcgenVectorEnv.SPEC


@dataclass
class AnalyzeConfig:
    num_envs: int = 8
    """Test-level games played side by side."""
    num_steps: int = 64
    """Steps per game: num_envs * num_steps states."""
    variants: tuple[str, ...] = PROBE_VARIANTS
    """Rendering variants compared with Procgen's default rendering (see actors/render_pairs.py)."""
    seed: int = 0
    """Seeds the test levels and the driving actions."""
    driver: str = "random"
    """Who picks actions: `random` (uniform; the same states for every run of a game) or `agent` (agent 0 samples)."""
    tsne_points: int = 200
    """States per t-SNE panel (0: no t-SNE)."""

    def validate(self) -> "AnalyzeConfig":
        if self.num_envs < 1 or self.num_steps < 1:
            raise ConfigError(f"--num-envs and --num-steps must be >= 1, got {self.num_envs} and {self.num_steps}")
        if not self.variants:
            raise ConfigError("--variants needs at least one rendering variant")
        unknown = [v for v in self.variants if v not in RENDER_VARIANTS]
        if unknown:
            raise ConfigError(f"unknown rendering variants {unknown}; choose from {', '.join(RENDER_VARIANTS)}")
        if self.driver not in ("random", "agent"):
            raise ConfigError(f"--driver must be random or agent, got {self.driver!r}")
        if self.tsne_points < 0 or 0 < self.tsne_points < 10:
            raise ConfigError(f"--tsne-points must be 0 (off) or at least 10, got {self.tsne_points}")
        return self


def robustness_tv(agent: Agent, obs: np.ndarray, other: np.ndarray) -> float:
    """Mean TV between the agent's action distributions on two renderings of the same states."""
    return float(tv_distance(action_probs(agent, obs), action_probs(agent, other)).mean())


def agreement_tv(first: Agent, second: Agent, obs: np.ndarray) -> float:
    """Mean TV between two agents' action distributions on the same observations."""
    return float(tv_distance(action_probs(first, obs), action_probs(second, obs)).mean())


def collect_observations(game: str, distribution_mode: str, cfg: AnalyzeConfig, driver: Agent | None = None
                         ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Observations per rendering of the same num_envs*num_steps test-level states, and their level seeds (the probe
    set's states when num_envs x num_steps, seed and variants are the run's: actors/probes.py)."""
    return collect_paired_observations(game, distribution_mode, cfg.num_envs, cfg.num_steps, tuple(cfg.variants),
                                       cfg.seed, driver)


def load_agents(run_dir: Path) -> tuple[list[Agent], str]:
    """The run's agents from its latest valid checkpoint, and that checkpoint's name."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no valid checkpoint to analyse")
    agents = []
    for blob in ckpt.learners:
        agent = make_agent(*PROCGEN_OBS)
        agent.load_state_dict(tensors_from_bytes(blob)["model"])
        agent.eval()
        agents.append(agent)
    return agents, ckpt.path.name


def tsne_embedding(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
                random_state=seed).fit_transform(features)


def analyze_run(run_dir: Path, cfg: AnalyzeConfig) -> dict:
    """Measure one run and write RUN_DIR/analysis/; returns the robustness.json content."""
    cfg.validate()
    t0 = time.perf_counter()
    run = load_run(run_dir)
    if not is_procgen(run.config.env_id):
        raise ConfigError(f"{run_dir}: {run.config.env_id} is not a Procgen game; rendering variants exist only there")
    agents, checkpoint = load_agents(run.path)
    obs, level_seeds = collect_observations(run.game, run.config.distribution_mode, cfg,
                                                   agents[0] if cfg.driver == "agent" else None)
    base = obs[DEFAULT_RENDERING]
    result = {
        "run_dir": str(run.path), "game": run.game, "method": run.method, "seed": run.seed,
        "distribution_mode": run.config.distribution_mode, "checkpoint": checkpoint, "config": asdict(cfg),
        "states": len(base), "test_rand_seed": TEST_SEED_OFFSET + cfg.seed,
        "training_level_fraction": training_level_fraction(level_seeds, run.config.start_level, run.config.num_levels),
        "robustness_tv": {v: [robustness_tv(a, base, obs[v]) for a in agents] for v in cfg.variants},
        "agreement_tv_pairs": {f"{i}-{j}": agreement_tv(agents[i], agents[j], base)
                               for i in range(len(agents)) for j in range(i + 1, len(agents))},
    }
    pairs = list(result["agreement_tv_pairs"].values())
    result["agreement_tv"] = float(np.mean(pairs)) if pairs else None
    out = run.path / ANALYSIS_DIR
    out.mkdir(exist_ok=True)
    if cfg.tsne_points:
        variant = cfg.variants[0]
        pick = np.random.default_rng(cfg.seed).choice(len(base), min(cfg.tsne_points, len(base)), replace=False)
        coords = np.stack([tsne_embedding(np.concatenate([encoder_features(a, base[pick]),
                                                          encoder_features(a, obs[variant][pick])]), cfg.seed)
                           for a in agents])
        rendering = np.repeat([0, 1], len(pick))
        np.savez(out / "tsne.npz", coords=coords, rendering=rendering, renderings=np.array([DEFAULT_RENDERING, variant]))
        plot_tsne([(f"agent {i}", c, rendering, [DEFAULT_RENDERING, variant]) for i, c in enumerate(coords)],
                  out / "tsne.png", f"{run.game} {run.method} seed {run.seed}: encoder features, test levels")
    result["seconds"] = time.perf_counter() - t0
    (out / ANALYSIS_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def analyze_paths(paths: list[Path], cfg: AnalyzeConfig, log=print) -> tuple[list[dict], list[str]]:
    """Analyse every Procgen run directory at or below `paths`; returns (results, problems)."""
    cfg.validate()
    run_dirs = []
    for path in paths:
        found = find_run_dirs(Path(path))
        if not found:
            raise ConfigError(f"{path}: no run directories (directories with a config.json) found")
        run_dirs += found
    results, problems = [], []
    for run_dir in run_dirs:
        try:
            result = analyze_run(run_dir, cfg)
        except ConfigError as err:
            problems.append(str(err))
            log(f"skipped: {err}")
            continue
        tv = ", ".join(f"{v} {np.mean(x):.3f}" for v, x in result["robustness_tv"].items())
        log(f"{run_dir}: robustness TV {tv}; agreement TV {result['agreement_tv']}")
        results.append(result)
    return results, problems
