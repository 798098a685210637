"""GiGPO on Ray RLlib end to end (CPU, tiny offline model): training, runners, learners, checkpoints, Tune."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from gigpo_rllib import GiGPO, GiGPOConfig
from gigpo_rllib.advantages import anchor_group_stats, compute_gigpo_advantages
from gigpo_rllib.batch import pad_token_batch, shard_rows, take_rows
from gigpo_rllib.losses import shape_advantages

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**training) -> GiGPOConfig:
    settings = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                    minibatch_size=8, max_new_tokens=8, action_constraint=True, lr=1e-3, history_length=1)
    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
            .training(**{**settings, **training}))


def module_weights(algo) -> dict[str, np.ndarray]:
    return algo.learner_group.get_weights()["default_policy"]


def runner_weights(algo) -> list[dict[str, np.ndarray]]:
    states = algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.get_state(components=["rl_module"])["rl_module"]["default_policy"],
        local_env_runner=algo.env_runner_group.num_remote_env_runners() == 0)
    return states


def adam_steps(algo) -> list[float]:
    optimizer = algo.learner_group.get_state()["learner"]["optimizer"]["default_policy_default_optimizer"]
    return [float(param_state["step"]) for param_state in optimizer["state"]["state"].values()]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_train_with_the_local_runner(ray_session):
    # One minibatch (at most 4 x 3 samples, padded to 16): the update sees only fresh samples, so the whole
    # pipeline (sampler log-probs -> padded batch -> learner log-probs) must give a ratio of exactly 1.
    algo = tiny_config(minibatch_size=16).build()
    try:
        before = {k: v.copy() for k, v in module_weights(algo).items()}
        result = algo.train()
        runners = result["env_runners"]
        assert runners["num_episodes"] == 4
        assert math.isfinite(runners["episode_return_mean"]) and 0 <= runners["success_rate"] <= 1
        assert runners["invalid_action_rate"] == 0.0  # the action constraint allows valid answers only
        learners = result["learners"]
        policy = learners["default_policy"]
        for name in ("policy_loss", "policy_kl", "clip_fraction", "entropy", "grad_norm"):
            assert math.isfinite(policy[name]), name
        assert policy["clip_fraction"] == 0.0
        assert abs(policy["policy_kl"]) < 1e-6
        assert learners["__all_modules__"]["anchor_num_groups"] >= 2
        assert 0 <= learners["__all_modules__"]["anchor_singleton_fraction"] <= 1
        assert result["throughput"]["train_tokens_per_s"] > 0
        for timer in ("env_runner_sampling_timer", "learner_update_timer", "synch_weights"):
            assert timer in result["timers"]
        after = module_weights(algo)
        assert any(not np.array_equal(before[k], after[k]) for k in before), "the update changed nothing"
        assert_same_weights(runner_weights(algo)[0], after)  # the sampler got the new weights
    finally:
        algo.stop()


def test_length_bucketing_trains(ray_session):
    algo = tiny_config(minibatch_size=16, length_bucketing=True, ppo_epochs=2).build()
    try:
        policy = algo.train()["learners"]["default_policy"]
    finally:
        algo.stop()
    assert math.isfinite(policy["policy_loss"]) and policy["clip_fraction"] <= 0.5


def test_train_with_two_remote_runners(ray_session):
    config = tiny_config(train_env_manager={"num_env_groups": 4, "group_size": 2}, rollout_batch_size=8)
    algo = config.env_runners(num_env_runners=2).build()
    try:
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == 8
        weights = module_weights(algo)
        remote = runner_weights(algo)
        assert len(remote) == 2
        for state in remote:
            assert_same_weights(state, weights)
    finally:
        algo.stop()


@pytest.mark.parametrize("grouping", ["traj_group_id", "tags"])
def test_two_learners_give_the_single_learner_advantages(ray_session, grouping):
    # With grouping="tags" the batch is sharded by tag (two env families), else by episode group.
    config = tiny_config(train_env_manager={"num_env_groups": 4, "group_size": 2, "tags": ["FrozenLake", "Sokoban"],
                                            "num_groups_partition": [2, 2]}, rollout_batch_size=8,
                         reward_normalization={"method": "mean_std", "grouping": grouping}, minibatch_size=4)
    config.environment(env=None)  # train on the tags above
    algo = config.learners(num_learners=2).build()
    by = "tag_ids" if grouping == "tags" else "group_ids"
    try:
        rollout = algo._rollout(algo._groups([2, 2], seeds=range(100, 104)), group_size=2, seed=0)
        batch = pad_token_batch(rollout, pad_token_id=0, allowed_replies=rollout["allowed_replies"])
        shards = [take_rows(batch, rows) for rows in shard_rows(batch, 2, by=by)]

        def shard_advantages(learner):
            rank = torch.distributed.get_rank()
            columns = {k: torch.as_tensor(v) for k, v in shards[rank].items()}
            advantages = learner.compute_advantages(columns).numpy()
            return rank, (advantages, learner.metrics.peek(("__all_modules__", "anchor_num_groups")))

        answers = dict(call.get() for call in algo.learner_group.foreach_learner(shard_advantages))
        by_rank = {rank: advantages for rank, (advantages, _) in answers.items()}
        single = compute_gigpo_advantages(*(torch.as_tensor(batch[k]) for k in
                                            ("rewards", "traj_ids", "step_ids", "group_ids", "anchor_ids")),
                                          method="mean_std", grouping=grouping,
                                          tag_ids=torch.as_tensor(batch["tag_ids"]))
        expected = shape_advantages(single.advantages, torch.as_tensor(batch["response_mask"].sum(-1)),
                                    scaling="scale", clip=config.advantage_clip).numpy()
        for rank, rows in enumerate(shard_rows(batch, 2, by=by)):
            np.testing.assert_allclose(by_rank[rank], expected[rows], rtol=1e-5, atol=1e-6)
        whole_batch_groups = anchor_group_stats(single.anchor_group_ids).num_groups
        assert [groups for _, groups in answers.values()] == [whole_batch_groups] * 2  # counts are all-reduced
        result = algo.train()  # shards of unequal size must not hang DDP
        assert math.isfinite(result["learners"]["default_policy"]["policy_loss"])
    finally:
        algo.stop()


@pytest.mark.parametrize("episode_stats", ["trajectory", "step"])
def test_grpo_baseline_uses_episode_advantages_only(ray_session, episode_stats):
    algo = tiny_config(adv_estimator="grpo", whiten_advantages=False, advantage_clip=None,
                       episode_advantage_stats=episode_stats).build()
    try:
        rollout = algo._rollout(algo._groups([2], seeds=[7, 8]), group_size=2, seed=0)
        batch = pad_token_batch(rollout, pad_token_id=0, allowed_replies=rollout["allowed_replies"])
        columns = {k: torch.as_tensor(v) for k, v in batch.items()}
        (call,) = algo.learner_group.foreach_learner(lambda learner: learner.compute_advantages(columns))
        advantages = call.get()
        reference = compute_gigpo_advantages(*(columns[k].double() if k == "rewards" else columns[k] for k in
                                               ("rewards", "traj_ids", "step_ids", "group_ids", "anchor_ids")),
                                             episode_stats=episode_stats)
        np.testing.assert_allclose(advantages.numpy(), reference.episode_advantages.numpy(), atol=1e-6)
        assert math.isfinite(algo.train()["env_runners"]["episode_return_mean"])
    finally:
        algo.stop()


RESUME_SCRIPT = """
import json, sys, numpy as np, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
from gigpo_rllib import GiGPO
algo = GiGPO.from_checkpoint(sys.argv[1])
weights = algo.learner_group.get_weights()["default_policy"]
state = algo.get_state()
before = dict(iteration=algo.iteration, seeds=state["seed_counters"],
              checksum=float(sum(np.abs(w).sum() for w in weights.values())))
