"""The environment factory, against real Procgen and Gymnasium environments (no mocks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gymnasium.spaces import Box, Discrete, MultiDiscrete
from gymnasium.vector import AutoresetMode, VectorEnv

from actors.envs import (PROCGEN_GAMES, PROCGEN_MODES, ProcgenVectorEnv, get_reward_normalizer_state, is_procgen,
                         make_vector_env, procgen_game, set_reward_normalizer_state, validate_env)

REPO = Path(__file__).resolve().parents[1]
# chaser ends episodes within ~50-250 random steps and pays fractional rewards, so return sums are non-trivial.
FAST_GAME = "chaser"


def run_python(code: str) -> subprocess.Popen:
    """Start `code` in a fresh interpreter: an unsupported Procgen mode aborts the whole process from C++."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --- ids and validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", ["coinrun", "procgen:coinrun", "procgen-coinrun-v0", "procgen:procgen-coinrun-v0"])
def test_procgen_ids_are_recognised(env_id):
    assert is_procgen(env_id)
    assert procgen_game(env_id) == "coinrun"
    validate_env(env_id)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "gymnasium:CartPole-v1"])
def test_gymnasium_ids_are_not_procgen_and_pass(env_id):
    assert not is_procgen(env_id)
    validate_env(env_id)
    validate_env(env_id, "extreme")  # distribution_mode means nothing outside Procgen
    with pytest.raises(ValueError):
        procgen_game(env_id)


@pytest.mark.parametrize("env_id, closest", [("coinrn", "coinrun"), ("procgen:starpilt", "starpilot"),
                                             ("procgen-bigfsh-v0", "bigfish")])
def test_unknown_game_names_closest_and_lists_valid_games(env_id, closest):
    with pytest.raises(ValueError, match="Unknown Procgen game") as err:
        validate_env(env_id)
    assert f"Did you mean '{closest}'" in str(err.value)
    assert all(game in str(err.value) for game in PROCGEN_GAMES)


def test_unsupported_mode_lists_the_supported_ones():
    with pytest.raises(ValueError, match="distribution_mode='extreme'") as err:
        validate_env("coinrun", "extreme")
    assert "easy, hard, exploration" in str(err.value)
    with pytest.raises(ValueError, match=r"supports: easy, hard\. "):
        validate_env("bigfish", "memory")
    validate_env("dodgeball", "memory")
    validate_env("starpilot", "extreme")


def test_unknown_gymnasium_id_suggests_close_ids():
    with pytest.raises(ValueError, match="neither a Procgen game nor a registered Gymnasium id") as err:
        validate_env("CartPol-v1")
    assert "'CartPole-v1'" in str(err.value)
    with pytest.raises(ValueError, match="'CartPole-v1'"):
        validate_env("CartPole")  # gymnasium ids need their version
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg'"):
        validate_env("no_such_pkg:Foo-v0")


def test_make_vector_env_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_envs"):
        make_vector_env("CartPole-v1", 0, seed=0)
    with pytest.raises(ValueError, match="clip_reward"):
        make_vector_env("CartPole-v1", 1, seed=0, clip_reward=0.0)


def test_tables_match_procgen_source():
    from procgen.env import ENV_NAMES, EXPLORATION_LEVEL_SEEDS

    assert PROCGEN_GAMES == tuple(ENV_NAMES)
    assert {g for g, modes in PROCGEN_MODES.items() if "exploration" in modes} == set(EXPLORATION_LEVEL_SEEDS)
    assert all(modes[:2] == ("easy", "hard") for modes in PROCGEN_MODES.values())


