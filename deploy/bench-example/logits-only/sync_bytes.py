"""Bytes per minibatch sync at the paper's minibatch (2048 states, IMPALA-CNN, 15 actions), over real gRPC, both modes."""
import dataclasses, json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))     # the repository (tests/helpers.py)
import torch
from learners.config import preset
from learners.schedule import IterationPlan
from tests.helpers import LearnerPair, synthetic_rollout

out = {}
for mode in ("detached", "exact"):
    cfg = dataclasses.replace(preset("paper"), num_envs=64, num_steps=64, num_minibatches=2, update_epochs=1,
                              distill_mode=mode, metrics_port=-1, rpc_timeout_s=600, sync_timeout_s=600)
    plan = IterationPlan.for_iteration(cfg, 0)
    rollouts = [synthetic_rollout(i, (64, 64, 3), "uint8", 15, cfg.num_steps, cfg.num_envs, seed=i) for i in range(2)]
    pair = LearnerPair(cfg, (64, 64, 3), "uint8", 15)
    try:
        t0 = time.time()
        stats = pair.update_all(rollouts, plan)
        out[mode] = {"minibatch": cfg.minibatch_size, "microbatch": cfg.microbatch_size, "syncs": stats[0].syncs,
                     "bytes_per_sync": [(s.sync_bytes_sent + s.sync_bytes_received) / s.syncs for s in stats],
                     "sent_per_sync": [s.sync_bytes_sent / s.syncs for s in stats],
                     "received_per_sync": [s.sync_bytes_received / s.syncs for s in stats],
                     "seconds": time.time() - t0}
    finally:
        pair.close()
    print(mode, json.dumps(out[mode]))
open(sys.argv[1] if len(sys.argv) > 1 else "sync_bytes.json", "w").write(json.dumps(out, indent=1))
