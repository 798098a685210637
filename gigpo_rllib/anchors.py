"""Anchor states: text observation -> canonical text -> stable integer id.

GiGPO's step-level groups (paper Sec. 3.2, Eq. 6) collect the steps that start from the *same environment
state* in different trajectories of one episode group. For a text environment the state is its observation
text, so two observations that differ only in formatting noise (line endings, runs of blanks, a turn
counter) must map to the same id, and nothing else may. The id is an xxhash (XXH3) of the canonical text:
stable across processes, machines and runs (unlike Python's salted ``hash()``).

64-bit ids are returned as *signed* ``int64`` values (the two's-complement view of the unsigned digest) so they
fit a ``torch.int64`` tensor unchanged; 128-bit ids are Python ints and need :func:`dense_anchor_labels`
before they go into a tensor.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Callable, Iterable, Sequence

import numpy as np
import xxhash

Canonicalizer = Callable[[str], str]
"""A user function applied to the newline-normalised text before whitespace folding; typically it removes
volatile parts (turn counters, timestamps) that do not belong to the state."""

SUPPORTED_BITS = (64, 128)

_BLANKS = re.compile(r"[^\S\n]+")  # any whitespace except newline
_BLANK_LINES = re.compile(r"\n{3,}")


def canonicalize(text: str, strip: Canonicalizer | None = None) -> str:
    """Return the canonical form of a text observation.

    Steps, in order: Unicode NFC normalisation; ``\\r\\n`` and ``\\r`` become ``\\n``; the optional ``strip``
    function; every run of non-newline whitespace becomes one space; each line is stripped at both ends;
    runs of blank lines fold into one; leading and trailing blank lines are removed.
    """
    if not isinstance(text, str):
        raise TypeError(f"canonicalize: text must be str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if strip is not None:
        text = strip(text)
        if not isinstance(text, str):
            raise TypeError(f"canonicalize: the strip function must return str, got {type(text).__name__}")
    lines = [_BLANKS.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _signed64(unsigned: int) -> int:
    return unsigned - (1 << 64) if unsigned >= (1 << 63) else unsigned


def hash_canonical(canonical_text: str, bits: int = 64) -> int:
    """Hash text that is already canonical. 64 bits: signed int64 value; 128 bits: non-negative Python int."""
    _check_bits(bits)
    data = canonical_text.encode("utf-8")
    if bits == 64:
        return _signed64(xxhash.xxh3_64_intdigest(data))
    return xxhash.xxh3_128_intdigest(data)


def anchor_id(text: str, canonicalize_fn: Canonicalizer | None = None, bits: int = 64) -> int:
    """Anchor id of one observation: ``hash_canonical(canonicalize(text, canonicalize_fn), bits)``."""
    return hash_canonical(canonicalize(text, canonicalize_fn), bits)


def anchor_ids(
    texts: Iterable[str], canonicalize_fn: Canonicalizer | None = None, bits: int = 64
) -> np.ndarray | list[int]:
    """Anchor ids of many observations.

    Returns an ``int64`` numpy array of shape ``(n,)`` for ``bits=64`` and a list of Python ints for
    ``bits=128`` (numpy has no 128-bit integer).
    """
    _check_bits(bits)
    ids = [anchor_id(text, canonicalize_fn, bits) for text in texts]
    if bits == 64:
        return np.asarray(ids, dtype=np.int64).reshape(len(ids))
    return ids


def dense_anchor_labels(ids: Sequence[int]) -> np.ndarray:
    """Map arbitrary (e.g. 128-bit) anchor ids to dense ``int64`` labels ``0..k-1`` that preserve equality.

    Labels are assigned in order of first appearance, so the result is deterministic for a given sequence.
    """
    labels: dict[int, int] = {}
    return np.fromiter((labels.setdefault(i, len(labels)) for i in ids), dtype=np.int64, count=len(ids))


def group_similar_texts(texts: Sequence[str], threshold: float) -> np.ndarray:
    """Cluster near-duplicate canonical texts: the optional similarity grouping of anchor states.

    Each text joins the first earlier *representative* whose ``difflib`` similarity ratio with it is at least
    ``threshold``, else it becomes a representative itself (greedy, so the result depends on the order: pass
    texts in a deterministic order). Exact duplicates always share a cluster. Cost is O(n · r) comparisons for r
    representatives, so use it on the states of one episode group, not on a whole batch.

    Args:
        texts: ``n`` canonical texts.
        threshold: similarity in ``(0, 1]``; 1 groups exact duplicates only.

    Returns:
        ``(n,)`` int64: the index (into ``texts``) of each text's representative.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    representatives: list[int] = []
    by_text: dict[str, int] = {}
    labels = np.empty(len(texts), dtype=np.int64)
    for index, text in enumerate(texts):
        if text in by_text:
            labels[index] = by_text[text]
            continue
        label = index
        if threshold < 1.0:
            matcher = difflib.SequenceMatcher(None, "", text, autojunk=False)  # b (cached) = the new text
            for candidate in representatives:
                matcher.set_seq1(texts[candidate])
                # The quick upper bounds skip most pairs before the full ratio.
                if (matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold
                        and matcher.ratio() >= threshold):
                    label = candidate
                    break
        if label == index:
            representatives.append(index)
        by_text[text] = label
        labels[index] = label
    return labels
