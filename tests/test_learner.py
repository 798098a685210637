"""The learner's once-per-update preparation and its per-minibatch loss, on a learner built in the test process
(no Ray) and hand-made batches (tests/learner_batch.py)."""

import math

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from gigpo_rllib.losses import LOSS_AGG_MODES, k3_kl
from gigpo_rllib.rl_module import HOST_MASKS, TOKEN_LOGPROBS
from tests.host_syncs import HostSyncCounter
from tests.learner_batch import (EOS, local_learner, prepared_batch, run_update, summed_gradient, synthetic_batch,
                                 update_minibatches)


def test_reference_kl_is_exactly_zero_before_the_first_update_in_bfloat16():
    learner = local_learner(model_dtype="bfloat16", init_kl_coef=0.1, minibatch_size=4)
    columns = prepared_batch(learner, synthetic_batch())
    for start in range(0, len(columns["input_ids"]), 4):
        minibatch = {name: value[start:start + 4] for name, value in columns.items()}
        with torch.no_grad():
            logprobs = learner.module[DEFAULT_MODULE_ID].forward_train(minibatch)[TOKEN_LOGPROBS]
        mask = minibatch["response_mask"].bool()
        assert k3_kl(logprobs, minibatch["reference_logprobs"])[mask].abs().max().item() == 0.0


