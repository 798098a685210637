"""Packing the learner's weights for the samplers (gigpo_rllib.weight_sync): each weight once, in the samplers'
dtype, in one buffer."""

import pytest
import torch

from gigpo_rllib.models import load_model_and_tokenizer
from gigpo_rllib.weight_sync import pack_weights, unpack_weights


@pytest.fixture(scope="module")
def model():
    return load_model_and_tokenizer("gigpo-tiny")[0]


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_each_weight_is_packed_once_in_the_samplers_dtype(model, dtype, width):
    state = model.state_dict()
    assert model.config.tie_word_embeddings and "lm_head.weight" in state
    packed = pack_weights(state, dtype)
    assert packed.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert [name for name, _, _ in packed.entries] == [name for name in state if name != "lm_head.weight"]
    distinct_elements = sum(value.numel() for name, value in state.items() if name != "lm_head.weight")
    assert packed.nbytes == width * distinct_elements  # no upcast, no duplicate
    unpacked = unpack_weights(packed)
    for name, value in unpacked.items():
        assert value.dtype == getattr(torch, dtype)
        torch.testing.assert_close(value, state[name].to(value.dtype), rtol=0, atol=0)


def test_unpacked_weights_load_into_a_sampler_in_place(model):
    from gigpo_rllib.sampling.hf import HFSampler

    sampler = HFSampler("gigpo-tiny", dtype="bfloat16")
    target = dict(sampler.model.state_dict())
    with torch.no_grad():
        source = {name: value + 0.5 for name, value in model.state_dict().items()}
    sampler.load_weights(unpack_weights(pack_weights(source, "bfloat16")))
    for name, value in sampler.model.state_dict().items():
        assert value.data_ptr() == target[name].data_ptr()  # copied into the same storage
        torch.testing.assert_close(value, source[name].to(torch.bfloat16), rtol=0, atol=0)


def test_integer_buffers_travel_exactly(model):
    # bfloat16 has 8 significant bits: 257 would arrive as 256.
    state = {**model.state_dict(), "model.position_ids": torch.arange(1024).unsqueeze(0)}
    unpacked = unpack_weights(pack_weights(state, "bfloat16"))
    assert unpacked["model.position_ids"].dtype == torch.int64
    assert torch.equal(unpacked["model.position_ids"], state["model.position_ids"])
    assert unpacked["model.norm.weight"].dtype == torch.bfloat16
