import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bench_advantages import synthetic_batch, trajectory_lengths
from gigpo_rllib import advantages
from gigpo_rllib.advantages import (
    NORMALIZATION_METHODS,
    anchor_group_stats,
    batch_adjust,
    compute_gigpo_advantages,
    discounted_step_returns,
    segment_normalize,
    stalled_groups,
)
from tests.loop_reference import loop_gigpo

FIELDS = ("advantages", "episode_advantages", "step_advantages", "step_returns", "episode_returns", "anchor_group_ids")


def batch(rows):
    """rows: (reward, traj, step, group, anchor) tuples -> the five input tensors."""
    rewards, traj, step, group, anchor = zip(*rows)
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(traj), torch.tensor(step),
            torch.tensor(group), torch.tensor(anchor))


# Two trajectories of one group; both start in state 5. Trajectory 0 reaches the goal at step 1.
TWO_TRAJECTORIES = batch([
    (0.0, 0, 0, 0, 5),
    (1.0, 0, 1, 0, 6),
    (0.0, 1, 0, 0, 5),
    (0.0, 1, 1, 0, 7),
])


def test_mean_by_hand():
    out = compute_gigpo_advantages(*TWO_TRAJECTORIES, gamma=0.9, method="mean")
    # R = [1, 0]; mean 0.5.  G = [0.9, 1, 0, 0]; state 5 holds {0.9, 0} (mean 0.45); 6 and 7 are singletons.
    torch.testing.assert_close(out.episode_advantages, torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(out.step_returns, torch.tensor([0.9, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.step_advantages, torch.tensor([0.45, 0.0, -0.45, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.advantages, out.episode_advantages + out.step_advantages)


def test_weights_combine_levels():
    out = compute_gigpo_advantages(*TWO_TRAJECTORIES, gamma=0.9, episode_weight=2.0, step_weight=0.5)
    torch.testing.assert_close(out.advantages, 2.0 * out.episode_advantages + 0.5 * out.step_advantages)


def test_mean_std_by_hand():
    # Four one-step trajectories in one group, all in the same state: returns 1, 0, 0, 1.
    inputs = batch([(1.0, 0, 0, 0, 9), (0.0, 1, 0, 0, 9), (0.0, 2, 0, 0, 9), (1.0, 3, 0, 0, 9)])
    out = compute_gigpo_advantages(*inputs, method="mean_std")
    sigma = statistics.stdev([1.0, 0.0, 0.0, 1.0])  # unbiased
    z = 0.5 / (sigma + 1e-6)
    expected = torch.tensor([z, -z, -z, z], dtype=torch.float64)
    torch.testing.assert_close(out.episode_advantages, expected)
    torch.testing.assert_close(out.step_advantages, expected)


def test_asym_clip_clamps_both_tails():
    high = [10.0] + [0.0] * 16
    values = torch.tensor(high + [0.0] + [10.0] * 16, dtype=torch.float64)
    segments = torch.tensor([0] * 17 + [1] * 17)
    out = segment_normalize(values, segments, 2, "asym_clip")
    mu, sigma = statistics.mean(high), statistics.stdev(high)
    assert (10.0 - mu) / (sigma + 1e-6) > 3  # the raw score is beyond the clip
    assert out[0].item() == 3.0 and out[17].item() == -1.0
    assert out[1].item() == pytest.approx((0.0 - mu) / (sigma + 1e-6))


@pytest.mark.parametrize("method", ["mean", "mean_std", "asym_clip"])
def test_segment_normalize_ignores_empty_segments_and_zeroes_singletons(method):
    values = torch.tensor([1.0, 3.0, -2.5, 7.0], dtype=torch.float64)
    compact = segment_normalize(values, torch.tensor([0, 0, 1, 2]), 3, method)
    with_gaps = segment_normalize(values, torch.tensor([1, 1, 3, 5]), 7, method)  # segments 0, 2, 4, 6 empty
    assert torch.equal(with_gaps, compact)
    assert compact[2:].tolist() == [0.0, 0.0]  # singletons: no baseline
    assert compact[0].item() == -compact[1].item() != 0.0


def test_identity_passes_returns_through():
    out = compute_gigpo_advantages(*TWO_TRAJECTORIES, gamma=0.9, method="identity")
    torch.testing.assert_close(out.episode_advantages, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.step_advantages, out.step_returns)


@pytest.mark.parametrize("method", ["mean", "mean_std", "asym_clip"])
def test_singletons_and_zero_variance_give_zero(method):
    inputs = batch([
        (3.0, 0, 0, 0, 1),  # alone in its group: no baseline
        (2.0, 1, 0, 1, 1),  # group 1: equal returns, same state
        (2.0, 2, 0, 1, 1),
    ])
    out = compute_gigpo_advantages(*inputs, method=method)
    assert out.episode_advantages.abs().max().item() == 0.0
    assert out.step_advantages.abs().max().item() == 0.0


def test_zero_variance_of_large_float32_returns_gives_zero():
    rewards = torch.full((8,), 1234.5678, dtype=torch.float32)
    ids = torch.arange(8)
    out = compute_gigpo_advantages(rewards, ids, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                                   torch.zeros(8, dtype=torch.long), method="mean_std")
    assert out.advantages.abs().max().item() == 0.0
    assert out.advantages.dtype == torch.float32


def test_repeated_state_within_one_trajectory_joins_its_anchor_group():
    # Trajectory 0 bumps into a wall: state 4 at steps 0 and 1. Trajectory 1 sees state 4 once.
    inputs = batch([(0.0, 0, 0, 0, 4), (0.0, 0, 1, 0, 4), (1.0, 0, 2, 0, 8), (0.0, 1, 0, 0, 4)])
    out = compute_gigpo_advantages(*inputs, gamma=0.5, method="mean")
    ids = out.anchor_group_ids
    assert ids[0] == ids[1] == ids[3] and ids[2] != ids[0]
    group = [0.25, 0.5, 0.0]  # G at (traj 0, step 0), (traj 0, step 1), (traj 1, step 0)
    mu = sum(group) / 3
    torch.testing.assert_close(out.step_advantages[[0, 1, 3]], torch.tensor([g - mu for g in group], dtype=torch.float64))


def test_same_anchor_in_two_episode_groups_is_not_pooled():
    inputs = batch([(1.0, 0, 0, 0, 7), (0.0, 1, 0, 1, 7)])
    out = compute_gigpo_advantages(*inputs, method="mean")
    assert out.anchor_group_ids[0] != out.anchor_group_ids[1]
    assert out.step_advantages.abs().max().item() == 0.0  # each is a singleton in its own group
    assert anchor_group_stats(out.anchor_group_ids).num_groups == 2


def test_gamma_zero_and_one():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    traj, step = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(discounted_step_returns(rewards, traj, step, gamma=0.0), rewards)
    torch.testing.assert_close(discounted_step_returns(rewards, traj, step, gamma=1.0), torch.tensor([6.0, 5.0, 3.0, 10.0]))


def test_step_returns_follow_step_order_not_input_order_and_allow_gaps():
    rewards = torch.tensor([3.0, 1.0, 2.0])
    traj = torch.tensor([0, 0, 0])
    step = torch.tensor([20, 0, 7])  # order: 1.0 then 2.0 then 3.0
    torch.testing.assert_close(discounted_step_returns(rewards, traj, step, gamma=0.5),
                               torch.tensor([3.0, 1.0 + 0.5 * 2.0 + 0.25 * 3.0, 2.0 + 0.5 * 3.0]))


def test_step_ids_need_not_start_at_zero():
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0])
    traj = torch.tensor([0, 0, 1, 1])
    expected = discounted_step_returns(rewards, traj, torch.tensor([0, 1, 0, 1]), gamma=0.5)
    for step in ([5, 6, 9, 10], [-3, -2, 0, 1]):
        torch.testing.assert_close(discounted_step_returns(rewards, traj, torch.tensor(step), gamma=0.5), expected)


def test_grouping_tags_and_batch():
    # Four one-step trajectories in four episode groups; tags pair groups (0, 1) and (2, 3).
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0])
    ids = torch.arange(4)
    zeros = torch.zeros(4, dtype=torch.long)
    tags = torch.tensor([0, 0, 1, 1])
    by_group = compute_gigpo_advantages(rewards, ids, zeros, ids, ids)
    by_tag = compute_gigpo_advantages(rewards, ids, zeros, ids, ids, grouping="tags", tag_ids=tags)
    by_batch = compute_gigpo_advantages(rewards, ids, zeros, ids, ids, grouping="batch")
    assert by_group.episode_advantages.abs().max().item() == 0.0
    torch.testing.assert_close(by_tag.episode_advantages, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    torch.testing.assert_close(by_batch.episode_advantages, rewards - rewards.mean())


def test_episode_statistics_count_trajectories_not_steps():
    # A 3-step failure and a 1-step success: the group mean is over the two returns (0.5), not the 4 samples.
    inputs = batch([(0.0, 0, 0, 0, 1), (0.0, 0, 1, 0, 2), (0.0, 0, 2, 0, 3), (1.0, 1, 0, 0, 1)])
    out = compute_gigpo_advantages(*inputs, step_weight=0.0)
    torch.testing.assert_close(out.advantages, torch.tensor([-0.5, -0.5, -0.5, 0.5], dtype=torch.float64))
    # The per-step-sample option weighs the long failure 3:1, so the mean is 0.25.
    per_step = compute_gigpo_advantages(*inputs, step_weight=0.0, episode_stats="step")
    torch.testing.assert_close(per_step.advantages, torch.tensor([-0.25, -0.25, -0.25, 0.75], dtype=torch.float64))


def random_batch(seed, num_groups=3, group_size=4, max_steps=6, num_states=4):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for group in range(num_groups):
        for member in range(group_size):
            traj = group * group_size + member
            length = int(torch.randint(1, max_steps + 1, (1,), generator=generator))
            for step in range(length):
                reward = float(torch.randint(0, 3, (1,), generator=generator)) - 0.5
                anchor = int(torch.randint(0, num_states, (1,), generator=generator))
                rows.append((reward, traj * 7 + 100, step * 3, group + 40, anchor))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return batch([rows[i] for i in order])


@pytest.mark.parametrize("method", NORMALIZATION_METHODS)
@pytest.mark.parametrize("grouping", ["traj_group_id", "tags", "batch"])
@pytest.mark.parametrize("episode_stats", ["trajectory", "step"])
@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_loop_reference(method, grouping, episode_stats, seed):
    rewards, traj, step, group, anchor = random_batch(seed)
    tags = group % 2
    kwargs = dict(gamma=0.8, episode_weight=0.7, step_weight=1.3, method=method, grouping=grouping, tag_ids=tags,
                  episode_stats=episode_stats)
    out = compute_gigpo_advantages(rewards, traj, step, group, anchor, **kwargs)
    expected = loop_gigpo(rewards.tolist(), traj.tolist(), step.tolist(), group.tolist(), anchor.tolist(),
                          **{**kwargs, "tag_ids": tags.tolist()})
    for got, want in zip((out.advantages, out.episode_advantages, out.step_advantages, out.step_returns), expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), permutation_seed=st.integers(0, 10_000),
       method=st.sampled_from(NORMALIZATION_METHODS))
def test_shuffling_the_input_only_permutes_the_output(seed, permutation_seed, method):
    inputs = random_batch(seed)
    perm = torch.randperm(inputs[0].shape[0], generator=torch.Generator().manual_seed(permutation_seed))
    base = compute_gigpo_advantages(*inputs, method=method)
    shuffled = compute_gigpo_advantages(*(x[perm] for x in inputs), method=method)
    for field in ("advantages", "episode_advantages", "step_advantages", "step_returns", "episode_returns"):
        torch.testing.assert_close(getattr(shuffled, field), getattr(base, field)[perm], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- relabelling and sorting code paths


@pytest.fixture(params=["numpy", "torch"])
def sort_backend(request, monkeypatch):
    """CPU tensors are sorted by numpy; "torch" runs the path other devices take, on CPU."""
    monkeypatch.setattr(advantages, "_NUMPY_ON_CPU", request.param == "numpy")
    return request.param


@pytest.fixture(scope="module")
def long_shuffled_batch():
    """The benchmark's long setting: 1,024 trajectories of 1..50 steps in groups of 8, shuffled, with anchors
    that recur within groups; and the loop reference's (advantages, episode, step, returns) for it."""
    inputs = synthetic_batch(trajectory_lengths(1024))
    expected = loop_gigpo(*(x.tolist() for x in inputs), gamma=0.9, method="mean_std")
    return inputs, expected


def test_long_shuffled_batch_agrees_with_loop_reference(long_shuffled_batch, sort_backend):
    inputs, expected = long_shuffled_batch
    assert inputs[0].shape[0] > 25_000
    out = compute_gigpo_advantages(*inputs, gamma=0.9, method="mean_std")
    for got, want in zip((out.advantages, out.episode_advantages, out.step_advantages, out.step_returns), expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def wide_ids(inputs):
    """The same batch with ids far apart, in the same order: trajectories 2**40 apart, steps 10**12 apart, groups
    below -2**50 and anchors spread over the whole int64 range like hashes. Every relabelling then has to sort."""
    rewards, traj, step, group, anchor = inputs
    random = torch.randint(-2**63, 2**63 - 1, (int(anchor.max()) + 1,), generator=torch.Generator().manual_seed(7))
    hashes = torch.sort(random).values  # increasing, so anchor group labels keep their order
    return rewards, traj * 2**40 + 5, step * 10**12, group - 2**50, hashes[anchor]


@pytest.mark.parametrize("seed", range(3))
def test_sorting_paths_give_identical_results(seed, monkeypatch):
    inputs = random_batch(seed, num_groups=6, group_size=4, max_steps=30, num_states=6)
    wide = wide_ids(inputs)
    assert len(set(wide[4].tolist())) == len(set(inputs[4].tolist()))  # the hashes kept every anchor distinct
    kwargs = {"method": "mean_std", "grouping": "tags", "tag_ids": inputs[3] % 3}
    reference = compute_gigpo_advantages(*inputs, **kwargs)  # lookup tables, numpy sorts
    default_lookup = advantages._LOOKUP_RANGE_PER_ID
    for numpy_on_cpu in (True, False):
        monkeypatch.setattr(advantages, "_NUMPY_ON_CPU", numpy_on_cpu)
        for batch_inputs, lookup in ((inputs, 0), (wide, default_lookup)):
            monkeypatch.setattr(advantages, "_LOOKUP_RANGE_PER_ID", lookup)  # 0: never a lookup table
            out = compute_gigpo_advantages(*batch_inputs, **kwargs)
            for field in FIELDS:
                assert torch.equal(getattr(out, field), getattr(reference, field)), (numpy_on_cpu, lookup, field)


def test_wide_ids_agree_with_loop_reference(sort_backend):
    rewards, traj, step, group, anchor = wide_ids(random_batch(4, num_groups=4, group_size=4, max_steps=12))
    out = compute_gigpo_advantages(rewards, traj, step, group, anchor, gamma=0.8, method="mean")
    expected = loop_gigpo(rewards.tolist(), traj.tolist(), step.tolist(), group.tolist(), anchor.tolist(),
                          gamma=0.8, method="mean")
    for got, want in zip((out.advantages, out.episode_advantages, out.step_advantages, out.step_returns), expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ids, dtype", [
    ([3, 1, 3, 2, 1], torch.int64),  # small range: lookup table
    ([3, 1, 3, 2, 1], torch.int32),
    ([-7, 2**31 - 1, -7, -2**31, 0], torch.int32),  # wide range: sorted, keys packed with their positions
    ([-7, 10**15, -7, 2**62, 0], torch.int64),
    ([-2**63, 2**63 - 1, 0, -2**63, 5], torch.int64),  # range beyond int64: argsort
])
def test_dense_labels_match_unique(ids, dtype, sort_backend):
    tensor = torch.tensor(ids, dtype=dtype)
    labels, count = advantages._dense_labels(tensor)
    unique, inverse = torch.unique(tensor, return_inverse=True)
    assert count == unique.numel() and torch.equal(labels, inverse)


def test_repeated_step_is_named_on_the_sorting_path(monkeypatch):
    rewards, traj, _, group, anchor = TWO_TRAJECTORIES
    monkeypatch.setattr(advantages, "_LOOKUP_RANGE_PER_ID", 0)
    with pytest.raises(ValueError, match="step_ids must be unique within a trajectory; trajectory 1 has step 0"):
        compute_gigpo_advantages(rewards, traj, torch.tensor([0, 1, 0, 0]), group, anchor)
    with pytest.raises(ValueError, match="trajectory 1 has step 1000000000000 more than once"):
        compute_gigpo_advantages(rewards, traj, torch.tensor([0, 1, 10**12, 10**12]), group, anchor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    inputs = random_batch(3, num_groups=16, group_size=8, max_steps=20)
    cpu = compute_gigpo_advantages(*inputs, method="mean_std")
    gpu = compute_gigpo_advantages(*(x.cuda() for x in inputs), method="mean_std")
    assert gpu.advantages.is_cuda
    torch.testing.assert_close(gpu.advantages.cpu(), cpu.advantages)
    torch.testing.assert_close(gpu.step_returns.cpu(), cpu.step_returns)


def test_empty_batch():
    empty = torch.zeros(0)
    ids = torch.zeros(0, dtype=torch.long)
    out = compute_gigpo_advantages(empty, ids, ids, ids, ids)
    assert out.advantages.shape == (0,)


# ---------------------------------------------------------------------------------------------- bad input


def test_mismatched_lengths_name_the_argument():
    rewards, traj, step, group, anchor = TWO_TRAJECTORIES
    with pytest.raises(ValueError, match="anchor_ids has 3 entries but rewards has 4"):
        compute_gigpo_advantages(rewards, traj, step, group, anchor[:3])


def test_non_finite_rewards():
    rewards, *rest = TWO_TRAJECTORIES
    bad = rewards.clone()
    bad[2] = math.nan
    with pytest.raises(ValueError, match="rewards must be finite; entry 2"):
        compute_gigpo_advantages(bad, *rest)


def test_finite_rewards_whose_sum_overflows_are_accepted():
    # The finiteness check first looks at the sum; an overflowing sum of finite rewards must not be an error.
    for dtype, big in ((torch.float64, 1e308), (torch.float32, 3e38)):
        rewards = torch.tensor([big, big], dtype=dtype)
        ids = torch.arange(2)
        assert not torch.isfinite(rewards.sum())
        out = compute_gigpo_advantages(rewards, ids, torch.zeros(2, dtype=torch.long), ids, ids, method="identity")
        torch.testing.assert_close(out.episode_returns, rewards)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="zscore"), r"method must be one of \['identity', 'mean', 'mean_std', 'asym_clip'\], got 'zscore'"),
    (dict(grouping="episode"), r"grouping must be one of \['traj_group_id', 'tags', 'batch'\]"),
    (dict(grouping="tags"), "grouping=\"tags\" needs tag_ids"),
    (dict(gamma=1.5), r"gamma \(step_reward_gamma\) must be in \[0, 1\]"),
    (dict(episode_stats="samples"), r"episode_stats must be one of \['trajectory', 'step'\]"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_gigpo_advantages(*TWO_TRAJECTORIES, **kwargs)


def test_repeated_step_ids_within_a_trajectory():
    rewards, traj, step, group, anchor = TWO_TRAJECTORIES
    with pytest.raises(ValueError, match="step_ids must be unique within a trajectory; trajectory 1 has step 0"):
        compute_gigpo_advantages(rewards, traj, torch.tensor([0, 1, 0, 0]), group, anchor)


def test_trajectory_spanning_two_groups():
    rewards, traj, step, _, anchor = TWO_TRAJECTORIES
    with pytest.raises(ValueError, match="group_ids must be constant within a trajectory"):
        compute_gigpo_advantages(rewards, traj, step, torch.tensor([0, 1, 0, 0]), anchor)


def test_wrong_types_and_shapes():
    rewards, traj, step, group, anchor = TWO_TRAJECTORIES
    with pytest.raises(ValueError, match="traj_ids must be an integer tensor"):
        compute_gigpo_advantages(rewards, traj.double(), step, group, anchor)
    with pytest.raises(ValueError, match="rewards must be a floating-point tensor"):
        compute_gigpo_advantages(traj, traj, step, group, anchor)
    with pytest.raises(ValueError, match=r"rewards must be 1-D .* got shape \(2, 2\)"):
        compute_gigpo_advantages(rewards.view(2, 2), traj, step, group, anchor)
    with pytest.raises(ValueError, match="group_ids must be a torch.Tensor"):
        compute_gigpo_advantages(rewards, traj, step, [0, 0, 0, 0], anchor)


# ------------------------------------------------------------------------------------ anchor stats, adjust


def test_anchor_group_stats():
    stats = anchor_group_stats(torch.tensor([0, 0, 1, 2, 2, 2]))
    assert stats.num_groups == 3
    assert stats.singleton_fraction == pytest.approx(1 / 3)
    assert stats.mean_group_size == pytest.approx(2.0)
    assert stats.as_dict()["anchor_num_groups"] == 3.0


def test_stalled_groups_are_unsolved_groups_without_advantage():
    # Group 7: every try failed alike (stalled). Group 3: every try succeeded (solved, not stalled). Group 5: one try
    # scored more (it has a learning signal). Group 9: returns equal up to rounding (0.3 vs 0.1 + 0.2), no success
    # (stalled).
    groups = torch.tensor([7, 7, 7, 3, 3, 5, 5, 9, 9])
    returns = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.3, 0.1 + 0.2], dtype=torch.float64)
    success = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    stalled = stalled_groups(returns, groups, success)
    assert stalled.tolist() == [False, False, True, True]  # groups 3, 5, 7, 9
    # Exactly the groups whose advantages are zero and that did not succeed.
    rows = [(float(r), i, 0, int(g), i) for i, (r, g) in enumerate(zip(returns, groups))]
    zero = compute_gigpo_advantages(*batch(rows)).advantages.abs() < 1e-12
    labels = torch.unique(groups, return_inverse=True)[1]
    assert stalled[labels].tolist() == (zero & ~success).tolist()


