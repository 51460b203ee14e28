"""Paper-shape end to end, one mode: env steps/s (steady iterations) and the peak PSS of every process of the run.
The figures of README "Only logits on the wire": run with a checkout's code first on the path, e.g. for the code
before the change, `git worktree add /tmp/old a46e051` (and compile its protos), then
PYTHONPATH=/tmp/old .venv/bin/python deploy/bench-example/logits-only/paper_end_to_end.py exact 3 old-exact.json"""
import json, math, os, sys, tempfile, time
from pathlib import Path

import ray

import learners
from learners.bench.measure import bench_config, measure_end_to_end
from learners.bench.memory import MemorySampler
from learners.coordinator.cluster import init_local_ray, run_cpus

mode, iterations, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = bench_config("paper", distill_mode=mode)
init_local_ray(max(os.cpu_count(), math.ceil(run_cpus(cfg, cfg.num_actors))), log_to_driver=False)
t0 = time.time()
try:
    with MemorySampler() as memory, tempfile.TemporaryDirectory(prefix="mdpo-paper-") as tmp:
        with memory.phase("run"):
            r = measure_end_to_end(cfg, iterations, Path(tmp) / "run", memory)
        r["memory_total_pss_peak_bytes"] = memory.summary("run")["total_pss_peak_bytes"]
        r["memory_kinds"] = memory.summary("run")["kinds"]
finally:
    ray.shutdown()
r.update(mode=mode, code=os.path.dirname(learners.__file__), wall=time.time() - t0, load=os.getloadavg())
Path(out).write_text(json.dumps(r, indent=1))
print(mode, r["env_steps_per_second"], r["memory_total_pss_peak_bytes"] / 2**30, "GiB", r["wall"], "s")
