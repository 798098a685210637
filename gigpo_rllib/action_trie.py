"""The action constraint's rule: which tokens may come next in a constrained reply. Pure torch, no RLlib import.

A constrained row lists its complete allowed replies as token ids, padded with :data:`PAD_REPLY_ID` into a
(K, L) int64 tensor (a batch: (B, K, L)); a row whose replies are all padding is unconstrained. At reply step
``t`` the policy may only emit the *distinct* tokens ``replies[k, t]`` over the replies ``k`` whose first ``t``
tokens equal the reply's first ``t`` tokens: a prefix trie over token ids. A reply produced whole (its EOS
emitted), or one that left the trie, has no candidates.

This module is the one place that rule lives. The samplers follow a :class:`ReplyTrie` step by step (built once
per batch of requests, so a decode step costs a gather and one masked fill for the whole batch, whatever the
number of rows); the learner scores whole responses with :func:`candidates_along`. Both are
:func:`next_tokens` applied to :func:`prefix_agreement`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PAD_REPLY_ID = -1


def check_allowed(allowed: torch.Tensor, batch: int) -> None:
    """Raise ``ValueError`` unless ``allowed`` is an integer (``batch``, K, L) tensor."""
    if not isinstance(allowed, torch.Tensor) or allowed.dim() != 3 or allowed.shape[0] != batch:
        shape = tuple(allowed.shape) if isinstance(allowed, torch.Tensor) else type(allowed).__name__
        raise ValueError(f"allowed_responses must be an int tensor of shape (B={batch}, K, L), got {shape}")
    if allowed.dtype.is_floating_point or allowed.dtype == torch.bool:
        raise ValueError(f"allowed_responses must hold integer token ids (-1 = padding), got {allowed.dtype}")


def pad_allowed_responses(allowed: Sequence[Sequence[Sequence[int]]], device: str | torch.device = "cpu"
                          ) -> torch.Tensor:
    """N lists of allowed replies -> (N, K, L) int64 tensor padded with -1 (K, L at least 1)."""
    k = max([len(r) for r in allowed] + [1])
    length = max([len(x) for r in allowed for x in r] + [1])
    out = torch.full((len(allowed), k, length), PAD_REPLY_ID, dtype=torch.long)
    for i, replies in enumerate(allowed):
        for j, reply in enumerate(replies):
            out[i, j, : len(reply)] = torch.as_tensor(list(reply), dtype=torch.long)
    return out.to(device)


def _dedupe(cand: torch.Tensor) -> torch.Tensor:
    """Replace repeated ids along the last dim with -1 (keep the first). ``cand`` (..., K) -> (..., K)."""
    k = cand.shape[-1]
    same = cand.unsqueeze(-1) == cand.unsqueeze(-2)  # (..., K, K): [i, j] = cand_i == cand_j
    earlier = torch.ones(k, k, dtype=torch.bool, device=cand.device).tril(diagonal=-1)  # j < i
    dup = (same & earlier).any(-1)
    return cand.masked_fill(dup, PAD_REPLY_ID)


def prefix_agreement(replies: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Which replies a sequence has followed so far.

    Args:
        replies: (..., K, L) int64, -1 padded.
        sequence: (..., L) int64, broadcastable against ``replies`` without its K dim; pad it with a value that
            matches no reply token (e.g. -2) where it has no token.

    Returns:
        (..., K, L + 1) bool: ``[..., k, t]`` is True when reply ``k`` and the sequence agree on their first ``t``
        tokens (always True for ``t = 0``).
    """
    same = (replies == sequence.unsqueeze(-2)).to(torch.long)
    agree = torch.cumprod(same, dim=-1).to(torch.bool)
    return torch.cat([torch.ones_like(agree[..., :1]), agree], dim=-1)


def next_tokens(replies: torch.Tensor, agreement: torch.Tensor) -> torch.Tensor:
    """The constraint's rule: ``(..., K, L)`` replies and their ``(..., K, L + 1)`` :func:`prefix_agreement` ->
    ``(..., L + 1, K)`` int64, at each step ``t`` the distinct tokens ``replies[k, t]`` of the agreeing replies, each
    in the slot of the first reply that has it, -1 elsewhere (and everywhere at ``t = L``)."""
    tokens = F.pad(replies, (0, 1), value=PAD_REPLY_ID)  # (..., K, L + 1): nothing follows the longest reply
    return _dedupe(tokens.masked_fill(~agreement, PAD_REPLY_ID).transpose(-1, -2))