# Builds and steps every (game, mode) pair, each in a forked child: an unsupported mode exits the process from
# C++. Forking after one env has loaded Procgen's assets (~2 s) makes each probe cost milliseconds.
PROBE_ALL_MODES = """
import json, os
import numpy as np, procgen
from procgen.env import DISTRIBUTION_MODE_DICT, ENV_NAMES

procgen.ProcgenGym3Env(num=1, env_name="coinrun", rand_seed=0).close()
works = {}
for game in ENV_NAMES:
    for mode in DISTRIBUTION_MODE_DICT:
        pid = os.fork()
        if pid == 0:
            try:
                env = procgen.ProcgenGym3Env(num=1, env_name=game, distribution_mode=mode, rand_seed=0)
                for _ in range(5):
                    env.act(np.array([4]))
                env.observe()
            except BaseException:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            works.setdefault(game, []).append(mode)
print("MODES " + json.dumps(works))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe forks")
def test_procgen_modes_match_the_real_library():
    probe = run_python(PROBE_ALL_MODES)
    # Our own entry points must refuse unsupported pairs before Procgen is even imported.
    guarded = run_python("""
        import sys
        from actors.envs import ProcgenVectorEnv, make_vector_env
        for build in (lambda: make_vector_env("coinrun", 1, 0, distribution_mode="extreme"),
                      lambda: ProcgenVectorEnv("bigfish", 1, distribution_mode="memory")):
            try:
                build()
            except ValueError:
                print("REFUSED")
        print("procgen imported:", "procgen" in sys.modules)
    """)

    out, errs = probe.communicate(timeout=120)
    assert probe.returncode == 0, errs
    found = json.loads(next(line for line in out.splitlines() if line.startswith("MODES "))[len("MODES "):])
    assert {game: tuple(modes) for game, modes in found.items()} == PROCGEN_MODES
    out, errs = guarded.communicate(timeout=60)
    assert out.splitlines() == ["REFUSED", "REFUSED", "procgen imported: False"], out + errs


# --- ProcgenVectorEnv ----------------------------------------------------------------------------------------

def test_procgen_spaces_and_vector_api():
    env = ProcgenVectorEnv(FAST_GAME, 3, distribution_mode="easy", rand_seed=0)
    try:
        assert isinstance(env, VectorEnv) and env.num_envs == 3
        assert env.single_observation_space == Box(0, 255, (64, 64, 3), np.uint8)
        assert env.single_action_space == Discrete(15)
        assert env.observation_space == Box(0, 255, (3, 64, 64, 3), np.uint8)
        assert env.action_space == MultiDiscrete([15, 15, 15])
        assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP

        obs, infos = env.reset(seed=1)
        assert obs.dtype == np.uint8 and obs.shape == (3, 64, 64, 3) and env.observation_space.contains(obs)
        assert isinstance(infos, dict) and infos["level_seed"].shape == (3,)

        for actions in (env.action_space.sample(), [0, 7, 14]):  # int64 arrays and plain lists both work
            obs, rewards, terminated, truncated, infos = env.step(actions)
            assert env.observation_space.contains(obs)
            assert rewards.dtype == np.float32 and rewards.shape == (3,)
            assert terminated.dtype == np.bool_ and terminated.shape == (3,)
            assert truncated.dtype == np.bool_ and not truncated.any()
            for key in ("level_seed", "prev_level_complete", "prev_level_seed"):
                assert infos[key].shape == (3,) and infos[f"_{key}"].all()
        with pytest.raises(NotImplementedError, match="individual envs"):
            env.reset(options={"reset_mask": np.array([True, False, False])})
    finally:
        env.close()
    assert env.closed
    env.close()  # closing twice is harmless


def rollout_obs(env: VectorEnv, seed: int, steps: int, actions: np.ndarray) -> np.ndarray:
    frames = [env.reset(seed=seed)[0]]
    frames += [env.step(actions[t])[0] for t in range(steps)]
    return np.stack(frames)


def test_procgen_seeding_is_reproducible():
    actions = np.random.default_rng(0).integers(0, 15, (20, 2))
    a = ProcgenVectorEnv(FAST_GAME, 2, rand_seed=99)
    b = ProcgenVectorEnv(FAST_GAME, 2, rand_seed=5)
    try:
        same = rollout_obs(a, 7, 20, actions)
        np.testing.assert_array_equal(same, rollout_obs(b, 7, 20, actions))
        np.testing.assert_array_equal(same, rollout_obs(a, 7, 20, actions))  # reseeding replays, even mid-episode
        assert not np.array_equal(same, rollout_obs(b, 8, 20, actions))
        # An unseeded reset after playing starts new episodes, derived reproducibly from the last seed.
        for env in (a, b):
            env.reset(seed=7)
            env.step(actions[0])
        fresh_a, fresh_b = a.reset()[0], b.reset()[0]
        np.testing.assert_array_equal(fresh_a, fresh_b)
        assert not np.array_equal(fresh_a, same[0])
    finally:
        a.close()
        b.close()


def test_procgen_exploration_mode_uses_its_fixed_level():
    from procgen.env import EXPLORATION_LEVEL_SEEDS

    env = ProcgenVectorEnv("coinrun", 2, num_levels=500, start_level=3, distribution_mode="exploration")
    try:
        _, infos = env.reset(seed=0)
        assert (infos["level_seed"] == EXPLORATION_LEVEL_SEEDS["coinrun"]).all()
    finally:
        env.close()


def test_procgen_same_step_autoreset_and_raw_episode_stats():
    n = 4
    env = make_vector_env(FAST_GAME, n, seed=0, distribution_mode="easy", normalize_reward=False, clip_reward=None)
    obs, infos = env.reset(seed=0)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    finished = []
    for _ in range(1000):
        prev_obs, prev_level = obs, infos["level_seed"]
        obs, rewards, terminated, truncated, infos = env.step(env.action_space.sample())
        returns += rewards
        lengths += 1
        assert not truncated.any()
        assert np.array_equal(infos.get("_episode", np.zeros(n, bool)), terminated)
        for i in np.flatnonzero(terminated):
            assert infos["episode"]["r"][i] == pytest.approx(returns[i], abs=1e-9)
            assert infos["episode"]["l"][i] == lengths[i]
            assert infos["prev_level_seed"][i] == prev_level[i]
            assert not np.array_equal(obs[i], prev_obs[i])
            finished.append((returns[i], int(infos["level_seed"][i]), obs[i]))
        returns[terminated], lengths[terminated] = 0, 0
        if len(finished) >= 3:
            break
    env.close()
    assert len(finished) >= 3 and any(r > 0 for r, _, _ in finished)
    # The obs returned on the done step is exactly the first frame of the next level.
    _, level, first_obs = finished[0]
    one_level = ProcgenVectorEnv(FAST_GAME, 1, num_levels=1, start_level=level, distribution_mode="easy")
    try:
        np.testing.assert_array_equal(one_level.reset(seed=1)[0][0], first_obs)
    finally:
        one_level.close()


# --- Gymnasium envs through the factory ----------------------------------------------------------------------

def test_cartpole_same_step_autoreset_and_episode_stats():
    n = 4
    env = make_vector_env("CartPole-v1", n, seed=0, normalize_reward=False, clip_reward=None)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = env.reset(seed=0)
    returns = np.zeros(n)
    done_steps = 0
    for _ in range(300):
        obs, rewards, terminated, truncated, infos = env.step(env.action_space.sample())
        assert terminated.dtype == np.bool_ and truncated.dtype == np.bool_ and terminated.shape == (n,)
        returns += rewards
        done = terminated | truncated
        if not done.any():
            assert "final_obs" not in infos
            continue
        np.testing.assert_array_equal(infos["_final_obs"], done)
        for i in np.flatnonzero(done):
            x, _, angle, _ = infos["final_obs"][i]
            assert abs(x) > 2.4 or abs(angle) > 0.2095  # the terminal state of the finished episode ...
            assert np.all(np.abs(obs[i]) <= 0.05)      # ... while obs is already a fresh reset state
            assert infos["episode"]["r"][i] == returns[i] == infos["episode"]["l"][i]
        returns[done] = 0
        done_steps += 1
        if done_steps >= 3:
            break
    env.close()
    assert done_steps >= 3


def test_reward_normalisation_and_clipping_keep_raw_episode_stats():
    env = make_vector_env("CartPole-v1", 4, seed=0, gamma=0.99, clip_reward=10.0)
    wrappers = []
    inner = env
    while inner is not inner.unwrapped:
        wrappers.append(type(inner).__name__)
        inner = inner.env
    assert wrappers == ["ClipReward", "NormalizeReturn", "RecordEpisodeStatistics"]

    env.reset(seed=0)
    seen, stat_minus_raw = [], []
    for _ in range(200):
        _, rewards, terminated, truncated, infos = env.step(env.action_space.sample())
        seen.append(rewards)
        if "episode" in infos:
            done = infos["_episode"]
            stat_minus_raw += list(infos["episode"]["r"][done] - infos["episode"]["l"][done])  # raw return == length
    env.close()
    seen = np.concatenate(seen)
    # CartPole pays exactly 1 per step; the first normalised rewards are huge (tiny return variance) and clip.
    assert np.all(np.abs(seen) <= 10.0) and np.any(seen == 10.0)
    assert not np.allclose(seen, 1.0) and np.all(seen > 0)
    assert stat_minus_raw and all(diff == 0 for diff in stat_minus_raw)  # stats stay in raw units


def test_reward_normalizer_state_round_trips():
    env = make_vector_env("CartPole-v1", 3, seed=0)
    env.reset(seed=0)
    for _ in range(40):
        env.step(env.action_space.sample())
    state = get_reward_normalizer_state(env)
    assert set(state) == {"mean", "var", "count", "accumulated_reward"} and len(state["accumulated_reward"]) == 3
    assert state["count"] > 1 and state["var"] != 1.0

    restored = json.loads(json.dumps(state))
    fresh = make_vector_env("CartPole-v1", 3, seed=1)
    set_reward_normalizer_state(fresh, restored)
    assert get_reward_normalizer_state(fresh) == state
    src, dst = (e.env.return_rms for e in (env, fresh))  # ClipReward wraps NormalizeReturn directly
    assert (src.mean, src.var, src.count) == (dst.mean, dst.var, dst.count)

    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"reward_normalizer": state}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["reward_normalizer"] == state

    with pytest.raises(ValueError, match="num_envs"):
        set_reward_normalizer_state(make_vector_env("CartPole-v1", 2, seed=0), state)
    env.close()
    fresh.close()


def test_reward_normalizer_state_without_normalizer():
    env = make_vector_env("CartPole-v1", 2, seed=0, normalize_reward=False)
    assert get_reward_normalizer_state(env) == {}
    set_reward_normalizer_state(env, {})  # no-op
    with pytest.raises(ValueError, match="normalize_reward=True"):
        set_reward_normalizer_state(env, {"mean": 0.0, "var": 1.0, "count": 1.0, "accumulated_reward": [0.0, 0.0]})
    env.close()
