"""The --backend choices, and what the local backend (learners/local.py) cannot do: checked with the rest of the
config (learners/config.py), before anything starts."""

from __future__ import annotations

from learners.errors import ConfigError

BACKENDS = ("ray", "local")


def check_backend(cfg) -> None:
    """`cfg`: a TrainConfig. The local backend runs every role in this process, with no Ray and no learner
    processes: what needs those is refused with the way out."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.backend != "local":
        return
    if cfg.ray_address:
        raise ConfigError(f"--backend local starts no Ray, so it cannot join the cluster at --ray-address "
                          f"{cfg.ray_address}; drop --ray-address, or use --backend ray")
    if cfg.inference == "learner":
        raise ConfigError("--inference learner needs learner processes that serve their actors' inference; the local "
                          "backend runs the policy in its rollout workers: use --inference actor (or auto), or "
                          "--backend ray")
    if cfg.device == "cuda":
        raise ConfigError("--device cuda: the local backend updates on the CPU (learners/reference.py's mdpo_update); "
                          "use --device cpu (or auto), or --backend ray for GPU learners")
