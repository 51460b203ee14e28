"""Robustness measures: the rendering pairs are the same game states; TV distances; `mdpo analyze` on real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.render_pairs import (DEFAULT_RENDERING, RENDER_VARIANTS, PairedProcgenEnv, state_option_offsets,
                                 state_options, strip_render_options)
from learners.checkpoint import latest_checkpoint, tensors_from_bytes
from learners.config import ConfigError, TrainConfig
from learners.model import make_agent
from learners.study.robustness import (PROCGEN_OBS, TEST_SEED_OFFSET, AnalyzeConfig, agreement_tv, analyze_run,
                                 collect_observations, robustness_tv, tv_distance)
from tests.study import ANALYZE, CELLS, GAME, tiny_study

# chaser and fruitbot end episodes and pay rewards often under random actions; starpilot and coinrun too, less often.
GAMES = ["chaser", "fruitbot", "starpilot", "coinrun"]


# --- the pairs are the same states ------------------------------------------------------------------------------

@pytest.mark.parametrize("game", GAMES)
def test_renderings_are_the_same_states_under_the_same_actions(game):
    env = PairedProcgenEnv(game, 6, list(RENDER_VARIANTS), rand_seed=11, num_levels=0, distribution_mode="hard")
    rng = np.random.default_rng(0)
    ends = rewards = 0
    differing = {name: 0.0 for name in RENDER_VARIANTS}
    try:
        for _ in range(300):
            per_env = {name: e.observe() for name, e in env.envs.items()}
            infos = {name: [i["level_seed"] for i in e.get_info()] for name, e in env.envs.items()}
            states = env.states()
            reward, obs, first = per_env[DEFAULT_RENDERING]
            for name in RENDER_VARIANTS:
                r, o, f = per_env[name]
                np.testing.assert_array_equal(r, reward)            # same rewards
                np.testing.assert_array_equal(f, first)             # same episode ends (gym3: first of the next)
                assert infos[name] == infos[DEFAULT_RENDERING]      # same levels
                # The whole serialized game state is identical but for the rendering flags themselves.
                assert [strip_render_options(s, game) for s in states[name]] == \
                       [strip_render_options(s, game) for s in states[DEFAULT_RENDERING]]
                assert states[name] != states[DEFAULT_RENDERING]
                differing[name] += float((o["rgb"] != obs["rgb"]).mean())
            ends += int(first.sum())
            rewards += int((reward != 0).sum())
            env.act(rng.integers(0, 15, 6))
    finally:
        env.close()
    assert ends > 0 and rewards > 0, "the check must cover episode ends and rewards"
    assert differing["no_backgrounds"] > 0 and differing["monochrome_assets"] > 0   # really other pixels


def test_option_fields_sit_where_strip_render_options_expects_them():
    import procgen

    for game in GAMES:
        plain = procgen.ProcgenGym3Env(num=1, env_name=game, rand_seed=1).get_state()[0]
        for variant, options in RENDER_VARIANTS.items():
            other = procgen.ProcgenGym3Env(num=1, env_name=game, rand_seed=1, **options).get_state()[0]
            assert {k: state_options(other, game)[k] for k in options} == options
            diff = np.flatnonzero(np.frombuffer(plain, np.uint8) != np.frombuffer(other, np.uint8))
            offsets = state_option_offsets(game)
            assert all(any(off <= d < off + 4 for off in offsets.values()) for d in diff), (game, variant)


def test_the_state_comparison_detects_different_states():
    """Negative control: other levels are not the same state, and the env's own guard notices divergence."""
    import procgen

    a = procgen.ProcgenGym3Env(num=2, env_name="chaser", rand_seed=1)
    b = procgen.ProcgenGym3Env(num=2, env_name="chaser", rand_seed=2, use_backgrounds=False)
    assert [strip_render_options(s, "chaser") for s in a.get_state()] != \
           [strip_render_options(s, "chaser") for s in b.get_state()]
    env = PairedProcgenEnv("chaser", 2, ["no_backgrounds"], rand_seed=1)
    env.envs["no_backgrounds"] = b
    with pytest.raises(RuntimeError, match="diverged"):
        for _ in range(200):
            env.observe()
            env.act(np.zeros(2, np.int64))
    env.close()


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown rendering variant"):
        PairedProcgenEnv("coinrun", 1, ["restrict_themes"], rand_seed=0)


