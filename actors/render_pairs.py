"""The same Procgen game states rendered several ways: the paired observations of the robustness measure.

`PairedProcgenEnv` steps one gym3 Procgen env per rendering, all built with the same game, levels and
rand_seed and all given the same actions. Procgen's rendering options (backgrounds, themes, monochrome
assets, velocity paint) only change how a state is drawn, so the envs stay in the same game state: the
serialized states (`get_state()`) are byte-identical except for the rendering-option fields themselves.
That was checked empirically on procgen-mirror 0.10.7 and is re-checked by tests/test_robustness.py and,
on every step, by `step()` (same rewards, episode starts and level seeds, or it raises).

Two options are deliberately not offered. `restrict_themes=True` is not rendering-only: it changes the stored
entity themes (bossfight, fruitbot) and the random draws, so bigfish levels diverge after a few hundred steps.
`center_agent=False` changes more of the serialized state than its own flag (camera state) in coinrun.
"""

from __future__ import annotations

import numpy as np

# Rendering variants: gym3 Procgen options that change pixels, never dynamics. Checked on all 16 games for 500
# random-action steps across episode ends. paint_vel_info draws nothing in chaser, heist, maze, miner, plunder.
RENDER_VARIANTS: dict[str, dict[str, bool]] = {
    "no_backgrounds": {"use_backgrounds": False},
    "monochrome_assets": {"use_monochrome_assets": True},
    "paint_vel_info": {"paint_vel_info": True},
}
DEFAULT_RENDERING = "default"

# Header of a serialized Procgen state (game.cpp serialize(), same order in procgen 0.10.x):
# int version, string game name (int length + bytes), then these int32 options, in this order.
_STATE_OPTIONS = ("paint_vel_info", "use_generated_assets", "use_monochrome_assets", "restrict_themes",
                  "use_backgrounds", "center_agent")


def state_option_offsets(game: str) -> dict[str, int]:
    """Byte offset of each rendering-option int32 in a serialized state of `game`."""
    start = 4 + 4 + len(game.encode())
    return {name: start + 4 * k for k, name in enumerate(_STATE_OPTIONS)}


def state_options(state: bytes, game: str) -> dict[str, bool]:
    """The rendering options recorded in a serialized state."""
    return {name: bool(int.from_bytes(state[off:off + 4], "little"))
            for name, off in state_option_offsets(game).items()}


def strip_render_options(state: bytes, game: str) -> bytes:
    """A serialized state with its rendering-option fields zeroed, so differently rendered copies compare equal."""
    data = bytearray(state)
    for off in state_option_offsets(game).values():
        data[off:off + 4] = bytes(4)
    return bytes(data)


def render_options(variant: str) -> dict[str, bool]:
    """gym3 Procgen keyword arguments of a rendering variant (`default` is Procgen's own rendering)."""
    if variant == DEFAULT_RENDERING:
        return {}
    if variant not in RENDER_VARIANTS:
        raise ValueError(f"unknown rendering variant {variant!r}; choose from {', '.join(RENDER_VARIANTS)}")
    return dict(RENDER_VARIANTS[variant])


class PairedProcgenEnv:
    """`num_envs` Procgen games, each rendered once per variant, stepped in lockstep with shared actions.

    Observations are dicts rendering -> uint8 (num_envs, 64, 64, 3); the default rendering is always first.
    """

    def __init__(self, game: str, num_envs: int, variants: list[str] | tuple[str, ...], *, rand_seed: int,
                 num_levels: int = 0, start_level: int = 0, distribution_mode: str = "hard"):
        import procgen  # lazy: importing procgen also imports the legacy gym

        if not variants:
            raise ValueError("need at least one rendering variant to pair with the default rendering")
        self.game, self.num_envs = game, num_envs
        self.renderings = [DEFAULT_RENDERING] + [v for v in variants if v != DEFAULT_RENDERING]
        self.envs = {name: procgen.ProcgenGym3Env(num=num_envs, env_name=game, distribution_mode=distribution_mode,
                                                  num_levels=num_levels, start_level=start_level,
                                                  rand_seed=rand_seed, **render_options(name))
                     for name in self.renderings}
        self._check_options()

    def _check_options(self) -> None:
        """A state header must hold the options its variant sets: guards the offsets strip_render_options uses.
        (Only those: some games pin others, e.g. chaser always runs with center_agent off.)"""
        for name, env in self.envs.items():
            expected = render_options(name)
            found = {k: v for k, v in state_options(env.get_state()[0], self.game).items() if k in expected}
            if found != expected:
                raise RuntimeError(f"{self.game}: serialized state options {found} differ from the env's own "
                                   f"{expected}; this Procgen build lays out states differently")

    def observe(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(obs per rendering, rewards, episode starts, level seeds), verified equal across renderings."""
        obs, ref = {}, None
        for name, env in self.envs.items():
            reward, ob, first = env.observe()
            seeds = np.array([info["level_seed"] for info in env.get_info()])
            obs[name] = ob["rgb"]
            if ref is None:
                ref = (reward, first, seeds)
            elif not (np.array_equal(reward, ref[0]) and np.array_equal(first, ref[1])
                      and np.array_equal(seeds, ref[2])):
                raise RuntimeError(f"{self.game}: rendering {name!r} diverged from the default rendering "
                                   "(rewards, episode starts or levels differ): not the same states")
        return obs, ref[0], ref[1], ref[2]

    def act(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions, dtype=np.int32).reshape(self.num_envs)
        for env in self.envs.values():
            env.act(actions)

    def states(self) -> dict[str, list[bytes]]:
        return {name: env.get_state() for name, env in self.envs.items()}

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
