"""Overlapped sampling and learning (``max_off_policy_steps``): the config's rules, the decoupled objective's
importance weights on a local learner, and end to end on Ray (slow): one weight version per episode group, no
change at all without remote runners, and a checkpoint taken between overlapped iterations that loses no batch and
trains none twice."""

import math

import numpy as np
import pytest
import torch

from gigpo_rllib import GiGPO, GiGPOConfig
from gigpo_rllib.batch import WEIGHTS_VERSION
from gigpo_rllib.config import OFF_POLICY_IS_CAP
from tests.conftest import require_vllm
from tests.learner_batch import local_learner, prepared_batch, synthetic_batch


def frozen_lake(**training) -> GiGPOConfig:
    settings = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                    minibatch_size=4, max_new_tokens=8, action_constraint=True, lr=1e-3, history_length=1)
    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
            .training(**{**settings, **training}))


# ------------------------------------------------------------------------------------------------ config


def test_one_step_off_policy_recomputes_proximal_logprobs_and_caps_the_importance_weights():
    config = frozen_lake(max_off_policy_steps=1).env_runners(num_env_runners=1)
    config.validate()
    assert config.overlaps_sampling
    # HF in float32 on CPU would take the sampler's log-probs; a stale batch needs the learner's own.
    assert config.resolved_old_logprobs_source == "learner"
    assert config.resolved_truncated_is_cap == OFF_POLICY_IS_CAP
    assert frozen_lake(max_off_policy_steps=1, truncated_is_cap=3.0).env_runners(
        num_env_runners=1).resolved_truncated_is_cap == 3.0


def test_sampler_logprobs_are_refused_for_stale_batches():
    config = frozen_lake(max_off_policy_steps=1, old_logprobs_source="sampler").env_runners(num_env_runners=1)
    with pytest.raises(ValueError, match="max_off_policy_steps > 0 .* use old_logprobs_source='learner' or 'auto'"):
        config.validate()


@pytest.mark.parametrize("value", [2, -1, 0.5, True])
def test_max_off_policy_steps_is_zero_or_one(value):
    with pytest.raises(ValueError, match=r"max_off_policy_steps must be an integer in \[0, 1\]"):
        frozen_lake(max_off_policy_steps=value).env_runners(num_env_runners=1).validate()


def test_without_remote_runners_nothing_overlaps_and_build_says_so():
    config = frozen_lake(max_off_policy_steps=1)
    with pytest.warns(UserWarning, match="num_env_runners is 0: sampling and update take turns"):
        config.validate()
    plain = frozen_lake()
    assert not config.overlaps_sampling
    assert (config.resolved_old_logprobs_source, config.resolved_truncated_is_cap) == (
        plain.resolved_old_logprobs_source, plain.resolved_truncated_is_cap) == ("sampler", None)


# ------------------------------------------------------------------------------------ the decoupled objective


def test_stale_tokens_are_weighted_by_the_capped_proximal_to_behaviour_ratio():
    """The learner's pre-update log-probs become the proximal ("old") ones the PPO ratio is clipped around; each
    token weighs min(π_proximal / π_behaviour, cap) with the sampler's recorded log-probs as the behaviour policy,
    and the weights' mean, max and capped share are logged."""
    learner = local_learner(old_logprobs_source="learner", truncated_is_cap=2.0)
    batch = synthetic_batch(groups=4, turns=1)  # 8 rows: two minibatches, so the proximal pass runs before the first
    rows = len(batch["rewards"])
    proximal = prepared_batch(learner, batch)["old_logprobs"]  # one pass to learn the learner's own log-probs
    # The behaviour policy of the even rows was far less likely to pick its tokens (weight capped at 2), of the
    # odd rows a little less (weight e^0.1).
    order = prepared_batch(learner, batch)["traj_ids"].numpy()  # rows come back shuffled, seeded alike each time
    gap = np.where(np.arange(rows) % 2 == 0, 3.0, 0.1)
    behaviour = batch["old_logprobs"].copy()
    behaviour[order] = proximal.numpy() - gap[:, None]
    batch["old_logprobs"] = np.where(batch["response_mask"], behaviour, 0.0).astype(np.float32)
    prepared = prepared_batch(learner, batch)
    mask = prepared["response_mask"]
    torch.testing.assert_close(prepared["old_logprobs"], proximal)
    expected = torch.where(torch.as_tensor(gap[:, None] > 1).expand_as(mask), 2.0, math.exp(0.1))
    torch.testing.assert_close(prepared["is_weights"][mask], expected[mask], rtol=1e-5, atol=1e-5)
    metrics = learner.metrics.reduce()["default_policy"]
    assert float(metrics["is_weight_max"]) == pytest.approx(2.0)
    capped_share = float(mask[::2].sum() / mask.sum())
    assert float(metrics["is_capped_fraction"]) == pytest.approx(capped_share)


# ------------------------------------------------------------------------------------------------ end to end


def learning_metrics(result: dict) -> dict[str, float]:
    """The result's rollout and learner numbers that do not depend on timing (what a seeded run repeats)."""
    timing = ("_s", "_per_s", "time", "timer")
    numbers = {}
    for section in ("env_runners", "learners"):
        for scope, values in result[section].items():
            for name, value in (values.items() if isinstance(values, dict) else [(scope, values)]):
                key = f"{section}/{scope}/{name}"
                if isinstance(value, (int, float)) and not any(mark in key for mark in timing):
                    numbers[key] = float(value)
    return numbers


