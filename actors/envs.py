"""Environment factory: Procgen games (through gym3) and registered Gymnasium ids, as Gymnasium vector envs.

Every env this module builds autoresets in the SAME step an episode ends: the obs returned with a done flag is
already the first obs of the next episode. Episode statistics (info["episode"]) are recorded on raw rewards,
before reward normalisation and clipping.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers.vector import ClipReward, RecordEpisodeStatistics

from actors.reward_normalization import NormalizeReturn

if TYPE_CHECKING:
    import procgen

PROCGEN_GAMES: tuple[str, ...] = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)

# Derived empirically from procgen-mirror 0.10.7: every (game, mode) pair was built in its own subprocess with
# ProcgenGym3Env(num=1, ...) and stepped 20 times (tests/test_envs.py re-derives the whole table the same way).
# Unsupported "extreme"/"memory" modes kill the process from C++ (`fassert failed ... game.cpp`, exit code 1), and
# so does an unknown game name (SIGABRT), which is why validate_env must run first. "exploration" is Python-side:
# one fixed hard level per game, available exactly for the games in procgen.env.EXPLORATION_LEVEL_SEEDS.
_EXTREME = {"chaser", "dodgeball", "leaper", "starpilot"}
_MEMORY = {"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}
_EXPLORATION = {"caveflyer", "climber", "coinrun", "heist", "jumper", "leaper", "maze", "ninja"}
PROCGEN_MODES: dict[str, tuple[str, ...]] = {
    game: ("easy", "hard")
    + ("extreme",) * (game in _EXTREME)
    + ("memory",) * (game in _MEMORY)
    + ("exploration",) * (game in _EXPLORATION)
    for game in PROCGEN_GAMES
}


def _procgen_candidate(env_id: str) -> tuple[str, bool]:
    """The game name an id would refer to, and whether the id explicitly asked for Procgen."""
    name = env_id.removeprefix("procgen:")
    if match := re.fullmatch(r"procgen-(.+)-v\d+", name):
        name = match.group(1)
    return name, name != env_id


def is_procgen(env_id: str) -> bool:
    """True for "coinrun", "procgen:coinrun", "procgen-coinrun-v0" (and "procgen:procgen-coinrun-v0")."""
    return _procgen_candidate(env_id)[0] in PROCGEN_GAMES


def procgen_game(env_id: str) -> str:
    """The bare game name of a Procgen env id."""
    name = _procgen_candidate(env_id)[0]
    if name not in PROCGEN_GAMES:
        raise ValueError(_unknown_game_message(name))
    return name


def _did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close:  # gymnasium ids are case-sensitive, so also try ignoring case ("cartpole-v1")
        by_lower = {c.lower(): c for c in choices}
        close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown_game_message(name: str) -> str:
    return (f"Unknown Procgen game {name!r}.{_did_you_mean(name.lower(), PROCGEN_GAMES)} "
            f"Valid games: {', '.join(PROCGEN_GAMES)}.")


def validate_env(env_id: str, distribution_mode: str = "hard") -> None:
    """Raise ValueError (with a fix) for an env that cannot be built, before anything expensive or fatal runs."""
    name, explicit_procgen = _procgen_candidate(env_id)
    if name in PROCGEN_GAMES:
        modes = PROCGEN_MODES[name]
        if distribution_mode not in modes:
            raise ValueError(f"Procgen game {name!r} does not support distribution_mode={distribution_mode!r}; "
                             f"it supports: {', '.join(modes)}. Pick one of those.")
        return
    if explicit_procgen:
        raise ValueError(_unknown_game_message(name))

    # Mirror gymnasium.make: "package:Env-v0" imports the package so that it can register its ids.
    module, _, gym_id = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"Env id {env_id!r}: cannot import {module!r} to register its envs ({err}). "
                             f"Install it, or drop the '{module}:' prefix.") from err
    if gym_id in gymnasium.registry:
        return
    # An unknown lower-case word like "coinrn" is far more likely a mistyped game than a Gymnasium id.
    if difflib.get_close_matches(name.lower(), PROCGEN_GAMES, n=1, cutoff=0.6):
        raise ValueError(_unknown_game_message(name))
    raise ValueError(f"Unknown env id {env_id!r}: it is neither a Procgen game nor a registered Gymnasium id."
                     f"{_did_you_mean(gym_id, list(gymnasium.registry))} "
                     f"Procgen games: {', '.join(PROCGEN_GAMES)}. Gymnasium ids need their version "
                     f"(e.g. 'CartPole-v1'); see gymnasium.pprint_registry().")


@dataclass(frozen=True)
class ProcgenLevels:
    """Which levels a ProcgenVectorEnv draws from; kept so the gym3 env can be rebuilt on a seeded reset."""

    game: str
    num_levels: int = 500
    start_level: int = 0
    distribution_mode: str = "hard"


class ProcgenVectorEnv(VectorEnv):
    """`procgen.ProcgenGym3Env` as a Gymnasium VectorEnv with SAME_STEP autoreset.

    gym3 semantics map directly onto SAME_STEP: after act(), observe() returns the reward of that action and
    first=True where the episode ended, with the obs already being the next episode's first obs. Procgen does not
    report why an episode ended, and its per-game step limits look exactly like a terminal state, so every end
    is `terminated` and `truncated` is always False. gym3 discards the last obs of a finished episode, so there
    is no info["final_obs"].
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}
    OBS_SHAPE, NUM_ACTIONS = (64, 64, 3), 15     # every game, every mode
    SPEC = (OBS_SHAPE, "uint8", NUM_ACTIONS)      # (observation shape, dtype, actions), as obs_spec() returns

    def __init__(self, env_name: str, num_envs: int, *, num_levels: int = 500, start_level: int = 0,
                 distribution_mode: str = "hard", rand_seed: int | None = None, num_threads: int = 4):
        validate_env(env_name, distribution_mode)
        self.levels = ProcgenLevels(procgen_game(env_name), num_levels, start_level, distribution_mode)
        self.num_threads = num_threads   # procgen's stepping threads (its own default is 4)
        self.num_envs = num_envs
        self.single_observation_space = Box(0, 255, self.OBS_SHAPE, np.uint8)
        self.single_action_space = Discrete(self.NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._gym3 = self._make_gym3(rand_seed)
        self._stepped = False

    def _make_gym3(self, rand_seed: int | None) -> procgen.ProcgenGym3Env:
        # Importing procgen also imports the legacy `gym` (it registers ids there), which prints an
        # "unmaintained" banner from every process; our code never uses gym, so keep the import lazy and quiet.
        with contextlib.redirect_stderr(io.StringIO()):
            import procgen

        lv = self.levels
        # Exploration mode pins num_levels/start_level itself and asserts that they are not passed.
        level_kwargs = {} if lv.distribution_mode == "exploration" else {
            "num_levels": lv.num_levels, "start_level": lv.start_level}
        return procgen.ProcgenGym3Env(num=self.num_envs, env_name=lv.game, distribution_mode=lv.distribution_mode,
                                      rand_seed=rand_seed, num_threads=self.num_threads, **level_kwargs)

    def _observe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        reward, obs, first = self._gym3.observe()
        per_env = self._gym3.get_info()
        infos = {key: np.array([info[key] for info in per_env]) for key in per_env[0]}
        # Gymnasium's vector info convention pairs every key with a "_key" mask of the envs it applies to.
        infos |= {f"_{key}": np.ones(self.num_envs, dtype=bool) for key in list(infos)}
        return obs["rgb"], reward.astype(np.float32), first.astype(bool), infos

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if options:
            raise NotImplementedError(f"ProcgenVectorEnv.reset takes no options (got {sorted(options)}): "
                                      "gym3 cannot reset individual envs.")
        super().reset(seed=seed)  # seeds self.np_random
        # gym3 cannot restart episodes, so a reset rebuilds the env. An unseeded reset draws the new seed from
        # np_random: reproducible after one seeded reset, yet it never replays the episodes already played.
        if seed is not None or self._stepped:
            rand_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
            self._gym3.close()
            self._gym3 = self._make_gym3(rand_seed)
            self._stepped = False
        obs, _, _, infos = self._observe()
        return obs, infos

    def step(self, actions: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        self._gym3.act(np.asarray(actions, dtype=np.int32).reshape(self.num_envs))
        self._stepped = True
        obs, reward, first, infos = self._observe()
        return obs, reward, first, np.zeros(self.num_envs, dtype=bool), infos

    def close_extras(self, **kwargs: Any) -> None:
        self._gym3.close()


def make_vector_env(env_id: str, num_envs: int, seed: int, *, num_levels: int = 500, start_level: int = 0,
                    distribution_mode: str = "hard", gamma: float = 0.999, normalize_reward: bool = True,
                    clip_reward: float | None = 10.0, procgen_threads: int = 4) -> VectorEnv:
    """A SAME_STEP-autoreset vector env with raw-reward episode stats, then optional reward normalising/clipping.

    Procgen ids become a ProcgenVectorEnv (seeded with `seed` at construction); any other registered Gymnasium
    id a synchronous gymnasium vector env, for which num_levels/start_level/distribution_mode are ignored.
    The caller still resets (with `seed` for reproducible runs). `procgen_threads` caps the threads Procgen steps
    its envs on (pin it to the process's CPU share so processes sharing a machine do not oversubscribe it).
    """
    validate_env(env_id, distribution_mode)
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    if clip_reward is not None and clip_reward <= 0:
        raise ValueError(f"clip_reward must be > 0 (or None to disable clipping), got {clip_reward}.")
    if is_procgen(env_id):
        env: VectorEnv = ProcgenVectorEnv(env_id, num_envs, num_levels=num_levels, start_level=start_level,
                                          distribution_mode=distribution_mode, rand_seed=seed,
                                          num_threads=procgen_threads)
    else:
        env = gymnasium.make_vec(env_id, num_envs, vectorization_mode="sync",
                                 vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    env.action_space.seed(seed)  # so random-action warm-ups and tests are reproducible too
    # Statistics first: reported episode returns must be in the game's own units, not normalised ones.
    env = RecordEpisodeStatistics(env)
    if normalize_reward:   # the authors' arithmetic (gym 0.23.1), see actors/reward_normalization.py
        env = NormalizeReturn(env, gamma=gamma)
    if clip_reward is not None:
        env = ClipReward(env, -clip_reward, clip_reward)
    return env


def obs_spec(env: VectorEnv) -> tuple[tuple[int, ...], str, int]:
    """(observation shape, observation dtype, number of actions) of a vector env."""
    space = env.single_observation_space
    return tuple(space.shape), space.dtype.name, int(env.single_action_space.n)


def _find_normalizer(env: VectorEnv) -> NormalizeReturn | None:
    while isinstance(env, VectorWrapper):
        if isinstance(env, NormalizeReturn):
            return env
        env = env.env
    return None


def get_reward_normalizer_state(env: VectorEnv) -> dict[str, float | list[float]]:
    """NormalizeReturn statistics as plain Python numbers (safe for JSON and torch.load(weights_only=True))."""
    norm = _find_normalizer(env)
    if norm is None:
        return {}
    rms = norm.return_rms
    return {"mean": float(rms.mean), "var": float(rms.var), "count": float(rms.count),
            "accumulated_reward": [float(r) for r in norm.accumulated_reward]}


def set_reward_normalizer_state(env: VectorEnv, state: dict[str, float | list[float]]) -> None:
    """Restore what get_reward_normalizer_state returned; {} (no normaliser when saved) is a no-op."""
    if not state:
        return
    norm = _find_normalizer(env)
    if norm is None:
        raise ValueError("Got reward-normaliser state, but this env has no NormalizeReturn wrapper; "
                         "build it with normalize_reward=True or drop the state.")
    accumulated = np.asarray(state["accumulated_reward"], dtype=norm.accumulated_reward.dtype)
    if accumulated.shape != norm.accumulated_reward.shape:
        raise ValueError(f"Reward-normaliser state is for {accumulated.size} envs, this env has "
                         f"{norm.num_envs}; build it with the same num_envs.")
    norm.return_rms.mean = np.asarray(state["mean"], dtype=np.float64)
    norm.return_rms.var = np.asarray(state["var"], dtype=np.float64)
    norm.return_rms.count = float(state["count"])
    norm.accumulated_reward = accumulated
