"""From the env runners' step samples to padded token batches for the learners (numpy, no RLlib).

Each step sample becomes one right-padded row ``[prompt, response, pad...]``. Scalar columns stay 1-D, so the
learner can compute the advantages on its device before minibatching. With several learners the batch is
sharded by *episode group* (by tag with ``grouping="tags"``), so every group's statistics stay exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gigpo_rllib.advantages import batch_adjust, groups_without_spread
from gigpo_rllib.logprobs import PAD_REPLY_ID
from gigpo_rllib.rollout import EPISODE_COLUMNS, SAMPLE_COLUMNS


# Per-sample columns held as lists of variable-length rows (token ids, log-probs, allowed replies).
ROW_LIST_COLUMNS = ("prompt_ids", "response_ids", "response_logprobs", "allowed_replies")
# The per-sample number of the weights that sampled it, added by the env runner (see max_off_policy_steps).
WEIGHTS_VERSION = "weights_seq_no"


def merge_rollouts(rollouts: list[dict[str, Any]], sequential: bool = False) -> dict[str, Any]:
    """Concatenate the outputs of several :meth:`StepCollector.collect` calls (counts add up; the first fault is
    kept). Timings are those of the slowest rollout (runners sample side by side), or their sum when the rollouts
    ran one after another (``sequential``)."""
    merged: dict[str, Any] = {name: np.concatenate([r[name] for r in rollouts]) for name in SAMPLE_COLUMNS}
    if WEIGHTS_VERSION in rollouts[0]:
        merged[WEIGHTS_VERSION] = np.concatenate([r[WEIGHTS_VERSION] for r in rollouts])
    for name in ROW_LIST_COLUMNS:
        if name in rollouts[0]:
            merged[name] = [row for r in rollouts for row in r[name]]
    merged["episodes"] = {k: np.concatenate([r["episodes"][k] for r in rollouts]) for k in EPISODE_COLUMNS}
    if "transcript" in rollouts[0]["episodes"]:
        merged["episodes"]["transcript"] = [turns for r in rollouts for turns in r["episodes"]["transcript"]]
    combine = sum if sequential else max
    merged["timing"] = {k: combine(r["timing"][k] for r in rollouts) for k in rollouts[0]["timing"]}
    for name in ("token_counts", "lost"):
        merged[name] = {k: sum(r[name][k] for r in rollouts) for k in rollouts[0][name]}
    for name in ("groups_dropped", "ended_by_env_error"):
        merged[name] = sum(r[name] for r in rollouts)
    merged["first_fault"] = next((r["first_fault"] for r in rollouts if r["first_fault"]), None)
    return merged


def groups_with_signal(rollout: dict[str, Any]) -> np.ndarray:
    """Ids of the rollout's episode groups whose episode returns differ (the others get zero episode-level advantage,
    :func:`~gigpo_rllib.advantages.groups_without_spread`), in increasing order."""
    import torch

    # A runner whose trajectories were all lost sends empty (float) columns: ids are cast back to integers.
    _, traj_labels = np.unique(rollout["traj_ids"].astype(np.int64), return_inverse=True)
    returns = np.bincount(traj_labels, weights=rollout["rewards"].astype(np.float64))
    ends = np.flatnonzero(rollout["episode_ends"])  # one row per trajectory
    group_ids = rollout["group_ids"][ends].astype(np.int64)
    flat = groups_without_spread(torch.from_numpy(returns[traj_labels[ends]]), torch.from_numpy(group_ids)).numpy()
    return np.unique(group_ids)[~flat]


def take_groups(rollout: dict[str, Any], group_ids: np.ndarray) -> dict[str, Any]:
    """The step samples of ``rollout`` whose episode group is in ``group_ids`` (the per-episode records, counts and
    timings stay whole: they describe what was sampled)."""
    rows = np.flatnonzero(np.isin(rollout["group_ids"], group_ids))
    taken = dict(rollout)
    for name in SAMPLE_COLUMNS + ((WEIGHTS_VERSION,) if WEIGHTS_VERSION in rollout else ()):
        taken[name] = rollout[name][rows]
    for name in ROW_LIST_COLUMNS:
        if name in rollout:
            taken[name] = [rollout[name][row] for row in rows]
    return taken


def pad_token_batch(samples: dict[str, Any], pad_token_id: int, allowed_replies: list[list[list[int]]] | None = None
                    ) -> dict[str, np.ndarray]:
    """Padded learner columns for N step samples.

    Returns ``input_ids`` (N, S) int64, ``attention_mask`` (N, S) int64, ``response_mask`` (N, S) bool,
    ``old_logprobs`` (N, S) float32, the 1-D scalar columns of :data:`SAMPLE_COLUMNS` (rewards float32, ids
    int64), and with ``allowed_replies`` (one list of token-id replies per sample) ``allowed_responses``
    (N, K, L) int64 padded with -1.
    """
    prompts, responses, logprobs = samples["prompt_ids"], samples["response_ids"], samples["response_logprobs"]
    n = len(prompts)
    width = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    response_mask = np.zeros((n, width), dtype=bool)
    old_logprobs = np.zeros((n, width), dtype=np.float32)
    for row, (prompt, response, lp) in enumerate(zip(prompts, responses, logprobs)):
        end = len(prompt) + len(response)
        input_ids[row, :len(prompt)] = prompt
        input_ids[row, len(prompt):end] = response
        attention[row, :end] = 1
        response_mask[row, len(prompt):end] = True
        old_logprobs[row, len(prompt):end] = lp
    out = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask,
           "old_logprobs": old_logprobs}
    for name in SAMPLE_COLUMNS:
        out[name] = samples[name].astype(np.float32 if name == "rewards" else np.int64)
    if allowed_replies is not None:
        # A free-form env's rows have no allowed replies (an all -1 row is unconstrained); K and L are at least 1.
        k = max([len(replies) for replies in allowed_replies] + [1])
        length = max([len(reply) for replies in allowed_replies for reply in replies] + [1])
        allowed = np.full((n, k, length), PAD_REPLY_ID, dtype=np.int64)
        for row, replies in enumerate(allowed_replies):
            for j, reply in enumerate(replies):
                allowed[row, j, :len(reply)] = reply
        out["allowed_responses"] = allowed
    return out


def shard_rows(batch: dict[str, np.ndarray], num_shards: int, by: str = "group_ids") -> list[np.ndarray]:
    """Row indices of ``num_shards`` shards that never split a value of ``batch[by]`` (an episode group or a
    tag), balanced by row count (largest units first onto the lightest shard)."""
    units, counts = np.unique(batch[by], return_counts=True)
    if len(units) < num_shards:
        raise ValueError(f"cannot shard {len(units)} distinct {by} over {num_shards} learners; each learner needs "
                         "at least one")
    loads = np.zeros(num_shards, dtype=np.int64)
    owner = {}
    for unit_index in np.argsort(-counts, kind="stable"):
        shard = int(np.argmin(loads))
        owner[units[unit_index]] = shard
        loads[shard] += counts[unit_index]
    shard_of_row = np.array([owner[v] for v in batch[by]], dtype=np.int64)
    return [np.flatnonzero(shard_of_row == s) for s in range(num_shards)]


def take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[rows] for name, column in batch.items()}


def minibatches_per_shard(shard_sizes: list[int], minibatch_size: int, mode: str) -> int:
    """Minibatches per epoch of the largest shard after :func:`batch_adjust`; every learner must run this many
    so that DDP's collective calls line up."""
    return max(len(batch_adjust(size, minibatch_size, mode)) // minibatch_size for size in shard_sizes)
