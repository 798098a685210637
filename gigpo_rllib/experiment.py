"""Experiments for the ``rllib`` command: a YAML file (either layout) or flags -> a validated config, stop
criteria and run options, with every mistake reported as an :class:`ExperimentError` that names the key.

Two YAML layouts are read:

* flat: :class:`~gigpo_rllib.config.GiGPOConfig` keys at the top level, plus an optional ``stop:`` section;
* RLlib's tuned-example layout, one experiment per file::

      frozenlake-gigpo:
        run: GiGPO              # or GRPO: the same algorithm with adv_estimator: grpo
        env: TextFrozenLake-v0
        stop: {training_iteration: 20, env_runners/success_rate: 0.9}
        config: {lr: 0.001, ...}
        # optional: checkpoint_freq: 5, checkpoint_at_end: true, storage_path: ~/gigpo_results
"""

from __future__ import annotations

import copy
import importlib
import json
import pathlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from gigpo_rllib.stopping import TRAINING_ITERATION, StopCriteria, parse_stop

if TYPE_CHECKING:
    from gigpo_rllib.config import GiGPOConfig

DEFAULT_STOP_ITERS = 10
ALGORITHMS = ("GiGPO", "GRPO")
"""``run:`` / ``--algo`` values: GRPO is GiGPO with ``adv_estimator: grpo`` (the step-level advantage off)."""
TUNED_EXAMPLE_KEYS = ("run", "env", "stop", "config", "checkpoint_freq", "checkpoint_at_end", "storage_path")


class ExperimentError(ValueError):
    """A bad experiment file, flag or config value; the CLI prints its message and exits with status 2."""


@dataclass
class Experiment:
    """One experiment as read, before validation: ``settings`` are config keys (``env`` included), ``stop`` the
    raw stop mapping; the run options are ``None`` when the source does not set them."""

    name: str
    algo: str = "GiGPO"
    settings: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)
    checkpoint_freq: int | None = None
    checkpoint_at_end: bool | None = None
    storage_path: str | None = None
    source: str = "config"

    def overridden(self, *, algo: str | None = None, env: str | None = None, settings: Mapping | None = None,
                   stop: Mapping | None = None) -> "Experiment":
        """A copy with command-line values on top: ``settings`` merge into the file's (one level deep, as the
        config merges nested keys); a non-empty ``stop`` replaces the file's stop criteria."""
        merged = merge_settings(self.settings, settings or {})
        if env is not None:
            merged["env"] = env
        return replace(self, algo=algo or self.algo, settings=merged, stop=dict(stop or self.stop))


def merge_settings(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# -------------------------------------------------------------------------------------------- reading files


def read_experiment_file(path: str | pathlib.Path) -> Experiment:
    """Parse a YAML experiment file in either layout (see module docstring); nothing is validated yet. A ``.json``
    file (such as a run directory's ``params.json``) is read as JSON: YAML would take ``1e-05`` for a string."""
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {str(path)!r}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ExperimentError(f"{path}: not valid JSON: {error}") from error
        return experiment_from_mapping(data, source=str(path), default_name=path.stem)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path}: not valid YAML: {error}") from error
    return experiment_from_mapping(data if data is not None else {}, source=str(path), default_name=path.stem)


def experiment_from_mapping(data: Any, *, source: str, default_name: str) -> Experiment:
    if not isinstance(data, dict):
        raise ExperimentError(f"{source}: expected a mapping of config keys, or RLlib's layout "
                              f"`NAME: {{run: GiGPO, env: ..., config: {{...}}}}`, got {type(data).__name__}")
    blocks = {name: block for name, block in data.items() if _is_tuned_example_block(block)}
    if not blocks:
        settings = dict(data)
        stop = settings.pop("stop", None)
        return Experiment(name=default_name, settings=settings, stop=_stop_mapping(stop, source), source=source)
    if len(data) > 1:
        raise ExperimentError(f"{source}: holds {len(data)} top-level entries ({', '.join(map(str, data))}); an "
                              "RLlib-layout file must hold exactly one experiment `NAME: {run: GiGPO, ...}`")
    (name, block), = blocks.items()
    return _tuned_example(str(name), block, source=f"{source} [{name}]")


