"""Build the compose cluster's images without Docker Hub: for a machine behind a proxy or offline.

`docker compose up` builds `mdpo:cpu` from `python:3.11-slim-bookworm` and pulls `prom/prometheus`; both
come from Docker Hub. Where Docker Hub cannot be reached but Debian's package mirror and PyPI can (our
CI machines, many company networks), this script builds stand-ins from Debian packages:

  - a Python 3.11 base: a minimal Debian bookworm root file system (debootstrap) with python3 and venv,
    carrying the host's extra CA certificates (a TLS-intercepting proxy's) so pip inside trusts it;
  - `mdpo:cpu`: deploy/Dockerfile unchanged, on that base, with torch's CPU wheel served from the
    host's own pip configuration (pip download on the host, a local index over loopback) so the
    build never fetches a multi-GB CUDA build;
  - a Prometheus image from Debian's `prometheus` package with the official image's entrypoint,
    user and paths (deploy/docker/compose-standins.yml points the compose file's `prometheus` at it).

Each image carries a label with a hash of what went into it, and is rebuilt only when that changes
(the Dockerfile, deploy/constraints.txt, the package's files, this script). Run as root (debootstrap):

    .venv/bin/python deploy/docker/build_images.py          # then:
    COMPOSE_PROFILES=cpu docker compose -f docker-compose.yml -f deploy/docker/compose-standins.yml \\
        up -d ray-auth ray-head ray-cpu-worker ray-learner-cpu-0 ray-learner-cpu-1 prometheus mdpo-train-cpu

There is no Grafana package in Debian: the `grafana` service needs Docker Hub.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LABEL = "mdpo.content-hash"
BASE_TAG = "mdpo-standin/python:3.11-bookworm"
PROMETHEUS_TAG = "mdpo-standin/prometheus:debian"
MDPO_TAG = "mdpo:cpu"
DEBIAN_MIRROR = os.environ.get("MDPO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the base needs beyond minbase: the Dockerfile runs `python -m venv` and apt-get over https-free mirrors.
BASE_PACKAGES = ["python3", "python3-venv", "python-is-python3", "ca-certificates"]
BASE_RECIPE = "1"   # bump when build_base() changes what it makes
TORCH_INDEX_PORT = 47813
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)

PROMETHEUS_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
# Debian's Prometheus with the official image's layout: entrypoint /bin/prometheus (/bin is /usr/bin), user nobody, data in
# /prometheus; wget for the compose health check (the official image has busybox's).
RUN apt-get update \\
    && apt-get install -y --no-install-recommends prometheus wget \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Built:
    tag: str
    content_hash: str
    seconds: float  # 0.0 when the cached image was kept


def log(message: str) -> None:
    print(f"[build_images {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kwargs)
    except subprocess.CalledProcessError as err:
        raise BuildError(f"`{' '.join(cmd[:4])} ...` failed with exit code {err.returncode}") from None


def image_id(tag: str) -> str | None:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def replacing(tag: str):
    """Around a rebuild of `tag`: the image it replaces is removed after (a 2 GB leftover each time otherwise); kept
    where a container or another image still uses it."""
    old = image_id(tag)
    yield
    if old and old != image_id(tag):
        subprocess.run(["docker", "rmi", old], capture_output=True)


def image_hash(tag: str) -> str | None:
    out = subprocess.run(["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{LABEL}"}}}}', tag],
                         capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def host_extra_certificates(base_bundle: str) -> list[str]:
    """The host's trusted certificates that Debian's bundle lacks (a proxy's CA, a company CA)."""
    if not HOST_CA_BUNDLE.exists():
        return []
    known = set(PEM.findall(base_bundle))
    return [pem for pem in PEM.findall(HOST_CA_BUNDLE.read_text()) if pem not in known]


def build_base(force: bool = False) -> Built:
    host_bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    content = digest(BASE_RECIPE.encode(), " ".join(BASE_PACKAGES).encode(), DEBIAN_MIRROR.encode(), host_bundle)
    if not force and image_hash(BASE_TAG) == content:
        return Built(BASE_TAG, content, 0.0)
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed: `apt-get install debootstrap` (Debian/Ubuntu), then rerun")
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root: rerun as root (sudo)")
    start = time.monotonic()
    with replacing(BASE_TAG), tempfile.TemporaryDirectory(prefix="mdpo-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap bookworm ({DEBIAN_MIRROR}) into {rootfs} ...")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
             str(rootfs), DEBIAN_MIRROR], stdout=subprocess.DEVNULL)
        extra = host_extra_certificates((rootfs / "etc/ssl/certs/ca-certificates.crt").read_text())
        for i, pem in enumerate(extra):
            (rootfs / f"usr/local/share/ca-certificates/host-{i}.crt").write_text(pem + "\n")
        if extra:
            log(f"adding {len(extra)} CA certificate(s) the host trusts and Debian does not")
            run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   # pip uses its own certifi bundle unless told otherwise: point it at the system's.
                   "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                   "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                   f"LABEL {LABEL}={content}", 'CMD ["python3"]']
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        cmd = ["docker", "import"] + [arg for change in changes for arg in ("--change", change)] + ["-", BASE_TAG]
        imported = subprocess.run(cmd, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise BuildError(f"importing the root file system as {BASE_TAG} failed")
    return Built(BASE_TAG, content, time.monotonic() - start)


def build_prometheus(base: Built, force: bool = False) -> Built:
    content = digest(PROMETHEUS_DOCKERFILE.encode(), base.content_hash.encode())
    if not force and image_hash(PROMETHEUS_TAG) == content:
        return Built(PROMETHEUS_TAG, content, 0.0)
    start = time.monotonic()
    log(f"building {PROMETHEUS_TAG} from Debian's prometheus package ...")
    with replacing(PROMETHEUS_TAG), tempfile.TemporaryDirectory(prefix="mdpo-prom-") as ctx:
        (Path(ctx) / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE)
        run(["docker", "build", "-q", "--build-arg", f"BASE={base.tag}", "--label", f"{LABEL}={content}",
             "-t", PROMETHEUS_TAG, ctx], stdout=subprocess.DEVNULL)
    return Built(PROMETHEUS_TAG, content, time.monotonic() - start)


def context_files() -> list[Path]:
    """What deploy/Dockerfile copies from the build context (the package, its build files, the pins)."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "actors", "learners", "protos"], cwd=ROOT,
                             capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        package = [ROOT / p for p in tracked.stdout.split("\0") if p]
    else:  # not a git checkout (an unpacked release): every file of the package directories
        package = [p for d in ("actors", "learners", "protos") for p in (ROOT / d).rglob("*") if p.is_file()]
    fixed = [ROOT / name for name in ("deploy/Dockerfile", "deploy/constraints.txt", ".dockerignore",
                                      "pyproject.toml", "setup.py", "README.md", "LICENSE")]
    return sorted(p for p in fixed + package if p.exists() and "__pycache__" not in p.parts)


def torch_pin() -> str:
    for line in (ROOT / "deploy/constraints.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.strip()
    raise BuildError("deploy/constraints.txt pins no torch: regenerate it with deploy/docker/pin_constraints.py")


@contextlib.contextmanager
def local_torch_index(pip: str):
    """A loopback package index holding the host pip's torch wheel, which must be a CPU build."""
    with tempfile.TemporaryDirectory(prefix="mdpo-torch-index-") as root:
        wheels = Path(root) / "torch"
        wheels.mkdir()
        pin = torch_pin()
        log(f"pip download {pin} with the host's pip configuration ...")
        run([pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
             "-d", str(wheels), pin])
        found = sorted(wheels.glob("torch-*.whl"))
        if not found or not all("+cpu" in w.name for w in found):
            raise BuildError(f"the host's pip gave {[w.name for w in found]} for {pin}, not a CPU build (+cpu): "
                             "point pip at the PyTorch CPU index (pip config set global.extra-index-url "
                             "https://download.pytorch.org/whl/cpu) or pass --torch-index-url")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
        handler.log_message = lambda *args: None
        try:    # the same URL every time: a build argument that changes misses Docker's layer cache
            server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            # A plain directory listing is a valid simple index: /torch/ lists the wheel's link.
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


def build_mdpo(base: Built, torch_index_url: str | None = None, pip: str = "pip", force: bool = False) -> Built:
    files = context_files()
    content = digest(base.content_hash.encode(), *(str(p.relative_to(ROOT)).encode() for p in files),
                     *(p.read_bytes() for p in files))
    if not force and image_hash(MDPO_TAG) == content:
        return Built(MDPO_TAG, content, 0.0)
    start = time.monotonic()
    with replacing(MDPO_TAG), contextlib.ExitStack() as stack:
        index = torch_index_url or stack.enter_context(local_torch_index(pip))
        log(f"building {MDPO_TAG} from deploy/Dockerfile on {base.tag} (torch from {index}) ...")
        # Host networking: the build reaches the loopback index (and the registries as the host does).
        run(["docker", "build", "--network", "host", "-f", "deploy/Dockerfile",
             "--build-arg", f"PYTHON_IMAGE={base.tag}", "--build-arg", f"TORCH_INDEX_URL={index}",
             "--label", f"{LABEL}={content}", "-t", MDPO_TAG, "."], cwd=ROOT, stdout=sys.stderr)
    return Built(MDPO_TAG, content, time.monotonic() - start)


def build_all(force: bool = False, torch_index_url: str | None = None, pip: str = "pip") -> list[Built]:
    if shutil.which("docker") is None:
        raise BuildError("no `docker` command: install Docker (Debian: apt-get install docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise BuildError("the Docker engine does not answer (`docker info` fails): start dockerd, then rerun")
    base = build_base(force)
    return [base, build_prometheus(base, force), build_mdpo(base, torch_index_url, pip, force)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even where the cached image matches")
    parser.add_argument("--torch-index-url", help="a package index with torch's CPU wheel, instead of the "
                                                  "host pip's wheel served over loopback")
    parser.add_argument("--pip", default=str(Path(sys.executable).parent / "pip"),
                        help="the pip whose configuration finds torch's CPU wheel (default: this Python's)")
    args = parser.parse_args(argv)
    try:
        for built in build_all(args.force, args.torch_index_url, args.pip):
            state = f"built in {built.seconds:.0f} s" if built.seconds else "cached"
            print(f"{built.tag}  {LABEL}={built.content_hash}  {state}")
    except BuildError as err:
        print(f"build_images: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
