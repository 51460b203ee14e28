"""MDPO in one process: one iteration's update of every agent, side by side, in lockstep (no threads, no wire).

The in-process backend (`mdpo train --backend local`, learners/local.py) trains with it, and the distributed
learners are tested against it. It is checked in turn against a transcription of the authors' code
(tests/test_fidelity.py).

Each agent's loss is the paper's: PPO's clipped surrogate, value loss and entropy bonus on its own rollouts, plus
alpha times the mean KL(peer || self) over its peers, on its own states, in the minibatch order every agent shares.
- detached: at each sync point the peers' logits on the window's states become fixed targets (classic DML);
- exact: the authors' joint objective, the sum of every agent's loss / N, one backward through every network (the
  peers' logits are not detached), each network's gradient clipped on its own, then each agent's Adam steps.
Whole minibatches: the learners' micro-batches give the same gradient (tests/test_overlap.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Categorical

import learners.ppo as ppo
from learners.errors import NonFiniteError
from learners.records import Batch
from learners.schedule import IterationPlan


def mdpo_update(agents: list, optimizers: list, batches: list[Batch], cfg, plan: IterationPlan) -> list[dict]:
    """Update `agents` (each with its Adam) on their `batches`; returns each agent's loss terms, means over the
    minibatches (the scalars a Learner reports)."""
    n, mbs = len(agents), plan.minibatch_size
    distill = plan.distill and n > 1
    exact = distill and cfg.distill_mode == "exact"
    scale = 1.0 / n if cfg.distilling else 1.0      # Learner.loss_scale
    obs = [torch.from_numpy(b.obs) for b in batches]
    targets = [{p: None for p in range(n) if p != i} for i in range(n)]   # detached: peer p's logits on my states
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = plan.learning_rate
    steps: list[list[dict]] = [[] for _ in agents]
    for epoch in range(plan.update_epochs):
        perm = plan.permutation(epoch)
        for j in range(plan.num_minibatches):
            window = plan.sync_window(epoch, j, perm) if distill and not exact else None
            if window is not None:
                with torch.no_grad():
                    for i in range(n):
                        for p in targets[i]:
                            fresh = agents[p].logits(obs[i][window])
                            if targets[i][p] is None:
                                targets[i][p] = torch.zeros(len(batches[i].actions), fresh.shape[-1])
                            targets[i][p][window] = fresh
            mb = torch.from_numpy(perm[j * mbs:(j + 1) * mbs])
            total, terms = 0.0, []
            for i, (agent, b) in enumerate(zip(agents, batches)):
                logits, value = agent(obs[i][mb])
                new_logprob = Categorical(logits=logits).log_prob(torch.from_numpy(b.actions)[mb])
                old_logprob = torch.from_numpy(b.logprobs)[mb]
                pg_loss = ppo.policy_loss(new_logprob, old_logprob,
                                          ppo.normalize_advantages(torch.from_numpy(b.advantages)[mb]), cfg.clip_coef)
                v_loss = ppo.value_loss(value, torch.from_numpy(b.values)[mb], torch.from_numpy(b.returns)[mb],
                                        cfg.clip_coef if cfg.clip_vloss else None)
                entropy = ppo.entropy(logits)
                peers = ([agents[p].logits(obs[i][mb]) for p in range(n) if p != i] if exact
                         else [t[mb] for t in targets[i].values()] if distill else [])
                kl = torch.stack([ppo.kl_to_peer(q, logits) for q in peers]).mean() if peers else torch.zeros(())
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy + cfg.alpha * kl
                total = total + scale * loss
                approx_kl, clipfrac = ppo.ppo_diagnostics(new_logprob, old_logprob, cfg.clip_coef)
                terms.append(dict(loss=loss, policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, kl_peer=kl,
                                  approx_kl=approx_kl, clipfrac=clipfrac))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if not torch.isfinite(total.detach()):
                raise NonFiniteError(f"non-finite loss {float(total)} at epoch {epoch}, minibatch {j}; update aborted "
                                     "before the optimizer step")
            total.backward()
            for i, (agent, opt) in enumerate(zip(agents, optimizers)):
                grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteError(f"agent {i}: non-finite gradient norm; update aborted")
                opt.step()
                steps[i].append({k: float(v.detach()) for k, v in terms[i].items()} | {"grad_norm": float(grad_norm)})
    return [{k: float(np.mean([s[k] for s in agent_steps])) for k in agent_steps[0]} for agent_steps in steps]
