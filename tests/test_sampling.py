"""Token log-probs (gigpo_rllib.logprobs) and the samplers (gigpo_rllib.sampling)."""

from __future__ import annotations

import pytest
import torch

from gigpo_rllib.logprobs import position_ids_from_attention_mask, sequence_token_logprobs

# ---------------------------------------------------------------- sequence_token_logprobs, hand-made tensors


def _brute_force(logits, input_ids, response_mask, temperature, allowed):
    """Loop version of the constrained log-prob/entropy, written independently of the vectorised one."""
    bsz, seq, _ = logits.shape
    lp = torch.zeros(bsz, seq)
    ent = torch.zeros(bsz, seq)
    for b in range(bsz):
        resp_pos = [s for s in range(seq) if response_mask[b, s]]
        replies = []
        if allowed is not None:
            for row in allowed[b].tolist():
                reply = [x for x in row if x != -1]
                if reply:
                    replies.append(reply)
        for t, s in enumerate(resp_pos):
            z = logits[b, s - 1].double() / temperature
            tok = int(input_ids[b, s])
            if replies:
                prefix = [int(input_ids[b, p]) for p in resp_pos[:t]]
                cands = sorted({r[t] for r in replies if len(r) > t and r[:t] == prefix})
                zc = z[cands]
                logz = torch.logsumexp(zc, 0)
                lp[b, s] = float(z[tok] - logz)
                p = torch.softmax(zc, 0)
                ent[b, s] = float(-(p * torch.log(p)).sum())
            else:
                logp = torch.log_softmax(z, 0)
                lp[b, s] = float(logp[tok])
                ent[b, s] = float(-(logp.exp() * logp).sum())
    return lp, ent


def test_unconstrained_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    lp, ent = sequence_token_logprobs(logits, ids, mask)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = torch.cat([torch.zeros(2, 1), ref], 1) * mask
    torch.testing.assert_close(lp, ref)
    assert (ent[~mask] == 0).all() and (ent[mask] > 0).all()


