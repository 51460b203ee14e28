"""Procgen's normalized score: (R - R_min) / (R_max - R_min) with per-game, per-mode constants.

Constants from Cobbe, Hesse, Hilton, Schulman, "Leveraging Procedural Generation to Benchmark
Reinforcement Learning", ICML 2020 (arXiv:1912.01588), appendix table "Normalization constants":
R_max is the maximum achievable score (or an estimate), R_min the score of a random policy or the score
reachable with trivial behaviour. They exist for the easy and hard distribution modes only.
"""

from __future__ import annotations

# game: (R_min, R_max)
RETURN_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "easy": {
        "coinrun": (5.0, 10.0), "starpilot": (2.5, 64.0), "caveflyer": (3.5, 12.0), "dodgeball": (1.5, 19.0),
        "fruitbot": (-1.5, 32.4), "chaser": (0.5, 13.0), "miner": (1.5, 13.0), "jumper": (3.0, 10.0),
        "leaper": (3.0, 10.0), "maze": (5.0, 10.0), "bigfish": (1.0, 40.0), "heist": (3.5, 10.0),
        "climber": (2.0, 12.6), "plunder": (4.5, 30.0), "ninja": (3.5, 10.0), "bossfight": (0.5, 13.0),
    },
    "hard": {
        "coinrun": (5.0, 10.0), "starpilot": (1.5, 35.0), "caveflyer": (2.0, 13.4), "dodgeball": (1.5, 19.0),
        "fruitbot": (-0.5, 27.2), "chaser": (0.5, 14.2), "miner": (1.5, 20.0), "jumper": (1.0, 10.0),
        "leaper": (1.5, 10.0), "maze": (4.0, 10.0), "bigfish": (0.0, 40.0), "heist": (2.0, 10.0),
        "climber": (1.0, 12.6), "plunder": (3.0, 30.0), "ninja": (2.0, 10.0), "bossfight": (0.5, 13.0),
    },
}


def return_range(game: str, distribution_mode: str) -> tuple[float, float] | None:
    """(R_min, R_max) of a Procgen game in a mode, or None when the paper gives none (other envs or modes)."""
    return RETURN_RANGES.get(distribution_mode, {}).get(game)


def normalized_score(game: str, distribution_mode: str, value: float | None) -> float | None:
    bounds = return_range(game, distribution_mode)
    if bounds is None or value is None:
        return None
    low, high = bounds
    return (value - low) / (high - low)
