import os
import sys
from pathlib import Path

import pytest

# Keep torch from oversubscribing the 2-core CI machine when several learners share a process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the tests of one module (imported here, not at the top: tests/test_cuda.py runs where Ray is
    not installed)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_terminal_summary(terminalreporter):
    from tests.helpers import FAULT_REPORT

    if not FAULT_REPORT:
        return
    terminalreporter.section("fault injection summary")
    terminalreporter.write_line(f"{'fault':48s} {'injected':>8s} {'survived':>8s} {'data lost':>9s}")
    for fault, injected, survived, lost in FAULT_REPORT:
        terminalreporter.write_line(f"{fault:48s} {injected:8d} {survived:8d} {lost:9d}")
    total = [sum(col) for col in list(zip(*FAULT_REPORT))[1:]]
    terminalreporter.write_line(f"{'total':48s} {total[0]:8d} {total[1]:8d} {total[2]:9d}")
