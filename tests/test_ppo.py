"""The math against closed forms and hand-derived gradients."""

import numpy as np
import pytest
import torch

from learners import ppo


def test_gae_single_step_is_td_error():
    adv, ret = ppo.compute_gae(np.array([[1.0]]), np.array([[0.5]]), np.array([[False]]), np.array([2.0]),
                               gamma=0.9, gae_lambda=0.95)
    assert adv[0, 0] == pytest.approx(1.0 + 0.9 * 2.0 - 0.5)
    assert ret[0, 0] == pytest.approx(1.0 + 0.9 * 2.0)


def test_gae_matches_closed_form_sum_of_discounted_td_errors():
    rng = np.random.default_rng(0)
    T, gamma, lam = 6, 0.99, 0.9
    r, v, nv = rng.normal(size=(T, 1)), rng.normal(size=(T, 1)), rng.normal(size=1)
    adv, _ = ppo.compute_gae(r, v, np.zeros((T, 1), bool), nv, gamma, lam)
    values_next = np.concatenate([v[1:, 0], nv])
    deltas = r[:, 0] + gamma * values_next - v[:, 0]
    expected = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, T)) for t in range(T)]
    np.testing.assert_allclose(adv[:, 0], expected, rtol=1e-5)


def test_gae_stops_at_episode_end():
    # The episode ends with the action at t=1: nothing after it may leak into t<=1.
    r = np.array([[1.0], [1.0], [100.0]])
    v = np.zeros((3, 1))
    adv, _ = ppo.compute_gae(r, v, np.array([[False], [True], [False]]), np.array([50.0]), 1.0, 1.0)
    assert adv[1, 0] == pytest.approx(1.0)
    assert adv[0, 0] == pytest.approx(2.0)
    assert adv[2, 0] == pytest.approx(150.0)


def test_policy_loss_clips_in_the_pessimistic_direction():
    old = torch.log(torch.tensor([0.5, 0.5]))
    new = torch.log(torch.tensor([0.9, 0.9]))          # ratio 1.8
    adv = torch.tensor([1.0, -1.0])
    loss = ppo.policy_loss(new, old, adv, clip_coef=0.2)
    # positive advantage: min(1.8, 1.2)*1 -> 1.2; negative: max-loss picks 1.8*1
    assert loss.item() == pytest.approx(-(1.2 - 1.8) / 2)


def test_value_loss_clipped_and_unclipped():
    new, old, ret = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3.0])
    assert ppo.value_loss(new, old, ret, None).item() == pytest.approx(0.5 * 1.0)
    # clipped prediction 0.2 -> (0.2-3)^2 = 7.84 > 1: the pessimistic (larger) error wins
    assert ppo.value_loss(new, old, ret, 0.2).item() == pytest.approx(0.5 * 7.84)


def test_entropy_of_uniform_is_log_n():
    assert ppo.entropy(torch.zeros(3, 15)).item() == pytest.approx(np.log(15), rel=1e-6)


def test_kl_direction_is_peer_to_self():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.3, 0.3, 0.4]])
    kl = ppo.kl_to_peer(p.log(), q.log()).item()
    assert kl == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)
    assert kl != pytest.approx(float((q * (q / p).log()).sum()), rel=1e-3)   # not the reverse KL


def test_kl_gradients_match_hand_derivation():
    torch.manual_seed(0)
    peer = torch.randn(4, 5, requires_grad=True)
    own = torch.randn(4, 5, requires_grad=True)
    ppo.kl_to_peer(peer, own).backward()
    p, q = torch.softmax(peer, -1), torch.softmax(own, -1)
    # d/d own_logits of mean_b sum p log(p/q) = (q - p) / B
    torch.testing.assert_close(own.grad, (q - p).detach() / 4)
    # d/d peer_logits = p * (log p - log q - KL_b) / B
    kl_b = (p * (p.log() - q.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(peer.grad, (p * (p.log() - q.log() - kl_b)).detach() / 4)


def test_kl_is_zero_for_identical_policies_and_positive_otherwise():
    x = torch.randn(8, 15)
    assert ppo.kl_to_peer(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert ppo.kl_to_peer(x, x + torch.randn(8, 15)).item() > 0


def test_diagnostics_and_explained_variance():
    approx_kl, clipfrac = ppo.ppo_diagnostics(torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.5, 0.5])), 0.2)
    assert clipfrac == pytest.approx(0.5)
    assert approx_kl > 0
    assert ppo.explained_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert np.isnan(ppo.explained_variance(np.zeros(3), np.ones(3)))
