"""The MDPO math as pure functions: GAE, PPO clipped losses, entropy, KL toward a peer.

Tensors are torch; every function is differentiable where it should be and has no side effects.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Categorical


def compute_gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, next_value: np.ndarray,
                gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over a (T, N) rollout.

    `dones[t]` marks that the episode ended with the action at step t (same-step autoreset), so no
    value is bootstrapped across it. `next_value` is V(s_T) for the state after the last step.
    Returns (advantages, returns), both (T, N) float32.
    """
    num_steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float32)
    last_gae = np.zeros(rewards.shape[1:], dtype=np.float32)
    for t in reversed(range(num_steps)):
        next_values = next_value if t == num_steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t].astype(np.float32)
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        last_gae = delta + gamma * gae_lambda * not_done * last_gae
        advantages[t] = last_gae
    return advantages, (advantages + values).astype(np.float32)


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def policy_loss(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                clip_coef: float) -> torch.Tensor:
    """PPO clipped surrogate, as a loss to minimise."""
    ratio = torch.exp(new_logprob - old_logprob)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    return torch.max(pg_loss1, pg_loss2).mean()


def value_loss(new_value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor,
               clip_coef: float | None) -> torch.Tensor:
    """0.5 * squared error, clipped around the rollout's value estimate when clip_coef is set."""
    unclipped = (new_value - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    clipped_value = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
    clipped = (clipped_value - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return Categorical(logits=logits).entropy().mean()


def kl_to_peer(peer_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_peer || pi_self), averaged over states: the distillation term of the MDPO objective (README "Fidelity").

    The gradient flows into whichever argument requires grad: `logits` always; `peer_logits`
    only in the authors' `exact` objective (detached mode passes a constant).
    """
    peer_logp = torch.log_softmax(peer_logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return (peer_logp.exp() * (peer_logp - logp)).sum(-1).mean()


def ppo_diagnostics(new_logprob: torch.Tensor, old_logprob: torch.Tensor,
                    clip_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(approx KL to the behaviour policy, fraction of clipped ratios), without gradient, as 0-d tensors."""
    with torch.no_grad():
        logratio = new_logprob - old_logprob
        ratio = logratio.exp()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return approx_kl, clipfrac


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    var_returns = np.var(returns)
    return float("nan") if var_returns == 0 else float(1 - np.var(returns - values) / var_returns)