# --- the measures --------------------------------------------------------------------------------------------------

def test_tv_distance_closed_forms():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
    torch.testing.assert_close(tv_distance(p, q), torch.tensor([0.0, 1.0, 0.3]))


def test_a_policy_that_ignores_pixels_is_perfectly_robust_and_a_random_cnn_is_not():
    cfg = AnalyzeConfig(num_envs=2, num_steps=8, variants=("no_backgrounds",), tsne_points=0)
    obs, _ = collect_observations("coinrun", "hard", cfg)
    torch.manual_seed(0)
    agent = make_agent(*PROCGEN_OBS)
    assert robustness_tv(agent, obs[DEFAULT_RENDERING], obs["no_backgrounds"]) > 1e-5
    assert robustness_tv(agent, obs[DEFAULT_RENDERING], obs[DEFAULT_RENDERING]) == 0.0
    with torch.no_grad():
        agent.actor.weight.zero_()        # logits = bias: the same distribution for every frame
    assert robustness_tv(agent, obs[DEFAULT_RENDERING], obs["no_backgrounds"]) == pytest.approx(0.0, abs=1e-7)
    other = make_agent(*PROCGEN_OBS)
    assert agreement_tv(other, other, obs[DEFAULT_RENDERING]) == 0.0
    assert agreement_tv(agent, other, obs[DEFAULT_RENDERING]) > 1e-5


def test_analyze_config_and_non_procgen_runs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown rendering variants"):
        AnalyzeConfig(variants=("restrict_themes",)).validate()
    with pytest.raises(ConfigError, match="driver"):
        AnalyzeConfig(driver="expert").validate()
    TrainConfig(env_id="CartPole-v1").save(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="not a Procgen game"):
        analyze_run(tmp_path, AnalyzeConfig())


# --- `mdpo analyze` on real tiny runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tiny_study(tmp_path_factory)


@pytest.mark.slow
def test_analyze_writes_its_results_for_every_finished_run(study):
    assert study.analyze.returncode == 0, study.analyze.output
    for cell in CELLS:
        result = json.loads((study.root / cell / "analysis" / "robustness.json").read_text())
        assert result["states"] == 4 * 16
        assert set(result["robustness_tv"]) == {"no_backgrounds", "monochrome_assets"}
        for values in result["robustness_tv"].values():
            assert len(values) == 2 and all(0 <= v <= 1 for v in values)
        assert 0 <= result["agreement_tv"] <= 1
        assert result["training_level_fraction"] == 0.0        # test levels only
        tsne = np.load(study.root / cell / "analysis" / "tsne.npz")
        assert tsne["coords"].shape == (2, 48, 2) and list(tsne["renderings"]) == ["default", "no_backgrounds"]
        assert (study.root / cell / "analysis" / "tsne.png").stat().st_size > 0
    # The failed `gpu` runs have no checkpoint: reported, not analysed.
    assert "no valid checkpoint" in study.analyze.output
    assert not (study.root / GAME / "gpu" / "seed1" / "analysis").exists()


