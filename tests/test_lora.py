"""LoRA fine-tuning: the config key, adapters-only training and state, and samplers that get merged weights whose
log-probs equal the learner's."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from gigpo_rllib import GiGPOConfig, lora
from gigpo_rllib.lora import LORA_DEFAULTS
from gigpo_rllib.rl_module import MODULE_PREFIX, LLMRLModule, to_sampler_state_dict
from gigpo_rllib.sampling import SamplingParams, make_sampler
from tests.test_algorithm import adam_steps, assert_same_weights, module_weights, runner_weights, tiny_config
from tests.test_rl_module import ACTIONS, _right_padded_batch, assert_learner_recomputes_sampler_logprobs

SETTINGS = {"r": 4, "alpha": 8}


def lora_module(**settings) -> LLMRLModule:
    return RLModuleSpec(module_class=LLMRLModule, observation_space=gym.spaces.Box(0, 1, (1,)),
                        action_space=gym.spaces.Discrete(1),
                        model_config={"model": "gigpo-tiny", "lora": {**SETTINGS, **settings}}).build()


def randomise_adapters(module: LLMRLModule, seed: int = 0) -> None:
    """Adapters start with B = 0 (the merged weights are the base's); give them values so merging matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_config_merges_partial_settings_and_names_bad_ones():
    config = GiGPOConfig().training(lora={"r": 8})
    assert config.lora == {**LORA_DEFAULTS, "r": 8}
    assert config.module_model_config()["lora"] == config.lora
    config.validate()
    for settings, message in [({"rank": 4}, r"unknown keys \['rank'\]"), ({"r": 0}, r"lora.r must be an integer >= 1"),
                              ({"alpha": -1}, "lora.alpha"), ({"dropout": 1.0}, r"lora.dropout .* \[0, 1\)"),
                              ({"target_modules": []}, "lora.target_modules")]:
        with pytest.raises(ValueError, match=message):
            GiGPOConfig().training(lora=settings).validate()
    with pytest.raises(ValueError, match="lora must be null or a dict"):
        GiGPOConfig().training(lora=4).validate()


def test_adapter_sync_is_refused_where_it_cannot_work():
    vllm = dict(sampler_backend="vllm")
    for training, message in [({"lora_sync": "adapter", **vllm}, "needs lora set"),
                              ({"lora_sync": "adapter", "lora": {"r": 8}}, r"needs the vLLM sampler.*resolves to 'hf'"),
                              ({"lora_sync": "adapters", "lora": {"r": 8}, **vllm}, r"lora_sync must be one of")]:
        with pytest.raises(ValueError, match=message):
            GiGPOConfig().training(**training).validate()


def test_a_missing_peft_names_the_extra(monkeypatch):
    find_spec = lora.importlib.util.find_spec
    monkeypatch.setattr(lora.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"peft.*pip install 'gigpo-rllib\[lora\]'"):
        GiGPOConfig().training(lora={}).validate()


def test_a_target_module_the_model_lacks_is_named():
    with pytest.raises(ValueError, match=r"lora.target_modules \['attention'\] do not fit"):
        lora_module(target_modules=["attention"])


def test_only_adapters_train_and_make_the_state():
    module = lora_module()
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    state = module.get_state()
    assert sorted(state) == sorted(MODULE_PREFIX + name for name in trainable)
    # At the start B = 0: the merged weights are the pretrained ones, under the base model's names.
    base = LLMRLModule(observation_space=gym.spaces.Box(0, 1, (1,)), action_space=gym.spaces.Discrete(1),
                       model_config={"model": "gigpo-tiny"})
    merged = module.get_state(inference_only=True)
    assert sorted(merged) == sorted(base.get_state())
    for name, value in base.get_state().items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
    # The adapters-only state round-trips; merged weights are refused by name.
    randomise_adapters(module)
    other = lora_module()
    other.set_state(module.get_state())
    for name, value in module.get_state(inference_only=True).items():
        np.testing.assert_array_equal(other.get_state(inference_only=True)[name], value, err_msg=name)
    with pytest.raises(ValueError, match="takes its adapters, not merged weights"):
        other.set_state(merged)


def test_a_sampler_with_merged_weights_scores_like_the_lora_learner():
    """Ratio = 1 at step 0 with LoRA: the sampler (a plain model) loads the merged weights and records the log-probs
    the adapted learner computes."""
    learner = lora_module()
    randomise_adapters(learner)
    sampler = make_sampler("hf", "gigpo-tiny")
    try:
        sampler.load_weights(to_sampler_state_dict(learner.get_state(inference_only=True)))
        torch.testing.assert_close(sampler.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                                   learner.sampler_state_dict()["model.layers.0.self_attn.q_proj.weight"])
        tok = sampler.tokenizer
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Grid {i}:\n_ O\nG P"}],
                                                      add_generation_prompt=True, tokenize=False))
                   for i in range(4)]
        replies = [tok.encode(f"<answer>{action}</answer>") + [tok.eos_token_id] for action in ACTIONS]
        completions = sampler.generate(prompts, SamplingParams(max_new_tokens=12), allowed_responses=[replies] * 4,
                                       seed=0)
        batch = _right_padded_batch(prompts, completions, tok.pad_token_id, allowed=[replies] * 4)
        assert_learner_recomputes_sampler_logprobs(learner, batch, completions, atol=1e-5)
    finally:
        sampler.close()


def on_learner(algo, function):
    """``function(the learner's RL module)``, run where the learner is."""
    (call,) = algo.learner_group.foreach_learner(lambda learner: function(learner.module["default_policy"].unwrapped()))
    return call.get()


def frozen_weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.model.named_parameters() if not p.requires_grad}


@pytest.mark.slow
def test_lora_training_moves_only_adapters_and_syncs_merged_weights(ray_session, tmp_path):
    from gigpo_rllib import GiGPO

    algo = tiny_config(lora=SETTINGS, lr=1e-2, entropy_loss_coef=0.01).env_runners(num_env_runners=1).build()
    try:
        base_before = on_learner(algo, frozen_weights)
        adapters_before = {k: v.copy() for k, v in module_weights(algo).items()}
        algo.train()
        adapters = module_weights(algo)
        assert adapters.keys() == adapters_before.keys()
        assert any(not np.array_equal(adapters[k], adapters_before[k]) for k in adapters)
        base_after = on_learner(algo, frozen_weights)
        assert all(torch.equal(base_before[name], base_after[name]) for name in base_before)
        assert len(adam_steps(algo)) == len(adapters)  # optimizer state for the adapters only
        merged = on_learner(algo, lambda module: module.get_state(inference_only=True))
        (runner,) = runner_weights(algo)
        for name, value in merged.items():  # the runner's sampler holds the merged weights
            np.testing.assert_allclose(runner[name], value, atol=0, rtol=0, err_msg=name)
        path = algo.save_to_path(str(tmp_path / "checkpoint"))
    finally:
        algo.stop()
    restored = GiGPO.from_checkpoint(path)
    try:
        assert_same_weights(module_weights(restored), adapters)
        (runner,) = runner_weights(restored)
        for name, value in merged.items():  # restoring syncs the merged weights to the runners too
            np.testing.assert_array_equal(runner[name], value, err_msg=name)
    finally:
        restored.stop()
    # The exported folder is a plain model with the adapters merged in: the weights the samplers had.
    from transformers import AutoModelForCausalLM

    from gigpo_rllib.export import export_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(path, tmp_path / "exported"))
    for name, value in exported.state_dict().items():
        np.testing.assert_allclose(value.numpy(), merged[MODULE_PREFIX + name], rtol=0, atol=1e-6, err_msg=name)
