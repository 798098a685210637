"""LLMRLModule: RLlib construction, state round-trip, and log-prob agreement with the sampler."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from gigpo_rllib.rl_module import TOKEN_ENTROPY, TOKEN_LOGPROBS, LLMRLModule, to_sampler_state_dict
from gigpo_rllib.sampling import SamplingParams, make_sampler

ACTIONS = ("Left", "Down", "Right", "Up")


def _spec(**model_config):
    return RLModuleSpec(
        module_class=LLMRLModule,
        observation_space=gym.spaces.Box(0, 1, (1,)),
        action_space=gym.spaces.Discrete(1),
        model_config={"model": "gigpo-tiny", **model_config},
    )


@pytest.fixture(scope="module")
def module():
    return _spec().build()


def _right_padded_batch(prompts, completions, pad_id, allowed=None):
    """The learner's layout: [prompt, response, pad...] per row."""
    rows = [p + c.token_ids for p, c in zip(prompts, completions)]
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad_id, dtype=np.int64)
    attn = np.zeros((len(rows), s), dtype=np.int64)
    resp = np.zeros((len(rows), s), dtype=bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c.token_ids)] = p + c.token_ids
        attn[i, : len(p) + len(c.token_ids)] = 1
        resp[i, len(p) : len(p) + len(c.token_ids)] = True
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
             "response_mask": torch.from_numpy(resp)}
    if allowed is not None:
        k = max(len(a) for a in allowed)
        length = max(len(r) for a in allowed for r in a)
        arr = np.full((len(rows), k, length), -1, dtype=np.int64)
        for i, a in enumerate(allowed):
            for j, r in enumerate(a):
                arr[i, j, : len(r)] = r
        batch["allowed_responses"] = torch.from_numpy(arr)
    return batch


def test_builds_from_spec_with_placeholder_spaces(module):
    assert isinstance(module, LLMRLModule)
    assert type(module.model).__name__ == "Qwen2ForCausalLM"
    assert all(k.startswith("model.") for k in module.state_dict())
    with pytest.raises(NotImplementedError, match="sampling"):
        module.forward_inference({})
    with pytest.raises(NotImplementedError, match="sampling"):
        module.forward_exploration({})
    with pytest.raises(ValueError, match="temperature"):
        _spec(temperature=0).build()


def test_algorithm_config_builds_module_with_placeholder_spaces():
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
    from ray.rllib.core import DEFAULT_MODULE_ID

    class _Config(AlgorithmConfig):
        def get_default_rl_module_spec(self):
            return RLModuleSpec(module_class=LLMRLModule)

    spaces = {DEFAULT_MODULE_ID: (gym.spaces.Box(0, 1, (1,)), gym.spaces.Discrete(1))}
    cfg = _Config().rl_module(model_config={"temperature": 0.9})
    m = cfg.get_rl_module_spec(spaces=spaces, inference_only=True).build()
    assert isinstance(m, LLMRLModule) and m.inference_only and m.temperature == 0.9
    assert m.model_name == "gigpo-tiny"


def test_state_round_trip_keeps_tied_embeddings(module):
    state = module.get_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = _spec().build()
    changed = {k: v + np.float32(0.25) for k, v in state.items()}
    other.set_state(changed)
    m = other.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    for k, v in other.get_state().items():
        np.testing.assert_array_equal(v, changed[k])
    # Only one of the tied names given (as a sampler-style partial sync would): the tie still holds.
    emb = "model.model.embed_tokens.weight"
    other.set_state({emb: state[emb]})
    np.testing.assert_array_equal(m.lm_head.weight.detach().numpy(), state[emb])
    with pytest.raises(ValueError, match="lacks"):
        other.set_state({"model.nope": np.zeros(1)})
    sd = to_sampler_state_dict(state)
    assert set(sd) == set(module.sampler_state_dict()) and "lm_head.weight" in sd