@pytest.mark.slow
def test_without_remote_runners_max_off_policy_steps_changes_nothing(ray_session):
    """Staleness 0 is today's algorithm: with nothing to overlap, a seeded run with max_off_policy_steps=1 repeats
    the sequential run's metrics exactly, recorded here from a run of the default config."""
    runs = []
    for settings in ({}, {"max_off_policy_steps": 1}):
        algo = frozen_lake(**settings).debugging(seed=5).build_algo()
        try:
            runs.append([learning_metrics(algo.train()) for _ in range(2)])
        finally:
            algo.stop()
    np.testing.assert_equal(runs[1], runs[0])  # NaN (parameter counts RLlib leaves unset) equals NaN
    assert all("staleness" not in key for key in runs[1][0])


# The layouts the overlap must work in: the learner in the driver with the HF sampler, and two DDP learner actors
# with the vLLM sampler (whose engine reloads weights in place: a sync must wait for the batch in flight).
LAYOUTS = {"one local learner, hf": ({}, 0),
           "two learners, vllm": ({"sampler_backend": "vllm", "sequence_length": 512}, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_overlapped_groups_come_from_one_weight_version_and_lag_one_update(ray_session, layout):
    training, learners = LAYOUTS[layout]
    if training.get("sampler_backend") == "vllm":
        require_vllm()
    config = frozen_lake(max_off_policy_steps=1, **training).env_runners(num_env_runners=1)
    algo = config.learners(num_learners=learners).debugging(seed=5).build_algo()
    trained_versions = []
    try:
        for iteration in range(3):
            pending_version = algo._current_weights_seq_no()
            result = algo.train()
            sampled = algo._pending_sample.sampled  # sampled during this iteration's update, trained by the next
            for group in np.unique(sampled["group_ids"]):
                versions = np.unique(sampled[WEIGHTS_VERSION][sampled["group_ids"] == group])
                assert len(versions) == 1, f"group {group} mixes weight versions {versions}"
            assert set(sampled[WEIGHTS_VERSION]) == {pending_version}  # the weights before this update
            trained_versions.append(result["learners"]["__all_modules__"]["staleness"])
            timers = result["timers"]
            assert timers["overlap_s"] > 0 and timers["learner_waited_s"] >= 0 and timers["sampler_waited_s"] >= 0
            learner = result["learners"]["default_policy"]
            assert 0 < learner["is_weight_mean"] <= learner["is_weight_max"] <= OFF_POLICY_IS_CAP
            assert 0 <= learner["is_capped_fraction"] <= 1
        # A batch whose sampling fails during the update fails the next iteration, before its update: the state
        # in between is that of a finished iteration, fit for a final checkpoint.
        def failing_sample():
            raise RuntimeError("every trajectory was lost")

        algo._sample_training_batch = failing_sample
        algo.train()
        assert algo.checkpoint_is_consistent
        with pytest.raises(RuntimeError, match="every trajectory was lost"):
            algo.train()
        assert algo.checkpoint_is_consistent and algo._pending_sample is None
    finally:
        algo.stop()
    # The first batch is sampled before any update; every later one by the weights one update older.
    assert trained_versions == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_a_checkpoint_between_overlapped_iterations_loses_no_batch_and_trains_none_twice(ray_session, tmp_path,
                                                                                         monkeypatch):
    """The batch sampled during the last update is in the checkpoint: a resumed run trains exactly the batches (env
    seeds and rewards) the uninterrupted run trains, in the same order, and ends with the same weights."""
    trained = []
    log_sample = GiGPO._log_sample

    def record(self, sample):
        trained.append((sorted(group.seed for group in sample.groups), sample.training["rewards"].tolist()))
        log_sample(self, sample)

    monkeypatch.setattr(GiGPO, "_log_sample", record)
    config = frozen_lake(max_off_policy_steps=1).env_runners(num_env_runners=1).debugging(seed=5)

    algo = config.build_algo()
    try:
        for _ in range(3):
            algo.train()
        uninterrupted_weights = algo.learner_group.get_weights()["default_policy"]
    finally:
        algo.stop()
    uninterrupted, trained[:] = list(trained), []

    algo = config.build_algo()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "mid_overlap"))
    finally:
        algo.stop()
    resumed = GiGPO.from_checkpoint(path)
    try:
        # The saved batch is trained first, one update behind the restored learner.
        assert resumed.train()["learners"]["__all_modules__"]["staleness"] == 1.0
        resumed.train()
        resumed_weights = resumed.learner_group.get_weights()["default_policy"]
    finally:
        resumed.stop()
    assert trained == uninterrupted
    assert len({tuple(seeds) for seeds, _ in trained}) == 3  # three different batches
    for name, value in uninterrupted_weights.items():
        np.testing.assert_allclose(resumed_weights[name], value, rtol=0, atol=1e-6, err_msg=name)



@pytest.mark.slow
def test_staleness_zero_reproduces_the_recorded_sequential_run(ray_session):
    import json

    from tests.recorded_runs import RECORDED_METRICS, recorded_run_config, run_metrics

    recorded = json.loads(RECORDED_METRICS.read_text())
    now = run_metrics(recorded_run_config().training(max_off_policy_steps=0))
    for iteration, (before, after) in enumerate(zip(recorded, now, strict=True)):
        # Every metric recorded before the overlap existed is still there with its value (new ones may be added).
        assert set(before) <= set(after), (iteration, sorted(set(before) - set(after)))
        changed = {key: (value, after[key]) for key, value in before.items()
                   if not (math.isclose(value, after[key], rel_tol=1e-6, abs_tol=1e-9)
                           or math.isnan(value) and math.isnan(after[key]))}
        assert not changed, (iteration, changed)
