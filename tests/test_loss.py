"""The learner's loss pieces on hand-made tensors (no Ray, no model)."""

import torch

from gigpo_rllib.losses import gigpo_policy_loss, k3_kl, shape_advantages


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


def test_whitening_weighs_samples_by_response_tokens_then_clamps():
    advantages = torch.tensor([1.0, -1.0, 3.0])
    lengths = torch.tensor([1, 3, 0])
    out = shape_advantages(advantages, lengths, whiten=True, clip=None)
    tokens = torch.tensor([1.0, -1.0, -1.0, -1.0])  # the token-level view; the empty reply has no tokens
    expected = (advantages - tokens.mean()) / tokens.std(unbiased=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    clipped = shape_advantages(advantages, lengths, whiten=False, clip=0.5)
    assert clipped.tolist() == [0.5, -0.5, 0.5]
    assert shape_advantages(advantages, lengths, whiten=False, clip=None).tolist() == advantages.tolist()


def test_whitening_with_a_learner_sum_uses_global_statistics():
    first, second = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -3.0, 0.5])
    lengths_first, lengths_second = torch.tensor([2, 1]), torch.tensor([1, 4, 2])
    whole = shape_advantages(torch.cat([first, second]), torch.cat([lengths_first, lengths_second]), whiten=True,
                             clip=None)
    parts = {}

    def partial_sums(lengths, values):
        weights = lengths.double()
        return torch.stack([weights.sum(), (weights * values).sum(), (weights * values * values).sum()])

    totals = partial_sums(lengths_first, first.double()) + partial_sums(lengths_second, second.double())
    parts["first"] = shape_advantages(first, lengths_first, whiten=True, clip=None, sum_over_learners=lambda _: totals)
    torch.testing.assert_close(parts["first"], whole[:2], rtol=1e-6, atol=1e-6)


def test_a_huge_log_ratio_gives_a_finite_loss_and_gradient():
    old = torch.tensor([[0.0, -200.0]])  # the old policy thought the token impossible
    new = torch.tensor([[0.0, -0.1]], requires_grad=True)
    mask = torch.tensor([[False, True]])
    for advantage in (1.0, -1.0):
        loss, diagnostics = gigpo_policy_loss(new, old, torch.tensor([advantage]), mask, pg_clip=0.2,
                                              dual_clip_ratio=3.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
        assert torch.isfinite(diagnostics["policy_kl"])


def test_truncated_importance_weights_are_capped_and_finite():
    from gigpo_rllib.losses import truncated_is_weights

    learner = torch.tensor([[0.0, -1.0, -0.5]])
    sampler = torch.tensor([[-300.0, -1.0, -0.1]])
    weights = truncated_is_weights(learner, sampler, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 1.0, float(torch.exp(torch.tensor(-0.4)))]]))


def test_clip_higher_lets_a_positive_advantage_grow_further():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 0.25]])  # ratio e^0.25 ≈ 1.28
    mask = torch.tensor([[False, True]])
    symmetric, _ = gigpo_policy_loss(new, old, torch.tensor([1.0]), mask, pg_clip=0.2)
    higher, diagnostics = gigpo_policy_loss(new, old, torch.tensor([1.0]), mask, pg_clip=0.2, pg_clip_high=0.3)
    assert torch.isclose(symmetric, torch.tensor(-1.2)) and torch.isclose(higher, -torch.exp(torch.tensor(0.25)))
    assert diagnostics["clip_fraction"].item() == 0.0
    # The lower side keeps pg_clip: a negative advantage at ratio 0.7 is clipped at 0.8.
    low, _ = gigpo_policy_loss(torch.log(torch.tensor([[1.0, 0.7]])), old, torch.tensor([-1.0]), mask, pg_clip=0.2,
                               pg_clip_high=0.3)
    assert torch.isclose(low, torch.tensor(0.8))


def test_length_buckets_keep_every_row_and_sort_each_megabatch():
    from gigpo_rllib.learner import BUCKET_MINIBATCHES, bucket_by_length

    lengths = torch.randint(10, 300, (1000,), generator=torch.Generator().manual_seed(0))
    order = bucket_by_length(lengths, minibatch_size=16)
    assert sorted(order.tolist()) == list(range(1000))
    megabatch = 16 * BUCKET_MINIBATCHES
    for start in range(0, 1000, megabatch):
        chunk = order[start:start + megabatch]
        assert (chunk >= start).all() and (chunk < start + megabatch).all()  # rows stay in their megabatch
        assert (lengths[chunk][:-1] >= lengths[chunk][1:]).all()
