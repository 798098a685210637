"""GiGPO's two-level, critic-free advantages (Feng et al., arXiv 2505.10978, Sec. 3), in vectorised torch.

Every function takes flat 1-D tensors with one entry per *step sample* (one turn of one trajectory), in any
order, and returns tensors in that same order on the inputs' device. There is no Python loop over samples,
trajectories or groups. Counter-like ids are relabelled through lookup tables and only wide ones (anchor hashes)
are sorted; on CPU tensors the sorts and range scans run in numpy on zero-copy views, on other devices in torch.
Notation (docs/design.md "The math"):

* ``τ(i)`` trajectory, ``g(i)`` episode group, ``t(i)`` step index, ``r_i`` reward, ``a(i)`` anchor state id.
* Episode return ``R_τ = Σ_t r_t``; episode advantage ``A^E_i = norm(R_τ(i); {R_τ' : τ' ∈ g(i)})`` (Eq. 3),
  statistics taken over *trajectories* (one value each), not over step samples.
* Discounted step return ``G_i = r_i + γ G_next(i)`` (Eq. 5), ``next`` = the following step of the trajectory.
* Anchor groups: samples with equal ``(g(i), a(i))`` (Eq. 6), i.e. the same state seen inside the same episode
  group, repeats within one trajectory included; never pooled across episode groups.
* Step advantage ``A^S_i = norm(G_i; {G_j : j ∈ anchor group of i})`` (Eq. 7).
* Combined ``A_i = w_E A^E_i + w_S A^S_i`` (Eq. 8).

``norm`` is one of :data:`NORMALIZATION_METHODS`: ``identity`` (x), ``mean`` (x − μ), ``mean_std``
((x − μ)/(σ + 1e-6), unbiased σ) and ``asym_clip`` (the ``mean_std`` score clamped to [−1, 3]). For the
centring methods a group of one sample gets 0 (it has no baseline) and a group with σ ≈ 0 gets 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

NORMALIZATION_METHODS = ("identity", "mean", "mean_std", "asym_clip")
EPISODE_GROUPINGS = ("traj_group_id", "tags", "batch")
EPISODE_STATS = ("trajectory", "step")
BATCH_ADJUST_MODES = ("copy", "delete", "auto")

STD_EPSILON = 1e-6
ASYM_CLIP_RANGE = (-1.0, 3.0)
# Statistics run in float64: with float32, a group of equal large returns can leave a rounding-level σ that
# ``(x − μ)/(σ + ε)`` would blow up into ±1 scores.
_STATS_DTYPE = torch.float64
_ZERO_STD_RELATIVE = 1e-9
# Ids whose range is at most this many times their count (trajectory, step, group and tag ids are counters) are
# relabelled through a lookup table, O(N + range), instead of a sort; wider ranges (anchor hashes) are sorted.
_LOOKUP_RANGE_PER_ID = 4
# CPU tensors are sorted and scanned for min/max by numpy (zero-copy views): at 50k int64 keys its vectorised sort
# is ~4x faster than torch's and its min/max ~2x. Other devices use torch. Tests switch this off to run the torch
# path on CPU.
_NUMPY_ON_CPU = True


@dataclass(frozen=True)
class GiGPOAdvantages:
    """Result of :func:`compute_gigpo_advantages`; every tensor has shape ``(N,)`` in input order."""

    advantages: torch.Tensor
    episode_advantages: torch.Tensor
    step_advantages: torch.Tensor
    step_returns: torch.Tensor
    episode_returns: torch.Tensor
    anchor_group_ids: torch.Tensor
    """Dense anchor-group label ``0..K-1`` of each sample (equal label ⇔ equal ``(group, anchor)``)."""


@dataclass(frozen=True)
class AnchorGroupStats:
    """Metrics of the step-level grouping: how much state sharing the batch had."""

    num_groups: int
    singleton_fraction: float
    """Fraction of anchor groups that hold one sample (their step advantage is 0)."""
    mean_group_size: float

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "AnchorGroupStats":
        """From :func:`anchor_group_counts` (possibly summed over shards)."""
        groups, singletons, samples = (float(c) for c in counts)
        if groups == 0:
            return cls(0, 0.0, 0.0)
        return cls(num_groups=int(groups), singleton_fraction=singletons / groups, mean_group_size=samples / groups)

    def as_dict(self, prefix: str = "anchor_") -> dict[str, float]:
        return {
            f"{prefix}num_groups": float(self.num_groups),
            f"{prefix}singleton_fraction": self.singleton_fraction,
            f"{prefix}mean_group_size": self.mean_group_size,
        }


# --------------------------------------------------------------------------------------------- validation


def _check_1d(name: str, tensor: torch.Tensor, length: int | None, reference: str = "rewards") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one entry per step sample), got shape {tuple(tensor.shape)}")
    if length is not None and tensor.shape[0] != length:
        raise ValueError(
            f"{name} has {tensor.shape[0]} entries but {reference} has {length}; every input needs one entry per "
            "step sample (nothing is broadcast)"
        )


def _check_ids(name: str, tensor: torch.Tensor, length: int, device: torch.device, reference: str = "rewards") -> None:
    _check_1d(name, tensor, length, reference)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {reference} is on {device}; put all inputs on one device")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_rewards(rewards: torch.Tensor) -> None:
    _check_1d("rewards", rewards, None)
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    # A finite sum proves every entry finite at the cost of one reduction; the elementwise check runs only when
    # it is not (a non-finite entry, or finite entries whose sum overflows).
    if not math.isfinite(rewards.sum().item()) and not bool(torch.isfinite(rewards).all()):
        bad = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards must be finite; entry {bad} is {rewards[bad].item()}")


# ------------------------------------------------------------------------------------------ building blocks


def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    """``(lowest id, span)`` of a non-empty ``(N,)`` integer tensor, ``span = highest − lowest + 1`` as a Python
    int (it may exceed int64 for hashes)."""
    if _NUMPY_ON_CPU and ids.device.type == "cpu":
        array = ids.numpy()
        low, high = int(array.min()), int(array.max())
    else:
        low, high = (int(bound) for bound in torch.aminmax(ids))
    return low, high - low + 1


def _sort_values(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` ``(N,)`` int64 in ascending order."""
    if _NUMPY_ON_CPU and keys.device.type == "cpu":
        return torch.from_numpy(np.sort(keys.numpy()))
    return torch.sort(keys).values


