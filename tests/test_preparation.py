"""The row order of an update (:func:`training_rows`), with plain tensors: no learner, no Ray."""

import torch

from gigpo_rllib.preparation import training_rows


def test_rows_are_adjusted_shuffled_and_topped_up_with_untrained_rows():
    keep, trained, minibatches = training_rows(10, 4, "delete", seed=3, planned_minibatches=3)
    assert minibatches == 3 and len(keep) == len(trained) == 12
    # "delete" keeps 8 distinct rows, all trained; the planned third minibatch is filled with rows of weight 0.
    assert trained.tolist() == [True] * 8 + [False] * 4
    assert len(set(keep[:8].tolist())) == 8 and set(keep[8:].tolist()) <= set(keep[:8].tolist())
    again, _, _ = training_rows(10, 4, "delete", seed=3, planned_minibatches=3)
    assert torch.equal(keep, again)  # seeded: every learner and a resumed run order the rows alike
    assert not torch.equal(keep[:8].sort().values, keep[:8])  # shuffled, not in rollout order


def test_length_bucketing_sorts_rows_by_length_within_a_megabatch():
    lengths = torch.tensor([5, 1, 9, 3, 7, 2, 8, 4])
    keep, trained, _ = training_rows(8, 2, "copy", seed=0, lengths=lengths)
    assert bool(trained.all()) and sorted(keep.tolist()) == list(range(8))
    assert lengths[keep].tolist() == sorted(lengths.tolist(), reverse=True)