def test_temperature_divides_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 6, generator=g)
    ids = torch.randint(0, 6, (1, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    lp, ent = sequence_token_logprobs(logits, ids, mask, temperature=0.7)
    lp2, ent2 = sequence_token_logprobs(logits / 0.7, ids, mask)
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(ent, ent2)


def test_constrained_matches_brute_force_with_dedupe_and_mixed_rows():
    g = torch.Generator().manual_seed(2)
    vocab, eos = 9, 8
    # Row 0: replies share first tokens (dedupe needed at t=0 and t=1). Row 1: unconstrained. Row 2: right pad.
    allowed = torch.tensor(
        [
            [[3, 4, eos, -1], [3, 4, 5, eos], [3, 6, eos, -1], [2, eos, -1, -1]],
            [[-1] * 4] * 4,
            [[1, eos, -1, -1], [1, eos, -1, -1], [5, 5, eos, -1], [-1] * 4],
        ]
    )
    ids = torch.tensor(
        [
            [0, 7, 7, 3, 4, 5, eos],  # left-padded prompt, response 3 4 5 eos
            [7, 7, 7, 1, 2, 0, 0],  # unconstrained response 1 2
            [7, 6, 5, 5, eos, 0, 0],  # response 5 5 eos, then right padding
        ]
    )
    mask = torch.tensor(
        [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool
    )
    logits = torch.randn(3, 7, vocab, generator=g, requires_grad=True)
    for temperature in (1.0, 0.5):
        lp, ent = sequence_token_logprobs(logits, ids, mask, temperature=temperature, allowed_responses=allowed)
        ref_lp, ref_ent = _brute_force(logits.detach(), ids, mask, temperature, allowed)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    lp, _ = sequence_token_logprobs(logits, ids, mask, allowed_responses=allowed)
    # Step 0 of row 0 chooses between {3, 2} once each (3 appears in three replies but counts once).
    z = logits.detach()[0, 2]
    assert lp[0, 3].item() == pytest.approx((z[3] - torch.logsumexp(z[[3, 2]], 0)).item(), abs=1e-6)
    # The forced final eos of "3 4 5 eos" has probability 1.
    assert lp[0, 6].item() == pytest.approx(0.0, abs=1e-6)
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_constrained_rejects_token_outside_the_trie():
    logits = torch.zeros(1, 3, 5)
    ids = torch.tensor([[0, 2, 4]])
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    allowed = torch.tensor([[[1, 4]]])
    with pytest.raises(ValueError, match="allowed_responses"):
        sequence_token_logprobs(logits, ids, mask, allowed_responses=allowed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"allowed_responses": torch.zeros(2, 2)}, "allowed_responses"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    logits = torch.zeros(1, 3, 5)
    ids = torch.zeros(1, 3, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        sequence_token_logprobs(logits, ids, mask, **kwargs)
    with pytest.raises(ValueError, match="response_mask"):
        sequence_token_logprobs(logits, ids, torch.ones(1, 3, dtype=torch.bool))


def test_position_ids_any_padding_side():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# ---------------------------------------------------------------- samplers

from gigpo_rllib.sampling import SamplingParams, make_sampler, resolve_backend  # noqa: E402
from gigpo_rllib.sampling.base import Completion  # noqa: E402
from gigpo_rllib.sampling.hf import pad_allowed_responses  # noqa: E402

ACTIONS = ("Left", "Down", "Right", "Up")


@pytest.fixture(scope="module")
def sampler():
    s = make_sampler("hf", "gigpo-tiny")
    yield s
    s.close()


def _prompts(tok, n):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Grid {i}:\n_ O G\nP _ #" + " Move?" * (i % 3)}]
        out.append(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)))
    return out


def _allowed(tok, n):
    replies = [tok.encode(f"<answer>{a}</answer>") + [tok.eos_token_id] for a in ACTIONS]
    return [replies] * n


def test_sampling_params_validation():
    assert SamplingParams().top_k == -1
    for kwargs, name in [
        ({"temperature": 0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)


@pytest.mark.parametrize("installed", [True, False])
def test_backend_selection(monkeypatch, installed):
    import gigpo_rllib.sampling.vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: installed)
    assert resolve_backend("hf", "cuda") == "hf" and resolve_backend("vllm", "cpu") == "vllm"
    assert resolve_backend("auto", "cpu") == "hf"  # generate is the better choice on a CPU
    assert resolve_backend("auto", "cuda") == ("vllm" if installed else "hf")
    with pytest.raises(ValueError, match="sampler_backend.*'hf', 'vllm', 'auto'"):
        make_sampler("torch", "gigpo-tiny")
    if not installed:
        with pytest.raises(ImportError, match=r"pip install 'gigpo-rllib\[vllm\]'"):
            make_sampler("vllm", "gigpo-tiny")


def test_config_names_the_missing_vllm_package(monkeypatch):
    import gigpo_rllib.sampling.vllm as vllm_backend
    from gigpo_rllib import GiGPOConfig

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    config = GiGPOConfig().training(sampler_backend="vllm", train_env_manager={"num_env_groups": 2, "group_size": 2},
                                    rollout_batch_size=4)
    with pytest.raises(ValueError, match="needs the vllm package"):
        config.validate()


def test_generate_unconstrained_is_reproducible(sampler):
    tok = sampler.tokenizer
    prompts = _prompts(tok, 4)
    params = SamplingParams(max_new_tokens=6)
    a = sampler.generate(prompts, params, seed=3)
    b = sampler.generate(prompts, params, seed=3)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # Without a seed, successive calls draw fresh samples.
    c1 = sampler.generate(prompts, params)
    c2 = sampler.generate(prompts, params)
    assert [c.token_ids for c in c1] != [c.token_ids for c in c2]
    for c in a:
        assert isinstance(c, Completion) and len(c.token_ids) == len(c.logprobs) <= 6
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
        assert tok.pad_token_id not in c.token_ids or c.finish_reason == "length"
        assert all(lp <= 0 for lp in c.logprobs)
    with pytest.raises(ValueError, match="prompt_ids"):
        sampler.generate([[]], params)
    with pytest.raises(ValueError, match="allowed_responses"):
        sampler.generate(prompts, params, allowed_responses=[[[1, 5]]] * 4)  # no EOS at the end


def test_logprobs_match_incremental_decoding(sampler):
    """The one-pass recomputation equals HF's own step-by-step (KV-cache) scores of the sampled tokens."""
    tok = sampler.tokenizer
    prompts = _prompts(tok, 3)
    params = SamplingParams(temperature=0.8, max_new_tokens=5)
    comps = sampler.generate(prompts, params, seed=0)
    for prompt, comp in zip(prompts, comps):
        ids = torch.tensor([prompt + comp.token_ids])
        with torch.no_grad():
            logits = sampler.model(ids).logits[0, len(prompt) - 1 : -1] / 0.8
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(comp.logprobs), ref, atol=1e-5, rtol=1e-5)


def test_constrained_generation_stays_in_the_allowed_set(sampler):
    tok = sampler.tokenizer
    prompts = _prompts(tok, 8)
    allowed = _allowed(tok, 8)
    allowed[1] = []  # an unconstrained row mixed in
    comps = sampler.generate(prompts, SamplingParams(max_new_tokens=16), allowed_responses=allowed, seed=0)
    for i, c in enumerate(comps):
        if i == 1:
            continue
        assert c.token_ids in allowed[i] and c.finish_reason == "stop"
        # Only the step that picks the action is random; the rest of each reply is forced (log-prob 0).
        assert sum(1 for lp in c.logprobs if lp < -1e-6) == 1
    seen = {tok.decode(c.token_ids) for i, c in enumerate(comps) if i != 1}
    assert len(seen) > 1


def test_load_weights_changes_outputs_and_matches_new_weights(sampler):
    from gigpo_rllib.models import load_model_and_tokenizer

    tok = sampler.tokenizer
    prompts = _prompts(tok, 4)
    allowed = _allowed(tok, 4)
    params = SamplingParams(max_new_tokens=12)
    original = {k: v.clone() for k, v in sampler.model.state_dict().items()}
    before = sampler.generate(prompts, params, allowed_responses=allowed, seed=5)
    # A "trained" copy: perturb every weight, send numpy arrays like RLlib does (tied lm_head omitted).
    other, _ = load_model_and_tokenizer("gigpo-tiny")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in other.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    new_state = {k: v.numpy() for k, v in other.state_dict().items() if k != "lm_head.weight"}
    try:
        sampler.load_weights(new_state)
        assert sampler.model.lm_head.weight.data_ptr() == sampler.model.model.embed_tokens.weight.data_ptr()
        after = sampler.generate(prompts, params, allowed_responses=allowed, seed=5)
        assert [c.logprobs for c in after] != [c.logprobs for c in before]
        # The recorded log-probs are those of the new weights.
        for prompt, comp in zip(prompts, after):
            ids = torch.tensor([prompt + comp.token_ids])
            with torch.no_grad():
                lg = other(ids).logits[0, len(prompt) - 1 : -1]
            step = [i for i, lp in enumerate(comp.logprobs) if lp < -1e-6]
            t = step[0]
            cands = sorted({r[t] for r in allowed[0] if r[:t] == comp.token_ids[:t]})
            ref = lg[t, comp.token_ids[t]] - torch.logsumexp(lg[t, cands], 0)
            assert comp.logprobs[t] == pytest.approx(ref.item(), abs=1e-5)
        with pytest.raises(ValueError, match="prefix"):
            sampler.load_weights({"model." + k: v for k, v in new_state.items()})
        with pytest.raises(ValueError, match="missing"):
            sampler.load_weights({"model.norm.weight": new_state["model.norm.weight"]})
    finally:
        sampler.load_weights(original)
    again = sampler.generate(prompts, params, allowed_responses=allowed, seed=5)
    assert [c.token_ids for c in again] == [c.token_ids for c in before]
    for a, b in zip(again, before):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


def test_constraint_keeps_token_zero_when_an_empty_slot_follows_it():
    from gigpo_rllib.sampling.hf import _AllowedRepliesProcessor

    # Both replies continue with token 0 at the first step; the deduplicated second slot is empty (-1).
    allowed = torch.tensor([[[0, 2], [0, 3]]])
    processor = _AllowedRepliesProcessor(allowed, prompt_len=1)
    scores = processor(torch.tensor([[7]]), torch.zeros(1, 5))
    assert torch.isfinite(scores[0, 0]) and torch.isinf(scores[0, 1:]).all()
    second = processor(torch.tensor([[7, 0]]), torch.zeros(1, 5))
    assert torch.isfinite(second[0, [2, 3]]).all() and torch.isinf(second[0, [0, 1, 4]]).all()


# ------------------------------------------------------- forward_token_logprobs: output layer at responses only


@pytest.fixture(scope="module")
def tiny_model():
    from gigpo_rllib.models import load_model_and_tokenizer

    return load_model_and_tokenizer("gigpo-tiny")


def _scored_batch(tokenizer, seed=0):
    """Right-padded rows [prompt, reply, pad] of different lengths, half of them constrained."""
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    replies = [tokenizer(f"<answer>{w}</answer>", add_special_tokens=False)["input_ids"] + [eos]
               for w in ("Left", "Down", "Right", "Up")]
    rows, masks, allowed = [], [], []
    for i in range(6):
        prompt = torch.randint(3, 1000, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
        reply = replies[i % 4]
        rows.append(prompt + reply)
        masks.append([False] * len(prompt) + [True] * len(reply))
        allowed.append(replies if i % 2 else [])
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response = torch.tensor([m + [False] * (width - len(m)) for m in masks])
    return ids, attention, response, pad_allowed_responses(allowed)


def test_response_only_scoring_equals_the_full_forward_with_gradients(tiny_model, monkeypatch):
    import gigpo_rllib.logprobs as logprobs_module
    from gigpo_rllib.logprobs import forward_token_logprobs, scores_response_positions_only

    model, tokenizer = tiny_model
    assert scores_response_positions_only(model)
    ids, attention, response, allowed = _scored_batch(tokenizer)

    def scored(response_only):
        model.zero_grad()
        logprobs, entropy = forward_token_logprobs(model, ids, attention, response, temperature=0.7,
                                                   allowed_responses=allowed, response_only=response_only)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        return logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]

    full = scored(False)
    sliced = scored(True)
    # Several chunks, each recomputed in the backward pass: still the same numbers.
    monkeypatch.setattr(logprobs_module, "LOGIT_CHUNK_ELEMENTS", 5 * model.get_output_embeddings().weight.shape[0])
    chunked = scored(True)
    for other in (sliced, chunked):
        torch.testing.assert_close(other[0], full[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(other[1], full[1], rtol=0, atol=1e-5)
        for mine, reference in zip(other[2], full[2]):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    assert (full[0][response] < 0).any() and (full[0][~response] == 0).all()


def test_models_that_transform_logits_use_the_full_forward(tiny_model):
    from gigpo_rllib.logprobs import scores_response_positions_only

    model, _ = tiny_model
    model.config.final_logit_softcapping = 30.0
    try:
        assert not scores_response_positions_only(model)
    finally:
        model.config.final_logit_softcapping = None


def test_the_model_sees_only_the_columns_some_row_uses(tiny_model):
    from gigpo_rllib.logprobs import forward_token_logprobs

    model, tokenizer = tiny_model
    ids, attention, response, allowed = _scored_batch(tokenizer)
    longest = int(attention.sum(-1).max())
    # A minibatch cut from a wider batch: extra padding columns on the right, as the learner's batches have.
    padded = [torch.nn.functional.pad(t, (0, 40)) for t in (ids, attention, response)]
    widths = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        trimmed = forward_token_logprobs(model, *padded, allowed_responses=allowed)
        full = forward_token_logprobs(model, ids, attention, response, allowed_responses=allowed)
    finally:
        handle.remove()
    assert widths == [longest, longest]
    assert trimmed[0].shape == padded[0].shape
    torch.testing.assert_close(trimmed[0][:, :ids.shape[1]], full[0], rtol=0, atol=0)


def test_a_checkpoints_generation_config_does_not_change_sampling(tmp_path):
    import json

    from gigpo_rllib.models import build_offline_model
    from gigpo_rllib.sampling.hf import HFSampler

    path = build_offline_model(tmp_path / "model")
    settings = json.loads((path / "generation_config.json").read_text())
    # Processors the recorded log-probs know nothing about: no token may repeat, a heavy repetition penalty.
    settings.update(no_repeat_ngram_size=1, repetition_penalty=5.0)
    (path / "generation_config.json").write_text(json.dumps(settings))
    sampler = HFSampler(str(path))
    prompt = sampler.tokenizer("a a a a", add_special_tokens=False)["input_ids"]
    completions = sampler.generate([prompt] * 32, SamplingParams(max_new_tokens=24), seed=0)
    # The untrained model repeats tokens all the time when nothing forbids it.
    assert any(len(set(c.token_ids)) < len(c.token_ids) for c in completions)
