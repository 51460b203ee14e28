"""The live mechanism metrics (actors/probes.py): TV and CKA against hand-computed values, their invariances, the probe
set's states, and how the coordinator pairs agents of one weights version within its time budget. No training."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from actors.probes import (PROBE_ENVS, PROBE_VARIANTS, build_probe_set, linear_cka, measure, probe_metrics,
                           tv_distance)
from actors.render_pairs import DEFAULT_RENDERING
from learners.config import ConfigError, TrainConfig
from learners.coordinator.evaluations import Evaluations
from learners.model import make_agent
from learners.records import ProbeOutput, ProbeSet
from learners.study.robustness import AnalyzeConfig, collect_observations


def brute_force_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s U-statistic by its definition: the mean over ordered 4-tuples of distinct states of
    h = 1/4! sum over their orderings of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n, total, count = len(k), 0.0, 0
    for quad in itertools.permutations(range(n), 4):
        h = 0.0
        for i, j, q, r in itertools.permutations(quad):
            h += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        total += h / 24
        count += 1
    return total / count


def test_linear_cka_is_the_unbiased_hsic_ratio_computed_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    k, l = x @ x.T, y @ y.T
    expected = brute_force_unbiased_hsic(k, l) / np.sqrt(brute_force_unbiased_hsic(k, k) * brute_force_unbiased_hsic(l, l))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)


def test_cka_is_one_for_the_same_representation_up_to_rotation_and_scale_and_near_zero_for_unrelated_ones():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 32))
    rotation, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    # 300 states against 256 unrelated features: the plain (biased) estimator scores them high, the unbiased ~0.
    a, b = rng.normal(size=(300, 256)), rng.normal(size=(300, 256))
    center = lambda m: m - m.mean(0)
    ka, kb = center(a) @ center(a).T, center(b) @ center(b).T
    biased = np.sum(ka * kb) / np.sqrt(np.sum(ka * ka) * np.sum(kb * kb))
    assert biased > 0.4 and abs(linear_cka(a, b)) < 0.05
    with pytest.raises(ValueError, match=">= 4 states"):
        linear_cka(x[:3], x[:3])


def test_tv_distance_of_hand_computed_tables():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.5, 0.25, 0.25]])
    torch.testing.assert_close(tv_distance(p, q), torch.tensor([0.0, 1.0, 0.25]))


@pytest.fixture(scope="module")
def coinrun_probe():
    return build_probe_set("coinrun", "hard", 32, 3, num_levels=500, start_level=0)


def test_the_probe_set_is_the_same_states_every_time_and_those_mdpo_analyze_measures(coinrun_probe, tmp_path):
    assert list(coinrun_probe.renderings) == [DEFAULT_RENDERING, *PROBE_VARIANTS] and coinrun_probe.states == 32
    again = build_probe_set("coinrun", "hard", 32, 3, num_levels=500, start_level=0)
    for name, obs in coinrun_probe.renderings.items():
        assert obs.shape == (32, 64, 64, 3) and obs.dtype == np.uint8
        np.testing.assert_array_equal(again.renderings[name], obs)
    assert not np.array_equal(coinrun_probe.renderings[DEFAULT_RENDERING], coinrun_probe.renderings["no_backgrounds"])
    # Test levels, drawn from the whole distribution: some may be training levels, and the set says how many.
    assert 0.0 <= coinrun_probe.training_level_fraction <= 1.0
    # `mdpo analyze` with the probe set's shape and seed plays the very same states.
    analyzed, _ = collect_observations("coinrun", "hard", AnalyzeConfig(num_envs=PROBE_ENVS, num_steps=32 // PROBE_ENVS,
                                                                        seed=3, tsne_points=0))
    for name, obs in coinrun_probe.renderings.items():
        np.testing.assert_array_equal(analyzed[name], obs)
    # What the run directory keeps (probes.npz) is what was measured.
    path = tmp_path / "probes.npz"
    path.write_bytes(coinrun_probe.to_npz())
    loaded = ProbeSet.from_npz(path)
    assert (loaded.env_id, loaded.seed, loaded.training_level_fraction) == ("coinrun", 3, coinrun_probe.training_level_fraction)
    for name, obs in coinrun_probe.renderings.items():
        np.testing.assert_array_equal(loaded.renderings[name], obs)


def test_identical_agents_agree_fully_and_a_pixel_blind_policy_is_perfectly_robust(coinrun_probe):
    torch.manual_seed(0)
    agent, other = make_agent((64, 64, 3), "uint8", 15), make_agent((64, 64, 3), "uint8", 15)
    twin = make_agent((64, 64, 3), "uint8", 15)
    twin.load_state_dict(agent.state_dict())
    same = probe_metrics([measure(agent, coinrun_probe, 0, 7), measure(twin, coinrun_probe, 1, 7)], coinrun_probe)
    assert same["agreement_tv"] == {"0-1": 0.0} and same["cka"]["0-1"] == pytest.approx(1.0)
    assert same["weights_version"] == 7 and same["states"] == 32
    for variant in PROBE_VARIANTS:
        assert all(v > 1e-6 for v in same["robustness_tv"][variant])      # a random CNN sees the pixels change
        assert all(v < 1.0 for v in same["render_cka"][variant])
    with torch.no_grad():
        agent.actor.weight.zero_()           # logits = bias: the same action distribution whatever the frame
    blind = probe_metrics([measure(agent, coinrun_probe, 0, 8), measure(other, coinrun_probe, 1, 8)], coinrun_probe)
    for variant in PROBE_VARIANTS:
        assert blind["robustness_tv"][variant][0] == pytest.approx(0.0, abs=1e-7)
        assert blind["robustness_tv"][variant][1] > 1e-6
    assert blind["agreement_tv"]["0-1"] > 0


def test_envs_without_renderings_measure_agreement_and_cka_only():
    probe = build_probe_set("CartPole-v1", "hard", 24, 1, num_levels=500, start_level=0)
    assert list(probe.renderings) == [DEFAULT_RENDERING] and probe.renderings[DEFAULT_RENDERING].shape == (24, 4)
    assert probe.training_level_fraction is None
    agents = [make_agent((4,), "float32", 2) for _ in range(3)]
    metrics = probe_metrics([measure(a, probe, i, 1) for i, a in enumerate(agents)], probe)
    assert metrics["robustness_tv"] == {} and metrics["render_cka"] == {}
    assert set(metrics["agreement_tv"]) == set(metrics["cka"]) == {"0-1", "0-2", "1-2"}     # every pair for N > 2


def output(learner: int, version: int, seconds: float = 0.0) -> ProbeOutput:
    rng = np.random.default_rng(100 * version + learner)
    probs = rng.dirichlet(np.ones(3), size=8)
    return ProbeOutput(learner, version, {DEFAULT_RENDERING: probs}, {DEFAULT_RENDERING: rng.normal(size=(8, 5))},
                       seconds)


def test_the_coordinator_pairs_only_agents_of_one_weights_version_and_stays_within_its_budget():
    evals = Evaluations(2, probe_budget=0.1)
    evals.probe = ProbeSet("CartPole-v1", 1, {DEFAULT_RENDERING: np.zeros((8, 4), np.float32)}, None)
    evals.probe_ref = object()               # stands in for the object-store reference use_probe() makes
    assert evals.probe_due(wall_seconds=0.0)                     # the first measurement is always due
    evals._pair(output(0, 4, 1.0))
    evals._pair(output(1, 6, 1.0))           # learner 1's evaluation of version 4 was skipped: nothing to pair yet
    assert evals.take_measured() is None
    evals._pair(output(0, 6, 1.5))
    measured = evals.take_measured()
    assert measured["weights_version"] == 6 and evals.take_measured() is None     # handed to one record only
    assert measured == probe_metrics([output(0, 6), output(1, 6)], evals.probe)
    assert list(evals.outputs) == [] and evals.probe_round_seconds == 2.5        # version 4 superseded
    evals.probe_seconds = 3.5                # spent so far (poll() adds each output's seconds)
    assert not evals.probe_due(wall_seconds=50.0)                # 3.5 + 2.5 > 10% of 50 s
    assert evals.probe_due(wall_seconds=60.0)
    evals._pair(output(0, 8, 1.0))
    evals.reset()                            # a rollback: half-paired outputs belong to weights the run lost
    evals._pair(output(1, 8, 1.0))
    assert evals.take_measured() is None


def test_probe_settings_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match="--probe-states"):
        TrainConfig(env_id="CartPole-v1", probe_states=8).validate()
    with pytest.raises(ConfigError, match="--probe-budget"):
        TrainConfig(env_id="CartPole-v1", probe_budget=0).validate()
    TrainConfig(env_id="CartPole-v1", probe_states=0).validate()     # off


def test_a_records_probe_block_becomes_tensorboard_and_tracker_scalars():
    """TensorBoard and the --track trackers take a record's scalars from scalars_of: the probe block is among them."""
    from learners.coordinator.tensorboard import scalars_of

    probe = {"weights_version": 12, "states": 64, "training_level_fraction": 0.0,
             "robustness_tv": {"no_backgrounds": [0.12, 0.10]}, "render_cka": {"no_backgrounds": [0.9, float("nan")]},
             "agreement_tv": {"0-1": 0.05}, "cka": {"0-1": 0.8}}
    record = {"iteration": 3, "env_steps": 1536, "env_steps_total": 3072, "learners": [{"id": 0}, {"id": 1}]}
    assert not any(tag.startswith("probe/") for tag in scalars_of(record))
    scalars = {tag: v for tag, v in scalars_of({**record, "probe": probe}).items() if tag.startswith("probe/")}
    assert scalars == {"probe/weights_version": 12.0, "probe/robustness_tv/no_backgrounds/agent0": 0.12,
                       "probe/robustness_tv/no_backgrounds/agent1": 0.10, "probe/render_cka/no_backgrounds/agent0": 0.9,
                       "probe/agreement_tv/agents0-1": 0.05, "probe/cka/agents0-1": 0.8}     # NaN (undefined) left out
