"""Token log-probs (gigpo_rllib.logprobs) and the samplers (gigpo_rllib.sampling)."""

from __future__ import annotations

import pytest
import torch

from gigpo_rllib.logprobs import (
    allowed_next_tokens,
    next_token_candidates,
    position_ids_from_attention_mask,
    sequence_token_logprobs,
)

# ---------------------------------------------------------------- sequence_token_logprobs, hand-made tensors


def _brute_force(logits, input_ids, response_mask, temperature, allowed):
    """Loop version of the constrained log-prob/entropy, written independently of the vectorised one."""
    bsz, seq, _ = logits.shape
    lp = torch.zeros(bsz, seq)
    ent = torch.zeros(bsz, seq)
    for b in range(bsz):
        resp_pos = [s for s in range(seq) if response_mask[b, s]]
        replies = []
        if allowed is not None:
            for row in allowed[b].tolist():
                reply = [x for x in row if x != -1]
                if reply:
                    replies.append(reply)
        for t, s in enumerate(resp_pos):
            z = logits[b, s - 1].double() / temperature
            tok = int(input_ids[b, s])
            if replies:
                prefix = [int(input_ids[b, p]) for p in resp_pos[:t]]
                cands = sorted({r[t] for r in replies if len(r) > t and r[:t] == prefix})
                zc = z[cands]
                logz = torch.logsumexp(zc, 0)
                lp[b, s] = float(z[tok] - logz)
                p = torch.softmax(zc, 0)
                ent[b, s] = float(-(p * torch.log(p)).sum())
            else:
                logp = torch.log_softmax(z, 0)
                lp[b, s] = float(logp[tok])
                ent[b, s] = float(-(logp.exp() * logp).sum())
    return lp, ent


def test_unconstrained_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    lp, ent = sequence_token_logprobs(logits, ids, mask)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = torch.cat([torch.zeros(2, 1), ref], 1) * mask
    torch.testing.assert_close(lp, ref)
    assert (ent[~mask] == 0).all() and (ent[mask] > 0).all()


def test_temperature_divides_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 6, generator=g)
    ids = torch.randint(0, 6, (1, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    lp, ent = sequence_token_logprobs(logits, ids, mask, temperature=0.7)
    lp2, ent2 = sequence_token_logprobs(logits / 0.7, ids, mask)
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(ent, ent2)


def test_constrained_matches_brute_force_with_dedupe_and_mixed_rows():
    g = torch.Generator().manual_seed(2)
    vocab, eos = 9, 8
    # Row 0: replies share first tokens (dedupe needed at t=0 and t=1). Row 1: unconstrained. Row 2: right pad.
    allowed = torch.tensor(
        [
            [[3, 4, eos, -1], [3, 4, 5, eos], [3, 6, eos, -1], [2, eos, -1, -1]],
            [[-1] * 4] * 4,
            [[1, eos, -1, -1], [1, eos, -1, -1], [5, 5, eos, -1], [-1] * 4],
        ]
    )
    ids = torch.tensor(
        [
            [0, 7, 7, 3, 4, 5, eos],  # left-padded prompt, response 3 4 5 eos
            [7, 7, 7, 1, 2, 0, 0],  # unconstrained response 1 2
            [7, 6, 5, 5, eos, 0, 0],  # response 5 5 eos, then right padding
        ]
    )
    mask = torch.tensor(
        [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool
    )
    logits = torch.randn(3, 7, vocab, generator=g, requires_grad=True)
    for temperature in (1.0, 0.5):
        lp, ent = sequence_token_logprobs(logits, ids, mask, temperature=temperature, allowed_responses=allowed)
        ref_lp, ref_ent = _brute_force(logits.detach(), ids, mask, temperature, allowed)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    lp, _ = sequence_token_logprobs(logits, ids, mask, allowed_responses=allowed)
    # Step 0 of row 0 chooses between {3, 2} once each (3 appears in three replies but counts once).
    z = logits.detach()[0, 2]
    assert lp[0, 3].item() == pytest.approx((z[3] - torch.logsumexp(z[[3, 2]], 0)).item(), abs=1e-6)
    # The forced final eos of "3 4 5 eos" has probability 1.
    assert lp[0, 6].item() == pytest.approx(0.0, abs=1e-6)
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_constrained_rejects_token_outside_the_trie():
    logits = torch.zeros(1, 3, 5)
    ids = torch.tensor([[0, 2, 4]])
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    allowed = torch.tensor([[[1, 4]]])
    with pytest.raises(ValueError, match="allowed_responses"):
        sequence_token_logprobs(logits, ids, mask, allowed_responses=allowed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"allowed_responses": torch.zeros(2, 2)}, "allowed_responses"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    logits = torch.zeros(1, 3, 5)
    ids = torch.zeros(1, 3, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        sequence_token_logprobs(logits, ids, mask, **kwargs)
    with pytest.raises(ValueError, match="response_mask"):
        sequence_token_logprobs(logits, ids, torch.ones(1, 3, dtype=torch.bool))


def test_next_token_candidates_matches_list_helper():
    replies = [[3, 4, 9], [3, 4, 5, 9], [3, 6, 9], [2, 9]]
    allowed = torch.tensor([[r + [-1] * (4 - len(r)) for r in replies]])
    for gen in ([], [3], [3, 4], [3, 4, 5], [2], [2, 9], [7]):
        cand = next_token_candidates(allowed, torch.tensor([gen], dtype=torch.long).reshape(1, len(gen)))
        got = sorted(int(x) for x in cand[0] if x != -1)
        assert got == allowed_next_tokens(replies, gen)
    assert allowed_next_tokens(replies, [3]) == [4, 6]


def test_position_ids_any_padding_side():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
