"""The learner's loss pieces on hand-made tensors (no Ray, no model)."""

import torch

import pytest

from gigpo_rllib import GiGPOConfig
from gigpo_rllib.advantages import compute_gigpo_advantages
from gigpo_rllib.losses import gigpo_policy_loss, k3_kl, loss_token_weights, shape_advantages


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    advantages = torch.tensor([1.0, -2.0])
    loss, diagnostics = gigpo_policy_loss(logprobs, logprobs.clone(), advantages, mask, pg_clip=0.2)
    # Token-level mean over the 3 response tokens: (-1 - 1 + 2) / 3.
    assert loss.item() == 0.0
    assert diagnostics["policy_kl"].item() == 0.0 and diagnostics["clip_fraction"].item() == 0.0


def test_clipping_limits_the_gain_of_a_positive_advantage():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 0.5]])  # ratio e^0.5 ≈ 1.65 on the response token
    mask = torch.tensor([[False, True]])
    loss, diagnostics = gigpo_policy_loss(new, old, torch.tensor([1.0]), mask, pg_clip=0.2)
    assert torch.isclose(loss, torch.tensor(-1.2))
    assert diagnostics["clip_fraction"].item() == 1.0
    ratio = torch.exp(torch.tensor(0.5))
    assert torch.isclose(diagnostics["policy_kl"], (ratio - 1) - 0.5)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 3.0]])  # ratio e^3 ≈ 20
    mask = torch.tensor([[False, True]])
    plain, _ = gigpo_policy_loss(new, old, torch.tensor([-1.0]), mask, pg_clip=0.2)
    dual, _ = gigpo_policy_loss(new, old, torch.tensor([-1.0]), mask, pg_clip=0.2, dual_clip_ratio=3.0)
    assert plain.item() > 20 and torch.isclose(dual, torch.tensor(3.0))
    positive, _ = gigpo_policy_loss(new, old, torch.tensor([1.0]), mask, pg_clip=0.2, dual_clip_ratio=3.0)
    assert torch.isclose(positive, torch.tensor(-1.2))  # dual clip leaves positive advantages alone


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    logprobs = torch.tensor([-1.0, -2.0, -0.1])
    assert k3_kl(logprobs, logprobs).abs().max().item() == 0.0
    reference = torch.tensor([-1.5, -1.0, -3.0])
    kl = k3_kl(logprobs, reference)
    assert (kl > 0).all()
    log_ratio = reference - logprobs
    torch.testing.assert_close(kl, log_ratio.exp() - log_ratio - 1)


def test_scalings_weigh_samples_by_response_tokens_then_clamp():
    advantages = torch.tensor([1.0, -1.0, 3.0])
    lengths = torch.tensor([1, 3, 0])
    tokens = torch.tensor([1.0, -1.0, -1.0, -1.0])  # the token-level view; the empty reply has no tokens
    standardized = shape_advantages(advantages, lengths, scaling="standardize", clip=None)
    torch.testing.assert_close(standardized, (advantages - tokens.mean()) / tokens.std(unbiased=False),
                               rtol=1e-5, atol=1e-5)
    scaled = shape_advantages(advantages, lengths, scaling="scale", clip=None)
    torch.testing.assert_close(scaled, advantages / tokens.pow(2).mean().sqrt(), rtol=1e-5, atol=1e-5)
    clipped = shape_advantages(advantages, lengths, scaling="none", clip=0.5)
    assert clipped.tolist() == [0.5, -0.5, 0.5]
    assert shape_advantages(advantages, lengths, scaling="none", clip=None).tolist() == advantages.tolist()
    with pytest.raises(ValueError, match="scaling must be one of"):
        shape_advantages(advantages, lengths, scaling="whiten", clip=None)


def two_maps_batch():
    """Issue 16's case: map 0 won 2 of 8 tries (a win takes 6 turns, a loss runs out its 20), map 1 lost 8 of 8.
    One sample per turn, 3 reply tokens each, every turn from a state of its own (no shared anchor states)."""
    rewards, traj_ids, step_ids, group_ids = [], [], [], []
    for traj in range(16):
        group = traj // 8
        won = group == 0 and traj < 2
        turns = 6 if won else 20
        rewards += [0.0] * (turns - 1) + [1.0 if won else 0.0]
        traj_ids += [traj] * turns
        step_ids += list(range(turns))
        group_ids += [group] * turns
    n = len(rewards)
    columns = [torch.tensor(rewards), torch.tensor(traj_ids), torch.tensor(step_ids), torch.tensor(group_ids),
               torch.arange(n)]
    return columns, torch.full((n,), 3), torch.tensor(group_ids)


def test_default_scaling_keeps_a_group_without_signal_at_exactly_zero():
    (rewards, traj_ids, step_ids, group_ids, anchor_ids), lengths, groups = two_maps_batch()
    config = GiGPOConfig()
    combined = compute_gigpo_advantages(rewards, traj_ids, step_ids, group_ids, anchor_ids,
                                        method=config.reward_normalization["method"]).advantages
    assert combined[groups == 1].abs().max().item() == 0.0
    shaped = shape_advantages(combined, lengths, scaling=config.advantage_scaling, clip=config.advantage_clip)
    assert shaped[groups == 1].abs().max().item() == 0.0  # the all-lost map teaches nothing, and says so
    winners = shaped[(groups == 0) & (traj_ids < 2)]
    losers = shaped[(groups == 0) & (traj_ids >= 2)]
    assert (winners > 0).all() and (losers < 0).all()
    # Magnitudes survive (no sign-only clamp): a win is pushed 3x as hard as a loss is pulled (+0.75 vs -0.25).
    torch.testing.assert_close(winners[0] / losers[0], torch.tensor(-3.0))
    # ROLL-style whitening moves the all-lost map by -mean/std (the token mean is -0.072, not 0).
    standardized = shape_advantages(combined, lengths, scaling="standardize", clip=None)
    assert standardized[groups == 1].min().item() > 0.3


def test_loss_token_weights_give_each_mode_its_aggregate():
    counted = torch.tensor([[True, True, True, False], [True, False, False, False], [False, False, False, False]])
    losses = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])

    def aggregate(mode, scale=1.0):
        return (losses * loss_token_weights(counted, mode, scale=scale)).sum().item()

    assert aggregate("token-mean") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate("seq-mean-token-mean") == pytest.approx((2 + 4) / 2)  # the empty row is no sequence
    assert aggregate("seq-mean-token-sum") == pytest.approx((6 + 4) / 2)
    assert aggregate("token-mean", scale=3.0) == pytest.approx(3 * 2.5)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        loss_token_weights(counted, "mean", scale=1.0)
    # The PPO surrogate takes the same weights: at ratio 1 it is -sum(weights x advantage).
    weights = loss_token_weights(counted, "token-mean")
    loss, _ = gigpo_policy_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([1.0, -2.0, 5.0]), counted,
                                pg_clip=0.2, token_weights=weights)
    assert loss.item() == pytest.approx(-(3 * 1.0 - 2.0) / 4)
