"""GiGPO's loss pieces in plain torch: tensors in, tensors out (no Ray, no model, no env), so they can be checked
against the equations line by line and tested with hand-made tensors.

Shapes: ``B`` step samples (rows), ``S`` sequence positions; advantages are one per row and broadcast over the
row's response tokens, every mean is over response tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# The log-ratio log π_θ − log π_old is clamped to ±this before exp: beyond it the ratio is far outside any PPO
# clip range anyway, and exp of a large float32 log-ratio overflows to inf (inf × 0 advantage = NaN).
LOG_RATIO_LIMIT = 20.0


# How the per-token loss is averaged over an update (see :func:`loss_token_weights`).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def loss_token_weights(counted: torch.Tensor, mode: str, *, scale: float = 1.0,
                       sum_over_learners: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token weights ``(N, S)`` of the loss, so that ``Σ weights · ℓ`` over the rows of the *whole update batch*
    (every minibatch, every learner) is ``scale`` times the ``mode`` aggregate of the per-token losses ``ℓ``:

    * ``"token-mean"``: every counted token weighs ``1 / (counted tokens of the batch)``;
    * ``"seq-mean-token-mean"``: each row's mean over its counted tokens, then the mean over rows;
    * ``"seq-mean-token-sum"``: each row's sum over its counted tokens, then the mean over rows.

    ``counted`` ``(N, S)`` bool marks the tokens that count (response tokens the policy chose: not padding, not
    tokens forced by the action constraint); a row without any counts as no sequence. The two denominators
    (tokens, sequences) are summed over learners with one ``sum_over_learners`` call (an all-reduce). Because the
    weights are fixed before the first minibatch, how the rows are split into minibatches (length bucketing,
    sharding) changes nothing but padding.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {list(LOSS_AGG_MODES)}, got {mode!r}")
    counted = counted.to(torch.float64)
    row_tokens = counted.sum(-1)
    totals = torch.stack([row_tokens.sum(), (row_tokens > 0).to(torch.float64).sum()])
    if sum_over_learners is not None:
        totals = sum_over_learners(totals)
    tokens, sequences = totals[0].clamp_min(1), totals[1].clamp_min(1)
    if mode == "token-mean":
        weights = counted / tokens
    elif mode == "seq-mean-token-mean":
        weights = counted / row_tokens.clamp_min(1).unsqueeze(-1) / sequences
    else:
        weights = counted / sequences
    return (weights * scale).to(torch.float32)


# What ``whiten_advantages`` does to the combined advantages (see :func:`shape_advantages`).
ADVANTAGE_SCALINGS = ("none", "scale", "standardize")


def shape_advantages(advantages: torch.Tensor, response_lengths: torch.Tensor, *, scaling: str,
                     clip: float | None, sum_over_learners: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Scale per-sample advantages by statistics over the batch's response *tokens* (a sample weighs by its
    length), then clamp to ``±clip``. Shapes ``(N,)`` -> ``(N,)``.

    ``scaling``:
        ``"scale"``: divide by the token-weighted root mean square ``sqrt(E_tok[A²])``. Nothing is re-centred, so
            an advantage of 0 (a group whose tries all ended alike) stays exactly 0 and every sign is kept; only the
            step size is normalised (the token-weighted mean square becomes 1). The root mean square, not the
            standard deviation, because the std measures spread around a mean that is not removed: advantages
            mostly of one sign have a small std and would be blown up.
        ``"standardize"``: subtract the token-weighted mean, then divide by the token-weighted std (whitening). With
            replies of different lengths the token mean is not 0, so zero advantages move to ``-mean/std``.
        ``"none"``: leave them as they are.

    ``sum_over_learners`` adds a small tensor over all learners (an all-reduce), so sharded learners scale with
    the statistics of the whole batch, exactly as a single learner would.
    """
    if scaling not in ADVANTAGE_SCALINGS:
        raise ValueError(f"scaling must be one of {list(ADVANTAGE_SCALINGS)}, got {scaling!r}")
    if scaling != "none":
        weights = response_lengths.to(torch.float64)
        values = advantages.to(torch.float64)
        sums = torch.stack([weights.sum(), (weights * values).sum(), (weights * values * values).sum()])
        if sum_over_learners is not None:
            sums = sum_over_learners(sums)
        total = sums[0].clamp_min(1)
        mean_square = sums[2] / total
        if scaling == "scale":
            values = values * torch.rsqrt(mean_square + 1e-8)
        else:
            mean = sums[1] / total
            values = (values - mean) * torch.rsqrt((mean_square - mean * mean).clamp_min(0) + 1e-8)
        advantages = values.to(advantages.dtype)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def truncated_is_weights(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(log π_learner_old − log π_sampler), cap)`` per token (Yao et al.
    2025): they correct for sampling from the engine's slightly different policy. ``(B, S)`` -> ``(B, S)``."""
    return torch.exp((learner_logprobs - sampler_logprobs).clamp(max=math.log(cap)))


def gigpo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, *, pg_clip: float, pg_clip_high: float | None = None,
                      dual_clip_ratio: float | None = None, is_weights: torch.Tensor | None = None,
                      token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped PPO surrogate (optionally dual-clipped): its weighted sum with ``token_weights``
    (:func:`loss_token_weights`), or without them its mean over the response tokens.

    Args:
        logprobs, old_logprobs: ``(B, S)`` token log-probs under the current and the old (pre-update) policy.
        advantages: ``(B,)`` one advantage per step sample, broadcast over its response tokens.
        response_mask: ``(B, S)`` bool.
        pg_clip: ε of the ratio clip ``[1 − ε, 1 + ε_high]``.
        pg_clip_high: ε_high, the upper clip ("clip-higher", Yu et al. 2025, DAPO): a larger value lets unlikely
            tokens with a positive advantage gain more per update, which keeps the policy's entropy from collapsing.
            None uses ``pg_clip``.
        dual_clip_ratio: c > 1; when given, the loss of a negative-advantage token is at most ``−c · A``.
        is_weights: optional ``(B, S)`` constant per-token weights of the loss (:func:`truncated_is_weights`).
        token_weights: optional ``(B, S)`` aggregation weights (:func:`loss_token_weights`), 0 off the counted tokens.

    Returns:
        ``(loss, diagnostics)``: diagnostics are ``policy_kl`` (the ``(r − 1) − log r`` estimator) and
        ``clip_fraction``, both scalars.
    """
    mask = response_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(logprobs.dtype)
    high = pg_clip if pg_clip_high is None else pg_clip_high
    token_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - pg_clip, 1 + high) * adv)
    if dual_clip_ratio is not None:
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -dual_clip_ratio * adv), token_loss)
    if is_weights is not None:
        token_loss = token_loss * is_weights.detach()
    with torch.no_grad():
        diagnostics = {
            "policy_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "clip_fraction": masked_mean(((ratio < 1 - pg_clip) | (ratio > 1 + high)).to(mask.dtype), mask),
        }
    if token_weights is None:
        return masked_mean(token_loss, mask), diagnostics
    return (token_loss * token_weights).sum(), diagnostics


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π ‖ π_ref) per token: ``exp(ref − lp) − (ref − lp) − 1`` (≥ 0)."""
    log_ratio = reference_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1
