"""`docker compose up` for real: the compose cluster's images built and run on a real Docker engine.

The README's CPU command, `COMPOSE_PROFILES=cpu docker compose up --scale ray-learner-cpu-1=2`, with the smoke
preset and a fixed MDPO_RUN, on the images deploy/Dockerfile builds. Docker Hub cannot be reached here, so the
images come from deploy/docker/build_images.py (a Debian base for the Dockerfile's PYTHON_IMAGE, a Debian
Prometheus, torch's CPU wheel from the host's pip), cached by content; Grafana has no Debian package and is left
out. Everything is checked from outside the containers, as a user would look: service exit codes, health states,
the `runs` volume, Prometheus' API, `docker kill` for the fault.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.deploy_helpers import ROOT, started_learners
from tests.helpers import FAULT_REPORT, system_tool

STANDINS = ROOT / "deploy/docker/compose-standins.yml"
PROJECT = "mdpo-compose-test"          # fixed: a run of this test cleans up what a killed earlier one left
RUN = "compose-smoke"
BATCH = 512                            # smoke preset: 8 envs x 64 steps
ITERATIONS = 4                         # its 2,048 steps
KILL_AFTER = 2                         # iterations in metrics.jsonl before a learner container is killed
SERVICES = ["ray-auth", "ray-head", "ray-cpu-worker", "ray-learner-cpu-0", "ray-learner-cpu-1", "prometheus",
            "mdpo-train-cpu"]          # every service of the cpu profile but Grafana (no image without Docker Hub)
LONG_RUNNING = ["ray-head", "ray-cpu-worker", "ray-learner-cpu-0", "ray-learner-cpu-1", "prometheus"]


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def docker_engine():
    """A running Docker engine: the machine's, or a dockerd started here and stopped afterwards (only then)."""
    system_tool("docker", "Debian package docker.io")
    system_tool("docker-compose", "Debian package docker-compose")
    started = None
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            pytest.fail("no Docker engine answers and starting dockerd needs root: start it, or run as root")
        system_tool("dockerd", "Debian package docker.io")
        log = open("/tmp/mdpo-test-dockerd.log", "ab")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
            assert started.poll() is None, f"dockerd exited ({started.returncode}): see /tmp/mdpo-test-dockerd.log"
            assert time.monotonic() < deadline, "dockerd did not answer within 60 s: see /tmp/mdpo-test-dockerd.log"
            time.sleep(0.5)
    yield
    if started is not None:
        started.terminate()
        try:
            started.wait(timeout=60)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
        # dockerd leaves its default network namespace mounted (/run/docker/netns/default) when it stops.
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounted if m.startswith(("/run/docker/", "/var/lib/docker"))), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        left = [m for m in Path("/proc/mounts").read_text().splitlines() if "/run/docker/" in m or "/var/lib/docker" in m]
        assert not left, f"still mounted after dockerd stopped: {left}"


@pytest.fixture(scope="module")
def images(docker_engine):
    """mdpo:cpu and the stand-ins, built once per machine (kept while their inputs are unchanged)."""
    system_tool("debootstrap", "Debian package debootstrap")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_images", ROOT / "deploy/docker/build_images.py")
    build_images = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build_images          # dataclasses look their module up there
    spec.loader.exec_module(build_images)
    t0 = time.monotonic()
    try:
        built = build_images.build_all(pip=str(ROOT / ".venv/bin/pip"))
    except build_images.BuildError as err:
        pytest.fail(f"building the images failed: {err}")
    print("images: " + ", ".join(f"{b.tag} {'built in %.0f s' % b.seconds if b.seconds else 'cached'}" for b in built)
          + f" ({time.monotonic() - t0:.0f} s)")
    return {b.tag: b for b in built}


