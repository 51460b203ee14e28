"""The paper's mechanism as numbers, on a fixed probe set of states: robustness, agreement, representation similarity.

One copy for `mdpo analyze` (learners/study/robustness.py) and the live metrics of every evaluation (the Evaluator
measures, the coordinator pairs agents of one weights version):
- robustness TV, per agent and rendering variant: mean over states s of TV(pi(.|default(s)), pi(.|variant(s))),
  the same game state drawn two ways (actors/render_pairs.py). Small = the policy ignores the irrelevant pixels.
- agreement TV, per pair of agents: mean over states of TV(pi_A(.|s), pi_B(.|s)) on the default rendering.
- CKA, per pair of agents: linear CKA between their encoder features on the default rendering; and render CKA, per
  agent and variant, between its features of the two renderings ("representation convergence" as a number).
TV(p, q) = 1/2 sum_a |p(a) - q(a)|, in [0, 1]. CKA uses the unbiased HSIC estimator (Song et al. 2012, as in
Kornblith et al. 2019): with a few hundred states against 256 features the plain estimator is biased upward (two
unrelated random representations already score high), the unbiased one is centred on 0 for them.

The probe set's states come from test levels (num_levels 0, seeds apart from training and evaluation) driven by
uniform random actions, so they depend only on the game and the seed: every run of a game, MDPO and PPO alike,
every evaluation and every resume measures the same states.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.envs import ProcgenVectorEnv, is_procgen, make_vector_env, procgen_game
from actors.render_pairs import DEFAULT_RENDERING, PairedProcgenEnv
from learners.records import ProbeOutput, ProbeSet

TEST_SEED_OFFSET = 2 * 10**8       # training seeds are small, evaluation seeds start at 10**8
PROBE_VARIANTS = ("no_backgrounds", "monochrome_assets")
PROBE_ENVS = 8                     # games played side by side while the states are collected


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between rows of two probability tables."""
    return 0.5 * (p - q).abs().sum(-1)


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator of two Gram matrices (Song et al. 2012, eq. 5), diagonals zeroed."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones_k, ones_l = k.sum(0), l.sum(0)
    return float((np.sum(k * l) + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_k @ ones_l)
                 / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations (rows = the same states, columns = features), unbiased HSIC."""
    if len(x) != len(y) or len(x) < 4:
        raise ValueError(f"CKA needs the same >= 4 states in both representations, got {len(x)} and {len(y)}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, l = x @ x.T, y @ y.T
    denominator = np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))
    return float(_unbiased_hsic(k, l) / denominator) if denominator > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ the probe set
def collect_paired_observations(game: str, distribution_mode: str, num_envs: int, num_steps: int,
                                variants: tuple[str, ...], seed: int, driver=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Observations per rendering of the same num_envs*num_steps test-level states, and their level seeds. `driver`
    (an Agent) picks the actions instead of uniform random ones (then the states depend on it)."""
    env = PairedProcgenEnv(game, num_envs, variants, rand_seed=TEST_SEED_OFFSET + seed, num_levels=0,
                           distribution_mode=distribution_mode)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    frames: dict[str, list] = {name: [] for name in env.renderings}
    level_seeds = []
    try:
        for _ in range(num_steps):
            obs, _, _, seeds = env.observe()
            for name in frames:
                frames[name].append(obs[name])
            level_seeds.append(seeds)
            if driver is None:
                actions = rng.integers(0, ProcgenVectorEnv.SPEC[2], num_envs)
            else:
                probs = action_probs(driver, obs[DEFAULT_RENDERING])
                actions = torch.multinomial(probs, 1, generator=generator).squeeze(-1).numpy()
            env.act(actions)
    finally:
        env.close()
    return {name: np.concatenate(f) for name, f in frames.items()}, np.concatenate(level_seeds)


def training_level_fraction(level_seeds: np.ndarray, start_level: int, num_levels: int) -> float:
    """The share of states on the run's training levels: num_levels 0 draws from the whole level distribution,
    training levels included."""
    return float(((level_seeds >= start_level) & (level_seeds < start_level + num_levels)).mean())


def build_probe_set(env_id: str, distribution_mode: str, states: int, seed: int, num_levels: int,
                    start_level: int) -> ProbeSet:
    """`states` test-level states of the env (a multiple of PROBE_ENVS), rendered every way the probes compare.
    Gymnasium envs have no renderings: only their own observations, from random-action episodes."""
    steps = max(1, -(-states // PROBE_ENVS))
    if is_procgen(env_id):
        obs, level_seeds = collect_paired_observations(procgen_game(env_id), distribution_mode, PROBE_ENVS, steps,
                                                       PROBE_VARIANTS, seed)
        obs, level_seeds = {name: o[:states] for name, o in obs.items()}, level_seeds[:states]
        return ProbeSet(env_id, seed, obs, training_level_fraction(level_seeds, start_level, num_levels))
    env = make_vector_env(env_id, PROBE_ENVS, TEST_SEED_OFFSET + seed, normalize_reward=False, clip_reward=None)
    rng = np.random.default_rng(seed)
    try:
        ob, _ = env.reset(seed=TEST_SEED_OFFSET + seed)
        frames = []
        for _ in range(steps):
            frames.append(ob)
            ob, *_ = env.step(rng.integers(0, env.single_action_space.n, PROBE_ENVS))
    finally:
        env.close()
    return ProbeSet(env_id, seed, {DEFAULT_RENDERING: np.concatenate(frames)[:states]}, None)


# ------------------------------------------------------------------------------------------------ measuring
@torch.no_grad()
def action_probs(agent, obs: np.ndarray, batch: int = 256) -> torch.Tensor:
    # np.array: frames from Ray's object store are read-only, which torch.from_numpy warns about.
    return torch.cat([torch.softmax(agent.logits(torch.from_numpy(np.array(obs[i:i + batch]))), -1)
                      for i in range(0, len(obs), batch)])


@torch.no_grad()
def encoder_features(agent, obs: np.ndarray, batch: int = 256) -> np.ndarray:
    return torch.cat([agent.features(torch.from_numpy(np.array(obs[i:i + batch])))
                      for i in range(0, len(obs), batch)]).numpy()


@torch.no_grad()
def measure(agent, probe: ProbeSet, learner_id: int, weights_version: int) -> ProbeOutput:
    """One agent's action probabilities and encoder features on every rendering of the probe set (forward passes
    only, the encoder once per frame: the policy head runs on the features kept); what the coordinator needs to
    pair it with the other agents of its version."""
    t0 = time.perf_counter()
    features = {name: torch.from_numpy(encoder_features(agent, obs)) for name, obs in probe.renderings.items()}
    probs = {name: torch.softmax(agent.actor(f), -1).numpy() for name, f in features.items()}
    return ProbeOutput(learner_id, weights_version, probs,
                       {name: f.numpy().astype(np.float32) for name, f in features.items()}, time.perf_counter() - t0)


def probe_metrics(outputs: list[ProbeOutput], probe: ProbeSet) -> dict:
    """The numbers of one weights version, from every agent's output: metrics.jsonl's `probe` block."""
    outputs = sorted(outputs, key=lambda o: o.learner_id)
    tv = lambda p, q: float(tv_distance(torch.tensor(p), torch.tensor(q)).mean())   # copies: Ray hands read-only arrays
    variants = [name for name in probe.renderings if name != DEFAULT_RENDERING]
    pairs = [(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1:]]
    return {
        "weights_version": outputs[0].weights_version,
        "states": probe.states,
        "training_level_fraction": probe.training_level_fraction,
        "robustness_tv": {v: [tv(o.probs[DEFAULT_RENDERING], o.probs[v]) for o in outputs] for v in variants},
        "render_cka": {v: [linear_cka(o.features[DEFAULT_RENDERING], o.features[v]) for o in outputs] for v in variants},
        "agreement_tv": {f"{a.learner_id}-{b.learner_id}": tv(a.probs[DEFAULT_RENDERING], b.probs[DEFAULT_RENDERING])
                         for a, b in pairs},
        "cka": {f"{a.learner_id}-{b.learner_id}": linear_cka(a.features[DEFAULT_RENDERING], b.features[DEFAULT_RENDERING])
                for a, b in pairs},
    }