def _is_tuned_example_block(value: Any) -> bool:
    return isinstance(value, dict) and ("run" in value or "config" in value)


def _tuned_example(name: str, block: dict, *, source: str) -> Experiment:
    unknown = sorted(set(block) - set(TUNED_EXAMPLE_KEYS))
    if unknown:
        raise ExperimentError(f"{source}: unknown experiment key(s) {unknown}; an RLlib-layout experiment holds "
                              f"{list(TUNED_EXAMPLE_KEYS)} (config keys go under `config:`)")
    settings = block.get("config") or {}
    if not isinstance(settings, dict):
        raise ExperimentError(f"{source}: `config` must be a mapping of config keys, got {settings!r}")
    settings = dict(settings)
    if "env" in block:
        if "env" in settings and settings["env"] != block["env"]:
            raise ExperimentError(f"{source}: env is given twice with different values ({block['env']!r} and "
                                  f"config.env {settings['env']!r}); keep one")
        settings["env"] = block["env"]
    checkpoint_freq = block.get("checkpoint_freq")
    if checkpoint_freq is not None and (not _is_int(checkpoint_freq) or checkpoint_freq < 0):
        raise ExperimentError(f"{source}: checkpoint_freq must be an integer >= 0, got {checkpoint_freq!r}")
    at_end = block.get("checkpoint_at_end")
    if at_end is not None and not isinstance(at_end, bool):
        raise ExperimentError(f"{source}: checkpoint_at_end must be true or false, got {at_end!r}")
    storage_path = block.get("storage_path")
    if storage_path is not None and not isinstance(storage_path, str):
        raise ExperimentError(f"{source}: storage_path must be a directory path, got {storage_path!r}")
    return Experiment(name=name, algo=normalize_algo(block.get("run", "GiGPO"), source=source), settings=settings,
                      stop=_stop_mapping(block.get("stop"), source), checkpoint_freq=checkpoint_freq,
                      checkpoint_at_end=at_end, storage_path=storage_path, source=source)


def _stop_mapping(stop: Any, source: str) -> dict:
    if stop is None:
        return {}
    try:
        return parse_stop(stop, source=source)
    except ValueError as error:
        raise ExperimentError(str(error)) from error


def normalize_algo(name: Any, *, source: str = "--algo") -> str:
    """``"gigpo"`` -> ``"GiGPO"``; anything but GiGPO / GRPO is an error naming the choices."""
    for algo in ALGORITHMS:
        if isinstance(name, str) and name.lower() == algo.lower():
            return algo
    raise ExperimentError(f"{source}: unknown algorithm {name!r}; this rllib command trains {' or '.join(ALGORITHMS)} "
                          "(GRPO = GiGPO with adv_estimator: grpo)")


# ------------------------------------------------------------------------------------- Python objects in files

PYTHON_OBJECT = "__python__"
"""``{"__python__": "module:qualified.name"}`` in a file stands for the class or function of that import path (the
form :func:`encode_settings` gives config values JSON cannot hold, such as RLlib's ``env_runner_cls``)."""
UNRECORDED_OBJECT = "__unrecorded__"
"""``{"__unrecorded__": "repr"}``: a value that has no import path (a lambda, a local class); it cannot be read back."""


