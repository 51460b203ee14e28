"""Reading the deployment files the way their tools do, for tests/test_deploy.py and
tests/test_deploy_cluster.py: compose interpolation, volumes and profiles; each command's argv as the
container's shell expands it; Ray's (click) and mdpo's (argparse) own command lines to parse it; how
KubeRay turns a worker group into `ray start`; .dockerignore matching."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

from learners.cli import build_parser, resolve_config
from learners.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
KUBERAY_FILE = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = ROOT / "deploy" / "runtime_env.yaml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
VENV_BIN = Path(sys.executable).parent
SHELL_BUILTINS = {"umask", "exec", "set", "export", "cd", "test", "true"}
IMAGE_COREUTILS = {"mkdir"}    # programs of the base image a compose command may run besides ray and mdpo


LEARNER_LINE = re.compile(r"learner (\d+): gRPC ([\d.]+):(\d+), device")    # the coordinator's log line


def load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ============================================================================ compose helpers
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str]):
    """Compose variable interpolation (`$$`, `${X}`, `${X:-d}`, `${X-d}`, `$X`) over a loaded YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        if op in (":-", ":?") and not env.get(name):
            if op == ":?":
                raise KeyError(f"compose needs {name} set: {default}")
            return default
        if op == "-" and name not in env:
            return default
        return env.get(name, "")

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def active_services(compose: dict, profile: str) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, container path, read-only) of each short-syntax volume."""
    out = []
    for spec in svc.get("volumes", []):
        parts = spec.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def named_volume_at(svc: dict, container_path: str) -> tuple[str, str] | None:
    """(volume, mount point) of the named volume that holds `container_path` in this service."""
    best = None
    for source, target, _ in mounts(svc):
        if source.startswith((".", "/")):
            continue
        if PurePosixPath(container_path).is_relative_to(target) and (best is None or len(target) > len(best[1])):
            best = (source, target)
    return best


def host_path(svc: dict, container_path: str) -> Path | None:
    """The repository file behind `container_path` of a bind-mounted directory, if any."""
    for source, target, _ in mounts(svc):
        if source.startswith((".", "/")) and PurePosixPath(container_path).is_relative_to(target):
            return (ROOT / source / PurePosixPath(container_path).relative_to(target)).resolve()
    return None


def shell_commands(command, env: dict[str, str]) -> list[list[str]]:
    """The argv of every program a compose `command` runs, expanded by a real /bin/sh like the container's
    (variables, quoting, `$(...)`, word splitting): exec-form lists as they are, `sh -c SCRIPT` per command."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] != ["sh", "-c"]:
        return [list(command)]
    argvs = []
    for part in re.split(r"&&|;", command[2]):
        part = re.sub(r"\s[12]?>\s*/dev/null|\s2>&1", " ", part).strip()
        part = re.sub(r"^exec\s+", "", part)
        if not part:
            continue
        out = subprocess.run(["/bin/sh", "-c", f"printf '%s\\0' {part}"], env={"PATH": os.environ["PATH"], **env},
                             capture_output=True, check=True).stdout.decode()
        argvs.append(out.split("\0")[:-1])
    return argvs


# ========================================================================== command parsers
def parse_ray(argv: list[str]) -> tuple[str, dict]:
    """Parse `ray ...` with Ray's own click command line (no command runs): (subcommand path, params)."""
    from ray.scripts.scripts import cli

    assert argv[0] == "ray", argv
    cmd, ctx, rest, path = cli, click.Context(cli, info_name="ray"), list(argv[1:]), []
    while isinstance(cmd, click.Group):
        name, rest = rest[0], rest[1:]
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"`ray {' '.join(path + [name])}` is not a ray command"
        path.append(name)
        if isinstance(sub, click.Group):
            ctx = click.Context(sub, info_name=name, parent=ctx)
            cmd = sub
            continue
        try:
            return " ".join(path), sub.make_context(name, rest, parent=ctx).params
        except click.ClickException as err:
            raise AssertionError(f"`{shlex.join(argv)}`: {err.format_message()}") from None


def parse_mdpo(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig]:
    """Parse and validate `mdpo train ...` with the real parser and config validation (no run starts)."""
    assert argv[:2] == ["mdpo", "train"], argv
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"`{shlex.join(argv)}` is not a valid mdpo command line") from None
    cfg, _ = resolve_config(args)
    return args, cfg


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def check_command(argv: list[str]) -> tuple[str, object]:
    """Every program a deployment runs is a real entry point with real flags; returns (kind, parsed)."""
    program = argv[0]
    if program == "ray":
        sub, params = parse_ray(argv)
        if sub == "start":
            if params.get("resources"):
                resources = json.loads(params["resources"])
                assert all(isinstance(v, (int, float)) and v > 0 for v in resources.values()), resources
            if params.get("labels"):
                from ray._private.label_utils import parse_node_labels_string

                parse_node_labels_string(params["labels"])
        if sub == "job submit":
            assert params["entrypoint"], f"`{shlex.join(argv)}` submits nothing"
            check_command(list(params["entrypoint"]))
        return sub, params
    if program == "mdpo":
        return "mdpo train", parse_mdpo(argv)
    assert program in SHELL_BUILTINS | IMAGE_COREUTILS, f"`{shlex.join(argv)}`: {program} is not an entry point of the image"
    return program, None