def _sort(keys: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort int64 keys, ties in any order.

    Args:
        keys: ``(N,)`` int64, in ``[0, span)``; any values when ``span`` ≥ 2**63.
        span: bound of the keys (a Python int, so it may exceed int64).

    Returns:
        ``(sorted keys (N,), permutation (N,))`` with ``sorted keys = keys[permutation]``.
    """
    n = keys.shape[0]
    index_bits = max(n - 1, 1).bit_length()
    if span <= 2 ** (63 - index_bits):
        # Each key shifted up with its position in the low bits: sorting those values sorts the keys and carries
        # the permutation along, and a plain sort of values is ~2.5x faster than an argsort.
        positions = torch.arange(n, device=keys.device)
        packed = _sort_values(torch.add(positions, keys, alpha=1 << index_bits))
        return packed >> index_bits, packed & ((1 << index_bits) - 1)
    if _NUMPY_ON_CPU and keys.device.type == "cpu":
        order = torch.from_numpy(np.argsort(keys.numpy()))
    else:
        order = torch.sort(keys).indices
    return keys.index_select(0, order), order


def _run_labels(sorted_keys: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64 label of each run of equal values in ``sorted_keys`` ``(N,)``: 0, 0, 1, 2, 2, ..."""
    new_run = torch.empty_like(sorted_keys, dtype=torch.long)
    new_run[:1].zero_()
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new_run[1:])
    return new_run.cumsum_(0)


