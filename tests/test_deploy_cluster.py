"""The compose topology, for real, without containers (there is no Docker engine here).

`ray start --head` plus a rollout node and two learner nodes, each started from its compose service's
own command (its ports remapped to free ones, each node on its own loopback address, the compose
volumes as directories), with Ray token authentication on and the token made by the compose
`ray-auth` command; the compose health checks decide when a node is up. Then the compose training
job's own `ray job submit -- mdpo train ...` (a short CartPole run) must end SUCCEEDED with a
summary.json, with every actor where the compose topology puts it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path, PurePosixPath

import pytest

from tests.deploy_helpers import (ROOT, RUNTIME_ENV, VENV_BIN, active_services, compose_commands, environment,
                                  flag_value, load_compose, named_volume_at, parse_ray, system_binary,
                                  train_command, url_port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_flags(argv: list[str], flags: dict[str, object]) -> list[str]:
    """argv with each `--flag=value` of `flags` replaced (or added)."""
    kept = [t for t in argv if t.split("=", 1)[0] not in flags]
    return kept + [f"{k}={v}" for k, v in flags.items()]


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag value` (space-separated, as in the mdpo command) replaced or added."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out + [flag, value]


class LocalComposeCluster:
    """The compose cluster as local processes: each compose service's own command, its named volumes as
    directories, its ports remapped to free ones, each node on its own loopback address."""

    def __init__(self, tmp_path: Path, services: dict[str, dict]):
        self.services, self.tmp = services, tmp_path
        self.volumes = {"ray-auth": tmp_path / "ray-auth", "runs": tmp_path / "runs"}
        for path in self.volumes.values():
            path.mkdir()
        self.temp_dir = Path(f"/tmp/ray_mdpo_{uuid.uuid4().hex[:8]}")   # Ray's socket paths must stay short
        self.marker = uuid.uuid4().hex
        net = int(self.marker[:2], 16) % 250 + 1
        self.next_ip = iter(f"127.77.{net}.{i}" for i in range(2, 250))
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, dict] = {}     # service -> ip, ports, log

    # -- compose -> local
    def local_path(self, svc: dict, container_path: str) -> Path:
        volume = named_volume_at(svc, container_path)
        assert volume is not None, f"{container_path} is on no named volume of the service"
        return self.volumes[volume[0]] / PurePosixPath(container_path).relative_to(volume[1])

    def env(self, name: str, **extra: str) -> dict[str, str]:
        svc = self.services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COMPOSE_"))}
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", MDPO_DEPLOY_TEST=self.marker,
                   RAY_AUTH_MODE="token")    # deploy/Dockerfile: ENV RAY_AUTH_MODE=token
        for key, value in environment(svc).items():
            env[key] = str(self.local_path(svc, value)) if value.startswith("/") and named_volume_at(svc, value) else value
        env.update(extra)
        return env

    def healthcheck(self, name: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> bool:
        """Run the service's compose health check (its ports remapped) until it passes (True) or the node's
        `ray start` exits (False)."""
        argv = list(self.services[name]["healthcheck"]["test"][1:])
        host, port, path = url_port(argv[-1])
        argv[-1] = f"http://{host}:{self.nodes[name]['ports'][port]}{path}"
        deadline = time.monotonic() + timeout_s
        while True:
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode == 0:
                return True
            if proc.poll() is not None:
                return False
            for other in self.procs:
                assert other.poll() is None, f"a Ray node exited: {self.log_tails()}"
            assert time.monotonic() < deadline, f"{name}: health check {argv} still failing: {result.stderr}\n{self.log_tails()}"
            time.sleep(1.0)

    def up(self, name: str, flags, attempts: int = 2) -> None:
        """Start a node from its compose command and wait for its compose health check. Ray gives a new node
        30 s to register its raylet; a 2-core machine busy with other work can miss that, so a node whose
        `ray start` gave up for that reason is started once more (fresh ports)."""
        for attempt in range(attempts):
            proc = self.start(name, flags())
            if self.healthcheck(name, proc):
                return
            log = Path(self.nodes[name]["log"]).read_text()
            self.procs.remove(proc)
            with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
            with_suppressed(proc.wait, timeout=10)
            assert "timed out during startup" in log and attempt + 1 < attempts, f"{name} did not start:\n{log[-3000:]}"

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n" + Path(i["log"]).read_text()[-1500:] for n, i in self.nodes.items())

    # -- lifecycle
    def make_token(self) -> str:
        name = "ray-auth"
        for _ in range(2):   # the second run must keep the first token
            argvs = compose_commands(self.services[name])
            result = subprocess.run(["sh", "-c", self.services[name]["command"][2]], env=self.env(name),
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and argvs[-1][:2] == ["ray", "get-auth-token"], result.stderr
            assert result.stdout == "", "the token must not end up in the service's log"
            token_file = self.local_path(self.services["ray-head"], environment(self.services["ray-head"])["RAY_AUTH_TOKEN_PATH"])
            token = token_file.read_text().strip()
            assert re.fullmatch(r"[0-9a-f]{64}", token) and token_file.stat().st_mode & 0o077 == 0
            if _ == 0:
                first = token
        assert token == first
        # README: how to read the token out of the head container to submit from the host
        shown = subprocess.run([str(VENV_BIN / "ray"), "get-auth-token"], env=self.env("ray-head"),
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.strip() == token, shown.stderr
        return token

    def start(self, name: str, flags: dict[str, object]) -> subprocess.Popen:
        argv, = compose_commands(self.services[name])
        ip = next(self.next_ip)
        agent = free_port()
        params = parse_ray(argv)[1]
        ports = {int(params["dashboard_agent_listen_port"]): agent}
        if "--dashboard-port" in flags:
            ports[int(params["dashboard_port"])] = int(flags["--dashboard-port"])
        argv = with_flags(argv, {"--node-ip-address": ip, "--dashboard-agent-listen-port": agent,
                                 "--metrics-export-port": free_port(), "--object-store-memory": 150_000_000,
                                 "--min-worker-port": 0, "--max-worker-port": 0, **flags})
        log = self.tmp / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=self.env(name), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        self.nodes[name] = {"ip": ip, "ports": ports, "log": log, "argv": argv}
        return proc

    def spawn(self, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        """A client command (from the repository root, as the docs run it), its output to a file."""
        out = self.tmp / f"client-{uuid.uuid4().hex[:6]}.log"
        with open(out, "w") as f:
            return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), out

    def finish(self, run: tuple[subprocess.Popen, Path], timeout_s: float) -> tuple[int, str]:
        proc, out = run
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{proc.args} did not finish in {timeout_s}s:\n{out.read_text()[-3000:]}") from None
        return code, out.read_text()

    def stop(self) -> None:
        """Stop only what this cluster started: its process groups, then any straggler carrying its marker."""
        for proc in reversed(self.procs):
            with_suppressed(os.killpg, proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3      # nothing to save: a short grace, then SIGKILL
        for proc in self.procs:
            with_suppressed(proc.wait, timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
            with_suppressed(proc.wait, timeout=5)
        marker = f"MDPO_DEPLOY_TEST={self.marker}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def with_suppressed(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (OSError, subprocess.TimeoutExpired):
        pass


# One interpreter instead of three `ray list` runs: the job's record, where its actors ran, the nodes' IPs.
STATE_SNAPSHOT = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
api, submission_id = sys.argv[1:3]
info = JobSubmissionClient(api).get_job_info(submission_id)
actors = list_actors(address=api, filters=[("job_id", "=", info.job_id)], detail=True, limit=1000)
print(json.dumps({"status": str(info.status.value), "entrypoint": info.entrypoint,
                  "actors": [[a.class_name, a.node_id] for a in actors],
                  "nodes": {n.node_id: n.node_ip for n in list_nodes(address=api, limit=100)}}))
"""


