"""The action constraint's one rule (gigpo_rllib.action_trie): the samplers' step-by-step trie and the learner's
scoring of whole responses allow the same tokens, and a decode step costs the same tensor operations for any
number of rows."""

from __future__ import annotations

import random

import torch
from torch.overrides import TorchFunctionMode

from gigpo_rllib.action_trie import ReplyTrie, candidates_along, pad_allowed_responses
from gigpo_rllib.logprobs import _response_candidates

EOS = 9


def brute_force_candidates(replies: list[list[int]], generated: list[int]) -> list[int]:
    """The rule read off the replies directly, written independently of the tensor versions."""
    t = len(generated)
    return sorted({reply[t] for reply in replies if len(reply) > t and reply[:t] == generated})


def random_replies(rng: random.Random) -> list[list[int]]:
    """Up to 6 replies over a 4-token alphabet (so they share prefixes, and repeat), each ending with EOS."""
    return [[rng.randrange(4) for _ in range(rng.randrange(0, 4))] + [EOS] for _ in range(rng.randrange(1, 7))]


def random_response(rng: random.Random, replies: list[list[int]]) -> list[int]:
    """Mostly an allowed reply; sometimes one that leaves the trie at a random step."""
    response = list(rng.choice(replies))
    if rng.random() < 0.3:
        response[rng.randrange(len(response))] = rng.randrange(4, 9)
    return response


def as_set(tokens: torch.Tensor) -> list[int]:
    return sorted(int(token) for token in tokens if token != -1)


def test_trie_learner_and_brute_force_allow_the_same_tokens_at_every_step():
    rng = random.Random(0)
    for _ in range(40):
        rows = [random_replies(rng) if rng.random() < 0.8 else [] for _ in range(5)]
        responses = [random_response(rng, replies) if replies else [rng.randrange(9)] for replies in rows]
        allowed = pad_allowed_responses(rows)
        trie = ReplyTrie.build(allowed)
        length = allowed.shape[2]
        # The learner's view: prompt token, then the response, right-padded.
        width = 1 + max(map(len, responses))
        input_ids = torch.tensor([[0] + r + [0] * (width - 1 - len(r)) for r in responses])
        response_mask = torch.tensor([[False] + [True] * len(r) + [False] * (width - 1 - len(r)) for r in responses])
        rows_, cols = response_mask.nonzero(as_tuple=True)
        learner, constrained = _response_candidates(allowed, input_ids, response_mask, rows_, cols)
        along = candidates_along(allowed, torch.tensor([(r + [-2] * length)[:length] for r in responses]))
        nodes = trie.roots
        for step in range(width - 1):
            sampler = trie.candidates(nodes)
            for b, (replies, response) in enumerate(zip(rows, responses)):
                if step >= len(response):
                    continue
                expected = brute_force_candidates(replies, response[:step]) if replies else []
                assert as_set(sampler[b]) == expected, (replies, response, step)
                assert as_set(along[b, min(step, length)]) == expected
                position = int(((rows_ == b) & (cols == step + 1)).nonzero())
                assert as_set(learner[position]) == expected and bool(constrained[position]) == bool(replies)
            nodes = trie.advance(nodes, input_ids[:, step + 1])


def test_joined_tries_keep_each_rows_own_replies():
    first = ReplyTrie.build(pad_allowed_responses([[[1, EOS], [2, 3, EOS]], []]))
    second = ReplyTrie.build(pad_allowed_responses([[[4, 5, 6, EOS]]]))
    joined = ReplyTrie.join([first, second])
    nodes = joined.follow(joined.roots, torch.tensor([[2], [0], [4]]))
    assert [as_set(c) for c in joined.candidates(nodes)] == [[3], [], [5]]
    nodes = joined.advance(nodes, torch.tensor([7, 0, 5]))  # row 0 leaves its trie: no constraint left
    assert [as_set(c) for c in joined.candidates(nodes)] == [[], [], [6]]


class CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def hf_step_calls(rows: int) -> tuple[int, torch.Tensor]:
    """Torch calls of the HF processor's second decode step on ``rows`` constrained rows, and its scores."""
    from gigpo_rllib.sampling.hf import _AllowedRepliesProcessor

    replies = [[1, 2, EOS], [1, 3, EOS], [4, EOS]]
    processor = _AllowedRepliesProcessor(pad_allowed_responses([replies] * rows), prompt_len=2)
    processor(torch.zeros(rows, 2, dtype=torch.long), torch.zeros(rows, 10))
    counter = CountTorchCalls()
    with counter:
        scores = processor(torch.tensor([[0, 0, 1]] * rows), torch.zeros(rows, 10))
    return counter.calls, scores


def test_hf_processor_does_the_same_tensor_operations_for_4_or_64_rows():
    calls_4, _ = hf_step_calls(4)
    calls_64, scores = hf_step_calls(64)
    assert calls_4 == calls_64
    assert torch.isfinite(scores[:, [2, 3]]).all() and torch.isinf(scores[:, [0, 1, 4, 9]]).all()