def _dense_labels(ids: torch.Tensor, span: int | None = None) -> tuple[torch.Tensor, int]:
    """Relabel integer ids to ``0..k-1`` in increasing id order (``torch.unique``'s inverse).

    Args:
        ids: ``(N,)`` integer tensor, any range.
        span: when given, the ids are known to lie in ``[0, span)``, which saves scanning them for their range.

    Returns:
        ``(labels (N,) int64, k)``.
    """
    n = ids.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=ids.device), 0
    low, span = (0, span) if span is not None else _id_range(ids)
    # Offsets from the lowest id: small enough for a lookup table, or to pack with positions in _sort. A span
    # beyond int64 (hashes of both signs) cannot be offset without overflow; such ids are sorted as they are.
    keys = ids.long() - low if low != 0 and span < 2**63 else ids.long()
    if span <= _LOOKUP_RANGE_PER_ID * n:
        # Rank of every possible value = number of present values up to it, minus one: a table lookup, no sort.
        rank = torch.zeros(span, dtype=torch.long, device=ids.device).index_fill_(0, keys, 1).cumsum_(0)
        num_labels = int(rank[-1])
        return rank.sub_(1).index_select(0, keys), num_labels
    sorted_keys, order = _sort(keys, span)
    sorted_labels = _run_labels(sorted_keys)
    return torch.empty_like(sorted_labels).scatter_(0, order, sorted_labels), int(sorted_labels[-1]) + 1


def segment_normalize(values: torch.Tensor, segments: torch.Tensor, num_segments: int, method: str) -> torch.Tensor:
    """The ``norm`` of Eqs. 3 and 7 (docs/design.md "The math") of ``values`` within their segments, all at once.

    Args:
        values: ``(N,)`` float.
        segments: ``(N,)`` int64 dense labels in ``[0, num_segments)``.
        num_segments: number of segments ``S``.
        method: one of :data:`NORMALIZATION_METHODS`.

    Returns:
        ``(N,)`` tensor of ``values``' dtype.
    """
    _check_choice("method", method, NORMALIZATION_METHODS)
    if method == "identity":
        return values.clone()
    # Statistics per segment first, then gathers per sample: x -> (x - mean) * scale. A segment of one sample
    # needs no mask: its mean is the sample itself, so x - mean is exactly 0 (and its σ is 0, no spread). An empty
    # segment's 0/0 mean is never gathered.
    x = values.to(_STATS_DTYPE)
    zeros = torch.zeros(num_segments, dtype=_STATS_DTYPE, device=x.device)
    counts = zeros.index_add(0, segments, torch.ones((), dtype=_STATS_DTYPE, device=x.device).expand_as(x))
    means = zeros.index_add(0, segments, x).div_(counts)
    scores = x - means.index_select(0, segments)
    if method != "mean":
        variance = zeros.index_add(0, segments, scores * scores).div_(counts.sub_(1).clamp_min_(1))
        # Raising exact zeros (every singleton's variance) to the smallest normal float first: torch's CPU sqrt is
        # ~10x slower on zeros, and a σ of 1e-154 falls under the spread threshold just as 0 does.
        std = variance.clamp_min_(torch.finfo(_STATS_DTYPE).tiny).sqrt_()
        has_spread = std > means.abs().add_(1.0).mul_(_ZERO_STD_RELATIVE)
        scale = std.add_(STD_EPSILON).reciprocal_().mul_(has_spread)
        scores.mul_(scale.index_select(0, segments))
    if method == "asym_clip":
        scores = scores.clamp(*ASYM_CLIP_RANGE)
    return scores.to(values.dtype)


@dataclass(frozen=True)
class _TrajectoryLayout:
    """Where each step sample sits: trajectory label and position (rank of its step id) within it."""

    traj_labels: torch.Tensor  # (N,) in [0, T)
    positions: torch.Tensor  # (N,) in [0, max_len)
    num_trajectories: int
    max_length: int


