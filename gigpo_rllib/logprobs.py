"""Token log-probabilities of responses: the one definition shared by sampler and learner.

The sampler records "old" log-probs with :func:`forward_token_logprobs` right after generation and the
learner computes "new" ones with the same function, so the PPO ratio is exactly 1 before any update.
Pure torch, no RLlib import.

Shapes: ``B`` rows, ``S`` sequence positions, ``V`` vocabulary, ``K`` allowed replies, ``L`` their max length.

Action-choice constraint. ``allowed_responses`` (B, K, L) int64, padded with -1, lists for each row the
complete replies (token ids, each ending with EOS) the policy may produce. At response step ``t`` the
policy is restricted to the *distinct* tokens ``allowed[b, k, t]`` over the replies ``k`` whose first ``t``
tokens equal the response's first ``t`` tokens (a prefix trie). A row whose allowed replies are all -1 is
unconstrained. The same rule drives the sampler (:func:`next_token_candidates`) and the learner
(:func:`sequence_token_logprobs`).
"""

from __future__ import annotations

import torch

PAD_REPLY_ID = -1


def _dedupe(cand: torch.Tensor) -> torch.Tensor:
    """Replace repeated ids along the last dim with -1 (keep the first). ``cand`` (..., K) -> (..., K)."""
    k = cand.shape[-1]
    same = cand.unsqueeze(-1) == cand.unsqueeze(-2)  # (..., K, K): [i, j] = cand_i == cand_j
    earlier = torch.ones(k, k, dtype=torch.bool, device=cand.device).tril(diagonal=-1)  # j < i
    dup = (same & earlier).any(-1)
    return cand.masked_fill(dup, PAD_REPLY_ID)


def _check_allowed(allowed: torch.Tensor, batch: int) -> None:
    if not isinstance(allowed, torch.Tensor) or allowed.dim() != 3 or allowed.shape[0] != batch:
        shape = tuple(allowed.shape) if isinstance(allowed, torch.Tensor) else type(allowed).__name__
        raise ValueError(f"allowed_responses must be an int tensor of shape (B={batch}, K, L), got {shape}")
    if allowed.dtype.is_floating_point or allowed.dtype == torch.bool:
        raise ValueError(f"allowed_responses must hold integer token ids (-1 = padding), got {allowed.dtype}")


