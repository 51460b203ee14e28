# Set-up is part of every target, so each one works on a fresh clone and is idempotent.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps smoke test test-fast protos gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard protos/*.proto)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# System packages the tests use: a real Prometheus (promtool), a Docker engine and Compose (docker.io,
# docker-compose: the compose cluster is built and run in tests/test_compose.py), debootstrap (its Debian base
# image: Docker Hub is out of reach), curl, iproute2 (network namespaces: the multi-host cluster test), nodejs and
# npm (the Grafana dashboard's schema check; not where npm is there already: NodeSource's nodejs bundles it and
# conflicts with Debian's npm).
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null \
			|| ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
			|| ! command -v curl >/dev/null || ! command -v ip >/dev/null || ! command -v node >/dev/null \
			|| ! command -v npm >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus docker.io docker-compose \
			debootstrap curl iproute2 $$(command -v npm >/dev/null || echo nodejs npm) >/dev/null; \
	fi

# The main job: a short Procgen training on an embedded local Ray.
smoke: setup
	$(VENV)/bin/mdpo train --preset smoke

test: setup system-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The GPU path on a machine with one NVIDIA GPU, in minutes, one table (learners/bench/gpu_check.py). It needs no
# set-up of its own: the repository's .venv if there is one, else the machine's python3 with torch, numpy, grpcio,
# grpcio-health-checking, protobuf and pytest (Ray and Procgen only for its training tier), and the gRPC stubs.
GPU_PYTHON := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) -m learners.bench.gpu_check $(GPU_CHECK_ARGS)

# Regenerate the gRPC stubs by hand (the build does this too).
protos: setup
	$(PY) -c "from setup import compile_protos; compile_protos()"

clean:
	rm -rf $(VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2.pyi