class Compose:
    """One compose project on the repository's docker-compose.yml plus the stand-ins, with `docker compose` where the
    Compose v2 plugin exists and `docker-compose` (v1) otherwise."""

    def __init__(self, env: dict[str, str]):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
        self.base = (["docker", "compose"] if plugin else ["docker-compose"]) + [
            "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "-f", str(STANDINS)]
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MDPO_", "COMPOSE_", "RAY_"))}, **env}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(self.base + list(args), cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(self.base[:2])} {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return out

    def containers(self, service: str | None = None, all_states: bool = True) -> list[dict]:
        """`docker inspect` of the project's containers (of one service), by Docker's compose labels."""
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = docker("ps", "-q", *(["-a"] if all_states else []), *filters).stdout.split()
        return json.loads(docker("inspect", *ids).stdout) if ids else []

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={PROJECT}"
        return {kind: docker(*cmd, "--filter", label).stdout.split()
                for kind, cmd in {"containers": ("ps", "-aq"), "networks": ("network", "ls", "-q"),
                                  "volumes": ("volume", "ls", "-q")}.items()}


def ip_of(container: dict) -> str:
    (net,) = container["NetworkSettings"]["Networks"].values()
    return net["IPAddress"]


def service_of(container: dict) -> str:
    return container["Config"]["Labels"]["com.docker.compose.service"]


def volume_dir(name: str) -> Path:
    """The host directory of a named volume of the project: read from outside, as root."""
    return Path(json.loads(docker("volume", "inspect", f"{PROJECT}_{name}").stdout)[0]["Mountpoint"])


def prometheus(path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:9090{path}", timeout=5) as response:
        return json.loads(response.read())["data"]


def wait_for(condition, timeout_s: float, what: str, context=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{context()}")


@pytest.mark.slow
def test_build_context_holds_every_package_module(images):
    """The image's build context, as the machine's builder cuts it with .dockerignore, holds every module of the
    package: Docker 20.10's legacy builder dropped learners/'s subpackages under the old `!learners/*/*.py`."""
    base = images["mdpo-standin/python:3.11-bookworm"].tag
    tag = f"mdpo-context-check:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {base}\nCOPY . /ctx\n"
    try:
        docker("build", "-q", "-t", tag, "-f", "-", ".", input=dockerfile, cwd=ROOT)
        listed = docker("run", "--rm", tag, "find", "/ctx", "-type", "f").stdout.split()
    finally:
        docker("rmi", "-f", tag, check=False)
    context = {str(Path(p).relative_to("/ctx")) for p in listed}
    tracked = subprocess.run(["git", "ls-files", "actors", "learners", "protos"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked and set(tracked) <= context, f"missing from the build context: {sorted(set(tracked) - context)}"
    assert not {p for p in context if p.startswith(("tests/", ".git/", ".venv/"))}, "the context holds more than it needs"


@pytest.mark.slow
def test_compose_up_trains_the_smoke_run_through_a_killed_learner_container(images):
    """The README's CPU cluster (`COMPOSE_PROFILES=cpu docker compose up --scale ray-learner-cpu-1=2`) trains the smoke
    run to the end though a learner container is `docker kill`ed mid-run; `up` again on the finished run exits 0 at
    once; `down -v` leaves nothing of the project behind, pass or fail."""
    compose = Compose({"COMPOSE_PROFILES": "cpu", "MDPO_PRESET": "smoke", "MDPO_RUN": RUN})
    compose("down", "-v", "--remove-orphans", timeout=300)     # what a killed earlier run of this test left
    t0 = time.monotonic()
    try:
        # Detached: a foreground `up` never returns (the nodes and Prometheus run on); the train service's exit code
        # is the result. `up -d` returns once every service it depends on is healthy and it has started.
        compose("up", "-d", "--no-build", "--scale", "ray-learner-cpu-1=2", *SERVICES)
        (train,) = compose.containers("mdpo-train-cpu")
        t_up = time.monotonic() - t0
        runs = volume_dir("runs")
        run_dir = runs / RUN
        def job_log() -> str:
            out = docker("logs", train["Id"], check=False)
            return out.stdout + out.stderr

        # Every long-running service's health check turned healthy (compose started the job only after that).
        health = {(service_of(c), c["Name"]): c["State"].get("Health", {}).get("Status")
                  for c in compose.containers() if service_of(c) in LONG_RUNNING}
        assert len(health) == len(LONG_RUNNING) + 1 and set(health.values()) == {"healthy"}, health
        ips = {c["Name"].lstrip("/"): ip_of(c) for c in compose.containers() if c["State"]["Running"]}
        name_at = {ip: name for name, ip in ips.items()}

        def metrics() -> list[dict]:
            path = run_dir / "metrics.jsonl"
            return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

        wait_for(lambda: metrics(), 300, "the first iteration", job_log)
        t_first = time.monotonic() - t0
        learners = wait_for(lambda: len(found := dict(started_learners(job_log()))) == 2 and found, 60, "the learners", job_log)
        where = {i: name_at.get(ip) for i, (ip, _) in learners.items()}
        assert all(n and "ray-learner-cpu" in n for n in where.values()) and len(set(where.values())) == 2, (where, ips)

        # Prometheus (the container) scrapes the run's coordinator, learners and actors, and its rules loaded.
        def scraped() -> dict[str, list]:
            targets = [t for t in prometheus("/api/v1/targets")["activeTargets"] if t["labels"].get("job") == "mdpo"]
            up = {}
            for t in targets:
                if t["health"] == "up" and t["labels"].get("run_id", "").endswith(RUN):
                    up.setdefault(t["labels"]["role"], []).append(t["scrapeUrl"])
            return up if {"coordinator", "learner", "actor"} <= set(up) and len(up["learner"]) == 2 else {}
        up = wait_for(scraped, 60, "Prometheus to scrape the run's coordinator, learners and actors",
                      lambda: json.dumps(prometheus("/api/v1/targets"), indent=1)[-3000:])
        rules = [r["name"] for g in prometheus("/api/v1/rules")["groups"] for r in g["rules"]]
        assert rules and any(r.startswith("Mdpo") or "mdpo" in r.lower() for r in rules), rules
        print(f"Prometheus targets up: { {role: len(urls) for role, urls in up.items()} }, {len(rules)} rules")

        # The fault, through Docker: learner 1's container is killed mid-run.
        wait_for(lambda: len(metrics()) >= KILL_AFTER, 300, f"{KILL_AFTER} iterations", job_log)
        killed = where[1]
        docker("kill", killed)
        t_kill, wall_kill = time.monotonic(), time.time()
        code = int(docker("wait", train["Id"], timeout=600).stdout.strip())
        log = job_log()
        assert code == 0, f"mdpo-train-cpu exited {code}:\n{log[-6000:]}"
        t_done = time.monotonic() - t0
        assert re.search(r"Job '\S+' succeeded", log), log[-3000:]
        failed = re.search(r"^(\S+ \S+) ERROR mdpo: iteration \d+ failed \((\w+)", log, re.M)
        assert failed, f"the run never saw the kill:\n{log[-3000:]}"
        detected_s = datetime.strptime(failed[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_kill

        # What the run wrote to the `runs` volume.
        summary = json.loads((run_dir / "summary.json").read_text())
        records = metrics()
        assert summary["completed"] and summary["iterations"] == ITERATIONS, summary
        assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1)), "an iteration lost or counted twice"
        assert [r["env_steps"] for r in records] == [BATCH * i for i in range(1, ITERATIONS + 1)]
        assert summary["env_steps"]["per_agent"] == [ITERATIONS * BATCH] * 2
        assert len(summary["learners"]) == 2 and summary["failures_recovered"] >= 1, summary
        FAULT_REPORT.append(("learner container killed (docker kill, compose)", 1, int(summary["completed"]),
                             abs(2 * ITERATIONS * BATCH - summary["env_steps"]["total"])))

        # Placement, from the run's own records: the learners on learner containers (the killed one's replacement on
        # the spare), the rollout actors and evaluators on the worker, the driver on the head.
        final = {i: name_at.get(ip) for i, (ip, _) in dict(started_learners(log)).items()}
        assert len(set(final.values())) == 2 and killed not in final.values(), (final, killed)
        assert all(n and "ray-learner-cpu" in n for n in final.values()), (final, ips)
        groups = json.loads((run_dir / "prometheus_targets.json").read_text())
        placed: dict[str, set] = {}
        for g in groups:
            placed.setdefault(g["labels"]["role"], set()).update(name_at.get(t.rsplit(":", 1)[0]) for t in g["targets"])
        worker = {n for n in ips if "ray-cpu-worker" in n}
        assert placed["actor"] <= worker and placed["evaluator"] <= worker, (placed, ips)
        assert placed["coordinator"] == {n for n in ips if "ray-head" in n}, (placed, ips)
        assert placed["learner"] == set(final.values()), (placed, final, groups, ips)

        # `up` again on the finished run: the job exits 0 at once, changing nothing.
        before = (run_dir / "summary.json").read_bytes(), (run_dir / "metrics.jsonl").read_bytes()
        t_again = time.monotonic()
        compose("up", "-d", "--no-build", "--scale", "ray-learner-cpu-1=2", *SERVICES)
        code = int(docker("wait", train["Id"], timeout=300).stdout.strip())
        again_s = time.monotonic() - t_again
        log = job_log()[len(log):]
        assert code == 0 and "holds this run, finished" in log, log[-3000:]
        assert ((run_dir / "summary.json").read_bytes(), (run_dir / "metrics.jsonl").read_bytes()) == before
        print(f"compose: up {t_up:.0f} s, first iteration at {t_first:.0f} s, killed {killed} at "
              f"{t_kill - t0:.0f} s, seen {detected_s:.1f} s later ({failed[2]}), job done at {t_done:.0f} s, up again {again_s:.0f} s; "
              f"{summary['env_steps_per_second']:.0f} env steps/s over the run")
    finally:
        down = compose("down", "-v", "--remove-orphans", timeout=300, check=False)
        left = compose.leftovers()
        assert down.returncode == 0 and not any(left.values()), (down.stderr[-2000:], left)

