"""Sharded learners (``learner_sharding: fsdp``) on CPU with gloo: two FSDP2 learners update like two DDP learners
and like one learner, each holds about half the bytes, the samplers get the same weights, and the gathered
checkpoint restores into one learner and back into two, exactly; and so does an algorithm checkpoint (save, then
a resume with another number of learners).

Two-learner groups take seconds to form, so one module-scoped run builds each kind once and every test reads it.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from gigpo_rllib.batch import shard_rows, take_rows
from gigpo_rllib.sharding import local_tensor
from tests.learner_batch import learner_config, local_learner, synthetic_batch

pytestmark = pytest.mark.slow

SPACES = {"default_policy": (gym.spaces.Box(0, 1, (1,)), gym.spaces.Discrete(2))}
# A low max_grad_norm so that clipping acts: a norm taken over one shard's gradients would change the update.
SETTINGS = dict(max_grad_norm=0.05)
ROWS = 8  # 4 groups of 2 one-turn trajectories: 4 rows (2 groups) per learner


def _batch():
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    batch = synthetic_batch(groups=4, group_size=2, seed=0, turns=1)
    assert len(batch["rewards"]) == ROWS
    shards = [take_rows(batch, rows) for rows in shard_rows(batch, 2)]
    as_batch = lambda columns: MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(columns))},
                                               env_steps=len(columns["rewards"]))
    return as_batch(batch), [as_batch(shard) for shard in shards]


def _update(target, batches, minibatch_size):
    """One update, one optimizer step per learner (the whole batch or shard is one minibatch), as the algorithm
    makes it."""
    common = dict(minibatch_size=minibatch_size, num_epochs=1, num_total_minibatches=1,
                  shuffle_batch_per_epoch=False, timesteps={})
    if isinstance(batches, list):
        return target.update(batches=batches, **common)
    return target.update(batch=batches, **common)


def _held_bytes(learner) -> dict[str, int]:
    """This learner's bytes of parameters, gradients and optimizer state (its own parts when sharded)."""
    params = learner.get_parameters(learner.module["default_policy"])
    size = lambda tensor: local_tensor(tensor).numel() * local_tensor(tensor).element_size()
    optimizer = sum(size(value) for optim in learner._named_optimizers.values() for state in optim.state.values()
                    for value in state.values() if isinstance(value, torch.Tensor) and value.dim() > 0)
    return {"parameters": sum(size(p) for p in params),
            "gradients": sum(size(p.grad) for p in params if p.grad is not None), "optimizer": optimizer}


def _optimizer_arrays(state) -> dict:
    """The per-parameter optimizer tensors of a learner state, flattened to ``(index, key) -> array``."""
    (optim,) = state["optimizer"].values()
    return {(index, key): np.asarray(value) for index, values in optim["state"]["state"].items()
            for key, value in values.items()}