def _trajectory_layout(traj_ids: torch.Tensor, step_ids: torch.Tensor) -> _TrajectoryLayout:
    """Trajectory label and position of every sample (the order Eq. 5 recurses in) from ``(N,)`` ids."""
    n = traj_ids.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=traj_ids.device)
        return _TrajectoryLayout(empty, empty, 0, 0)
    traj_labels, num_traj = _dense_labels(traj_ids)
    step_low, step_span = _id_range(step_ids)
    if num_traj * step_span <= _LOOKUP_RANGE_PER_ID * n:
        # Counting instead of sorting: a (trajectory, step) occupancy grid; a position is the number of occupied
        # cells before it in its row. Fewer occupied cells than samples means a repeated step.
        step_offsets = step_ids.long() - step_low if step_low != 0 else step_ids.long()
        cells = torch.add(step_offsets, traj_labels, alpha=step_span)
        ranks = torch.zeros(num_traj, step_span, dtype=torch.long, device=cells.device)
        ranks.view(-1).index_fill_(0, cells, 1)
        ranks = ranks.cumsum_(1)
        lengths = ranks[:, -1]
        if int(lengths.sum()) != n:
            _raise_repeated_step(torch.sort(cells).values, traj_ids, step_ids, cells)
        positions = ranks.view(-1).index_select(0, cells).sub_(1)
        return _TrajectoryLayout(traj_labels, positions, num_traj, int(lengths.max()))
    # Wide step range: one sort of (trajectory, step rank) keys, which are distinct unless a step repeats.
    step_labels, num_steps = _dense_labels(step_ids)
    keys = torch.add(step_labels, traj_labels, alpha=num_steps)
    sorted_keys, order = _sort(keys, num_traj * num_steps)
    _raise_repeated_step(sorted_keys, traj_ids, step_ids, keys)
    lengths = torch.bincount(traj_labels, minlength=num_traj)
    starts = torch.cumsum(lengths, 0) - lengths
    sorted_positions = torch.arange(n, device=order.device) - starts.index_select(0, traj_labels.index_select(0, order))
    positions = torch.empty_like(order).scatter_(0, order, sorted_positions)
    return _TrajectoryLayout(traj_labels, positions, num_traj, int(lengths.max()))