def encode_settings(value: Any) -> Any:
    """``value`` (config keys and their values) in a form JSON holds and :func:`build_config` reads back: classes
    and functions become ``{"__python__": "module:name"}``, tuples and sets lists; anything else JSON cannot
    hold becomes ``{"__unrecorded__": repr}``."""
    if isinstance(value, Mapping):
        return {str(key): encode_settings(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_settings(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((encode_settings(item) for item in value), key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    path = _import_path(value)
    return {PYTHON_OBJECT: path} if path is not None else {UNRECORDED_OBJECT: repr(value)}


def _import_path(value: Any) -> str | None:
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    try:
        return f"{module}:{name}" if _resolve_import_path(module, name) is value else None
    except (ImportError, AttributeError):
        return None


def _resolve_import_path(module: str, name: str) -> Any:
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def decode_settings(value: Any, *, source: str, key: str = "") -> Any:
    """The inverse of :func:`encode_settings`: import the objects named by ``{"__python__": ...}``. An object that
    was not recorded, or an import path that does not resolve, raises :class:`ExperimentError` naming the key."""
    if isinstance(value, list):
        return [decode_settings(item, source=source, key=key) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {UNRECORDED_OBJECT}:
        raise ExperimentError(f"{source}: {key} was a Python object without an import path ({value[UNRECORDED_OBJECT]}), "
                              "so the file could not record it; set it in Python, or give "
                              f'{{"{PYTHON_OBJECT}": "module:name"}}')
    if set(value) == {PYTHON_OBJECT}:
        module, _, name = str(value[PYTHON_OBJECT]).partition(":")
        try:
            return _resolve_import_path(module, name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ExperimentError(f"{source}: {key}: cannot import {value[PYTHON_OBJECT]!r} ({type(error).__name__}: "
                                  f"{error}); expected \"module:name\"") from error
    return {name: decode_settings(item, source=source, key=f"{key}/{name}" if key else name)
            for name, item in value.items()}


# ------------------------------------------------------------------------------------------------ validation


def build_stop(stop: Mapping[str, Any], *, source: str) -> StopCriteria:
    """Stop criteria; with none given, :data:`DEFAULT_STOP_ITERS` iterations."""
    try:
        thresholds = parse_stop(stop, source=source)
    except ValueError as error:
        raise ExperimentError(str(error)) from error
    return StopCriteria(thresholds or {TRAINING_ITERATION: DEFAULT_STOP_ITERS})


def build_config(settings: Mapping[str, Any], *, algo: str = "GiGPO", source: str = "config") -> "GiGPOConfig":
    """A validated :class:`GiGPOConfig` from config keys. Unknown keys, values of the wrong type and invalid
    values raise :class:`ExperimentError` naming the key and ``source``."""
    from gigpo_rllib.config import GiGPOConfig

    if not isinstance(settings, Mapping):
        raise ExperimentError(f"{source}: expected a mapping of config keys, got {type(settings).__name__}")
    settings = decode_settings(dict(settings), source=source)
    if "stop" in settings:
        raise ExperimentError(f"{source}: 'stop' is not a config key; put it next to the config (flat layout: at "
                              "the top level; RLlib layout: beside `config:`), or pass --stop")
    defaults = GiGPOConfig().to_dict()
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ExperimentError(
            f"{source}: unknown config key(s) {unknown}. Use GiGPOConfig attribute names (see the README's "
            "configuration reference, or GiGPOConfig().to_dict() for RLlib's own keys) and a 'stop' section.")
    _check_value_types(settings, source)
    _apply_algo(settings, algo, source)
    config = GiGPOConfig()
    try:
        _fill_config(config, settings)
        config.validate()
    except ValueError as error:
        raise ExperimentError(f"{source}: {error}") from error
    except (TypeError, AttributeError) as error:
        # Raised deep inside RLlib or validate() by a value of the wrong type: name the likely key.
        raise ExperimentError(_wrong_type_message(settings, defaults, error, source)) from error
    return config


def _fill_config(config: "GiGPOConfig", settings: dict[str, Any]) -> None:
    settings = dict(settings)
    env = settings.pop("env", None)
    env_config = settings.pop("env_config", None)
    if env is not None:
        config.environment(env=env)
    if env_config is not None:
        config.environment(env_config=env_config)
    config.update_from_dict(settings)


def _apply_algo(settings: dict[str, Any], algo: str, source: str) -> None:
    algo = normalize_algo(algo, source=source)
    if algo == "GRPO":
        if settings.get("adv_estimator", "grpo") != "grpo":
            raise ExperimentError(f"{source}: algorithm GRPO means adv_estimator: grpo, but the config sets "
                                  f"adv_estimator: {settings['adv_estimator']!r}; drop one of them")
        settings["adv_estimator"] = "grpo"


@dataclass(frozen=True)
class _ValueType:
    description: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_INTEGER = _ValueType("an integer", _is_int)
_NUMBER = _ValueType("a number", _is_number)
_BOOLEAN = _ValueType("true or false", lambda value: isinstance(value, bool))
_STRING = _ValueType("a string", lambda value: isinstance(value, str))
_MAPPING = _ValueType("a mapping", lambda value: isinstance(value, dict))
_LIST = _ValueType("a list", lambda value: isinstance(value, list))

# RLlib's keys that the README documents; RLlib's many other keys are checked by RLlib itself.
_RLLIB_KEY_TYPES = {
    "env": _ValueType("a string (an env tag, a Gymnasium id or 'module:EnvId')", lambda v: isinstance(v, str)),
    "env_config": _ValueType("a mapping of env arguments", lambda value: isinstance(value, dict)),
    "num_env_runners": _INTEGER,
    "num_learners": _INTEGER,
    "minibatch_size": _INTEGER,
    "seed": _INTEGER,
    "lr": _ValueType("a number or a schedule [[step, value], ...]",
                     lambda value: _is_number(value) or isinstance(value, list)),
}


def _type_of_default(default: Any) -> _ValueType | None:
    for kind, value_type in ((bool, _BOOLEAN), (int, _INTEGER), (float, _NUMBER), (str, _STRING),
                             (dict, _MAPPING), (list, _LIST)):
        if isinstance(default, kind):
            return value_type
    return None


def _expected_type(key: str) -> _ValueType | None:
    """What ``key`` accepts: the config's own check where the key has one (one source of truth with
    ``GiGPOConfig.validate``), else the type of its default."""
    from gigpo_rllib.config import GIGPO_KEYS

    if key in _RLLIB_KEY_TYPES:
        return _RLLIB_KEY_TYPES[key]
    config_key = next((config_key for config_key in GIGPO_KEYS if config_key.name == key), None)
    if config_key is None:
        return None
    if config_key.check is not None:
        return _ValueType(config_key.check.describe(), config_key.check.accepts)
    return _type_of_default(config_key.default)


def _check_value_types(settings: Mapping[str, Any], source: str) -> None:
    """GiGPO keys must have their default's type (an int where a float is expected is fine); ``null`` is left
    to validation, which accepts it where the key allows it."""
    for key, value in settings.items():
        expected = _expected_type(key)
        if expected is not None and value is not None and not expected.accepts(value):
            raise ExperimentError(f"{source}: {key} must be {expected.description}, got {value!r} "
                                  f"({type(value).__name__})")


def _wrong_type_message(settings: Mapping[str, Any], defaults: Mapping[str, Any], error: Exception,
                        source: str) -> str:
    suspects = []
    for key, value in settings.items():
        expected = _expected_type(key) or _type_of_default(defaults.get(key))
        if expected is not None and not expected.accepts(value):
            suspects.append(f"{key}={value!r} (expected {expected.description})")
    hint = "; check " + ", ".join(suspects) if suspects else f"; check the types of {sorted(settings)}"
    return f"{source}: a config value has the wrong type ({type(error).__name__}: {error}){hint}"


def check_envs(config: "GiGPOConfig", *, source: str) -> None:
    """:func:`~gigpo_rllib.env_runner.probe_envs` before Ray starts, as an :class:`ExperimentError` naming the env."""
    from gigpo_rllib.env_runner import probe_envs

    try:
        probe_envs(config)
    except ValueError as error:
        raise ExperimentError(f"{source}: {error}") from error
