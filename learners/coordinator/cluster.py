"""The Ray cluster a run uses: joining one or starting an embedded one, what a run reserves, where its actors go,
and the checks that need the machine or network (run before anything starts)."""

from __future__ import annotations

import ipaddress
import math
import os
import socket

import ray

from learners.config import ConfigError, TrainConfig
from learners.peer.security import channel_token
from learners.telemetry.metrics import bind_host


def run_cpus(cfg: TrainConfig, actors_per_learner: int | None = None) -> float:
    """Ray CPUs one run reserves: every learner and its rollout actors (train, sweep and bench size Ray with it)."""
    actors = cfg.num_actors if actors_per_learner is None else actors_per_learner
    return cfg.num_learners * (cfg.learner_cpus + actors * cfg.actor_cpus)


# Learner and actor processes malloc from several threads (gRPC, peer fetches, evaluation); glibc's default of up to
# 8 arenas per core keeps freed activation and frame buffers in each. Two arenas cut a smoke-shape learner's peak PSS
# 653 -> 564 MB at the same update speed (`mdpo bench`). Set in the environment the embedded Ray's processes inherit
# (a per-actor runtime_env would keep Ray from reusing its pre-started workers, which then idle at ~45 MB each); the
# cluster image (deploy/Dockerfile) and deploy/runtime_env.yaml set it for cluster runs.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


def learner_placement(cfg: TrainConfig) -> dict:
    """Ray options of a learner actor on the connected cluster: a GPU each when there are enough, and the `learner`
    slot that compose/KubeRay learner nodes advertise."""
    resources = ray.cluster_resources()
    gpu = cfg.device != "cpu" and resources.get("GPU", 0) >= cfg.num_learners
    options = {"num_cpus": cfg.learner_cpus, "num_gpus": 1 if gpu else 0}
    if resources.get("learner", 0) >= cfg.num_learners:
        options["resources"] = {"learner": 1}
    return options


def init_local_ray(num_cpus: int, log_to_driver: bool = True) -> None:
    """Start an embedded single-node Ray whose worker processes inherit WORKER_ENV (a value the user set wins)."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)


def connect_ray(cfg: TrainConfig) -> bool:
    """Join the cluster at cfg.ray_address (or RAY_ADDRESS), else start an embedded local Ray.
    Returns True when this process started (and so must stop) Ray."""
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {err}. Start one with `ray start --head` "
                              "or drop --ray-address to use an embedded local Ray") from None
        return False
    init_local_ray(max(os.cpu_count() or 1, math.ceil(run_cpus(cfg))))
    return True


def is_loopback(host: str) -> bool:
    """A bind address only this machine can reach (a name is resolved; one that does not resolve is not)."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host) if host and not host[0].isdigit() and ":" not in host
                                    else host).is_loopback
    except (ValueError, OSError):
        return False


def preflight(cfg: TrainConfig) -> None:
    """Checks that need the machine or network, run before anything is started. The local backend opens no gRPC
    port and joins no cluster: nothing here concerns it."""
    if cfg.backend == "local":
        return
    if (not is_loopback(cfg.grpc_host) and not cfg.grpc_tls_cert and not os.environ.get(cfg.grpc_token_env)
            and not cfg.grpc_token_file and not cfg.grpc_allow_insecure):
        raise ConfigError(
            f"--grpc-host {cfg.grpc_host} exposes the learners' gRPC ports beyond this machine with neither a "
            f"token nor TLS, so any host that reaches them could stall or feed training. Set a shared token in "
            f"${cfg.grpc_token_env} (e.g. export {cfg.grpc_token_env}=$(python -c 'import secrets; "
            f"print(secrets.token_hex(16))')), or TLS with --grpc-tls-cert/--grpc-tls-key/--grpc-tls-ca, or "
            f"accept the risk with --grpc-allow-insecure")
    if cfg.grpc_token_file:
        try:
            token = channel_token(cfg)
        except OSError:
            token = None
        if not token:
            raise ConfigError(f"--grpc-token-file {cfg.grpc_token_file} is missing or empty on this machine (the "
                              f"driver reads it); point it at the cluster's token file or set ${cfg.grpc_token_env}")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address)
    elif cfg.grpc_port:   # on a local run the learners bind on this machine
        for port in range(cfg.grpc_port, cfg.grpc_port + cfg.num_learners):
            with socket.socket() as sock:
                # As gRPC's own listener does: a previous run's connections in TIME_WAIT do not block the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((bind_host(cfg.grpc_host), port))
                except OSError as err:
                    raise ConfigError(f"--grpc-port: port {port} on {cfg.grpc_host} is in use ({err.strerror}); "
                                      "pick another base port or 0 for free ports") from None


# CPU worker nodes of the compose file and the KubeRay manifest (deploy/) carry this Ray node label
# (`ray start --labels=mdpo-role=rollout`); learner nodes advertise the custom resource `learner` instead.
ROLLOUT_NODE_LABEL = ("mdpo-role", "rollout")


def rollout_placement() -> dict:
    """Ray options that keep rollout actors and evaluators on the labelled CPU worker nodes, if the cluster has
    any; otherwise none (embedded Ray, unlabelled clusters, where Ray already prefers non-GPU nodes for them)."""
    key, value = ROLLOUT_NODE_LABEL
    if any(node.get("Alive") and (node.get("Labels") or {}).get(key) == value for node in ray.nodes()):
        return {"label_selector": {key: value}}
    return {}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message instead of Ray's long retry loop on a wrong host:port."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"--ray-address {address}: nothing answers at {host}:{port} ({err}); is the cluster up?") from None