@pytest.mark.slow
def test_analyze_numbers_equal_an_independent_recomputation(study):
    """Rebuild the agents from the checkpoint and the paired frames from raw gym3 envs; recompute TV by hand."""
    import procgen

    run = study.root / GAME / "mdpo" / "seed2"
    result = json.loads((run / "analysis" / "robustness.json").read_text())
    num_envs, num_steps, seed = (int(ANALYZE[i + 1]) for i in (0, 2, 6))
    agents = []
    for blob in latest_checkpoint(run / "checkpoints").learners:
        agent = make_agent((64, 64, 3), "uint8", 15)
        agent.load_state_dict(tensors_from_bytes(blob)["model"])
        agents.append(agent.eval())
    envs = {name: procgen.ProcgenGym3Env(num=num_envs, env_name=GAME, num_levels=0, start_level=0,
                                         rand_seed=TEST_SEED_OFFSET + seed, **opts)
            for name, opts in [("default", {}), ("no_backgrounds", {"use_backgrounds": False}),
                               ("monochrome_assets", {"use_monochrome_assets": True})]}
    rng = np.random.default_rng(seed)
    frames = {name: [] for name in envs}
    for _ in range(num_steps):
        for name, env in envs.items():
            frames[name].append(env.observe()[1]["rgb"])
        actions = rng.integers(0, 15, num_envs)
        for env in envs.values():
            env.act(actions)
    frames = {name: np.concatenate(f) for name, f in frames.items()}

    def probs(agent, obs):
        with torch.no_grad():
            return torch.softmax(agent.logits(torch.from_numpy(obs)), -1).numpy().astype(np.float64)

    for variant in ("no_backgrounds", "monochrome_assets"):
        expected = [0.5 * np.abs(probs(a, frames["default"]) - probs(a, frames[variant])).sum(1).mean() for a in agents]
        np.testing.assert_allclose(result["robustness_tv"][variant], expected, atol=1e-6)
    agreement = 0.5 * np.abs(probs(agents[0], frames["default"]) - probs(agents[1], frames["default"])).sum(1).mean()
    assert result["agreement_tv"] == pytest.approx(agreement, abs=1e-6)


@pytest.mark.slow
def test_agent_driven_states_are_reproducible_and_differ_from_random_ones(study, tmp_path):
    import shutil

    run = shutil.copytree(study.root / GAME / "ppo" / "seed1", tmp_path / "run")   # keep the study's analysis intact
    agent_cfg = AnalyzeConfig(num_envs=2, num_steps=24, driver="agent", seed=5, tsne_points=0)
    first, second = analyze_run(run, agent_cfg), analyze_run(run, agent_cfg)
    assert first["robustness_tv"] == second["robustness_tv"] and first["agreement_tv"] == second["agreement_tv"]
    random = analyze_run(run, AnalyzeConfig(num_envs=2, num_steps=24, driver="random", seed=5, tsne_points=0))
    assert random["robustness_tv"] != first["robustness_tv"]


@pytest.mark.slow
def test_mdpo_analyze_and_the_live_metrics_agree_on_one_checkpoint_and_the_runs_probe_states(study, tmp_path):
    """The evaluator's live measurement (the code every evaluation runs) and `mdpo analyze` with the probe set's
    shape and seed give the same numbers for the same checkpoint: one copy of the measures, the same states."""
    import dataclasses
    import shutil

    from actors.evaluator import Evaluator
    from actors.probes import PROBE_ENVS, probe_metrics
    from learners.records import ProbeSet, Weights

    run = shutil.copytree(study.root / GAME / "mdpo" / "seed2", tmp_path / "run")   # keep the study's analysis intact
    cfg = dataclasses.replace(TrainConfig.load(run / "config.json"), metrics_port=-1)   # no /metrics endpoint here
    probe = ProbeSet.from_npz(run / "probes.npz")           # what every evaluation of this run measured on
    assert probe.states == cfg.probe_states
    agents = []
    for blob in latest_checkpoint(run / "checkpoints").learners:
        agent = make_agent(*PROCGEN_OBS)
        agent.load_state_dict(tensors_from_bytes(blob)["model"])
        agents.append(agent.eval())
    outputs = [Evaluator(cfg, i, 10**8 + i).evaluate(Weights.from_module(4, a), probe)["probe"] for i, a in enumerate(agents)]
    live = probe_metrics(outputs, probe)
    analyzed = analyze_run(run, AnalyzeConfig(num_envs=PROBE_ENVS, num_steps=probe.states // PROBE_ENVS, seed=cfg.seed,
                                              tsne_points=0))
    assert analyzed["states"] == live["states"] and analyzed["training_level_fraction"] == live["training_level_fraction"]
    for variant, values in analyzed["robustness_tv"].items():
        np.testing.assert_allclose(live["robustness_tv"][variant], values, atol=1e-5)
    assert live["agreement_tv"]["0-1"] == pytest.approx(analyzed["agreement_tv"], abs=1e-5)
