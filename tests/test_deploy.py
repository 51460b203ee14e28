"""Cluster deployment files checked against the code they start (there is no Docker engine here).

`docker-compose config` validates docker-compose.yml; every command a compose service or the KubeRay
manifest runs is parsed by the real `ray` (click) and `mdpo` (argparse) command lines; ports, volumes,
paths, images, the token and health checks are cross-checked between services and against
deploy/prometheus/, deploy/grafana/, deploy/Dockerfile and the coordinator's placement rules.
tests/test_deploy_cluster.py runs the compose topology itself.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement

from learners.config import TrainConfig
from learners.coordinator.cluster import ROLLOUT_NODE_LABEL
from tests.deploy_helpers import (COMPOSE_FILE, CONSTRAINTS, DOCKERFILE, GRAFANA_DIR, KUBERAY_FILE, PROMETHEUS_DIR,
                                  ROOT, RUNTIME_ENV, active_services, check_command, compose_commands,
                                  dockerignore_excludes, environment, healthcheck_url, host_path, kuberay_ray_start,
                                  load_compose, load_script, mdpo_image, mounts, named_volume_at, parse_mdpo,
                                  parse_ray, ray_start_params, service_ports, shell_commands, system_binary,
                                  train_command, url_port)

PROFILES = ("gpu", "cpu")
NUM_LEARNERS = TrainConfig().num_learners


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)   # `mdpo train` validation would try to reach it


# ================================================================================ docker-compose
def test_docker_compose_config_validates():
    """The compose file is valid for docker-compose itself, with the default (.env) and the cpu profile."""
    binary = system_binary("docker-compose")
    for extra in ({}, {"COMPOSE_PROFILES": "cpu"}):
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")} | extra
        result = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        resolved = yaml.safe_load(result.stdout)
        assert set(resolved["services"]) == set(load_compose()["services"])
    # the default profile comes from .env: GPU learners
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "gpu"


def test_compose_commands_are_real_entry_points_and_flags():
    compose = load_compose()
    help_text = subprocess.run([system_binary("prometheus"), "--help"], capture_output=True, text=True)
    prometheus_flags = help_text.stdout + help_text.stderr
    for arg in compose["services"]["prometheus"]["command"]:
        assert f"{arg.split('=', 1)[0]}=" in prometheus_flags, f"prometheus has no flag {arg}"
    kinds = {}
    for name, svc in compose["services"].items():
        if not mdpo_image(svc):
            continue
        assert svc.get("command"), f"{name}: runs the image's default command"
        for argv in compose_commands(svc):
            kinds.setdefault(name, []).append(check_command(argv)[0])
    assert kinds["ray-auth"] == ["mkdir", "umask", "get-auth-token"]
    assert kinds["ray-head"] == ["start"]
    assert all(k == ["start"] for n, k in kinds.items() if n.startswith(("ray-cpu-worker", "ray-learner")))
    assert kinds["mdpo-train"] == kinds["mdpo-train-cpu"] == ["job submit"]


def test_compose_cluster_topology():
    compose = load_compose()
    head = compose["services"]["ray-head"]
    head_params = ray_start_params(head)
    assert head_params["head"] and head_params["block"]
    assert head_params["num_cpus"] == 0 and head_params["num_gpus"] == 0, "the head runs the driver, not actors"
    gcs = f"ray-head:{head_params['port']}"
    dashboard_port = head_params["dashboard_port"]
    assert head_params["dashboard_host"] == "0.0.0.0"
    assert any(p.endswith(f":{dashboard_port}:{dashboard_port}") and p.startswith("127.0.0.1:") for p in head["ports"]), \
        "the job API is published on the host's loopback only"

    for profile in PROFILES:
        services = active_services(compose, profile)
        nodes = {n: s for n, s in services.items() if n != "ray-head" and ray_start_params(s)}
        learners = {n: s for n, s in nodes.items() if json.loads(ray_start_params(s).get("resources") or "{}").get("learner")}
        rollout = {n: s for n, s in nodes.items() if n not in learners}
        assert len(learners) == NUM_LEARNERS, f"{profile}: one learner node per learner"
        assert rollout == {"ray-cpu-worker": services["ray-cpu-worker"]}
        for name, svc in nodes.items():
            params = ray_start_params(svc)
            assert params["address"] == gcs and params["block"], name
            assert svc["depends_on"]["ray-head"]["condition"] == "service_healthy", name
            assert svc.get("restart") == "unless-stopped", name
        for name, svc in learners.items():
            params = ray_start_params(svc)
            assert json.loads(params["resources"]) == {"learner": 1}, f"{name}: exactly one learner per node"
            assert params.get("labels") in (None, ""), f"{name}: learner nodes take no rollout actors"
            gpu = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            if profile == "gpu":
                assert svc["image"] == "mdpo:cuda"
                assert len(gpu) == 1 and gpu[0]["driver"] == "nvidia" and "gpu" in gpu[0]["capabilities"], name
                assert "count" not in gpu[0], f"{name}: count: 1 hands every learner the same first GPU"
            else:
                assert not gpu and svc["image"] == "mdpo:cpu", name
        if profile == "gpu":
            ids = [learners[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for n in learners]
            assert len({tuple(i) for i in ids}) == NUM_LEARNERS, f"each learner reserves its own GPU: {ids}"
        worker = ray_start_params(services["ray-cpu-worker"])
        key, value = ROLLOUT_NODE_LABEL
        assert worker["labels"] == f"{key}={value}", "rollout actors are placed by this label (learners/coordinator/cluster.py)"
        assert worker["num_gpus"] == 0
        scalable = services["ray-cpu-worker"]
        assert "container_name" not in scalable and not scalable.get("ports"), "--scale needs no fixed names/host ports"

        # The training job waits for every node of its profile, then submits to the head's job API.
        jobs = [n for n, s in services.items() if any(a[:3] == ["ray", "job", "submit"] for a in compose_commands(s))]
        assert len(jobs) == 1, f"{profile}: {jobs}"
        job = services[jobs[0]]
        for dep in ["ray-head", *nodes]:
            assert job["depends_on"][dep]["condition"] == "service_healthy", f"{jobs[0]} must wait for {dep}"
        for name, svc in services.items():
            for dep in svc.get("depends_on", {}):
                assert dep in services, f"{profile}: {name} depends on {dep}, which is not in the profile"
        submit_argv, submit = train_command(job)
        assert submit["address"] == f"http://ray-head:{dashboard_port}"
        entry = list(submit["entrypoint"])
        args, cfg = parse_mdpo(entry)
        assert cfg.grpc_host == "node" and cfg.metrics_host == "0.0.0.0", "learners/metrics must be reachable across nodes"
        assert not cfg.progress
        # The learners' channel crosses nodes: it needs the token, here the cluster's Ray token file on the head.
        assert cfg.grpc_token_file and named_volume_at(head, cfg.grpc_token_file)[0] == "ray-auth"
        # Rerunning the job continues its run (mdpo train is idempotent on a run directory): the directory must
        # not change between two expansions of the same command, e.g. with a timestamp.
        assert "$(" not in " ".join(map(str, job["command"])).replace("$$", "$"), \
            "the job's --run-dir must be the same each time the job runs (no command substitution)"
        # The driver runs on the head: the run directory must be on the runs volume there.
        volume = named_volume_at(head, cfg.run_dir)
        assert volume is not None and volume[0] == "runs", f"--run-dir {cfg.run_dir} is not on the head's runs volume"
        assert named_volume_at(job, cfg.run_dir) == volume, "the job container sees the same run directories"


def test_compose_nodes_have_shm_health_checks_and_the_token():
    compose = load_compose()
    auth = compose["services"]["ray-auth"]
    auth_home = environment(auth)["HOME"]
    (auth_volume, _), = [(s, t) for s, t, ro in mounts(auth) if t == auth_home and not ro]
    token_file = f"{auth_home}/.ray/auth_token"          # where `ray get-auth-token --generate` writes
    for name, svc in compose["services"].items():
        if not mdpo_image(svc) or name == "ray-auth":
            continue
        env = environment(svc)
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: token authentication must stay on"
        assert env.get("RAY_AUTH_TOKEN_PATH") == token_file, name
        assert named_volume_at(svc, token_file) == (auth_volume, auth_home), f"{name} does not see the token"
        assert (auth_volume, auth_home, True) in mounts(svc), f"{name}: mount the token read-only"
        params = ray_start_params(svc)
        if not params:
            continue
        shm = svc["shm_size"]
        assert shm.endswith("gb") and int(shm[:-2]) * 2**30 > params["object_store_memory"], \
            f"{name}: --object-store-memory must fit in shm_size"
        host, port, path = url_port(healthcheck_url(svc))
        assert host == "127.0.0.1"
        if params["head"]:
            assert (port, path) == (params["dashboard_port"], "/api/gcs_healthz")
            assert svc["depends_on"]["ray-auth"]["condition"] == "service_completed_successfully"
        else:
            assert (port, path) == (params["dashboard_agent_listen_port"], "/api/local_raylet_healthz")
        assert svc["healthcheck"]["test"][:2] == ["CMD", "curl"], "curl is what deploy/Dockerfile installs"
    assert "RAY_AUTH_MODE=disabled" not in COMPOSE_FILE.read_text().replace(" ", "").replace(":", "=")


def test_compose_images_build_from_the_dockerfile():
    compose = load_compose()
    for name, svc in compose["services"].items():
        if not mdpo_image(svc):
            continue
        build = svc["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        index = build["args"]["TORCH_INDEX_URL"]
        if svc["image"] == "mdpo:cpu":
            assert index == "https://download.pytorch.org/whl/cpu", name
        else:
            assert svc["image"] == "mdpo:cuda" and "cpu" not in index, name


# ===================================================================== monitoring wiring
def _prometheus_config(compose: dict) -> tuple[dict, dict, Path]:
    prom = compose["services"]["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    path = host_path(prom, config_arg.split("=", 1)[1])
    assert path is not None and path.is_file() and path.parent == PROMETHEUS_DIR.resolve(), \
        f"prometheus {config_arg} is not a file of deploy/prometheus/"
    return prom, yaml.safe_load(path.read_text()), path


def test_compose_prometheus_matches_deploy_prometheus():
    compose = load_compose()
    prom, config, config_path = _prometheus_config(compose)
    for rule in config.get("rule_files", []):
        assert (config_path.parent / rule).is_file(), f"{config_path.name}: rule file {rule} missing"
    head = compose["services"]["ray-head"]
    _, job_svc = next((n, s) for n, s in active_services(compose, "cpu").items() if n.startswith("mdpo-train"))
    _, cfg = parse_mdpo(list(train_command(job_svc)[1]["entrypoint"]))
    from learners.telemetry.metrics import sd_dir

    sd_file = sd_dir(cfg, cfg.run_dir) / "some-run.json"   # where the coordinator (on the head) writes targets
    file_sd_globs, static, dns = [], [], []
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            file_sd_globs += sd["files"]
        for st in job.get("static_configs", []):
            static += st["targets"]
        for sd in job.get("dns_sd_configs", []):
            dns += [(name, sd["port"]) for name in sd["names"]]
    assert file_sd_globs, "prometheus must discover the mdpo processes from the coordinator's targets files"
    assert any(fnmatch.fnmatch(str(sd_file), g) for g in file_sd_globs), f"{sd_file} matches none of {file_sd_globs}"
    for pattern in file_sd_globs:
        volume = named_volume_at(prom, pattern)
        assert volume is not None, f"prometheus sees no volume at {pattern}"
        assert named_volume_at(head, pattern) == volume, f"{pattern}: not the volume the coordinator writes to"
        # Prometheus watches the pattern's folder from its start; a folder made later is seen only at the next
        # refresh, after a short run is over (seen on a real compose cluster): a one-shot service Prometheus waits
        # for makes it first, on the same volume.
        folder = str(PurePosixPath(pattern).parent)
        makers = [n for n, c in (prom.get("depends_on") or {}).items()
                  if c.get("condition") == "service_completed_successfully"
                  and named_volume_at(compose["services"][n], folder) == named_volume_at(prom, folder)
                  and ["mkdir", "-p", folder] in compose_commands(compose["services"][n])]
        assert makers, f"no service that Prometheus waits for makes {folder} before it starts"
    for target in static:
        host, port = target.rsplit(":", 1)
        svc = prom if host == "localhost" else compose["services"].get(host)
        assert svc is not None, f"scrape target {target}: no compose service {host}"
        assert int(port) in service_ports(svc), f"scrape target {target}: {host} does not listen on {port}"
    for name, port in dns:    # DNS service discovery: one A record per container of the service
        assert name in compose["services"], f"dns_sd name {name}: no compose service"
        assert port in service_ports(compose["services"][name]), f"dns_sd {name}:{port}: {name} does not listen on {port}"
    if dns:
        ray_nodes = {n for n, svc in compose["services"].items() if mdpo_image(svc) and ray_start_params(svc)}
        assert ray_nodes <= {name for name, _ in dns}, f"Ray nodes not scraped: {sorted(ray_nodes - {n for n, _ in dns})}"


def test_compose_grafana_provisioning_is_mounted():
    compose = load_compose()
    grafana = compose["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning == (GRAFANA_DIR / "provisioning").resolve()
    datasources = [yaml.safe_load(p.read_text()) for p in sorted((provisioning / "datasources").glob("*.y*ml"))]
    urls = [d["url"] for f in datasources for d in f["datasources"] if d["type"] == "prometheus"]
    assert urls, "no Prometheus datasource is provisioned"
    compose_urls = [u for u in urls if url_port(u)[0] in compose["services"]]
    assert compose_urls, f"no datasource points at a compose service: {urls}"
    for url in compose_urls:
        host, port, _ = url_port(url)
        assert port in service_ports(compose["services"][host]), f"{url}: {host} does not listen on {port}"
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers, "no dashboard provider"
    for provider in providers:
        folder = host_path(grafana, provider["options"]["path"])
        assert folder is not None and list(folder.glob("*.json")), f"dashboards path {provider['options']['path']} is empty"
    home = host_path(grafana, environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file()
    json.loads(home.read_text())
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


# ============================================================================ the image
def test_dockerfile_installs_the_project_with_pinned_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = DOCKERFILE.read_text()
    instructions = [re.sub(r"\\\n\s*", " ", block).strip()
                    for block in re.split(r"\n(?=[A-Z]+ )", re.sub(r"^#.*\n", "", text, flags=re.M))]
    base = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", text)
    assert base and "FROM ${PYTHON_IMAGE}" in text
    assert f"{base.group(1)}" == f"{sys.version_info.major}.{sys.version_info.minor}", \
        "every Ray node and driver runs the Python minor version the project is tested with"
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)

    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    copied = []
    for ins in instructions:
        if ins.startswith("COPY "):
            *sources, _ = ins.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                files = [src] if (ROOT / src).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*")
                                                               if p.is_file() and "__pycache__" not in p.parts]
                kept = [f for f in files if not dockerignore_excludes(f, ignore)]
                assert kept, f"COPY {src}: .dockerignore keeps nothing of it"
                # Docker 20.10's legacy builder (Debian's docker.io) must cut the context alike.
                lost = [f for f in kept if dockerignore_excludes(f, ignore, legacy=True)]
                assert not lost, f"COPY {src}: the legacy builder's context loses {lost[:5]}"
                copied += kept
    top = sorted({name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]})
    assert top == ["actors", "learners", "protos"]
    for package in top:
        for init in (ROOT / package).rglob("__init__.py"):
            assert str(init.relative_to(ROOT)) in copied, f"package {init.parent} is not copied into the image"
        sources = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
                   if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and "__pycache__" not in p.parts]
        assert set(sources) <= set(copied), f"{package}: {sorted(set(sources) - set(copied))} not copied"
    assert "protos/distill.proto" in copied and not any(c.endswith("_pb2.py") for c in copied), \
        "the image compiles the stubs itself"
    for needed in ("pyproject.toml", "setup.py", pyproject["project"]["readme"], "deploy/constraints.txt"):
        assert needed in copied, f"{needed} is not in the image's build context"

    run = " ".join(i for i in instructions if i.startswith("RUN "))
    assert '--index-url "$TORCH_INDEX_URL"' in run and "-c /tmp/constraints.txt torch" in run
    assert "pip install -r /tmp/constraints.txt" in run and "pip install --no-deps /src" in run and "pip check" in run
    assert "mdpo train --help" in run, "the build fails if `mdpo` is not on PATH"
    assert re.search(r"apt-get install [^&]*\bcurl\b", run), "the compose health checks use curl"
    assert re.search(r"^USER ray$", text, re.M) and re.search(r"^ENV RAY_AUTH_MODE=token$", text, re.M)
    assert "/runs" in run and "/ray-auth" in run, "volume mount points owned by the image's user"


def test_constraints_pin_every_dependency():
    closure = load_script(ROOT / "deploy" / "docker" / "pin_constraints.py").closure
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for text in pyproject["project"]["dependencies"]:
        req = Requirement(text)
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"{req.name} is a dependency but not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req.name}=={pins[key]} violates {req.specifier}"
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert not exact or exact == [pins[key]], f"{req.name}: pinned {pins[key]}, pyproject says {exact}"
    missing = set(closure()) - set(pins)
    assert not missing, f"run-time dependencies missing from deploy/constraints.txt (regenerate it): {sorted(missing)}"


# =========================================================================== KubeRay
def test_kuberay_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all(KUBERAY_FILE.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    job, pvc = kinds["RayJob"], kinds["PersistentVolumeClaim"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    import ray

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    assert cluster["rayVersion"] == ray.__version__ and ray_pin.specifier.contains(cluster["rayVersion"])
    assert cluster["authOptions"]["mode"] == "token", "Ray token authentication stays on in Kubernetes too"
    assert spec["submissionMode"] == "K8sJobMode"

    compose = load_compose()
    images = {compose["services"]["ray-head"]["image"], compose["services"]["ray-learner-gpu-0"]["image"]}

    # the entry point: the same `mdpo train` as the compose job
    entry = shell_commands(["sh", "-c", spec["entrypoint"]], {})
    assert len(entry) == 1
    _, cfg = parse_mdpo(entry[0])
    assert cfg.grpc_host == "node" and cfg.metrics_host == "0.0.0.0" and not cfg.progress
    # A retry budget, and a fixed run directory so that a retry continues the run (mdpo train is idempotent on it);
    # the learners' channel checks the token KubeRay sets in every Ray container.
    assert spec["backoffLimit"] >= 1 and "$(" not in spec["entrypoint"]
    assert cfg.grpc_token_env == "RAY_AUTH_TOKEN"

    head = cluster["headGroupSpec"]
    head_pod = head["template"]["spec"]
    head_c = head_pod["containers"][0]
    _, head_params = parse_ray(kuberay_ray_start(head, head=True))
    assert head_params["num_cpus"] == 0 and head_params["num_gpus"] == 0, "the head runs the driver, not actors"
    mount = next(m for m in head_c["volumeMounts"] if PurePosixPath(cfg.run_dir).is_relative_to(m["mountPath"]))
    volume = next(v for v in head_pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], "run directories must persist"
    assert head_pod["securityContext"]["fsGroup"] == 1000

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    key, value = ROLLOUT_NODE_LABEL
    learner_groups = [g for g in groups.values() if (g.get("resources") or {}).get("learner")]
    rollout_groups = [g for g in groups.values() if (g.get("labels") or {}).get(key) == value]
    assert len(learner_groups) == 1 and len(rollout_groups) == 1 and len(groups) == 2
    learner, rollout = learner_groups[0], rollout_groups[0]
    assert learner["resources"] == {"learner": "1"}, "one learner per node"
    assert learner["replicas"] == learner["minReplicas"] >= NUM_LEARNERS
    gpu_c = learner["template"]["spec"]["containers"][0]
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu_c["image"] == "mdpo:cuda"
    assert rollout["template"]["spec"]["containers"][0]["image"] == head_c["image"] == "mdpo:cpu"
    assert {gpu_c["image"], head_c["image"]} == images, "the same images as docker-compose.yml"
    assert "nvidia.com/gpu" not in rollout["template"]["spec"]["containers"][0]["resources"]["limits"]

    for group, is_head in [(head, True), (learner, False), (rollout, False)]:
        _, params = parse_ray(kuberay_ray_start(group, head=is_head))
        if not is_head:
            assert not params["head"] and params["address"]
        container = group["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            ports = {params["dashboard_agent_listen_port"]} | ({params["dashboard_port"]} if is_head else set())
            assert get["port"] in ports and get["path"] in ("/api/gcs_healthz", "/api/healthz", "/api/local_raylet_healthz")
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm")
        dshm_mount = next(m for m in container["volumeMounts"] if m["name"] == "dshm")
        assert dshm_mount["mountPath"] == "/dev/shm" and shm["emptyDir"]["medium"] == "Memory"
        assert int(shm["emptyDir"]["sizeLimit"].rstrip("Gi")) * 2**30 > params["object_store_memory"]
    _, learner_params = parse_ray(kuberay_ray_start(learner, head=False))
    assert json.loads(learner_params["resources"]) == {"learner": 1}
    _, rollout_params = parse_ray(kuberay_ray_start(rollout, head=False))
    assert rollout_params["labels"] == f"{key}={value}"


# ==================================================================== ray job docs
def working_dir_package(tmp_path: Path, include_gitignore: bool) -> set[str]:
    """The files Ray's own packaging uploads for `--working-dir . --runtime-env deploy/runtime_env.yaml`."""
    import zipfile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    excludes = ray_constants.get_runtime_env_default_excludes() + runtime_env["excludes"]
    target = tmp_path / f"pkg-{include_gitignore}.zip"
    create_package(str(ROOT), target, include_gitignore=include_gitignore, excludes=excludes)
    with zipfile.ZipFile(target) as zf:
        return {n.rstrip("/") for n in zf.namelist()}


def test_runtime_env_uploads_the_code_with_its_stubs(tmp_path):
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(runtime_env) <= {"excludes", "env_vars"}, "the working_dir itself comes from --working-dir ."
    stubs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").glob("*_pb2*.py"))
    assert stubs, "run `make setup` (pip install -e .) first: it generates the gRPC stubs"
    uploaded = working_dir_package(tmp_path, include_gitignore=False)   # RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
    code = [str(p.relative_to(ROOT)) for pkg in ("actors", "learners", "protos") for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts]
    assert set(code) <= uploaded and set(stubs) <= uploaded
    dropped = [n for n in uploaded if n.split("/")[0] in {"tests", "deploy", "runs", ".venv", ".git", ".pytest_cache"}
               or ".egg-info" in n or "__pycache__" in n]
    assert not dropped, f"uploaded needlessly: {dropped[:5]}"
    # why the docs ask for RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1: by default Ray drops the git-ignored stubs
    assert not set(stubs) & working_dir_package(tmp_path, include_gitignore=True)
    doc = (ROOT / "deploy" / "ray_job.md").read_text()
    assert "RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1" in doc and "--runtime-env deploy/runtime_env.yaml" in doc


