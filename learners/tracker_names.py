"""The --track settings that need no tracker package or network: checked with the rest of the config
(learners/config.py) and used by the trackers themselves (learners/tracking/)."""

from __future__ import annotations

from learners.errors import ConfigError

TRACKERS = ("wandb", "mlflow")


def tracker_names(track: str) -> list[str]:
    names = [n.strip() for n in track.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            hint = " (TensorBoard event files are always written)" if name == "tensorboard" else ""
            raise ConfigError(f"--track {track!r}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, "
                              f"comma-separated{hint}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--track {track!r} names a tracker twice")
    return names


def check_settings(track: str, group: str) -> None:
    """The names, and a group name MLflow's run search can quote."""
    tracker_names(track)
    if any(q in group for q in "'\"`"):
        raise ConfigError(f"--track-group {group!r}: quotes cannot be in a group name")