def next_token_candidates(allowed_responses: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Allowed next-token ids after the tokens generated so far (sampler side of the constraint).

    Args:
        allowed_responses: (B, K, L) int64, -1 padded.
        generated: (B, T) int64, the response tokens produced so far (T may be 0).

    Returns:
        (B, K) int64: the distinct allowed next tokens of each row, -1 elsewhere. A row that is
        unconstrained (all -1) or has no continuation (finished, or diverged) is all -1.
    """
    _check_allowed(allowed_responses, generated.shape[0])
    allowed = allowed_responses.to(torch.long)
    b, k, length = allowed.shape
    t = generated.shape[1]
    if t >= length:
        return torch.full((b, k), PAD_REPLY_ID, dtype=torch.long, device=allowed.device)
    prefix_ok = (allowed[:, :, :t] == generated.to(allowed.device, torch.long).unsqueeze(1)).all(-1)  # (B, K)
    cand = allowed[:, :, t].masked_fill(~prefix_ok, PAD_REPLY_ID)
    return _dedupe(cand)


def allowed_next_tokens(allowed_replies: list[list[int]], generated: list[int]) -> list[int]:
    """List version of :func:`next_token_candidates` for one row (e.g. HF ``prefix_allowed_tokens_fn``).

    ``allowed_replies``: K replies as token-id lists; ``generated``: response tokens so far. Returns the
    sorted distinct allowed next tokens ([] if none).
    """
    t = len(generated)
    out = {r[t] for r in allowed_replies if len(r) > t and list(r[:t]) == list(generated)}
    return sorted(out)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B, S) int64 position ids counting only attended tokens (any padding side)."""
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def sequence_token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    allowed_responses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each response token under ``softmax(logits / temperature)``.

    Args:
        logits: (B, S, V) model outputs for ``input_ids``; ``logits[:, s]`` predicts ``input_ids[:, s + 1]``.
        input_ids: (B, S) int64.
        response_mask: (B, S) bool, True on the response tokens. Each row's response must be one contiguous
            run starting after position 0 (its prompt comes before it; padding may be on either side).
        temperature: > 0; logits are divided by it.
        allowed_responses: optional (B, K, L) int64, -1 padded (see module docstring). The response starts
            at the first True of ``response_mask`` in its row.

    Returns:
        ``(logprobs, entropy)``, both (B, S) float32, 0 where ``response_mask`` is False. ``logprobs[b, s]``
        is ``log p(input_ids[b, s] | input_ids[b, :s])``; ``entropy[b, s]`` is the entropy of that
        (possibly restricted) next-token distribution. Differentiable w.r.t. ``logits``.

    Raises:
        ValueError: bad shapes/temperature, a response at position 0, or a response token outside the
            allowed replies of a constrained row.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, S, V), got {tuple(logits.shape)}")
    bsz, seq, _ = logits.shape
    if tuple(input_ids.shape) != (bsz, seq):
        raise ValueError(f"input_ids must have shape {(bsz, seq)} like logits, got {tuple(input_ids.shape)}")
    if tuple(response_mask.shape) != (bsz, seq):
        raise ValueError(f"response_mask must have shape {(bsz, seq)}, got {tuple(response_mask.shape)}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    mask = response_mask.to(torch.bool)
    if mask[:, 0].any():
        raise ValueError("response_mask must be False at position 0 (a response needs a prompt before it)")

    out_lp = torch.zeros(bsz, seq, dtype=torch.float32, device=logits.device)
    out_ent = torch.zeros(bsz, seq, dtype=torch.float32, device=logits.device)
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    if rows.numel() == 0:
        return out_lp, out_ent

    z = logits[rows, cols - 1].float() / float(temperature)  # (N, V)
    tok = input_ids[rows, cols].to(torch.long)  # (N,)
    z_tok = z.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    lp = z_tok - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)

    if allowed_responses is not None:
        _check_allowed(allowed_responses, bsz)
        allowed = allowed_responses.to(device=logits.device, dtype=torch.long)
        length = allowed.shape[2]
        constrained_row = (allowed != PAD_REPLY_ID).any(dim=(1, 2))  # (B,)
        has_resp = mask.any(-1)
        start = torch.where(has_resp, mask.to(torch.long).argmax(-1), torch.zeros_like(has_resp, dtype=torch.long))
        # The response's first L tokens, -2 (matches nothing) beyond the row or the response.
        j = torch.arange(length, device=logits.device)
        pos = start.unsqueeze(-1) + j  # (B, L)
        in_seq = pos < seq
        pos_c = pos.clamp(max=seq - 1)
        resp = torch.where(in_seq & mask.gather(1, pos_c), input_ids.to(torch.long).gather(1, pos_c), -2)
        eq = allowed == resp.unsqueeze(1)  # (B, K, L)
        # prefix_ok[b, k, t] = replies k and the response agree on their first t tokens.
        ok = torch.cumprod(eq.to(torch.long), dim=-1).to(torch.bool)
        prefix_ok = torch.cat([torch.ones_like(ok[:, :, :1]), ok[:, :, :-1]], dim=-1)
        cand = _dedupe(allowed.masked_fill(~prefix_ok, PAD_REPLY_ID).transpose(1, 2))  # (B, L, K)

        t = cols - start[rows]  # (N,) response step
        t_ok = t < length
        c = cand[rows, t.clamp(max=length - 1)]  # (N, K)
        c = c.masked_fill(~t_ok.unsqueeze(-1), PAD_REPLY_ID)
        valid = c != PAD_REPLY_ID
        zc = z.gather(-1, c.clamp(min=0)).masked_fill(~valid, float("-inf"))  # (N, K)
        is_con = constrained_row[rows]
        tok_allowed = ((c == tok.unsqueeze(-1)) & valid).any(-1)
        bad = is_con & ~tok_allowed
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                "allowed_responses: the response token "
                f"{int(tok[i])} at row {int(rows[i])}, position {int(cols[i])} (response step {int(t[i])}) "
                "is not a continuation of any allowed reply of that row"
            )
        # Fill unconstrained rows with a finite dummy so no NaN can reach the gradient through torch.where.
        zc = torch.where(is_con.unsqueeze(-1), zc, torch.zeros_like(zc))
        lse_c = torch.logsumexp(zc, dim=-1)
        p_c = torch.softmax(zc, dim=-1)
        ent_c = lse_c - (p_c * zc.masked_fill(~valid, 0.0)).sum(-1)
        lp = torch.where(is_con, z_tok - lse_c, lp)
        ent = torch.where(is_con, ent_c, ent)

    out_lp = out_lp.index_put((rows, cols), lp)
    out_ent = out_ent.index_put((rows, cols), ent)
    return out_lp, out_ent


def forward_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    allowed_responses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Hugging Face causal LM on (B, S) ids and return :func:`sequence_token_logprobs` of it.

    Position ids come from ``attention_mask`` (so left- and right-padded rows give the same values). This
    is the exact computation both the sampler and the learner use. Returns ``(logprobs, entropy)`` (B, S).
    """
    position_ids = position_ids_from_attention_mask(attention_mask)
    logits = model(
        input_ids=input_ids.to(torch.long),
        attention_mask=attention_mask.to(torch.long),
        position_ids=position_ids,
        use_cache=False,
    ).logits
    return sequence_token_logprobs(
        logits, input_ids, response_mask, temperature=temperature, allowed_responses=allowed_responses
    )
