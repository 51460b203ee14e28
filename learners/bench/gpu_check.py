"""`make gpu-check`: the GPU path checked in a few minutes on a machine with one NVIDIA GPU, printed as one table.

Tier 1 needs neither Ray nor Procgen (a GPU box often has only torch and friends): the CUDA tests
(tests/test_cuda.py: a learner update against the CPU's, exact mode against the authors' joint update, learner-served
inference, bf16), then the learner's per-sample costs on the GPU and on this machine's CPU in fp32 and bf16
(learners/bench/device_costs.py, at the paper's minibatch). Tier 2, only where Ray, Gymnasium and Procgen import: a
short Procgen training with GPU learners and learner-served inference (`mdpo train --preset smoke`).

    python -m learners.bench.gpu_check [--out DIR] [--device cuda|cpu] [--quick]

`--device cpu` runs the same steps on the CPU (the CUDA tests then skip): how CI checks this script. Results also go
to DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIER1_MODULES = ("torch", "numpy", "grpc", "grpc_health", "google.protobuf", "pytest")
TIER2_MODULES = ("ray", "gymnasium", "procgen")


def missing(modules) -> list[str]:
    lacking = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            lacking.append(name)
    return lacking


def check_prerequisites() -> None:
    """Fail before any work with what is missing and how to bring it."""
    lacking = missing(TIER1_MODULES)
    if lacking:
        sys.exit(f"gpu-check: missing Python packages {lacking}. Install them (pip install torch numpy grpcio "
                 f"grpcio-health-checking protobuf pytest), or, on a machine without a package index, copy their wheels "
                 f"along and put pure-Python ones on PYTHONPATH (PYTHONPATH=grpcio_health_checking-....whl).")
    if not (REPO / "protos" / "distill_pb2.py").exists():
        sys.exit("gpu-check: the gRPC stubs protos/distill_pb2*.py are missing: run `make protos` (needs grpcio-tools) "
                 "here, or copy them from a checkout where `make setup` ran")


def run_cuda_tests(out: Path, device: str) -> dict:
    """tests/test_cuda.py, and on a GPU machine also the bf16 tests on its CPU (CI runs those itself)."""
    t0 = time.perf_counter()
    files = ["tests/test_cuda.py"] + (["tests/test_precision.py"] if device == "cuda" else [])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files], cwd=REPO,
                          capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, **counts}


def run_costs(device: str, quick: bool) -> list:
    from learners.bench.device_costs import measure_costs
    from learners.config import preset

    # The paper's minibatch (2048) and actor batch (its envs per actor); 1 epoch of 2 minibatches per update.
    cfg = preset("paper")
    shape = dict(num_steps=2048 * 2 // cfg.num_envs, num_minibatches=2, update_epochs=1)
    if quick:     # the script's plumbing, not figures: tiny shapes, small frames, one timed repetition
        shape = dict(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=1, microbatch_size=32)
    if device == "cuda":
        shape["microbatch_size"] = 0     # the whole minibatch in one pass: memory is plenty
    cfg = dataclasses.replace(cfg, metrics_port=-1, **shape)     # a preset's values: validate() would import Procgen
    if quick:
        return measure_costs(cfg, device, min_seconds=0.0, min_reps=1, frames=(16, 16, 3))
    return measure_costs(cfg, device, min_seconds=2.0)


def run_training(out: Path, device: str, quick: bool) -> dict:
    lacking = missing(TIER2_MODULES)
    if lacking:
        return {"skipped": f"{', '.join(lacking)} not installed (tier 2 needs Ray, Gymnasium and Procgen)"}
    run_dir = out / "smoke-run"
    steps = "4096" if quick else "32768"
    cmd = [sys.executable, "-m", "learners.cli", "train", "--preset", "smoke", "--env", "bigfish",
           "--run-dir", str(run_dir), "--total-steps", steps, "--device", device, "--inference", "learner",
           "--metrics-port", "-1", "--progress", "false", "--eval-every", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    (out / "training.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "error": (proc.stderr or proc.stdout)[-800:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"returncode": 0, "seconds": time.perf_counter() - t0, "env_steps": summary["env_steps"]["total"],
            "env_steps_per_second": summary["env_steps_per_second"],
            "devices": [l["device"] for l in summary["learners"]]}


def table(result: dict) -> str:
    from learners.bench.device_costs import Cost, format_costs

    lines = [f"mdpo gpu-check on {result['machine']}",
             f"CUDA tests: {result['tests'].get('passed', 0)} passed, {result['tests'].get('failed', 0)} failed, "
             f"{result['tests'].get('skipped', 0)} skipped ({result['tests']['seconds']:.0f} s)",
             format_costs([Cost(**c) for c in result["costs"]])]
    training = result["training"]
    if "skipped" in training:
        lines.append(f"tier 2 training: skipped ({training['skipped']})")
    elif training.get("returncode"):
        lines.append(f"tier 2 training: FAILED: {training['error']}")
    else:
        lines.append(f"tier 2 training (smoke, learners on {', '.join(training['devices'])}, learner-served "
                     f"inference): {training['env_steps']:,} env steps, {training['env_steps_per_second']:,.0f}/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="where logs and gpu_check.json go")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small shapes (CI checks the script with it)")
    args = parser.parse_args(argv)
    check_prerequisites()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no CUDA GPU (torch.cuda.is_available() is False); --device cpu checks the "
                 "script on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU"
    result = {"machine": f"{gpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"}
    print("gpu-check: CUDA tests ...", flush=True)
    result["tests"] = run_cuda_tests(out, args.device)
    print("gpu-check: per-sample costs ...", flush=True)
    devices = [args.device] + (["cpu"] if args.device == "cuda" else [])
    result["costs"] = [dataclasses.asdict(c) for d in devices for c in run_costs(d, args.quick)]
    print("gpu-check: tier 2 training ...", flush=True)
    result["training"] = run_training(out, args.device, args.quick)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    failed = result["tests"]["returncode"] != 0 or result["training"].get("returncode", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