def test_stalled_groups_name_mismatched_inputs():
    with pytest.raises(ValueError, match="episode_success has 2 entries but episode_returns has 3"):
        stalled_groups(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        stalled_groups(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("n, divisor, mode, expected_len", [
    (10, 4, "copy", 12), (10, 4, "delete", 8), (10, 4, "auto", 12),  # remainder 2 >= 4/2: copy
    (9, 4, "auto", 8),  # remainder 1 < 2: delete
    (3, 4, "auto", 4),  # smaller than the divisor: copy
    (3, 4, "delete", 4),  # deleting would empty the batch: falls back to copy
    (8, 4, "delete", 8), (2, 7, "copy", 7),
])
def test_batch_adjust_sizes(n, divisor, mode, expected_len):
    keep = batch_adjust(n, divisor, mode, seed=1)
    assert keep.shape == (expected_len,)
    assert len(keep) % divisor == 0
    assert keep.min() >= 0 and keep.max() < n


def test_batch_adjust_copy_keeps_every_original_and_delete_drops_distinct():
    copied = batch_adjust(10, 4, "copy", seed=3)
    assert copied[:10].tolist() == list(range(10))
    deleted = batch_adjust(10, 4, "delete", seed=3)
    assert len(set(deleted.tolist())) == 8 and deleted.tolist() == sorted(deleted.tolist())


def test_batch_adjust_is_seeded():
    assert batch_adjust(10, 4, "copy", seed=5).tolist() == batch_adjust(10, 4, "copy", seed=5).tolist()
    draws = {tuple(batch_adjust(100, 7, "copy", seed=s).tolist()) for s in range(5)}
    assert len(draws) > 1


def test_batch_adjust_errors():
    with pytest.raises(ValueError, match=r"mode \(batch_adjust_mode\) must be one of \['copy', 'delete', 'auto'\]"):
        batch_adjust(10, 4, "pad")
    with pytest.raises(ValueError, match="divisor must be >= 1"):
        batch_adjust(10, 0, "copy")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        batch_adjust(0, 4, "copy")
