"""The learner on CUDA: an update equal to the CPU one, exact mode equal to the authors' joint update, learner-served
inference and bf16. They skip without a GPU; `make gpu-check` (learners/bench/gpu_check.py) runs them on one.
Neither Ray nor Procgen is needed (a GPU machine may have neither).

Tolerances: TF32 is turned off, so CUDA's fp32 differs from the CPU's only in summation order (~1e-6 relative per
value): losses within 1e-4 and the gradient within 1e-3 (relative), parameters after exact mode's 4 Adam steps
at learning rate 1e-2 within rtol 1e-3 (the CPU-only test's 1e-4, loosened for the devices' kernels).
"""

import copy

import numpy as np
import pytest
import torch

from learners.config import TrainConfig
from learners.inference import InferenceServer
from learners.learner import Learner
from learners.model import make_agent
from learners.schedule import IterationPlan
from tests.helpers import LearnerPair, assert_same_parameters, reference_update, synthetic_rollout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these on one)")
FRAMES = ((64, 64, 3), "uint8", 15)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def first_step_gradient(learner: Learner, rollout, plan) -> tuple[object, torch.Tensor]:
    grads, step = [], learner.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten().cpu() for p in learner.agent.parameters()]))
        return step(*args, **kwargs)

    learner.optimizer.step = recording_step
    stats = learner.update([rollout], plan)
    return stats, grads[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cuda_update_equals_the_cpu_update(precision):
    cfg = TrainConfig(env_id="bigfish", num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, alpha=0.0,
                      microbatch_size=0, precision=precision, metrics_port=-1)     # not validated: no Procgen needed
    rollout = synthetic_rollout(0, *FRAMES, num_steps=16, num_envs=8, seed=1)
    plan = IterationPlan.for_iteration(cfg, 0)
    cpu_stats, cpu_grad = first_step_gradient(Learner(cfg, 0, *FRAMES, device="cpu"), rollout, plan)
    gpu_stats, gpu_grad = first_step_gradient(Learner(cfg, 0, *FRAMES, device="cuda"), rollout, plan)
    # bf16 rounds differently in the two devices' kernels: test_precision.py's bf16-vs-fp32 tolerances
    loss_tol, grad_tol = (1e-4, 1e-3) if precision == "fp32" else (0.02, 0.4)
    for term in ("loss", "policy_loss", "value_loss", "entropy"):
        a, b = getattr(cpu_stats, term), getattr(gpu_stats, term)
        assert abs(a - b) <= loss_tol * max(abs(a), 1e-3), (term, a, b)
    assert torch.linalg.norm(gpu_grad - cpu_grad) <= grad_tol * torch.linalg.norm(cpu_grad)


def test_exact_mode_on_cuda_matches_the_joint_single_process_update():
    cfg = TrainConfig(env_id="CartPole-v1", alpha=1.0, distill_mode="exact", sync="minibatch", num_envs=4,
                      num_steps=16, num_minibatches=2, update_epochs=2, learning_rate=1e-2, rpc_timeout_s=30,
                      sync_timeout_s=30)
    plan = IterationPlan(iteration=0, shuffle_seed=7, batch_size=cfg.batch_size, num_minibatches=2, update_epochs=2,
                         sync="minibatch", distill=True, learning_rate=cfg.learning_rate)
    rollouts = [synthetic_rollout(i, (4,), "float32", 2, 16, 4, seed=10 + i) for i in range(2)]
    pair = LearnerPair(cfg, (4,), "float32", 2, device="cuda")
    try:
        reference = [copy.deepcopy(l.agent).cpu() for l in pair.learners]
        optimizers = [torch.optim.Adam(r.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps) for r in reference]
        stats = pair.update_all(rollouts, plan)
        reference_update(reference, optimizers, rollouts, cfg, plan)        # on the CPU
        for learner, ref in zip(pair.learners, reference):
            assert next(learner.agent.parameters()).is_cuda
            assert_same_parameters(learner.agent.cpu(), ref, rtol=1e-3, atol=1e-4)
        assert all(s.syncs == 4 and s.kl_peer > 0 for s in stats)
    finally:
        pair.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_served_inference_on_cuda_equals_the_network_on_the_cpu(precision):
    agent = make_agent(*FRAMES, precision=precision)
    server = InferenceServer(copy.deepcopy(agent).cuda(), torch.device("cuda"), clients=1)
    try:
        server.load(0, server.template)
        obs = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
        logits, values = server.infer(0, obs)
        with torch.no_grad():
            ref_logits, ref_values = agent(torch.from_numpy(obs))
        tol = 1e-4 if precision == "fp32" else 0.02          # bf16: test_precision.py's forward tolerance
        for got, ref in ((logits, ref_logits), (values, ref_values)):
            assert got.dtype == np.float32
            assert np.linalg.norm(got - ref.numpy()) <= tol * np.linalg.norm(ref.numpy())
    finally:
        server.close()
