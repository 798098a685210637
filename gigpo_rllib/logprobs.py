"""Token log-probabilities of responses: the one definition shared by sampler and learner.

The sampler records "old" log-probs with :func:`forward_token_logprobs` right after generation and the
learner computes "new" ones with the same function, so the PPO ratio is exactly 1 before any update.
Pure torch, no RLlib import.

Shapes: ``B`` rows, ``S`` sequence positions, ``V`` vocabulary, ``K`` allowed replies, ``L`` their max length.

Action-choice constraint. ``allowed_responses`` (B, K, L) int64, padded with -1, lists for each row the
complete replies (token ids, each ending with EOS) the policy may produce; the tokens allowed at each response
step come from :mod:`gigpo_rllib.action_trie`, the rule the samplers apply too. A row whose allowed replies are
all -1 is unconstrained.
"""

from __future__ import annotations

import torch

from gigpo_rllib.action_trie import PAD_REPLY_ID, candidates_along, check_allowed


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B, S) int64 position ids counting only attended tokens (any padding side)."""
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the response tokens, each ``(N,)``; checks that no response starts at position 0."""
    mask = response_mask.to(torch.bool)
    if mask[:, 0].any():
        raise ValueError("response_mask must be False at position 0 (a response needs a prompt before it)")
    return mask.nonzero(as_tuple=True)


def _response_candidates(allowed_responses: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                         rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The allowed tokens at each response position (:func:`gigpo_rllib.action_trie.candidates_along`).

    Returns ``(candidates (N, K) int64, -1 padded; constrained (N,) bool)``; an unconstrained row gives all -1.
    """
    bsz, seq = input_ids.shape
    check_allowed(allowed_responses, bsz)
    allowed = allowed_responses.to(device=input_ids.device, dtype=torch.long)
    length = allowed.shape[2]
    mask = response_mask.to(torch.bool)
    constrained_row = (allowed != PAD_REPLY_ID).any(dim=(1, 2))  # (B,)
    has_response = mask.any(-1)
    start = torch.where(has_response, mask.to(torch.long).argmax(-1), torch.zeros_like(has_response, dtype=torch.long))
    # The response's first L tokens, -2 (matches nothing) beyond the row or the response.
    pos = start.unsqueeze(-1) + torch.arange(length, device=input_ids.device)  # (B, L)
    in_seq = pos < seq
    pos_c = pos.clamp(max=seq - 1)
    response = torch.where(in_seq & mask.gather(1, pos_c), input_ids.to(torch.long).gather(1, pos_c), -2)
    per_step = candidates_along(allowed, response)  # (B, L + 1, K); step L and beyond allows nothing
    step = cols - start[rows]  # (N,) response step
    return per_step[rows, step.clamp(max=length)], constrained_row[rows]


def _check_allowed_tokens(candidates: torch.Tensor, constrained: torch.Tensor, tokens: torch.Tensor) -> None:
    """Raise ValueError when a constrained position's token is not among its candidates (one host sync)."""
    allowed = ((candidates == tokens.unsqueeze(-1)) & (candidates != PAD_REPLY_ID)).any(-1)
    bad = constrained & ~allowed
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"allowed_responses: the response token {int(tokens[i])} (response token {i} of the batch) "
                         "is not a continuation of any allowed reply of its row")


def forced_response_tokens(allowed_responses: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
                           ) -> torch.Tensor:
    """``(B, S)`` bool: the response tokens the action constraint forces (a constrained position with exactly one
    allowed token). Their log-prob and entropy are 0 whatever the weights, so they carry no gradient and must not
    count in the loss's denominators. Also checks every constrained token (ValueError), so that scoring the same
    rows later can skip the check (``check_constraint=False``)."""
    rows, cols = _response_positions(response_mask)
    candidates, constrained = _response_candidates(allowed_responses, input_ids, response_mask, rows, cols)
    _check_allowed_tokens(candidates, constrained, input_ids[rows, cols].to(torch.long))
    single = (candidates != PAD_REPLY_ID).sum(-1) == 1
    forced = torch.zeros(response_mask.shape, dtype=torch.bool, device=input_ids.device)
    return forced.index_put((rows, cols), constrained & single)