def test_forward_train_shapes_and_gradient(module):
    tok = module.tokenizer
    ids = torch.tensor([tok.encode("Move? <answer>Left</answer>") + [tok.eos_token_id]])
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[0, 3:] = True
    out = module.forward_train({"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp})
    assert out[TOKEN_LOGPROBS].shape == ids.shape and out[TOKEN_ENTROPY].shape == ids.shape
    assert (out[TOKEN_LOGPROBS][~resp] == 0).all()
    out[TOKEN_LOGPROBS].sum().backward()
    assert module.model.model.embed_tokens.weight.grad is not None
    module.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="response_mask"):
        module.forward_train({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def assert_learner_recomputes_sampler_logprobs(learner, batch, completions, *, atol: float) -> dict:
    """The learner module's log-probs of the sampled replies in ``batch`` equal the sampler's recorded ones (the PPO
    ratio is 1 before any update); returns the module's output."""
    with torch.no_grad():
        out = learner.forward_train(batch)
    new = out[TOKEN_LOGPROBS][batch["response_mask"]]
    old = torch.tensor([logprob for completion in completions for logprob in completion.logprobs])
    torch.testing.assert_close(new, old, atol=atol, rtol=0)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_learner_logprobs(module, temperature):
    """THE KEY TEST: same weights -> old (sampler) and new (learner) log-probs agree, ratio == 1."""
    learner = _spec(temperature=temperature).build()
    learner.set_state(module.get_state())
    sampler = make_sampler("hf", "gigpo-tiny")
    try:
        # Give both a non-initial set of weights through the real sync path (numpy, prefix stripped).
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in learner.model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        sampler.load_weights(to_sampler_state_dict(learner.get_state()))
        tok = sampler.tokenizer
        prompts = [
            tok.encode(tok.apply_chat_template(
                [{"role": "user", "content": f"Grid {i}:\n_ O\nG P" + " Move?" * (i % 4)}],
                add_generation_prompt=True, tokenize=False))
            for i in range(6)
        ]
        replies = [tok.encode(f"<think>{w}</think><answer>{a}</answer>") + [tok.eos_token_id]
                   for a in ACTIONS for w in ("go", "go left")]
        allowed = [replies] * 6
        allowed[2] = []  # unconstrained row in the same batch
        comps = sampler.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=24),
                                 allowed_responses=allowed, seed=0)
        batch = _right_padded_batch(prompts, comps, tok.pad_token_id,
                                    allowed=[a if a else [[-1]] for a in allowed])
        out = assert_learner_recomputes_sampler_logprobs(learner, batch, comps, atol=1e-5)
        assert (out[TOKEN_ENTROPY][batch["response_mask"]] >= -1e-6).all()
    finally:
        sampler.close()


def _decoder_layer_calls(module, train_step) -> int:
    """Decoder-layer forward calls during ``train_step(module)``: one per layer, plus one per recomputed layer.
    Pre-hooks, because a checkpointed recompute stops early, before forward hooks would run."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *args: calls.append(1)) for layer in module.model.model.layers]
    try:
        train_step(module)
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


@pytest.mark.parametrize("through", ["forward_train", "scoring function"])
def test_gradient_checkpointing_recomputes_every_decoder_layer(through):
    from gigpo_rllib.logprobs import forward_token_logprobs

    ids = torch.randint(3, 200, (2, 12))
    attention, response = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    response[:, 8:] = True

    def train_step(module):
        if through == "forward_train":  # the learner's update
            logprobs = module.forward_train({"input_ids": ids, "attention_mask": attention,
                                             "response_mask": response})[TOKEN_LOGPROBS]
        else:  # anything else that trains the module's model (benchmarks/gpu_check.py, benchmarks/bench_update.py)
            logprobs, _ = forward_token_logprobs(module.model, ids, attention, response)
        logprobs.sum().backward()

    plain = _spec().build()
    layers = len(plain.model.model.layers)
    assert _decoder_layer_calls(plain, train_step) == layers
    checkpointed = _spec(gradient_checkpointing=True).build()
    assert _decoder_layer_calls(checkpointed, train_step) == 2 * layers
