"""`make gpu-check` (learners/bench/gpu_check.py) as a GPU machine without Ray, Gymnasium or Procgen would run it,
here on the CPU (--device cpu --quick): tier 1 must not import any of the three, and its table must carry every
stage in both precisions. On a GPU the same script runs tests/test_cuda.py instead of skipping it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Loaded at interpreter start-up from PYTHONPATH: the three packages then cannot be imported, as if not installed.
ABSENT = '''
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "procgen", "gymnasium"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
'''


def test_gpu_check_tier_one_runs_without_ray_gymnasium_or_procgen(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(ABSENT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "learners.bench.gpu_check", "--device", "cpu", "--quick", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["tests"]["skipped"] == 5 and "failed" not in result["tests"], \
        (out / "cuda_tests.log").read_text()[-3000:]
    stages = {(c["device"], c["precision"], c["stage"]) for c in result["costs"]}
    assert stages == {("cpu", p, s) for p in ("fp32", "bf16") for s in ("update", "forward", "served inference")}
    assert all(c["samples_per_second"] > 0 for c in result["costs"])
    assert "ray" in result["training"]["skipped"]
    for line in ("CUDA tests: ", "served inference", "bf16 / fp32 = ", "tier 2 training: skipped"):
        assert line in proc.stdout, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_refuses_a_machine_without_cuda_up_front(tmp_path):
    from learners.bench.gpu_check import main

    with pytest.raises(SystemExit, match="torch sees no CUDA GPU.*--device cpu"):
        main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