result = algo.train()
print("RESULT" + json.dumps(dict(before=before, iteration=algo.iteration,
                                 ret=result["env_runners"]["episode_return_mean"])))
"""


def test_checkpoint_round_trip_and_resume_in_a_new_process(ray_session, tmp_path):
    algo = tiny_config().build()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        saved = {k: v.copy() for k, v in module_weights(algo).items()}
        seeds = algo.get_state()["seed_counters"]
        steps = adam_steps(algo)
        assert steps and all(step == steps[0] > 0 for step in steps)
        restored = GiGPO.from_checkpoint(path)
        try:
            assert_same_weights(module_weights(restored), saved)
            assert restored.get_state()["seed_counters"] == seeds
            assert restored.iteration == 1
            assert adam_steps(restored) == steps
        finally:
            restored.stop()
    finally:
        algo.stop()
    process = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, path], capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("RESULT"))
    resumed = json.loads(line[len("RESULT"):])
    assert resumed["before"]["iteration"] == 1 and resumed["iteration"] == 2
    assert resumed["before"]["seeds"] == seeds
    assert resumed["before"]["checksum"] == pytest.approx(float(sum(np.abs(w).sum() for w in saved.values())))
    assert math.isfinite(resumed["ret"])


def test_a_restore_reaches_runners_whose_rllib_sync_was_skipped(ray_session, tmp_path, monkeypatch):
    """RLlib's restore sync is asynchronous and skips a runner with a request in flight; GiGPO syncs again, blocking,
    so every runner holds the restored weights before the next batch."""
    from ray.rllib.env.env_runner_group import EnvRunnerGroup

    algo = tiny_config(lr=1e-2).env_runners(num_env_runners=1).build()
    try:
        algo.train()
        trained = {k: v.copy() for k, v in module_weights(algo).items()}
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    monkeypatch.setattr(EnvRunnerGroup, "sync_weights", lambda self, *args, **kwargs: None)
    restored = GiGPO.from_checkpoint(path)
    try:
        (runner,) = runner_weights(restored)
        assert_same_weights(runner, trained)
    finally:
        restored.stop()


def test_one_step_updates_take_the_learner_old_logprobs_from_their_own_forward(ray_session, monkeypatch):
    """With one minibatch and one epoch the update's forward runs on the pre-update weights: the learner's old
    log-probs come from it (no second no-grad pass), and the step equals the one with the sampler's log-probs, which
    the HF sampler in float32 on CPU computes identically."""
    from gigpo_rllib.learner import GiGPOTorchLearner

    passes = []
    score = GiGPOTorchLearner._score_without_grad
    monkeypatch.setattr(GiGPOTorchLearner, "_score_without_grad",
                        lambda self, *args: passes.append(1) or score(self, *args))
    weights = {}
    for source in ("learner", "sampler"):
        algo = tiny_config(minibatch_size=64, old_logprobs_source=source).debugging(seed=3).build()
        try:
            result = algo.train()
            weights[source] = module_weights(algo)
        finally:
            algo.stop()
        if source == "learner":
            learner = result["learners"]["default_policy"]
            assert learner["logprob_gap_max"] < 1e-5 and learner["policy_kl"] == pytest.approx(0.0, abs=1e-7)
    assert passes == []
    for name in weights["learner"]:
        np.testing.assert_allclose(weights["learner"][name], weights["sampler"][name], rtol=0, atol=1e-6, err_msg=name)


def test_tune_runs_gigpo_by_name(ray_session, tmp_path):
    from ray import tune

    tuner = tune.Tuner("GiGPO", param_space=tiny_config(),
                       run_config=tune.RunConfig(stop={"training_iteration": 1}, storage_path=str(tmp_path),
                                                 verbose=0))
    results = tuner.fit()
    assert not results.errors
    result = results.get_best_result(metric="env_runners/episode_return_mean", mode="max")
    assert result.metrics["training_iteration"] == 1


@pytest.mark.parametrize("pool", [None, 3])
def test_validation_seeds_are_held_out_and_a_pool_is_validated_separately(ray_session, pool, monkeypatch):
    from gigpo_rllib import algorithm as algorithm_module

    algo = tiny_config(val_batch_size=3, val_interval=1,
                      train_env_manager={"num_env_groups": 2, "group_size": 2, "seed_pool": pool}).build()
    rollouts = []  # (group_size, env seeds) of every rollout
    sample = algo._rollout

    def recording(groups, group_size, seed, **kwargs):
        rollouts.append((group_size, [group.seed for group in groups]))
        return sample(groups, group_size, seed, **kwargs)

    algo._rollout = recording
    try:
        results = [algo.train() for _ in range(2)]
        algo._rollout = sample
        monkeypatch.setattr(algorithm_module, "PER_SEED_METRICS_MAX_POOL", 2)  # a pool too large for per-seed keys
        over_limit = algo.validate()
    finally:
        algo.stop()
    if pool is None:
        assert "pool_seed_success" not in results[0]["env_runners"]
    else:
        # Each seed's success rate; both first-batch seeds played 2 episodes, so their mean is the batch's rate.
        per_seed = results[0]["env_runners"]["pool_seed_success"]
        assert sorted(per_seed) == sorted(str(seed) for seed in rollouts[0][1])
        assert np.mean(list(per_seed.values())) == pytest.approx(results[0]["env_runners"]["success_rate"])
        validated = results[-1]["validation"]["pool"]
        assert sorted(validated["pool_seed_success"]) == ["0", "1", "2"]
        assert np.mean(list(validated["pool_seed_success"].values())) == pytest.approx(validated["success_rate"])
        assert "pool_seed_success" not in over_limit["pool"]
    train_seeds = {seed for size, seeds in rollouts if size == 2 for seed in seeds}
    validation = [seeds for size, seeds in rollouts if size == 1]
    if pool is None:
        assert results[-1]["validation"]["num_episodes"] == 3
        assert len(validation) == 2 and not train_seeds & {seed for seeds in validation for seed in seeds}
    else:
        assert train_seeds <= {0, 1, 2}
        pool_runs, held_out_runs = validation[0::2], validation[1::2]
        assert all(set(seeds) <= {0, 1, 2} for seeds in pool_runs)
        assert not {0, 1, 2} & {seed for seeds in held_out_runs for seed in seeds}
        for part in ("pool", "held_out"):
            assert results[-1]["validation"][part]["num_episodes"] == 3


def test_reference_model_only_when_kl_is_on(ray_session):
    for coefficient in (0.0, 0.5):
        algo = tiny_config(init_kl_coef=coefficient).build()
        try:
            (call,) = algo.learner_group.foreach_learner(lambda learner: learner._reference_model is not None)
            assert call.get() == (coefficient > 0)
            policy = algo.train()["learners"]["default_policy"]
            if coefficient > 0:
                assert policy["reference_kl"] >= 0.0 and math.isfinite(policy["reference_kl"])
            else:
                assert "reference_kl" not in policy
        finally:
            algo.stop()


def test_learning_rate_schedule_follows_sampled_steps(ray_session):
    algo = tiny_config(lr=[[0, 1e-3], [1, 1e-5]]).build()
    try:
        rates = [algo.train()["learners"]["default_policy"]["default_optimizer_learning_rate"] for _ in range(2)]
    finally:
        algo.stop()
    assert rates[-1] == pytest.approx(1e-5)


def test_entropy_coefficient_schedule_follows_sampled_steps(ray_session):
    algo = tiny_config(entropy_loss_coef=[[0, 0.4], [100_000, 0.0]]).build()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    sampled = results[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
    assert sampled > 0
    coefficients = [r["learners"]["default_policy"]["entropy_coef"] for r in results]
    assert coefficients[0] > coefficients[1]
    assert coefficients[1] == pytest.approx(0.4 * (1 - sampled / 100_000))


def test_learner_counts_stalled_groups(ray_session):
    # Every try earns 0; the first group's episodes are marked successful (solved), the second's are not (stalled).
    algo = tiny_config().build()
    try:
        rollout = algo._rollout(algo._groups([2], seeds=[11, 12]), group_size=2, seed=0)
        batch = pad_token_batch(rollout, pad_token_id=0, allowed_replies=rollout["allowed_replies"])
        batch["rewards"][:] = 0.0
        batch["episode_success"][:] = batch["group_ids"] == batch["group_ids"].min()
        fraction = algo._update(batch)[0]["__all_modules__"]["stalled_group_fraction"].peek()
        assert algo.train()["learners"]["__all_modules__"]["stalled_group_fraction"] in (0.0, 0.5, 1.0)
    finally:
        algo.stop()
    assert fraction == 0.5


def test_seed_example_config_trains_with_fewer_groups(ray_session):
    from gigpo_rllib.cli import load_experiment

    config, _ = load_experiment(ROOT / "configs" / "example_gigpo.yaml")
    config.training(train_env_manager={"num_env_groups": 2, "group_size": 2, "num_groups_partition": [2]},
                    rollout_batch_size=4)
    algo = config.build()
    try:
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == 4
        assert math.isfinite(result["learners"]["default_policy"]["policy_loss"])
    finally:
        algo.stop()


def changed_fraction(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    changed = sum(int((before[name] != after[name]).sum()) for name in before)
    return changed / sum(value.size for value in before.values())


def as_bfloat16(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: torch.from_numpy(value).to(torch.bfloat16).float().numpy() for name, value in weights.items()}


def test_bfloat16_compute_learns_like_float32_syncs_bfloat16_and_checkpoints(ray_session, tmp_path):
    # A learning rate far below bfloat16's resolution: bfloat16 weights would barely move, float32 master weights do.
    changed = {}
    for dtype in ("float32", "bfloat16"):
        algo = tiny_config(model_dtype=dtype, lr=1e-6).build()
        try:
            before = {name: value.copy() for name, value in module_weights(algo).items()}
            result = algo.train()
            after = module_weights(algo)
            assert all(value.dtype == np.float32 for value in after.values())
            changed[dtype] = changed_fraction(before, after)
            if dtype == "bfloat16":
                # The sampler got the update in its own dtype, each tensor once (the tied output layer is not
                # shipped twice) and not upcast.
                assert_same_weights(runner_weights(algo)[0], as_bfloat16(after))
                unique_elements = sum(value.size for name, value in after.items() if name != "model.lm_head.weight")
                assert result["learners"]["__all_modules__"]["weight_sync_bytes"] == 2 * unique_elements
                path = algo.save_to_path(str(tmp_path / "bfloat16"))
                restored = GiGPO.from_checkpoint(path)
                try:
                    assert_same_weights(module_weights(restored), after)
                    assert math.isfinite(restored.train()["learners"]["default_policy"]["policy_loss"])
                finally:
                    restored.stop()
        finally:
            algo.stop()
    # Rows of tokens that never occur get no gradient, so not every element moves even in float32.
    assert changed["float32"] > 0.2, changed
    assert changed["bfloat16"] >= 0.95 * changed["float32"], changed


def test_learner_adjusts_and_shuffles_after_the_advantages(ray_session):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.learner.training_data import TrainingData
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    algo = tiny_config(minibatch_size=5).build()
    try:
        rollout = algo._rollout(algo._groups([2], seeds=[11, 12]), group_size=2, seed=0)
        batch = pad_token_batch(rollout, pad_token_id=0, allowed_replies=rollout["allowed_replies"])

        def adjust(learner):
            expected = learner.compute_advantages({k: torch.as_tensor(v) for k, v in batch.items()})
            data = TrainingData(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(batch))},
                                                      env_steps=len(batch["rewards"])))
            columns = learner._make_batch_if_necessary(data).policy_batches[DEFAULT_MODULE_ID]
            return expected.numpy(), {k: columns[k].cpu().numpy() for k in ("advantages", "traj_ids", "step_ids")}

        (call,) = algo.learner_group.foreach_learner(adjust)
        expected, adjusted = call.get()
    finally:
        algo.stop()
    n = len(batch["rewards"])
    rows = {(t, s): i for i, (t, s) in enumerate(zip(batch["traj_ids"], batch["step_ids"]))}
    kept = [rows[t, s] for t, s in zip(adjusted["traj_ids"], adjusted["step_ids"])]
    assert len(kept) % 5 == 0 and set(kept) == set(range(n))  # copy mode keeps every sample, pads with copies
    np.testing.assert_allclose(adjusted["advantages"], expected[kept])  # copies carry the original advantages
    assert kept[:n] != list(range(n))  # shuffled, not in rollout order


def test_a_failed_runner_is_counted_not_hidden(ray_session):
    # Round-robin: runner 1 gets the even env seeds, runner 2 the odd ones, which fail.
    config = tiny_config(train_env_manager={"num_env_groups": 4, "group_size": 2}, rollout_batch_size=8)
    algo = config.environment("tests.learning_env:OddSeedFailing-v0").env_runners(
        num_env_runners=2).build()
    try:
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == 4
        assert result["env_runners"]["trajectories_lost"] == 4
    finally:
        algo.stop()


def test_a_failing_reset_costs_only_its_group(ray_session):
    algo = tiny_config().environment("tests.learning_env:OddSeedFailing-v0").build()  # groups of seeds 0 and 1
    try:
        result = algo.train()["env_runners"]
    finally:
        algo.stop()
    assert result["trajectories_lost_by_cause"]["env_error"] == 2 and result["num_episodes"] == 2


def test_a_runner_failing_as_a_whole_reaches_the_driver(ray_session):
    algo = tiny_config().build()

    def broken_sampler(*args, **kwargs):
        raise RuntimeError("the sampler broke")

    algo.env_runner_group.local_env_runner.sampler.generate = broken_sampler
    try:
        with pytest.raises(RuntimeError, match="(?s)runner_failed': 4.*env runner 0 failed:.*the sampler broke"):
            algo.train()
    finally:
        algo.stop()


def test_a_runner_whose_weights_are_stale_does_not_sample(ray_session):
    algo = tiny_config().build()
    try:
        algo.train()
        runner = algo.env_runner_group.local_env_runner
        assert runner.weights_seq_no == 1  # the learner's first update, synced
        runner.weights_seq_no = 0  # as if the last sync had never arrived
        with pytest.raises(RuntimeError, match="(?s)runner_failed': 4.*holds weights number 0, but the learner's are "
                                               "number 1"):
            algo.train()
    finally:
        algo.stop()


def test_one_process_layout_syncs_on_the_device(ray_session, monkeypatch):
    # num_learners=0 and num_env_runners=0: learner and sampler share the driver, so the sync copies the module's
    # tensors into the sampler directly, with no packed host buffer and nothing put into the object store.
    from gigpo_rllib.env_runner import GiGPOEnvRunner
    from gigpo_rllib.learner import GiGPOTorchLearner

    def no_host_round_trip(*args, **kwargs):
        raise AssertionError("the one-process sync went through packed weights")

    monkeypatch.setattr(GiGPOTorchLearner, "packed_weights", no_host_round_trip)
    monkeypatch.setattr(GiGPOEnvRunner, "load_packed_weights", no_host_round_trip)
    algo = tiny_config().build()
    try:
        sampler_tensors = {name: value.data_ptr() for name, value in
                           algo.env_runner_group.local_env_runner.sampler.state_dict().items()}
        before = {k: v.copy() for k, v in module_weights(algo).items()}
        algo.train()
        after = module_weights(algo)
        assert any(not np.array_equal(before[k], after[k]) for k in before), "the update changed nothing"
        assert_same_weights(runner_weights(algo)[0], after)
        sampler = algo.env_runner_group.local_env_runner.sampler
        assert {name: value.data_ptr() for name, value in sampler.state_dict().items()} == sampler_tensors  # in place
        assert algo.env_runner_group.local_env_runner.weights_seq_no == 1
    finally:
        algo.stop()
