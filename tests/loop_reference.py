"""A plain Python-loop GiGPO reference: one dictionary pass per quantity, the way the public implementations
compute it. Deliberately written independently of ``gigpo_rllib.advantages`` (lists and dicts, no torch ops),
so the tests compare two derivations of docs/design.md "The math"; the benchmark times it as the baseline."""

from __future__ import annotations

import math
from collections import defaultdict


def _norm(x: float, members: list[float], method: str) -> float:
    if method == "identity":
        return x
    if len(members) < 2:
        return 0.0
    mu = sum(members) / len(members)
    if method == "mean":
        return x - mu
    sigma = math.sqrt(sum((m - mu) ** 2 for m in members) / (len(members) - 1))
    if sigma <= 1e-9 * (1.0 + abs(mu)):
        return 0.0
    z = (x - mu) / (sigma + 1e-6)
    return min(max(z, -1.0), 3.0) if method == "asym_clip" else z


def loop_gigpo(rewards, traj_ids, step_ids, group_ids, anchor_ids, *, gamma=0.95, episode_weight=1.0,
               step_weight=1.0, method="mean", grouping="traj_group_id", tag_ids=None, episode_stats="trajectory"):
    """Returns (advantages, episode_advantages, step_advantages, step_returns) as Python lists, input order."""
    n = len(rewards)
    steps_of = defaultdict(list)
    for i in range(n):
        steps_of[traj_ids[i]].append(i)
    returns_of = {traj: sum(rewards[i] for i in members) for traj, members in steps_of.items()}

    def episode_key(i):
        return {"traj_group_id": group_ids[i], "tags": None if tag_ids is None else tag_ids[i], "batch": 0}[grouping]

    trajs_in_group = defaultdict(list)
    for traj, members in steps_of.items():
        copies = len(members) if episode_stats == "step" else 1  # "step": every sample carries its return
        trajs_in_group[episode_key(members[0])].extend([returns_of[traj]] * copies)
    episode_adv = [_norm(returns_of[traj_ids[i]], trajs_in_group[episode_key(i)], method) for i in range(n)]

    step_returns = [0.0] * n
    for members in steps_of.values():
        running = 0.0
        for i in sorted(members, key=lambda j: step_ids[j], reverse=True):
            running = rewards[i] + gamma * running
            step_returns[i] = running

    anchor_members = defaultdict(list)
    for i in range(n):
        anchor_members[(group_ids[i], anchor_ids[i])].append(step_returns[i])
    step_adv = [_norm(step_returns[i], anchor_members[(group_ids[i], anchor_ids[i])], method) for i in range(n)]

    combined = [episode_weight * e + step_weight * s for e, s in zip(episode_adv, step_adv)]
    return combined, episode_adv, step_adv, step_returns