def _two_learner_run(sharding: str, whole, shards) -> dict:
    """Two learners of ``sharding``: one update, then (fsdp) the checkpoint round trips."""
    config = learner_config(learner_sharding=sharding, **SETTINGS).learners(num_learners=2)
    group = config.build_learner_group(env=None, spaces=SPACES)
    run = {}
    try:
        _update(group, shards, minibatch_size=ROWS // 2)
        packed = [call.get() for call in group.foreach_learner(lambda learner: learner.packed_weights("float32"))]
        run["packed"] = next(p for p in packed if p is not None)
        run["bytes"] = [call.get() for call in group.foreach_learner(_held_bytes)]
        if sharding == "fsdp":
            for call in group.foreach_learner(lambda learner: learner.gather_state()):
                call.get()
            run["state"] = group.get_state()["learner"]
            _update(group, shards, minibatch_size=ROWS // 2)
            run["after_second_update"] = _packed(group)
            group.set_state({"learner": _as_fresh(run["state"])})  # back to the first checkpoint...
            _update(group, shards, minibatch_size=ROWS // 2)
            run["resumed_second_update"] = _packed(group)  # ...and the same second update again
            run["group"] = group  # the 1 -> 2 restore below loads into it
            return run
    except BaseException:
        group.shutdown()
        raise
    group.shutdown()
    return run


def _as_fresh(state: dict) -> dict:
    """``state`` as a restore into newly built learners sees it: RLlib's learner skips weights whose sequence number
    is not newer than its own, and these learners have updated since."""
    return {**state, "weights_seq_no": 0}


def _packed_weights(group):
    """The group's sampler payload (every sharded learner takes part in the gathers; rank 0 keeps it)."""
    packed = [call.get() for call in group.foreach_learner(lambda learner: learner.packed_weights("float32"))]
    return next(p for p in packed if p is not None)


def _packed(group):
    return _packed_weights(group).buffer.copy()


@pytest.fixture(scope="module")
def runs(ray_session):
    whole, shards = _batch()
    single = local_learner(minibatch_size=ROWS, **SETTINGS)
    _update(single, whole, minibatch_size=ROWS)
    results = {"single": {"packed": single.packed_weights("float32"), "bytes": [_held_bytes(single)]},
               "ddp": _two_learner_run("ddp", whole, shards), "fsdp": _two_learner_run("fsdp", whole, shards)}
    yield results
    results["fsdp"]["group"].shutdown()


def test_fsdp_update_matches_ddp_and_one_learner(runs):
    fsdp = runs["fsdp"]["packed"].buffer.view(np.float32)
    single = runs["single"]["packed"].buffer.view(np.float32)
    assert not np.allclose(single, local_learner(**SETTINGS).packed_weights("float32").buffer.view(np.float32))
    np.testing.assert_allclose(fsdp, runs["ddp"]["packed"].buffer.view(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fsdp, single, rtol=1e-5, atol=1e-6)


def test_fsdp_sync_payload_is_the_single_learner_one(runs):
    fsdp, single = runs["fsdp"]["packed"], runs["single"]["packed"]
    assert fsdp.nbytes == single.nbytes
    assert fsdp.entries == single.entries and dict(fsdp.aliases) == dict(single.aliases)


def test_fsdp_holds_about_half_of_ddp_per_learner(runs):
    ddp, fsdp = runs["ddp"]["bytes"], runs["fsdp"]["bytes"]
    assert ddp[0] == ddp[1] == runs["single"]["bytes"][0]  # DDP: a whole copy on each learner
    for part in ("parameters", "gradients", "optimizer"):
        assert sum(rank[part] for rank in fsdp) == pytest.approx(ddp[0][part], rel=0.01), part
        for rank in fsdp:
            assert 0.45 < rank[part] / ddp[0][part] < 0.55, (part, rank)


def test_fsdp_resume_is_exact(runs):
    # The restored state is bit-exact (next test). The update after it matches to float rounding only: two
    # identical updates of two gloo learners differ in the last bit even with DDP (measured), from the
    # reductions, not from the checkpoint.
    fsdp = runs["fsdp"]
    resumed, uninterrupted = (fsdp[key].view(np.float32) for key in ("resumed_second_update", "after_second_update"))
    assert not np.allclose(uninterrupted, fsdp["packed"].buffer.view(np.float32))  # the second update moved them
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6, atol=1e-7)  # a step moves weights by ~lr = 1e-3


def test_fsdp_checkpoint_restores_into_one_learner_and_back(runs):
    state = runs["fsdp"]["state"]
    one = local_learner(minibatch_size=ROWS, **SETTINGS)
    one.set_state(state)
    np.testing.assert_array_equal(one.packed_weights("float32").buffer, runs["fsdp"]["packed"].buffer)
    expected = _optimizer_arrays(state)
    restored = _optimizer_arrays(one.get_state())
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=str(key))
    group = runs["fsdp"]["group"]
    group.set_state({"learner": _as_fresh(one.get_state())})  # one learner's checkpoint into two sharded ones
    for call in group.foreach_learner(lambda learner: learner.gather_state()):
        call.get()
    back = group.get_state()["learner"]
    for name, value in state["rl_module"]["default_policy"].items():
        np.testing.assert_array_equal(back["rl_module"]["default_policy"][name], value, err_msg=name)
    back_optimizer = _optimizer_arrays(back)
    for key, value in expected.items():
        np.testing.assert_array_equal(back_optimizer[key], value, err_msg=str(key))


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_fsdp_composes_with_lora_and_gradient_checkpointing(ray_session, lora_sync):
    # The adapters are sharded like every other parameter (the frozen base too); the samplers get the merged weights
    # or the adapters alone, gathered.
    settings = dict(SETTINGS, lora={"r": 4, "alpha": 8}, gradient_checkpointing=True, lora_sync=lora_sync,
                    sampler_backend="vllm" if lora_sync == "adapter" else "hf")
    whole, shards = _batch()
    single = local_learner(minibatch_size=ROWS, **settings)
    # Fresh adapters are random: the sharded learners start from these (a copy: the state holds the live tensors).
    start = copy.deepcopy(single.get_state())
    before = single.packed_weights("float32").buffer.view(np.float32).copy()
    _update(single, whole, minibatch_size=ROWS)
    expected_packed = single.packed_weights("float32")
    expected = expected_packed.buffer.view(np.float32)
    group = learner_config(learner_sharding="fsdp", **settings).learners(num_learners=2).build_learner_group(
        env=None, spaces=SPACES)
    try:
        group.set_state({"learner": start})
        _update(group, shards, minibatch_size=ROWS // 2)
        sharded_packed = _packed_weights(group)
        sharded = sharded_packed.buffer.view(np.float32)
        held = [call.get() for call in group.foreach_learner(_held_bytes)]
    finally:
        group.shutdown()
    assert np.abs(expected - before).max() > 1e-4  # the update moved what the samplers get
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-7)
    assert sharded_packed.entries == expected_packed.entries
    assert sharded_packed.adapter_config == expected_packed.adapter_config
    assert (expected_packed.adapter_config is not None) == (lora_sync == "adapter")
    whole_bytes = _held_bytes(single)
    for part in ("parameters", "optimizer"):  # the trainable adapters and their Adam state, halved
        assert all(0.4 < rank[part] / whole_bytes[part] < 0.6 for rank in held), (part, held, whole_bytes)


def _policy_logprobs(learner) -> np.ndarray:
    """The learner's policy log-probs of a fixed batch of token rows (a collective when sharded: every learner runs
    it; the ranks return the same values)."""
    from gigpo_rllib.logprobs import forward_token_logprobs
    from gigpo_rllib.sharding import call_as_forward

    model = learner.module["default_policy"].model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=generator)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 8:] = True
    with torch.no_grad():
        logprobs, _ = call_as_forward(model, lambda *rows: forward_token_logprobs(model, *rows), ids,
                                      torch.ones_like(ids), response)
    return logprobs[response].numpy()