def _token_logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                                candidates: torch.Tensor | None, constrained: torch.Tensor | None,
                                check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of ``tokens`` under ``softmax(logits / temperature)``, restricted to ``candidates`` on
    constrained positions. ``logits`` (n, V) any float dtype, ``tokens`` (n,) -> two (n,) float32 tensors.

    With ``check``, raises ValueError when a constrained position's token is not among its candidates.
    """
    z = logits.float() / float(temperature)
    z_token = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z_token - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    if candidates is None:
        return logprobs, entropy
    valid = candidates != PAD_REPLY_ID
    z_candidates = z.gather(-1, candidates.clamp(min=0)).masked_fill(~valid, float("-inf"))  # (n, K)
    if check:
        _check_allowed_tokens(candidates, constrained, tokens)
    # Unconstrained positions get a finite dummy, so no NaN can reach the gradient through torch.where.
    z_candidates = torch.where(constrained.unsqueeze(-1), z_candidates, torch.zeros_like(z_candidates))
    lse_candidates = torch.logsumexp(z_candidates, dim=-1)
    p_candidates = torch.softmax(z_candidates, dim=-1)
    entropy_candidates = lse_candidates - (p_candidates * z_candidates.masked_fill(~valid, 0.0)).sum(-1)
    logprobs = torch.where(constrained, z_token - lse_candidates, logprobs)
    entropy = torch.where(constrained, entropy_candidates, entropy)
    return logprobs, entropy


def _check_shapes(input_ids: torch.Tensor, response_mask: torch.Tensor, temperature: float) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
    if tuple(response_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"response_mask must have shape {tuple(input_ids.shape)}, got {tuple(response_mask.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _scatter_to_rows(values: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                     shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for value in values:
        full = torch.zeros(shape, dtype=torch.float32, device=value.device)
        out.append(full.index_put((rows, cols), value))
    return out[0], out[1]


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
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(f"logits must have shape (B, S, V) with (B, S) = input_ids' {tuple(input_ids.shape)}, got "
                         f"{tuple(logits.shape)}")
    _check_shapes(input_ids, response_mask, temperature)
    rows, cols = _response_positions(response_mask)
    candidates = constrained = None
    if allowed_responses is not None:
        candidates, constrained = _response_candidates(allowed_responses, input_ids, response_mask, rows, cols)
    token_values = _token_logprobs_from_logits(logits[rows, cols - 1], input_ids[rows, cols].to(torch.long),
                                               temperature, candidates, constrained)
    return _scatter_to_rows(token_values, rows, cols, tuple(input_ids.shape))


# Logits are materialised for at most this many (token, vocabulary) entries at once: 2^27 float32 values are
# 0.5 GiB, about 880 response tokens of a 152k vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 27
# Configs whose logits are more than ``output_layer(hidden)``; such models are scored through their full forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def scores_response_positions_only(model: torch.nn.Module) -> bool:
    """Whether :func:`forward_token_logprobs` can apply ``model``'s output layer at response positions only: the
    model has a decoder and an output layer, and its config transforms the logits no further."""
    has_parts = callable(getattr(model, "get_decoder", None)) and model.get_output_embeddings() is not None
    config = getattr(model, "config", None)
    return has_parts and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def _chunk_values(output_layer, compute, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                  candidates: torch.Tensor | None, constrained: torch.Tensor | None, check: bool):
    with compute:
        logits = output_layer(hidden)
    return _token_logprobs_from_logits(logits, tokens, temperature, candidates, constrained, check)


def forward_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    allowed_responses: torch.Tensor | None = None,
    response_only: bool = True,
    autocast_dtype: torch.dtype | None = None,
    host_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    check_constraint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Hugging Face causal LM on (B, S) ids and return the :func:`sequence_token_logprobs` of its responses.

    Position ids come from ``attention_mask`` (so left- and right-padded rows give the same values). This is the
    exact computation both the sampler and the learner use. Columns that are padding in every row are cut off
    before the model runs, so a minibatch costs what its longest row does, not the whole batch's widest row.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the model under ``torch.autocast`` in that dtype (the
    learner keeps float32 weights and computes in bfloat16); log-probs are always taken in float32.

    Only the logits that are used are computed (docs/design.md "Scoring only what is trained"): the decoder runs to
    hidden states, the hidden state before each response token is gathered, and the output layer is applied there,
    in chunks of :data:`LOGIT_CHUNK_ELEMENTS`; with gradients on, each chunk is recomputed in the backward pass
    instead of being kept. Memory is then O(response tokens x vocabulary) per chunk instead of
    O(rows x sequence x vocabulary). ``response_only=False`` (or a model that
    :func:`scores_response_positions_only` rejects) runs the full forward instead: the same numbers, at the old
    cost. Returns ``(logprobs, entropy)``, (B, S) float32.

    Where the response tokens are and which columns are used decide tensor shapes, so finding them on a GPU waits
    for the device (a host sync, several per call). ``host_masks``, copies of ``(attention_mask, response_mask)``
    in host memory, lets them be found there instead, with nothing read back from the device. ``check_constraint=
    False`` skips checking that every constrained token is allowed (another sync), for rows already checked
    (:func:`forced_response_tokens`).
    """
    _check_shapes(input_ids, response_mask, temperature)
    layout_masks = host_masks if host_masks is not None else (attention_mask, response_mask)
    rows, cols = _response_positions(layout_masks[1])
    if host_masks is not None:
        # A fresh device tensor (a copy also on CPU, so the host masks stay apart from what the device computes).
        rows, cols = (index.to(input_ids.device, non_blocking=True, copy=True) for index in (rows, cols))
    candidates = constrained = None
    if allowed_responses is not None:
        candidates, constrained = _response_candidates(allowed_responses, input_ids, response_mask, rows, cols)
    tokens = input_ids[rows, cols].to(torch.long)
    first, end = _used_columns(layout_masks[0])
    columns = slice(first, end)
    inputs = dict(input_ids=input_ids[:, columns].to(torch.long), attention_mask=attention_mask[:, columns].to(torch.long),
                  position_ids=position_ids_from_attention_mask(attention_mask)[:, columns], use_cache=False)
    predicting = cols - 1 - first  # the (trimmed) position whose output predicts each response token
    compute = torch.autocast(input_ids.device.type, dtype=autocast_dtype,
                             enabled=autocast_dtype is not None and autocast_dtype != torch.float32)
    if not (response_only and scores_response_positions_only(model)):
        with compute:
            logits = model(**inputs).logits[rows, predicting]
        values = _token_logprobs_from_logits(logits, tokens, temperature, candidates, constrained, check_constraint)
        return _scatter_to_rows(values, rows, cols, tuple(input_ids.shape))

    with compute:
        hidden = model.get_decoder()(**inputs).last_hidden_state[rows, predicting]  # (N, H)
    return _response_values(model.get_output_embeddings(), hidden, tokens, temperature, candidates, constrained,
                            compute, (rows, cols), tuple(input_ids.shape), check_constraint)