def compose_commands(svc: dict) -> list[list[str]]:
    return shell_commands(svc["command"], environment(svc)) if "command" in svc else []


def mdpo_image(svc: dict) -> bool:
    return svc.get("image", "").startswith("mdpo:")


def ray_start_params(svc: dict) -> dict:
    starts = [parse_ray(argv)[1] for argv in compose_commands(svc) if argv[:2] == ["ray", "start"]]
    assert len(starts) <= 1
    return starts[0] if starts else {}


def train_command(svc: dict) -> tuple[list[str], dict]:
    """(`ray job submit` argv, its params) of a compose training-job service."""
    for argv in compose_commands(svc):
        if argv[:3] == ["ray", "job", "submit"]:
            return argv, parse_ray(argv)[1]
    raise AssertionError("the training service does not run `ray job submit`")


def url_port(url: str) -> tuple[str, int, str]:
    m = re.match(r"https?://([^:/]+):(\d+)(/.*)?$", url)
    assert m, url
    return m.group(1), int(m.group(2)), m.group(3) or "/"


def healthcheck_url(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    urls = [t for t in test if isinstance(t, str) and t.startswith("http")]
    assert len(urls) == 1, test
    return urls[0]


def system_binary(name: str) -> str:
    """A Debian tool the deployment tests run (`make system-deps` installs it): CI must have it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (make system-deps installs it)")
        pytest.skip(f"{name} not installed (make system-deps)")
    return path


def service_ports(svc: dict) -> set[int]:
    """Ports a service listens on: its `ray start` ports, `--web.listen-address`, published container ports."""
    ports = set()
    params = ray_start_params(svc) if mdpo_image(svc) else {}
    for key in ("port", "dashboard_port", "metrics_export_port", "dashboard_agent_listen_port", "ray_client_server_port"):
        if params.get(key):
            ports.add(int(params[key]))
    for arg in svc.get("command", []) if not mdpo_image(svc) else []:
        if arg.startswith("--web.listen-address="):
            ports.add(int(arg.rsplit(":", 1)[1]))
    for spec in svc.get("ports", []):
        ports.add(int(str(spec).rsplit(":", 1)[1]))
    return ports


def dockerignore_excludes(path: str, patterns: list[str], legacy: bool = False) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents wins. `legacy`: as
    Docker 20.10's legacy builder walks the context, which also skips a whole excluded folder unless some `!` pattern
    spells out that folder's path as its literal prefix (moby's archive.TarWithOptions): `!learners/*/*.py` does not
    bring back `learners/peer/`."""
    parts = path.split("/")
    if legacy:
        for n in range(1, len(parts)):
            folder = "/".join(parts[:n])
            if dockerignore_excludes(folder, patterns) and not any(
                    p.startswith("!") and (p[1:].strip("/") + "/").startswith(folder + "/") for p in patterns):
                return True
    excluded = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        pat = pattern.split("/")
        hit = any(len(pat) == n and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts[:n], pat))
                  for n in range(1, len(parts) + 1))
        if hit:
            excluded = not negate
    return excluded


def started_learners(log: str) -> list[tuple[int, tuple[str, int]]]:
    """(learner id, (ip, port)) as the coordinator logs each learner it starts, latest last."""
    return [(int(m[1]), (m[2], int(m[3]))) for m in LEARNER_LINE.finditer(log)]


def kuberay_ray_start(group: dict, head: bool, address: str = "mdpo-head-svc:6379") -> list[str]:
    """The `ray start` argv KubeRay builds from a group (top-level `resources`/`labels`, then rayStartParams;
    "true" values become bare flags), as the container's shell splits it."""
    params = dict(group.get("rayStartParams") or {})
    assert "labels" not in params, "KubeRay >= 1.5 rejects rayStartParams['labels']: use the group's `labels`"
    if group.get("resources"):
        assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), \
            "KubeRay rejects resources in both rayStartParams and `resources`"
        custom = {}
        for name, qty in group["resources"].items():
            key = {"cpu": "num-cpus", "memory": "memory", "gpu": "num-gpus"}.get(name.lower())
            if key:
                params[key] = str(int(float(qty)))
            else:
                custom[name] = float(qty)
        if custom:
            params["resources"] = "'" + json.dumps(custom, separators=(",", ":")) + "'"
    if group.get("labels"):
        params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(group["labels"].items()))
    if not head:
        params.setdefault("address", address)
    params.setdefault("block", "true")
    flags = "".join(f" --{k} " if v.lower() == "true" else ("" if v.lower() == "false" else f" --{k}={v} ")
                    for k, v in sorted(params.items()))
    return shlex.split("ray start" + (" --head" if head else "") + flags)