def assert_same_gradient(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    """Equal up to float summation order: each parameter's gradient within 1e-5 of its norm."""
    assert first.keys() == second.keys()
    for name in first:
        error = (first[name] - second[name]).norm().item()
        assert error <= 1e-5 * second[name].norm().item() + 1e-12, (name, error, second[name].norm().item())


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_length_bucketing_changes_padding_only(mode):
    # Free-form replies of 1-9 tokens: bucketing regroups the rows by length, so a per-minibatch token mean would
    # weigh a short reply's tokens more than a long one's.
    batch = synthetic_batch(groups=6, constrained=False)
    gradients = []
    for bucketing in (False, True):
        learner = local_learner(minibatch_size=4, length_bucketing=bucketing, loss_agg_mode=mode,
                                old_logprobs_source="learner", entropy_loss_coef=0.01, init_kl_coef=0.1)
        minibatches = update_minibatches(learner, batch)
        gradients.append(summed_gradient(learner, minibatches))
    assert_same_gradient(gradients[1], gradients[0])


def test_forced_tokens_and_padding_do_not_count_in_the_loss_weights():
    learner = local_learner(minibatch_size=4)
    batch = synthetic_batch()
    columns = prepared_batch(learner, batch)
    weights, response = columns["loss_weights"], columns["response_mask"].bool()
    # Replies 5 9 EOS, 5 7 EOS, 11 EOS: the EOS is always forced (one allowed token), the rest is chosen.
    eos = response & (columns["input_ids"] == EOS)
    assert (weights[eos] == 0).all() and (weights[~response] == 0).all()
    chosen = response & ~eos
    minibatches = len(weights) // 4
    torch.testing.assert_close(weights[chosen], torch.full((int(chosen.sum()),), minibatches / int(chosen.sum())))


def _two_learner_gradient(rank: int, init_file: str, out_file: str) -> None:
    """One of two learner processes (gloo, CPU): its shard's summed gradient, averaged over the two as DDP does,
    and the rows it trained (rank 0 writes both)."""
    import torch.distributed as dist

    from gigpo_rllib.batch import minibatches_per_shard, shard_rows, take_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        batch = synthetic_batch(groups=3, group_size=2, turns=2, constrained=False)
        shards = [take_rows(batch, rows) for rows in shard_rows(batch, 2)]
        planned = minibatches_per_shard([len(shard["rewards"]) for shard in shards], 4, "copy")
        learner = local_learner(minibatch_size=4, old_logprobs_source="learner")
        minibatches = update_minibatches(learner, shards[rank], num_total_minibatches=planned)
        gradient = summed_gradient(learner, minibatches)
        for value in gradient.values():
            dist.all_reduce(value)
            value /= 2
        trained = [(int(t), int(s)) for minibatch in minibatches
                   for t, s, weights in zip(minibatch["traj_ids"], minibatch["step_ids"], minibatch["loss_weights"])
                   if weights.sum() > 0]
        rows = [None, None]
        dist.all_gather_object(rows, (len(minibatches), trained))
        if rank == 0:
            torch.save({"gradient": gradient, "rows": rows}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_learners_sum_to_the_single_learner_gradient(tmp_path):
    # 12 rows in groups of 4: the shards hold 8 and 4 rows. Two learners with minibatches of 4 take 2 steps each
    # (the smaller shard topped up with rows of weight 0, not wrapped around); one learner with minibatches of 6
    # takes 2 steps as well. The summed gradient is 2 x the gradient of the global token mean either way.
    import torch.multiprocessing as mp

    out_file = tmp_path / "two_learners.pt"
    mp.spawn(_two_learner_gradient, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    result = torch.load(out_file)
    batch = synthetic_batch(groups=3, group_size=2, turns=2, constrained=False)
    learner = local_learner(minibatch_size=6, old_logprobs_source="learner")
    single = summed_gradient(learner, update_minibatches(learner, batch))
    assert_same_gradient(result["gradient"], single)
    for steps, trained in result["rows"]:
        assert steps == 2 and len(trained) == len(set(trained))  # no row trained twice in the epoch
    assert sum(len(trained) for _, trained in result["rows"]) == len(batch["rewards"])


def test_the_minibatch_path_reads_the_device_once_per_update():
    """Host syncs during one update of 2 epochs x 5 minibatches, counted by tests/host_syncs.py, outside the
    once-per-update batch preparation and RLlib's final metrics reduction (which read back the update's results).
    Left out as well: Hugging Face's own check of the attention mask before each forward (transformers'
    masking_utils reads whether the mask has padding), which this project does not control."""
    learner = local_learner(minibatch_size=4, entropy_loss_coef=0.01, init_kl_coef=0.1)
    counter = HostSyncCounter()
    prepare, reduce = learner._make_batch_if_necessary, learner.metrics.reduce

    def prepare_uncounted(*args, **kwargs):
        with counter.paused():
            prepared = prepare(*args, **kwargs)
        for name in HOST_MASKS:  # kept in host memory on purpose: reading them is no sync
            counter.mark_host(prepared.policy_batches[DEFAULT_MODULE_ID][name])
        return prepared

    def reduce_uncounted(*args, **kwargs):
        with counter.paused():
            return reduce(*args, **kwargs)

    learner._make_batch_if_necessary, learner.metrics.reduce = prepare_uncounted, reduce_uncounted
    batch = synthetic_batch()
    assert len(batch["rewards"]) == 20  # 5 minibatches of 4
    with counter.counting():
        run_update(learner, batch, num_epochs=2)
    ours = [where for where in counter.where if not where.split(" at ")[1].startswith("masking_utils.py")]
    assert len(ours) == 1, "\n".join(ours)


def test_a_non_finite_step_is_skipped_on_the_device_and_a_run_of_them_stops_training():
    learner = local_learner(minibatch_size=4, max_consecutive_skipped_updates=3)
    module = learner.module[DEFAULT_MODULE_ID]
    before = {name: value.detach().clone() for name, value in module.state_dict().items()}
    compute_loss = learner.compute_loss_for_module
    poisoned = {"minibatches": {1}, "seen": 0}

    def poisoned_loss(**kwargs):
        loss = compute_loss(**kwargs)
        poisoned["seen"] += 1
        return loss * float("nan") if poisoned["seen"] - 1 in poisoned["minibatches"] else loss

    learner.compute_loss_for_module = poisoned_loss
    results = run_update(learner, synthetic_batch())
    assert results["__all_modules__"]["skipped_updates"].peek() == 1.0
    assert math.isfinite(results[DEFAULT_MODULE_ID]["grad_norm"].peek())

    # Every step non-finite: nothing moves (weights, Adam's moments and step counts), and the update ends in an error.
    learner = local_learner(minibatch_size=4, max_consecutive_skipped_updates=3)
    compute_loss = learner.compute_loss_for_module
    poisoned.update(minibatches=set(range(100)), seen=0)
    learner.compute_loss_for_module = poisoned_loss
    with pytest.raises(FloatingPointError, match=r"5 minibatch updates in a row .*\(max_consecutive_skipped_updates=3\)"):
        run_update(learner, synthetic_batch())
    after = learner.module[DEFAULT_MODULE_ID].state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    for state in learner.get_optimizer().state.values():
        assert state["step"].item() == 0 and state["exp_avg"].abs().max().item() == 0