@pytest.mark.slow
def test_compose_topology_trains_a_job_submitted_with_ray_job_submit(tmp_path):
    """`ray start --head` + CPU worker + two learner nodes from the compose commands (cpu profile), token auth
    on, the compose health checks, then the compose job's `ray job submit -- mdpo train` (a short CartPole run)."""
    t0 = time.monotonic()
    system_binary("curl")     # the compose health checks
    services = active_services(load_compose(), "cpu")
    cluster = LocalComposeCluster(tmp_path, services)
    try:
        cluster.make_token()

        cluster.up("ray-head", lambda: {"--port": free_port(), "--dashboard-host": "127.0.0.1",
                                         "--dashboard-port": free_port(), "--ray-client-server-port": free_port(),
                                         "--temp-dir": cluster.temp_dir})
        head_argv = cluster.nodes["ray-head"]["argv"]
        gcs = f"{cluster.nodes['ray-head']['ip']}:{flag_value(head_argv, '--port')}"
        api = f"http://127.0.0.1:{flag_value(head_argv, '--dashboard-port')}"
        for name in ["ray-cpu-worker", "ray-learner-cpu-0", "ray-learner-cpu-1"]:
            cluster.up(name, lambda: {"--address": gcs})    # one at a time: 2 cores
        print(f"cluster up after {time.monotonic() - t0:.0f}s")

        # The compose training job, as its shell expands it, pointed at this cluster and shortened.
        submit_argv, submit = train_command(services["mdpo-train-cpu"])
        entry = list(submit["entrypoint"])
        run_dir = cluster.local_path(services["ray-head"], flag_value(entry, "--run-dir"))   # the driver runs on the head
        token_file = cluster.local_path(services["ray-head"], flag_value(entry, "--grpc-token-file"))
        for flag, value in [("--preset", "cartpole"), ("--run-dir", str(run_dir)), ("--grpc-token-file", str(token_file)),
                            ("--total-steps", "2048"),
                            ("--eval-every", "1"), ("--metrics-port", "0")]:
            entry = with_option(entry, flag, value)
        submission_id = f"mdpo-deploy-{uuid.uuid4().hex[:8]}"
        job_argv = with_flags(submit_argv[:submit_argv.index("--")], {"--address": api, "--submission-id": submission_id})
        ray = str(VENV_BIN / "ray")
        job_env = cluster.env("mdpo-train-cpu")
        # Meanwhile (2 cores: run the small ones alongside), token authentication turns away a client with
        # another token, and deploy/ray_job.md's working-dir route replaces the installed package with this
        # checkout's code and generated stubs.
        check = ("import os, learners, protos.distill_pb2 as pb; cwd = os.getcwd(); "
                 "assert learners.__file__.startswith(cwd) and pb.__file__.startswith(cwd), (cwd, pb.__file__); "
                 "assert not os.path.exists('tests'); print('working dir ok')")
        runs = {
            "train": cluster.spawn(job_argv + ["--"] + entry, job_env),
            "wrong-token": cluster.spawn([ray, "job", "submit", f"--address={api}", "--", "true"],
                                         {**job_env, "RAY_AUTH_TOKEN": "0" * 64}),
            "working-dir": cluster.spawn([ray, "job", "submit", f"--address={api}", "--working-dir", ".", "--runtime-env",
                                          str(RUNTIME_ENV.relative_to(ROOT)), "--", "python", "-c", check],
                                         {**job_env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}),
        }
        results = {name: cluster.finish(run, timeout_s=240) for name, run in runs.items()}
        code, log = results["train"]
        assert code == 0, f"the job failed:\n{log[-4000:]}\n{cluster.log_tails()}"
        code, log = results["wrong-token"]
        assert code != 0 and "Invalid authentication token" in log, log[-2000:]
        code, log = results["working-dir"]
        assert code == 0 and "working dir ok" in log, log[-3000:]
        print(f"jobs done after {time.monotonic() - t0:.0f}s")

        state = json.loads(subprocess.run([str(VENV_BIN / "python"), "-c", STATE_SNAPSHOT, api, submission_id],
                                          env=job_env, capture_output=True, text=True, timeout=120, check=True).stdout)
        assert state["status"] == "SUCCEEDED" and state["entrypoint"] == shlex.join(entry), state
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["completed"] and summary["iterations"] == 2
        assert [l["device"] for l in summary["learners"]] == ["cpu", "cpu"]    # no GPU here: learners fall back to CPU

        # Placement: each learner on its own learner node, rollout actors (which host the evaluators) on the CPU
        # worker.
        where: dict[str, list[str]] = {}
        for class_name, node_id in state["actors"]:
            where.setdefault(class_name, []).append(state["nodes"][node_id])
        ip = {name: info["ip"] for name, info in cluster.nodes.items()}
        assert sorted(where["LearnerWorker"]) == sorted([ip["ray-learner-cpu-0"], ip["ray-learner-cpu-1"]]), where
        assert set(where["RolloutWorker"]) == {ip["ray-cpu-worker"]} and set(where) == {"LearnerWorker", "RolloutWorker"}, where

        # The metrics endpoints Prometheus scrapes in compose (--metrics-host 0.0.0.0) carry the nodes' addresses.
        from learners.telemetry.metrics import TARGETS_FILE

        role_ip = {"coordinator": {ip["ray-head"]}, "learner": set(where["LearnerWorker"]),
                   "actor": {ip["ray-cpu-worker"]}, "evaluator": {ip["ray-cpu-worker"]}}
        groups = json.loads((run_dir / TARGETS_FILE).read_text())
        assert {g["labels"]["role"] for g in groups} == set(role_ip)
        for group in groups:
            for target in group["targets"]:
                assert target.rsplit(":", 1)[0] in role_ip[group["labels"]["role"]], (group, ip)
    finally:
        cluster.stop()
    print(f"compose topology test: {time.monotonic() - t0:.0f}s")