def _raise_repeated_step(sorted_keys: torch.Tensor, traj_ids: torch.Tensor, step_ids: torch.Tensor,
                         keys: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first repeated ``(trajectory, step)``, if any. ``keys`` ``(N,)`` encode the
    pair of each sample, increasing with (trajectory id, step id); ``sorted_keys`` ``(N,)`` is them sorted."""
    repeated = sorted_keys[1:] == sorted_keys[:-1]
    if not bool(repeated.any()):
        return
    sample = int((keys == sorted_keys[int(repeated.nonzero()[0])]).nonzero()[0])
    raise ValueError(
        f"step_ids must be unique within a trajectory; trajectory {traj_ids[sample].item()} has step "
        f"{step_ids[sample].item()} more than once"
    )


def _discounted_returns(rewards: torch.Tensor, layout: _TrajectoryLayout, gamma: float) -> torch.Tensor:
    """Eq. 5 for every sample: ``(N,)`` of ``rewards``' dtype."""
    if layout.num_trajectories == 0:
        return rewards.clone()
    dtype = _STATS_DTYPE
    length = layout.max_length
    # Trajectories as rows of a zero-padded (T, L) matrix; G = R @ W with W[j, k] = γ^(j−k) for j ≥ k sums the
    # discounted future rewards of every position in one matmul. Padding adds zeros, so it changes nothing.
    cells = torch.add(layout.positions, layout.traj_labels, alpha=length)
    padded = torch.zeros(layout.num_trajectories * length, dtype=dtype, device=rewards.device)
    padded.index_copy_(0, cells, rewards.to(dtype))
    returns = padded.view(layout.num_trajectories, length) @ _discount_matrix(length, float(gamma), rewards.device)
    return returns.view(-1).index_select(0, cells).to(rewards.dtype)


@functools.lru_cache(maxsize=16)
def _discount_matrix(length: int, gamma: float, device: torch.device) -> torch.Tensor:
    """``(L, L)`` float64 ``W[j, k] = γ^(j−k)`` for ``j ≥ k``, else 0 (Eq. 5 unrolled). Cached: batches repeat the
    same (L, γ), and building it is ~8 small ops, a noticeable share of a fast call. Callers must not modify it."""
    offsets = torch.arange(length, device=device)
    lag = (offsets[:, None] - offsets[None, :]).clamp_min_(0)
    return torch.full((), gamma, dtype=_STATS_DTYPE, device=device).pow(lag).tril_()


def discounted_step_returns(
    rewards: torch.Tensor, traj_ids: torch.Tensor, step_ids: torch.Tensor, gamma: float = 0.95
) -> torch.Tensor:
    """Discounted return of every step within its trajectory, ``G_i = r_i + γ G_next(i)`` (Eq. 5).

    Args:
        rewards: ``(N,)`` float, finite.
        traj_ids: ``(N,)`` integer trajectory id of each sample.
        step_ids: ``(N,)`` integer step index; unique within a trajectory, gaps allowed (only order matters).
        gamma: discount in ``[0, 1]``.

    Returns:
        ``(N,)`` tensor of ``rewards``' dtype, input order. Cost ``O(T·L²)`` for T trajectories of at most
        L steps, with no Python loop.
    """
    _check_rewards(rewards)
    n = rewards.shape[0]
    _check_ids("traj_ids", traj_ids, n, rewards.device)
    _check_ids("step_ids", step_ids, n, rewards.device)
    _check_gamma(gamma)
    return _discounted_returns(rewards, _trajectory_layout(traj_ids, step_ids), gamma)


def _check_gamma(gamma: float) -> None:
    if not (0.0 <= float(gamma) <= 1.0):
        raise ValueError(f"gamma (step_reward_gamma) must be in [0, 1], got {gamma!r}")


def anchor_group_counts(anchor_group_ids: torch.Tensor) -> torch.Tensor:
    """``[groups, singleton groups, samples]`` (float64, shape ``(3,)``) of dense anchor-group labels. Counts add
    up across disjoint shards (learners), unlike the derived fractions."""
    _check_1d("anchor_group_ids", anchor_group_ids, None)
    sizes = torch.bincount(anchor_group_ids)
    sizes = sizes[sizes > 0]
    return torch.tensor([sizes.numel(), int((sizes == 1).sum()), int(sizes.sum())], dtype=torch.float64)


def anchor_group_stats(anchor_group_ids: torch.Tensor) -> AnchorGroupStats:
    """Summarise dense anchor-group labels (``GiGPOAdvantages.anchor_group_ids``) for metrics."""
    return AnchorGroupStats.from_counts(anchor_group_counts(anchor_group_ids))


# ---------------------------------------------------------------------------------------------- entry point


def compute_gigpo_advantages(
    rewards: torch.Tensor,
    traj_ids: torch.Tensor,
    step_ids: torch.Tensor,
    group_ids: torch.Tensor,
    anchor_ids: torch.Tensor,
    *,
    gamma: float = 0.95,
    episode_weight: float = 1.0,
    step_weight: float = 1.0,
    method: str = "mean",
    grouping: str = "traj_group_id",
    tag_ids: torch.Tensor | None = None,
    episode_stats: str = "trajectory",
) -> GiGPOAdvantages:
    """GiGPO advantages of a batch of step samples (Eqs. 3, 5–8).

    Args:
        rewards: ``(N,)`` float reward of each step sample.
        traj_ids: ``(N,)`` integer trajectory id; all samples of one trajectory share it.
        step_ids: ``(N,)`` integer step index within the trajectory (unique per trajectory).
        group_ids: ``(N,)`` integer episode-group id (the ``group_size`` rollouts from one env seed); constant
            within a trajectory.
        anchor_ids: ``(N,)`` integer anchor-state id of the observation the step acted on.
        gamma: ``step_reward_gamma``, the discount of the step returns, in ``[0, 1]``.
        episode_weight: ``episode_reward_weight`` w_E.
        step_weight: ``step_reward_weight`` w_S (0 gives GRPO).
        method: ``reward_normalization.method``, one of :data:`NORMALIZATION_METHODS`, used at both levels.
        grouping: ``reward_normalization.grouping``, the episode-level group: ``traj_group_id`` (the episode
            group), ``tags`` (every group of one env tag; needs ``tag_ids``) or ``batch`` (the whole batch).
            Step-level anchor groups are always keyed by ``group_ids``.
        tag_ids: ``(N,)`` integer env-tag id of each sample, required when ``grouping="tags"``.
        episode_stats: what the episode-level mean and σ are taken over: ``trajectory`` (one return per
            trajectory, the paper's Eq. 3) or ``step`` (every step sample carries its trajectory's return, so
            longer trajectories weigh more; what some public implementations do, kept for comparison).

    Returns:
        :class:`GiGPOAdvantages` with ``(N,)`` tensors in input order, on the inputs' device.

    Raises:
        ValueError: naming the argument, for mismatched lengths, non-integer ids, non-finite rewards,
            unknown ``method``/``grouping``, missing ``tag_ids``, repeated step ids within a trajectory, or a
            trajectory that spans several episode groups (or tags).
    """
    _check_rewards(rewards)
    n, device = rewards.shape[0], rewards.device
    for name, ids in (("traj_ids", traj_ids), ("step_ids", step_ids), ("group_ids", group_ids), ("anchor_ids", anchor_ids)):
        _check_ids(name, ids, n, device)
    _check_choice("method", method, NORMALIZATION_METHODS)
    _check_choice("grouping", grouping, EPISODE_GROUPINGS)
    _check_choice("episode_stats", episode_stats, EPISODE_STATS)
    _check_gamma(gamma)
    if grouping == "tags":
        if tag_ids is None:
            raise ValueError('grouping="tags" needs tag_ids (one env-tag id per step sample), got None')
        _check_ids("tag_ids", tag_ids, n, device)

    layout = _trajectory_layout(traj_ids, step_ids)
    num_traj = layout.num_trajectories
    traj_group = _per_trajectory(group_ids, layout, "group_ids")
    # Dense labels come from the T per-trajectory values (cheap) instead of all N samples.
    traj_group_labels, num_groups = _dense_labels(traj_group)
    if grouping == "traj_group_id":
        traj_episode_labels, num_episode_groups = traj_group_labels, num_groups
    elif grouping == "tags":
        traj_episode_labels, num_episode_groups = _dense_labels(_per_trajectory(tag_ids, layout, "tag_ids"))
    else:
        traj_episode_labels, num_episode_groups = torch.zeros_like(traj_group_labels), min(num_traj, 1)

    # Episode level (Eq. 3): one return per trajectory, normalised among the trajectories of its group.
    traj_returns = torch.zeros(num_traj, dtype=rewards.dtype, device=device).index_add_(0, layout.traj_labels, rewards)
    if episode_stats == "trajectory":
        episode_advantages = segment_normalize(traj_returns, traj_episode_labels, num_episode_groups,
                                               method).index_select(0, layout.traj_labels)
    else:
        episode_advantages = segment_normalize(traj_returns.index_select(0, layout.traj_labels),
                                               traj_episode_labels.index_select(0, layout.traj_labels),
                                               num_episode_groups, method)

    # Step level (Eqs. 5-7): discounted returns, normalised within (episode group, anchor state) (Eq. 6).
    step_returns = _discounted_returns(rewards, layout, gamma)
    anchor_labels, num_anchors = _dense_labels(anchor_ids)
    sample_groups = traj_group_labels.index_select(0, layout.traj_labels)
    anchor_group_ids, num_anchor_groups = _dense_labels(torch.add(anchor_labels, sample_groups, alpha=num_anchors),
                                                        span=num_groups * num_anchors)
    step_advantages = segment_normalize(step_returns, anchor_group_ids, num_anchor_groups, method)

    return GiGPOAdvantages(
        advantages=episode_weight * episode_advantages + step_weight * step_advantages,  # Eq. 8
        episode_advantages=episode_advantages,
        step_advantages=step_advantages,
        step_returns=step_returns,
        episode_returns=traj_returns.index_select(0, layout.traj_labels),
        anchor_group_ids=anchor_group_ids,
    )


def _per_trajectory(values: torch.Tensor, layout: _TrajectoryLayout, name: str) -> torch.Tensor:
    """The value each trajectory carries, checking that it is constant within the trajectory. ``(T,)``."""
    per_traj = torch.empty(layout.num_trajectories, dtype=values.dtype, device=values.device)
    per_traj.scatter_(0, layout.traj_labels, values)
    mismatch = per_traj.index_select(0, layout.traj_labels) != values
    if bool(mismatch.any()):
        k = int(mismatch.nonzero()[0])
        raise ValueError(f"{name} must be constant within a trajectory; sample {k} disagrees with its trajectory's other samples")
    return per_traj


def groups_without_spread(episode_returns: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Which episode groups have no return spread: every episode earned the same return ``R``, so the
    episode-level advantage of Eq. 3 is zero for every member (``segment_normalize``'s spread threshold decides
    "the same"). Dynamic sampling leaves such groups out of the batch.

    Args:
        episode_returns: ``(N,)`` float, each sample's episode return (one row per trajectory is enough).
        group_ids: ``(N,)`` integer episode-group id.

    Returns:
        ``(G,)`` bool, one entry per episode group in increasing id order.
    """
    n = episode_returns.shape[0]
    _check_1d("episode_returns", episode_returns, None)
    _check_ids("group_ids", group_ids, n, episode_returns.device, "episode_returns")
    labels, num_groups = _dense_labels(group_ids)
    returns = episode_returns.to(_STATS_DTYPE)
    fill = torch.full((num_groups,), math.inf, dtype=_STATS_DTYPE, device=returns.device)
    low = fill.scatter_reduce(0, labels, returns, "amin")
    high = (-fill).scatter_reduce(0, labels, returns, "amax")
    return (high - low) <= high.abs().add(1.0).mul(_ZERO_STD_RELATIVE)


def stalled_groups(episode_returns: torch.Tensor, group_ids: torch.Tensor, episode_success: torch.Tensor
                   ) -> torch.Tensor:
    """Which episode groups are stuck: no episode succeeded and every episode earned the same return.

    Such a group gets zero advantage at both levels (Eq. 3's returns have no spread, and neither have the step
    returns of Eq. 7 when every try failed without reward), so nothing in the policy gradient moves the policy
    on its states. A group whose episodes all succeeded is not stalled: it has nothing left to find.

    Args:
        episode_returns: ``(N,)`` float, each sample's episode return ``R_τ(i)``
            (:attr:`GiGPOAdvantages.episode_returns`).
        group_ids: ``(N,)`` integer episode-group id.
        episode_success: ``(N,)`` bool (or 0/1), whether the sample's episode succeeded.

    Returns:
        ``(G,)`` bool, one entry per episode group in increasing id order.
    """
    flat = groups_without_spread(episode_returns, group_ids)
    _check_1d("episode_success", episode_success, episode_returns.shape[0], "episode_returns")
    labels, num_groups = _dense_labels(group_ids)
    solved = torch.zeros(num_groups, dtype=torch.bool, device=episode_returns.device).index_put_(
        (labels,), episode_success.bool(), accumulate=True)
    return flat & ~solved


def batch_adjust(num_samples: int, divisor: int, mode: str, seed: int = 0) -> torch.Tensor:
    """Indices of the step samples to keep so that their count is a multiple of ``divisor``.

    Runs *after* the advantages are computed, so duplicated or dropped samples never bias group statistics.

    Args:
        num_samples: batch size N ≥ 1.
        divisor: the count must become a multiple of this (minibatch size × number of learners), ≥ 1.
        mode: ``copy`` duplicates random samples up to the next multiple; ``delete`` drops random samples down
            to the previous multiple (falls back to ``copy`` if that would empty the batch); ``auto`` copies
            when the remainder is at least half the divisor or N < divisor, else deletes.
        seed: seed of the random choice.

    Returns:
        ``(M,)`` int64 CPU tensor of indices into the batch, ``M % divisor == 0``; kept originals come in
        ascending order, duplicates are appended after them.
    """
    _check_choice("mode (batch_adjust_mode)", mode, BATCH_ADJUST_MODES)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    remainder = num_samples % divisor
    everything = torch.arange(num_samples)
    if remainder == 0:
        return everything
    if mode == "auto":
        mode = "copy" if (remainder * 2 >= divisor or num_samples < divisor) else "delete"
    if mode == "delete" and num_samples - remainder == 0:
        mode = "copy"
    generator = torch.Generator().manual_seed(seed)
    if mode == "delete":
        dropped = torch.randperm(num_samples, generator=generator)[:remainder]
        keep = torch.ones(num_samples, dtype=torch.bool)
        keep[dropped] = False
        return everything[keep]
    missing = divisor - remainder
    if missing <= num_samples:
        extra = torch.randperm(num_samples, generator=generator)[:missing]
    else:
        extra = torch.randint(num_samples, (missing,), generator=generator)
    return torch.cat([everything, extra])
