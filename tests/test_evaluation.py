"""Evaluation as practitioners report it: greedy decoding (the default) and pass@k over k sampled episodes per task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import envs
from gigpo_rllib.algorithm import pass_at_k, pass_rates
from gigpo_rllib.cli import main
from gigpo_rllib.rl_module import TOKEN_LOGPROBS
from gigpo_rllib.rollout import GroupSpec, PromptBuilder, RolloutSettings, StepCollector, allowed_reply_ids
from gigpo_rllib.sampling import make_sampler
from gigpo_rllib.sampling.base import SamplingParams
from gigpo_rllib.sampling.hf import pad_allowed_responses
from tests.conftest import require_vllm

ACTIONS = ("Left", "Down", "Right", "Up")
BOARDS = ("P _ _\n_ O _\n_ _ G", "_ P _\n_ O _\n_ _ G", "_ _ _\nP O _\n_ _ G", "_ _ _\n_ O P\n_ _ G",
          "_ _ _\n_ O _\nP _ G", "_ _ P\n_ O _\n_ _ G")


# --------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # k = 1: the success rate
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0  # n = k: any success
    assert pass_at_k(5, 3, 3) == 1.0  # fewer failures than k: some success is certain
    with pytest.raises(ValueError, match="k <= samples"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="successes <= samples"):
        pass_at_k(2, 3, 1)


def test_pass_at_k_is_any_success_within_each_task():
    # Three tasks of 4 episodes: solved 0, 1 and 4 times; a fourth task lost two of its trajectories.
    successes = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    group_ids = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    rates = pass_rates({"group_id": np.array(group_ids), "success": np.array(successes, dtype=bool)}, 4)
    assert rates["pass@4"] == pytest.approx(2 / 3)  # task 3 has fewer than 4 episodes: left out of pass@4
    assert rates["pass@1"] == pytest.approx(np.mean([0, 0.25, 1, 0.5]))
    assert rates["pass@4"] >= rates["pass@1"]


# ----------------------------------------------------------------------------------------- greedy samplers


@pytest.fixture(scope="module")
def sampler():
    sampler = make_sampler("hf", "gigpo-tiny")
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def learner():
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from gigpo_rllib.env_runner import PLACEHOLDER_SPACES
    from gigpo_rllib.rl_module import LLMRLModule

    return RLModuleSpec(module_class=LLMRLModule, observation_space=PLACEHOLDER_SPACES[0],
                        action_space=PLACEHOLDER_SPACES[1], model_config={"model": "gigpo-tiny"}).build()


def frozen_lake_prompts(tokenizer) -> list[list[int]]:
    builder = PromptBuilder(tokenizer, sequence_length=256, max_new_tokens=12, history_length=0)
    return [builder.build("Reach G, avoid O. Answer with one move.", [], board)[0] for board in BOARDS]


def reply_scores(learner, prompts, replies) -> torch.Tensor:
    """(prompts, replies) total log-prob of each allowed reply after each prompt, under the learner and the action
    constraint, at temperature 1."""
    rows = [(prompt, reply) for prompt in prompts for reply in replies]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    ids = torch.full((len(rows), width), learner.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, reply) in enumerate(rows):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        attention[row, : len(prompt) + len(reply)] = 1
        response[row, len(prompt): len(prompt) + len(reply)] = True
    batch = {"input_ids": ids, "attention_mask": attention, "response_mask": response,
             "allowed_responses": pad_allowed_responses([replies] * len(rows))}
    with torch.no_grad():
        logprobs = learner.forward_train(batch)[TOKEN_LOGPROBS]
    return (logprobs * response).sum(-1).view(len(prompts), len(replies))


def test_greedy_picks_the_learners_most_likely_allowed_reply(sampler, learner):
    tokenizer = sampler.tokenizer
    replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=12, tag="FrozenLake")
    # The replies share every token but the action's, so the best first choice is the best reply.
    assert len({tuple(reply[:3]) for reply in replies}) == 1
    prompts = frozen_lake_prompts(tokenizer)
    params = SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True)
    completions = sampler.generate(prompts, params, [replies] * len(prompts), seed=1)
    scores = reply_scores(learner, prompts, replies)
    for completion, best, row in zip(completions, scores.argmax(-1).tolist(), scores):
        assert completion.token_ids == replies[best]
        # Greedy replies record their temperature-1 log-probs under the constraint, whatever `temperature` says.
        assert sum(completion.logprobs) == pytest.approx(float(row[best]), abs=1e-5)
    again = sampler.generate(prompts, params, [replies] * len(prompts), seed=2)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
    assert [c.logprobs for c in again] == [c.logprobs for c in completions]


def collect(sampler, seed: int, greedy: bool) -> dict:
    settings = RolloutSettings(sampling=SamplingParams(max_new_tokens=12), sequence_length=512, history_length=1,
                               max_envs=16, action_constraint=True)
    collector = StepCollector(sampler, lambda tag: envs.make_llm_env(tag, max_steps=3), settings)
    groups = [GroupSpec(group_id=i, tag="FrozenLake", tag_id=0, seed=i) for i in range(4)]
    return collector.collect(groups, group_size=1, sample_seed=seed, greedy=greedy)


def test_greedy_episodes_do_not_depend_on_the_sampling_seed(sampler):
    first, second = collect(sampler, seed=1, greedy=True), collect(sampler, seed=2, greedy=True)
    assert [r.tolist() for r in first["response_ids"]] == [r.tolist() for r in second["response_ids"]]
    for column in ("return", "length", "success"):
        np.testing.assert_array_equal(first["episodes"][column], second["episodes"][column])
    sampled = [collect(sampler, seed=seed, greedy=False)["response_ids"] for seed in (1, 2)]
    assert [r.tolist() for r in sampled[0]] != [r.tolist() for r in sampled[1]]  # the check above can tell


@pytest.mark.slow
def test_vllm_greedy_replies_equal_the_hf_samplers(sampler):
    from gigpo_rllib.sampling.vllm import VLLMSampler

    require_vllm()
    tokenizer = sampler.tokenizer
    replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=12, tag="FrozenLake")
    prompts = frozen_lake_prompts(tokenizer)
    params = SamplingParams(max_new_tokens=12, greedy=True)
    engine = VLLMSampler("gigpo-tiny", max_model_len=256)
    try:
        for allowed in ([replies] * len(prompts), None):
            expected = sampler.generate(prompts, params, allowed)
            got = engine.generate(prompts, params, allowed, seed=5)
            assert [c.token_ids for c in got] == [c.token_ids for c in expected]
            for ours, theirs in zip(got, expected):
                np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-3)
    finally:
        engine.close()


# -------------------------------------------------------------------------------------- validate / evaluate


def pool_config(**training):
    from tests.test_algorithm import tiny_config

    return tiny_config(train_env_manager={"num_env_groups": 2, "group_size": 2, "seed_pool": [3, 5]},
                       val_batch_size=2, **training)


@pytest.mark.slow
def test_greedy_validation_is_deterministic_and_reports_pass_at_k(ray_session):
    algo = pool_config(eval_pass_k=4).build()
    try:
        first, second = algo.validate(), algo.validate()
    finally:
        algo.stop()
    # The pool's tasks are the same in both runs, their sampling seeds are not: greedy episodes do not care.
    for name in ("success_rate", "episode_return_mean", "episode_len_mean", "pool_seed_success"):
        assert first["pool"][name] == second["pool"][name], name
    for results in (first["pool"], first["held_out"]):
        assert results["success_rate_greedy"] == results["success_rate"]
        assert "success_rate_sampled" not in results
        assert 0 <= results["pass@1"] <= results["pass@4"] <= 1


@pytest.mark.slow
def test_sampled_validation_says_so_at_its_own_temperature(ray_session):
    algo = pool_config(eval_greedy=False, eval_temperature=0.5, temperature=1.3).build()
    temperatures = []
    rollout = algo._rollout
    algo._rollout = lambda *args, **kwargs: temperatures.append(kwargs.get("temperature")) or rollout(*args, **kwargs)
    try:
        results = algo.validate()
        algo.train()
    finally:
        algo.stop()
    assert temperatures == [0.5, 0.5, None]  # pool and held-out validation; training keeps its own temperature
    assert results["held_out"]["success_rate_sampled"] == results["held_out"]["success_rate"]
    assert not any(name.startswith("pass@") or name == "success_rate_greedy" for name in results["held_out"])


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("flags, message", [(["--greedy", "--sample"], "not allowed with argument"),
                                            (["--pass-k", "0"], "--pass-k: must be an integer >= 1, got 0"),
                                            (["--pass-k", "two"], "--pass-k: expected an integer, got 'two'")])
def test_bad_evaluate_flags_get_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_flags_choose_greedy_or_sampled_and_pass_at_k(ray_session, tmp_path, capsys):
    from gigpo_rllib.checkpoints import save_checkpoint

    algo = pool_config().build()
    try:
        checkpoint = save_checkpoint(algo, tmp_path / "run")
    finally:
        algo.stop()
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--episodes", "2", "--pass-k", "3"]) == 0
    greedy = json.loads(capsys.readouterr().out)["held_out"]
    assert {"success_rate_greedy", "pass@1", "pass@3"} <= set(greedy) and "success_rate_sampled" not in greedy
    assert greedy["pass@3"] >= greedy["pass@1"] and not math.isnan(greedy["pass@3"])
    assert main(["evaluate", str(checkpoint), "--episodes", "2", "--sample"]) == 0
    sampled = json.loads(capsys.readouterr().out)["held_out"]
    assert "success_rate_sampled" in sampled and not any(name.startswith("pass@") for name in sampled)
