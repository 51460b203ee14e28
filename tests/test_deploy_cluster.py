"""The compose topology, for real, without containers (there is no Docker engine here), on hosts of their own.

`ray start --head`, a rollout node and learner nodes, each started from its compose service's own command on
the compose ports, each on a host with its own address (a network namespace, tests/netns.py), the compose volumes
as directories, with Ray token authentication on and the token made by the compose `ray-auth` command; the
compose health checks decide when a node is up. Then the compose training job's own `ray job submit -- mdpo
train ...` (a CartPole run), from a host of its own, must end SUCCEEDED with a summary.json and every actor where
the compose topology puts it, the learners' gRPC servers bound to their hosts' addresses with the token on,
though one learner host is partitioned mid-run (`docker compose up --scale ray-learner-cpu-1=2` gives the run
the spare learner node it moves to).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path, PurePosixPath

import pytest

from tests.deploy_helpers import (ROOT, RUNTIME_ENV, VENV_BIN, active_services, compose_commands, environment,
                                  flag_value, load_compose, named_volume_at, started_learners, system_binary,
                                  train_command)
from tests.helpers import FAULT_REPORT
from tests.netns import Host, Network


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
    """The compose cluster as local processes, each compose service on a host of its own (a network namespace with
    its own address, tests/netns.py) running the service's own command on the compose ports; the named volumes are
    directories."""

    def __init__(self, tmp_path: Path, services: dict[str, dict], net: Network):
        self.services, self.tmp, self.net = services, tmp_path, net
        self.volumes = {"ray-auth": tmp_path / "ray-auth", "runs": tmp_path / "runs"}
        for path in self.volumes.values():
            path.mkdir()
        self.temp_dir = Path(f"/tmp/ray_mdpo_{uuid.uuid4().hex[:8]}")   # Ray's socket paths must stay short
        self.marker = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, dict] = {}     # node name -> host, log, argv

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

    def healthcheck(self, node: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> bool:
        """Run the service's compose health check inside the node's host until it passes (True) or the node's
        `ray start` exits (False)."""
        argv = self.nodes[node]["host"].argv(self.services[self.nodes[node]["service"]]["healthcheck"]["test"][1:])
        deadline = time.monotonic() + timeout_s
        while True:
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode == 0:
                return True
            if proc.poll() is not None:
                return False
            for other in self.procs:
                assert other.poll() is None, f"a Ray node exited: {self.log_tails()}"
            assert time.monotonic() < deadline, f"{node}: health check {argv} still failing: {result.stderr}\n{self.log_tails()}"
            time.sleep(1.0)

    def up(self, node: str, flags: dict[str, object], service: str | None = None, attempts: int = 2) -> None:
        """Start a node (on a new host) from its compose service's command and wait for the compose health check.
        Ray gives a new node 30 s to register its raylet; a 2-core machine busy with other work can miss that, so
        a node whose `ray start` gave up for that reason is started once more."""
        host = self.net.add_host(node)
        for attempt in range(attempts):
            proc = self.start(node, service or node, host, flags)
            if self.healthcheck(node, proc):
                return
            log = Path(self.nodes[node]["log"]).read_text()
            self.procs.remove(proc)
            with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
            with_suppressed(proc.wait, timeout=10)
            assert "timed out during startup" in log and attempt + 1 < attempts, f"{node} did not start:\n{log[-3000:]}"

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

    def start(self, node: str, service: str, host: Host, flags: dict[str, object]) -> subprocess.Popen:
        argv, = compose_commands(self.services[service])
        # The compose command on the compose ports (the host is its own); only the object store is made smaller:
        # /dev/shm is shared by every host here.
        argv = with_flags(argv, {"--node-ip-address": host.ip, "--object-store-memory": 150_000_000, **flags})
        log = self.tmp / f"{node}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(host.argv(argv), env=self.env(service), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        self.nodes[node] = {"host": host, "service": service, "log": log, "argv": argv}
        return proc

    def spawn(self, host: Host, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        """A client command on `host` (from the repository root, as the docs run it), its output to a file."""
        out = self.tmp / f"client-{uuid.uuid4().hex[:6]}.log"
        with open(out, "w") as f:
            return subprocess.Popen(host.argv(argv), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), out

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
                  "actors": [[a.class_name, a.node_id, a.state] for a in actors],
                  "nodes": {n.node_id: n.node_ip for n in list_nodes(address=api, limit=100)}}))
"""

BATCH = 1024              # cartpole preset: 8 envs x 128 steps
ITERATIONS = 6
CUT_AFTER = 2             # iterations logged before the learner host is partitioned
HANG_TIMEOUT_S = 12       # the coordinator's bound (--hang-timeout-s); the peers' gRPC deadline is 8 s
FAILURE_LINE = re.compile(r"^(\S+ \S+) ERROR mdpo: iteration \d+ failed .*$", re.M)


def metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, timeout_s: float, proc: subprocess.Popen, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, f"the job ended ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_compose_topology_on_separate_hosts_trains_through_a_learner_host_partition(tmp_path):
    """Head, CPU worker and three learner nodes (two + the spare `--scale ray-learner-cpu-1=2` adds) from the
    compose commands (cpu profile), each on its own host; token auth on, the compose health checks, then the
    compose job's `ray job submit -- mdpo train` from a client host. Mid-run the host of learner 1 is cut off:
    the run must see it within the bound, move that learner to the spare node and finish with every iteration
    counted once."""
    t0 = time.monotonic()
    system_binary("curl")     # the compose health checks
    services = active_services(load_compose(), "cpu")
    net = Network()
    cluster = LocalComposeCluster(tmp_path, services, net)
    try:
        cluster.make_token()
        cluster.up("ray-head", {"--temp-dir": cluster.temp_dir})
        head_argv = cluster.nodes["ray-head"]["argv"]
        head_ip = cluster.nodes["ray-head"]["host"].ip
        gcs = f"{head_ip}:{flag_value(head_argv, '--port')}"
        api = f"http://{head_ip}:{flag_value(head_argv, '--dashboard-port')}"
        for node, service in [("ray-cpu-worker", None), ("ray-learner-cpu-0", None), ("ray-learner-cpu-1", None),
                              ("ray-learner-cpu-1-2", "ray-learner-cpu-1")]:
            cluster.up(node, {"--address": gcs}, service)    # one at a time: 2 cores
        client = net.add_host("mdpo-train-cpu")
        print(f"cluster up after {time.monotonic() - t0:.0f}s")

        # The compose training job, as its shell expands it, pointed at this cluster, with hang bounds a test can wait
        # out.
        submit_argv, submit = train_command(services["mdpo-train-cpu"])
        entry = list(submit["entrypoint"])
        run_dir = cluster.local_path(services["ray-head"], flag_value(entry, "--run-dir"))   # the driver runs on the head
        token_file = cluster.local_path(services["ray-head"], flag_value(entry, "--grpc-token-file"))
        for flag, value in [("--preset", "cartpole"), ("--run-dir", str(run_dir)), ("--grpc-token-file", str(token_file)),
                            ("--total-steps", str(ITERATIONS * BATCH)), ("--checkpoint-every", "2"),
                            ("--eval-every", "2"), ("--metrics-port", "0"), ("--rpc-timeout-s", "8"),
                            ("--sync-timeout-s", "8"), ("--hang-timeout-s", str(HANG_TIMEOUT_S))]:
            entry = with_option(entry, flag, value)
        submission_id = f"mdpo-deploy-{uuid.uuid4().hex[:8]}"
        job_argv = with_flags(submit_argv[:submit_argv.index("--")], {"--address": api, "--submission-id": submission_id})
        ray = str(VENV_BIN / "ray")
        job_env = cluster.env("mdpo-train-cpu")
        train = cluster.spawn(client, job_argv + ["--"] + entry, job_env)
        job, job_log = train

        # The learners' gRPC servers listen on their hosts' addresses only (--grpc-host node), token on.
        learners = wait_until(lambda: len(found := dict(started_learners(job_log.read_text()))) == 2 and found, 180,
                              job, "the learners' addresses", job_log)
        hosts = {i: net.host_of(ip) for i, (ip, _) in learners.items()}
        assert len({h.name for h in hosts.values()}) == 2 and all(h.name.startswith("ray-learner") for h in hosts.values())
        for i, (ip, port) in learners.items():
            assert f"{ip}:{port}" in net.listening(hosts[i]) and f"0.0.0.0:{port}" not in net.listening(hosts[i])

        # Meanwhile (2 cores: run the small ones alongside), token authentication turns away a client with
        # another token, and deploy/ray_job.md's working-dir route replaces the installed package with this
        # checkout's code and generated stubs.
        check = ("import os, learners, protos.distill_pb2 as pb; cwd = os.getcwd(); "
                 "assert learners.__file__.startswith(cwd) and pb.__file__.startswith(cwd), (cwd, pb.__file__); "
                 "assert not os.path.exists('tests'); print('working dir ok')")
        side = {
            "wrong-token": cluster.spawn(client, [ray, "job", "submit", f"--address={api}", "--", "true"],
                                         {**job_env, "RAY_AUTH_TOKEN": "0" * 64}),
            "working-dir": cluster.spawn(client, [ray, "job", "submit", f"--address={api}", "--working-dir", ".",
                                                  "--runtime-env", str(RUNTIME_ENV.relative_to(ROOT)), "--", "python",
                                                  "-c", check], {**job_env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}),
        }

        # The partition: learner 1's host drops off the network mid-run (its processes keep running).
        wait_until(lambda: len(metrics_lines(run_dir)) >= CUT_AFTER, 240, job, f"{CUT_AFTER} iterations", job_log)
        cut = hosts[1]
        net.cut(cut)
        t_cut = time.time()
        failed = wait_until(lambda: FAILURE_LINE.search(job_log.read_text()), HANG_TIMEOUT_S + 30, job,
                            "the partition to be detected", job_log)
        # Seen within the bound, by the driver's own clock (its log line's time; same machine): a hang, not a death.
        detected_s = datetime.strptime(failed[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t_cut
        print(f"partition of {cut.name} detected after {detected_s:.1f}s: {failed[0][:200]}")
        assert detected_s <= HANG_TIMEOUT_S + 1 and "failed (hang" in failed[0], failed[0]

        results = {name: cluster.finish(run, timeout_s=240) for name, run in {"train": train, **side}.items()}
        code, log = results["train"]
        assert code == 0, f"the job failed:\n{log[-4000:]}\n{cluster.log_tails()}"
        code, log_ = results["wrong-token"]
        assert code != 0 and "Invalid authentication token" in log_, log_[-2000:]
        code, log_ = results["working-dir"]
        assert code == 0 and "working dir ok" in log_, log_[-3000:]
        print(f"jobs done after {time.monotonic() - t0:.0f}s")

        state = json.loads(subprocess.run(client.argv([str(VENV_BIN / "python"), "-c", STATE_SNAPSHOT, api, submission_id]),
                                          env=job_env, capture_output=True, text=True, timeout=120, check=True).stdout)
        assert state["status"] == "SUCCEEDED" and state["entrypoint"] == shlex.join(entry), state
        summary = json.loads((run_dir / "summary.json").read_text())
        records = metrics_lines(run_dir)
        assert summary["completed"] and summary["iterations"] == ITERATIONS
        assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1)), "an iteration was lost or logged twice"
        assert summary["env_steps"]["per_agent"] == [ITERATIONS * BATCH] * 2
        assert [r["env_steps"] for r in records] == [BATCH * i for i in range(1, ITERATIONS + 1)]
        assert summary["failures_recovered"] >= 1 and summary["hangs_detected"] >= 1, summary
        assert [l["device"] for l in summary["learners"]] == ["cpu", "cpu"]    # no GPU here: learners fall back to CPU
        FAULT_REPORT.append(("learner host partitioned (multi-host cluster)", 1, int(summary["completed"]),
                             abs(2 * ITERATIONS * BATCH - summary["env_steps"]["total"])))

        # Placement: each learner on a learner node of its own, before the cut and after it (then not on the cut host:
        # the spare took its place), rollout actors (which host the evaluators) on the CPU worker.
        where: dict[str, list[str]] = {}
        for class_name, node_id, actor_state in state["actors"]:
            if node_id is None:     # created during the recovery but killed before Ray placed it: it ran nowhere
                assert actor_state == "DEAD", state["actors"]
                continue
            where.setdefault(class_name, []).append(state["nodes"][node_id])
        ip = {name: info["host"].ip for name, info in cluster.nodes.items()}
        final = dict(started_learners(log))
        assert len({a for a, _ in final.values()}) == 2 and cut.ip not in {a for a, _ in final.values()}, (final, cut)
        assert sorted(where["LearnerWorker"]) == sorted([a for a, _ in learners.values()] + [a for a, _ in final.values()])
        assert {net.host_of(a).name for a in where["LearnerWorker"]} <= {"ray-learner-cpu-0", "ray-learner-cpu-1",
                                                                        "ray-learner-cpu-1-2"}, where
        assert set(where["RolloutWorker"]) == {ip["ray-cpu-worker"]} and set(where) == {"LearnerWorker", "RolloutWorker"}, where

        # The metrics endpoints Prometheus scrapes in compose (--metrics-host 0.0.0.0) carry the nodes' addresses.
        from learners.telemetry.metrics import TARGETS_FILE

        role_ip = {"coordinator": {head_ip}, "learner": {a for a, _ in final.values()},
                   "actor": {ip["ray-cpu-worker"]}, "evaluator": {ip["ray-cpu-worker"]}}
        groups = json.loads((run_dir / TARGETS_FILE).read_text())
        assert {g["labels"]["role"] for g in groups} == set(role_ip)
        for group in groups:
            for target in group["targets"]:
                assert target.rsplit(":", 1)[0] in role_ip[group["labels"]["role"]], (group, ip)
    finally:
        cluster.stop()
        net.close()
    print(f"multi-host compose topology test: {time.monotonic() - t0:.0f}s")