def _learner_logprobs_and_optimizer(algo) -> tuple[np.ndarray, dict]:
    logprobs = [call.get() for call in algo.learner_group.foreach_learner(_policy_logprobs)]
    return logprobs[0], _optimizer_arrays(algo.get_state()["learner_group"]["learner"])


def _assert_same_optimizer_state(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=str(key))


def test_an_algorithm_checkpoint_moves_from_two_sharded_learners_to_one_and_back(ray_session, tmp_path):
    """The user trains on 2 GPUs (FSDP), resumes on 1, then on 2 again, as ``gigpo-train --resume`` does: the new
    run's config, then the checkpoint restored into it."""
    config = learner_config(**SETTINGS).environment(env_config={"max_steps": 3})
    sharded = config.copy().learners(num_learners=2).training(learner_sharding="fsdp").build_algo()
    one = None
    try:
        sharded.train()
        sharded_weights = sharded.get_weights()["default_policy"]  # gathered by the learners together
        saved_logprobs, saved_optimizer = _learner_logprobs_and_optimizer(sharded)
        steps = {float(value) for (_, key), value in saved_optimizer.items() if key == "step"}
        assert len(steps) == 1 and steps.pop() > 0  # every parameter took the update's Adam step
        one = config.copy().learners(num_learners=0).build_algo()
        untrained_logprobs, _ = _learner_logprobs_and_optimizer(one)
        assert not np.allclose(untrained_logprobs, saved_logprobs, atol=1e-4)  # the restore has something to carry
        one.restore_from_path(sharded.save_to_path(str(tmp_path / "two_learners")))
        assert one.iteration == 1
        logprobs, optimizer = _learner_logprobs_and_optimizer(one)
        np.testing.assert_allclose(logprobs, saved_logprobs, rtol=0, atol=1e-6)
        _assert_same_optimizer_state(optimizer, saved_optimizer)
        one_weights = one.get_weights()["default_policy"]
        assert sharded_weights.keys() == one_weights.keys()
        for name, value in one_weights.items():
            np.testing.assert_array_equal(sharded_weights[name], value, err_msg=name)

        one.train()  # the one-learner run moves on; its checkpoint goes back into the sharded learners
        saved_logprobs, saved_optimizer = _learner_logprobs_and_optimizer(one)
        sharded.restore_from_path(one.save_to_path(str(tmp_path / "one_learner")))
        assert sharded.iteration == 2
        logprobs, optimizer = _learner_logprobs_and_optimizer(sharded)
        np.testing.assert_allclose(logprobs, saved_logprobs, rtol=0, atol=1e-6)
        _assert_same_optimizer_state(optimizer, saved_optimizer)
    finally:
        sharded.stop()
        if one is not None:
            one.stop()