def _used_columns(attention_mask: torch.Tensor) -> tuple[int, int]:
    """``[first, end)`` of the columns that hold a real token in some row (one host sync on a device mask)."""
    used = attention_mask.bool().any(0)
    if not bool(used.any()):
        return 0, attention_mask.shape[1]
    positions = used.nonzero()
    return int(positions[0]), int(positions[-1]) + 1


def _response_values(output_layer, hidden, tokens, temperature, candidates, constrained, compute, positions, shape,
                     check):
    """Apply ``output_layer`` to the response positions' hidden states ``(N, H)`` in chunks and return the
    (B, S) log-probs and entropies (see :func:`forward_token_logprobs`)."""
    rows, cols = positions
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // output_layer.weight.shape[0])
    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk
    logprobs, entropy = [], []
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        args = (output_layer, compute, hidden[part], tokens[part], temperature,
                None if candidates is None else candidates[part], None if constrained is None else constrained[part],
                check)
        if recompute:
            from torch.utils.checkpoint import checkpoint

            values = checkpoint(_chunk_values, *args, use_reentrant=False)
        else:
            values = _chunk_values(*args)
        logprobs.append(values[0])
        entropy.append(values[1])
    if not logprobs:  # no response token at all
        empty = torch.zeros(0, device=hidden.device)
        return _scatter_to_rows((empty, empty), rows, cols, shape)
    return _scatter_to_rows((torch.cat(logprobs), torch.cat(entropy)), rows, cols, shape)