def candidates_along(allowed: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """The allowed tokens at every step of whole responses (learner side).

    ``allowed`` (B, K, L) int64 and ``responses`` (B, L) int64 (each response's first L tokens, -2 where it has
    none) -> (B, L + 1, K) int64: ``[b, t]`` the candidates of step ``t``, -1 padded.
    """
    return next_tokens(allowed, prefix_agreement(allowed, responses))


def restrict_logits(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, every logit of a row that is not among its ``candidates`` (R, C) (-1 padded); rows
    without candidates are left as they are. Returns ``logits`` (R, V).

    The candidates' logits are saved, their rows set to -inf and the saved values written back: one pass over the
    rows' logits and no (R, V) mask. The rows are set by adding a (R, 1) column of 0 / -inf: the same result as a
    masked fill for any logit but +inf, and on CPU several times faster than ``masked_fill_`` with a broadcast mask.
    """
    candidates = candidates.to(logits.device)
    valid = candidates != PAD_REPLY_ID
    # Empty slots point at the row's largest candidate (column 0 in a row without any), so writing their saved
    # value back leaves that column as it should be.
    fallback = candidates.max(-1, keepdim=True).values.clamp(min=0)
    columns = torch.where(valid, candidates, fallback)
    kept = logits.gather(1, columns)
    blocked = torch.zeros(valid.shape[0], 1, dtype=logits.dtype, device=logits.device)
    logits.add_(blocked.masked_fill_(valid.any(-1, keepdim=True), float("-inf")))
    return logits.scatter_(1, columns, kept)


class ReplyTrie:
    """Prefix tries of the allowed replies of a batch of rows, as tensors (sampler side).

    Built from (B, K, L) replies, node ``(b, k, t)`` (flat id ``(b * K + k) * (L + 1) + t``) is "row ``b`` has
    produced the first ``t`` tokens of its reply ``k``". ``tokens[node]`` (C,) holds the distinct tokens that may
    follow (:func:`next_tokens`, -1 padded), ``children[node]`` the node each of them leads to. Node -1 means "no
    constraint here": an unconstrained row, a finished reply, or a reply that left the trie. ``roots`` (B,) is
    each row's starting node. Tries of several batches are joined with :meth:`join`.
    """

    def __init__(self, tokens: torch.Tensor, children: torch.Tensor, roots: torch.Tensor):
        self.tokens, self.children, self.roots = tokens, children, roots

    @classmethod
    def build(cls, allowed: torch.Tensor) -> "ReplyTrie":
        """The tries of ``allowed`` (B, K, L) int64, -1 padded; on ``allowed``'s device, with no host sync."""
        check_allowed(allowed, allowed.shape[0])
        allowed = allowed.to(torch.long)
        batch, k, length = allowed.shape
        device = allowed.device
        # [b, k, j, t]: reply j agrees with reply k on t tokens, so node (b, k, t) continues with j's token t.
        following = next_tokens(allowed.unsqueeze(1), prefix_agreement(allowed.unsqueeze(1), allowed))  # (B,K,L+1,K)
        # Slot j holds reply j's own token, so emitting it leads to node (b, j, t + 1).
        row = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        reply = torch.arange(k, device=device).view(1, 1, 1, k)
        step = torch.arange(length + 1, device=device).view(1, 1, length + 1, 1)
        child = (row * k + reply) * (length + 1) + step + 1
        children = torch.where(following != PAD_REPLY_ID, child, PAD_REPLY_ID)
        constrained = (allowed != PAD_REPLY_ID).any(dim=(1, 2))
        roots = torch.where(constrained, torch.arange(batch, device=device) * k * (length + 1), PAD_REPLY_ID)
        return cls(following.reshape(-1, k), children.reshape(-1, k), roots)

    @classmethod
    def join(cls, tries: Sequence["ReplyTrie"]) -> "ReplyTrie":
        """One trie holding ``tries``' rows in order (their node ids shifted; roots of -1 stay -1)."""
        width = max(trie.tokens.shape[1] for trie in tries)
        offsets = [0]
        for trie in tries[:-1]:
            offsets.append(offsets[-1] + trie.tokens.shape[0])

        def widen(table: torch.Tensor) -> torch.Tensor:
            return F.pad(table, (0, width - table.shape[1]), value=PAD_REPLY_ID)

        def shift(nodes: torch.Tensor, offset: int) -> torch.Tensor:
            return torch.where(nodes == PAD_REPLY_ID, nodes, nodes + offset)

        return cls(torch.cat([widen(trie.tokens) for trie in tries]),
                   torch.cat([widen(shift(trie.children, offset)) for trie, offset in zip(tries, offsets)]),
                   torch.cat([shift(trie.roots, offset) for trie, offset in zip(tries, offsets)]))

    def candidates(self, nodes: torch.Tensor) -> torch.Tensor:
        """(R,) node ids -> (R, C) allowed next tokens, -1 padded (all -1 for node -1)."""
        found = self.tokens[nodes.clamp(min=0)]
        return found.masked_fill((nodes == PAD_REPLY_ID).unsqueeze(-1), PAD_REPLY_ID)

    def advance(self, nodes: torch.Tensor, emitted: torch.Tensor) -> torch.Tensor:
        """The nodes (R,) after each row emitted one token ``emitted`` (R,); -1 where the token is no candidate."""
        hit = self.candidates(nodes) == emitted.unsqueeze(-1)
        slot = hit.to(torch.long).argmax(-1, keepdim=True)
        child = self.children[nodes.clamp(min=0)].gather(1, slot).squeeze(1)
        return torch.where(hit.any(-1), child, PAD_REPLY_ID)

    def follow(self, nodes: torch.Tensor, emitted: torch.Tensor) -> torch.Tensor:
        """The nodes (R,) after each row emitted the tokens ``emitted`` (R, T), in order."""
        for step in range(emitted.shape[1]):
            nodes = self.advance(nodes, emitted[:, step])
        return nodes
