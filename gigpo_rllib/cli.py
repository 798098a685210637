"""The ``rllib`` command: train GiGPO (or GRPO) from a YAML file or from flags, evaluate a checkpoint, plot runs.

Ray >= 2.44 no longer ships an ``rllib`` command; ``pyproject.toml`` installs this one
(``rllib = gigpo_rllib.cli:main``). Without installing, ``python3 -m gigpo_rllib.cli ...`` does the same. It
speaks RLlib's dialect (``--algo``, ``--env``, ``--config``, ``--stop``, ``--storage-path``,
``--checkpoint-freq``, ``--checkpoint-at-end``, RLlib's tuned-example YAML layout) and keeps its own flags
(``--stop-iters``, ``--checkpoint-dir``, ``--checkpoint-every``) as aliases.

Usage::

    rllib train file configs/frozenlake_gigpo.yaml [--stop JSON | --stop-iters N] [--storage-path DIR |
                     --checkpoint-dir RUN_DIR] [--checkpoint-freq K] [--no-checkpoint-at-end]
                     [--resume [--allow-config-change]] [--wandb PROJECT] [--mlflow URI] [--verbose]
    rllib train file RUN_DIR/params.json ...      # the resolved config a run recorded: the same run again
    rllib train --algo GiGPO|GRPO --env ENV --config JSON [same flags]
    rllib evaluate CHECKPOINT_OR_RUN_DIR [--episodes N] [--greedy | --sample] [--pass-k K] [--num-env-runners N]
    rllib export CHECKPOINT_OR_RUN_DIR --out DIR [--force]
    rllib plot RUN_DIR [RUN_DIR ...] [--out progress.png]
    rllib check-env ENV_ID_OR_TAG [--env-config JSON] [--episodes N] [--group-size G] [--policy random|first]
                    [--actions JSON] [--model MODEL] [--config JSON]

Exit status: 0 done; 1 training failed (the run directory, ``error.txt`` with the traceback and the last
checkpoint are named); 2 bad arguments, config, experiment file or checkpoint (one line ``rllib: error: ...``);
130 interrupted (Ctrl-C).

The reusable pieces are :func:`load_experiment`, :func:`config_from_dict`, :func:`train`, :func:`evaluate` and
:func:`gigpo_rllib.export.export_checkpoint`;
the layouts of experiment files are described in :mod:`gigpo_rllib.experiment`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import pickle
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from gigpo_rllib.checkpoints import PROGRESS_FILE, resolve_checkpoint
from gigpo_rllib.checkpoints import config_from_checkpoint as _read_checkpoint_config
from gigpo_rllib.experiment import (DEFAULT_STOP_ITERS, Experiment, ExperimentError, build_config,
                                    build_stop, check_envs, experiment_from_mapping, normalize_algo,
                                    read_experiment_file)
from gigpo_rllib.logging_utils import filtered_native_stderr, quiet_output, start_ray
from gigpo_rllib.progress import format_progress, iteration_metrics, plot_runs, read_csv
from gigpo_rllib.stopping import TRAINING_ITERATION, StopCriteria
from gigpo_rllib.trackers import TrackerHooks, mlflow_callback, require_extra, wandb_callback
from gigpo_rllib.training import TrainingFailed, prepare_run, train

if TYPE_CHECKING:
    from gigpo_rllib.config import GiGPOConfig

__all__ = ["DEFAULT_STOP_ITERS", "ExperimentError", "TrainingFailed", "build_parser", "config_from_checkpoint",
           "config_from_dict", "evaluate", "load_experiment", "main", "plot", "progress_line", "train"]


# --------------------------------------------------------------------------------------------- loading


def config_from_dict(settings: dict[str, Any], *, source: str = "config") -> tuple["GiGPOConfig", int]:
    """A validated :class:`GiGPOConfig` and the number of iterations to train, from a flat experiment dict.

    ``settings`` holds config keys exactly as :meth:`GiGPOConfig.to_dict` names them, plus an optional ``stop``
    mapping; the iterations are its ``training_iteration`` (default :data:`DEFAULT_STOP_ITERS`). Unknown keys,
    wrong types and invalid values raise :class:`ExperimentError` naming the key and ``source``.
    """
    if not isinstance(settings, dict):
        raise ExperimentError(f"{source}: expected a mapping of config keys, got {type(settings).__name__}")
    settings = dict(settings)
    stop = settings.pop("stop", None)
    if stop is None:
        stop = {}
    criteria = build_stop(stop, source=source)
    return build_config(settings, source=source), criteria.max_iterations or DEFAULT_STOP_ITERS


def load_experiment(path: str | pathlib.Path) -> tuple["GiGPOConfig", int]:
    """Read a YAML experiment file (flat or RLlib's tuned-example layout) into ``(GiGPOConfig, iterations)``;
    the iterations are its ``stop.training_iteration`` (default :data:`DEFAULT_STOP_ITERS`)."""
    experiment = read_experiment_file(path)
    config = build_config(experiment.settings, algo=experiment.algo, source=experiment.source)
    return config, build_stop(experiment.stop, source=experiment.source).max_iterations or DEFAULT_STOP_ITERS


def progress_line(result: dict) -> str:
    """One line per iteration: return, success, invalid-action rate and this iteration's time split."""
    return format_progress(iteration_metrics(result))


def default_checkpoint_dir(name: str) -> pathlib.Path:
    return pathlib.Path.home() / "gigpo_results" / f"{_path_safe(name)}_{time.strftime('%Y%m%d-%H%M%S')}"


def _path_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "experiment"


def plot(run_dirs: Sequence[str | pathlib.Path], out: str | pathlib.Path) -> str:
    """Plot the ``progress.csv`` of each run directory into one PNG; returns its path."""
    runs = {}
    for run_dir in run_dirs:
        csv_path = pathlib.Path(run_dir) / PROGRESS_FILE
        if not csv_path.is_file():
            raise ExperimentError(f"no {PROGRESS_FILE} in {str(run_dir)!r} (expected a directory written by "
                                  "`rllib train`)")
        runs[pathlib.Path(run_dir).name] = read_csv(csv_path)
    try:
        return plot_runs(runs, out, title="GiGPO training progress")
    except ImportError as error:
        raise ExperimentError(str(error)) from error


# ----------------------------------------------------------------------------------------- evaluation


def config_from_checkpoint(checkpoint: str | pathlib.Path):
    """The (unfrozen) :class:`GiGPOConfig` an algorithm checkpoint was built with."""
    try:
        return _read_checkpoint_config(checkpoint)
    except ValueError as error:
        raise ExperimentError(str(error)) from error


def evaluate(checkpoint: str | pathlib.Path, *, episodes: int | None = None,
             num_env_runners: int | None = None, quiet: bool = True, transcripts: int = 0,
             greedy: bool | None = None, pass_k: int | None = None) -> dict[str, Any]:
    """Restore ``checkpoint`` (or the newest complete checkpoint of a run directory) and run
    :meth:`GiGPO.validate` on ``episodes`` fresh tasks (default: the checkpoint's ``val_batch_size``), decoded
    greedily or sampled as ``greedy`` says (default: the checkpoint's ``eval_greedy``), with ``pass_k`` sampled
    episodes per task for pass@k (default: the checkpoint's ``eval_pass_k``). Returns the validation metrics (with
    ``transcripts=N``, also the first N episodes' transcripts under ``"transcripts"``). A missing, partial or
    damaged checkpoint raises :class:`ExperimentError`."""
    from gigpo_rllib.algorithm import GiGPO

    checkpoint = resolve_checkpoint(checkpoint)
    config = config_from_checkpoint(checkpoint)
    if episodes is not None:
        if episodes < 1:
            raise ExperimentError(f"--episodes must be >= 1, got {episodes}")
        config.val_batch_size = episodes
    if pass_k is not None:
        if isinstance(pass_k, bool) or not isinstance(pass_k, int) or pass_k < 1:
            raise ExperimentError(f"--pass-k must be an integer >= 1, got {pass_k!r}")
        config.eval_pass_k = pass_k
    if greedy is not None:
        config.eval_greedy = bool(greedy)
    if num_env_runners is not None:
        config.num_env_runners = num_env_runners
    # The checkpoint's constructor argument is the config; passing ours replaces it, then the state is restored.
    try:
        with filtered_native_stderr(active=quiet):
            algo = GiGPO.from_checkpoint(str(checkpoint.resolve()), config=config)
    except (EOFError, pickle.UnpicklingError, FileNotFoundError) as error:
        raise ExperimentError(f"cannot load checkpoint {str(checkpoint)!r}: {type(error).__name__}: {error}; a "
                              "file of it is missing or cut short (an interrupted save?)") from error
    try:
        return algo.validate(transcripts=transcripts)
    finally:
        algo.stop()


def format_transcript(number: int, turns: list[dict[str, Any]]) -> str:
    """An episode's turns as text: what the policy saw, what it replied, the parsed action and the reward."""
    lines = [f"--- episode {number} ({len(turns)} turns, return {sum(turn['reward'] for turn in turns):+.3f})"]
    for index, turn in enumerate(turns, 1):
        action = turn["action"] if turn["valid"] else "invalid"
        lines.append(f"turn {index}:")
        lines.extend(f"  | {line}" for line in str(turn["observation"]).splitlines() or [""])
        lines.append(f"  reply: {turn['reply']!r}")
        lines.append(f"  action: {action} | reward {turn['reward']:+.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other error of the command (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"rllib: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _algo(text: str) -> str:
    try:
        return normalize_algo(text)
    except ExperimentError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--algo: ")) from None


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: flags given before `file` (rllib train --stop-iters 2 file x.yaml) are not reset by the sub-parser.
    add = parser.add_argument
    add("--algo", type=_algo, default=argparse.SUPPRESS, metavar="{GiGPO,GRPO}",
        help="the algorithm: GiGPO, or GRPO (GiGPO with adv_estimator: grpo); default: the file's `run`, else GiGPO")
    add("--env", default=argparse.SUPPRESS,
        help="env tag (FrozenLake, Sokoban, a TextArena game) or registered Gymnasium id ('module:EnvId' for your "
             "own); with `file`, overrides the file's env")
    add("--config", default=argparse.SUPPRESS, metavar="JSON",
        help="JSON object of config keys; with `file`, merged over the file's config (nested keys one level deep)")
    add("--stop", default=argparse.SUPPRESS, metavar="JSON",
        help="JSON object of stop criteria {result key: value}, nested keys as \"a/b\" paths, e.g. "
             "'{\"training_iteration\": 20, \"env_runners/success_rate\": 0.9}'; training stops when any value is "
             "reached (>=). Every key must appear in the first result (validation/... keys in the first "
             "validation), else exit 2. Replaces the file's stop section; default: the file's, else "
             f"{DEFAULT_STOP_ITERS} iterations")
    add("--stop-iters", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
        help="shorthand for --stop '{\"training_iteration\": N}' (overrides that one criterion)")
    add("--storage-path", default=argparse.SUPPRESS, metavar="DIR",
        help="the run goes to DIR/NAME (NAME: the experiment's name, file stem, or ALGO_ENV); rerun with --resume "
             "to continue it")
    add("--checkpoint-dir", default=argparse.SUPPRESS, metavar="RUN_DIR",
        help="the run directory itself (progress.csv, TensorBoard events, RUN_DIR/checkpoint_<iteration>); "
             "default ~/gigpo_results/NAME_<timestamp>")
    add("--checkpoint-freq", "--checkpoint-every", dest="checkpoint_freq", type=_non_negative_int,
        default=argparse.SUPPRESS, metavar="K", help="also checkpoint every K iterations (default 0: only at the end)")
    add("--checkpoint-at-end", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
        help="checkpoint when training ends, also after a failure that left the state sound (default: on)")
    add("--resume", action="store_true", default=argparse.SUPPRESS,
        help="continue the run in the run directory from its last complete checkpoint (iteration, weights, "
             "optimizer, seeds); progress rows after it are dropped. Without it, a directory holding a run is an "
             "error. A config that differs from the run's params.json (stop aside) is refused, naming each key")
    add("--allow-config-change", action="store_true", default=argparse.SUPPRESS,
        help="with --resume: continue even though the config differs from params.json (the changed keys are "
             "recorded in run_info.json)")
    add("--wandb", default=argparse.SUPPRESS, metavar="PROJECT",
        help="also log to Weights & Biases project PROJECT (Tune's WandbLoggerCallback): every metric under its "
             "result path, the config (params.json), the learning curve at the end; W&B's files go to "
             "RUN_DIR/wandb, WANDB_MODE=offline keeps them there. Needs the wandb extra")
    add("--mlflow", default=argparse.SUPPRESS, metavar="URI",
        help="also log to the MLflow tracking store URI (a server, or file:///path) under the experiment's name "
             "(Tune's MLflowLoggerCallback): metrics, params, the learning curve as an artifact. Needs the mlflow "
             "extra")
    add("--num-env-runners", type=_non_negative_int, default=argparse.SUPPRESS, metavar="N",
        help="override num_env_runners (remote sampling actors; 0 samples in the driver)")
    add("--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show Ray's and RLlib's start-up notes too (hidden by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rllib", description="Train and evaluate GiGPO (gigpo-rllib) on text environments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  rllib train file configs/frozenlake_gigpo.yaml --stop-iters 5\n"
               "  rllib train --algo GRPO --env TextFrozenLake-v0 --config "
               "'{\"train_env_manager\": {\"num_env_groups\": 4, \"group_size\": 4}, \"rollout_batch_size\": 16}' "
               "--stop '{\"training_iteration\": 20, \"env_runners/success_rate\": 0.9}' --storage-path ~/runs\n"
               "  rllib train --algo GRPO --env TextFrozenLake-v0 --config ... --storage-path ~/runs --resume\n"
               "  rllib evaluate ~/gigpo_results/frozenlake_gigpo_<time>/checkpoint_000020 --episodes 64 --pass-k 8\n"
               "  rllib export ~/gigpo_results/frozenlake_gigpo_<time> --out ~/models/frozenlake-policy\n"
               "exit status: 0 done, 1 training failed, 2 bad arguments/config/checkpoint, 130 interrupted")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train_parser = commands.add_parser(
        "train", help="train GiGPO or GRPO (from a YAML file: `rllib train file X.yaml`, or from flags)",
        description="Train GiGPO or GRPO. Either `rllib train file X.yaml [flags]` or "
                    "`rllib train --algo GiGPO --env ENV --config JSON [flags]`. Prints one progress line per "
                    "iteration and a summary; writes progress.csv, TensorBoard event files and checkpoints into "
                    "the run directory.")
    _add_run_flags(train_parser)
    train_modes = train_parser.add_subparsers(dest="train_mode", metavar="file")
    file_parser = train_modes.add_parser(
        "file", help="train from a YAML experiment file (or a run directory's params.json)",
        description="Train from a YAML experiment file, in either layout: flat GiGPOConfig keys (nested dicts "
                    "for reward_normalization / train_env_manager, RLlib keys env, env_config, num_env_runners, "
                    "num_learners, lr, minibatch_size, seed) with an optional stop: {...}; or RLlib's "
                    "tuned-example layout NAME: {run: GiGPO|GRPO, env: ..., stop: {...}, config: {...}}. A .json "
                    "file is read as JSON: a run directory's params.json trains that run's config again. Flags "
                    "override the file.")
    file_parser.add_argument("path", metavar="PATH.yaml", help="the experiment file (YAML, or JSON such as params.json)")
    _add_run_flags(file_parser)

    evaluate_parser = commands.add_parser(
        "evaluate", help="restore a checkpoint and run validation episodes",
        description="Restore a GiGPO checkpoint (or the newest complete checkpoint of a run directory) and run "
                    "validate(): one episode on each of N fresh validation tasks (env seeds), greedy by default, "
                    "and with --pass-k K also K sampled episodes per task; prints the validation metrics as JSON. "
                    "A missing, partial or damaged checkpoint is reported (exit 2).")
    evaluate_parser.add_argument("checkpoint", metavar="CHECKPOINT",
                                 help="a checkpoint directory, or a run directory written by train")
    evaluate_parser.add_argument("--episodes", type=_positive_int, default=None, metavar="N",
                                 help="validation episodes (default: the checkpoint's val_batch_size)")
    decoding = evaluate_parser.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", dest="greedy", action="store_const", const=True, default=None,
                          help="decode greedily (temperature 0), as reported evaluations do: success_rate_greedy "
                               "(default: the checkpoint's eval_greedy, which defaults to on)")
    decoding.add_argument("--sample", dest="greedy", action="store_const", const=False,
                          help="sample at the checkpoint's temperature/top_p/top_k instead: success_rate_sampled")
    evaluate_parser.add_argument("--pass-k", type=_positive_int, default=None, metavar="K",
                                 help="also sample K episodes per task and report pass@1 and pass@K (a task counts "
                                      "for pass@K when any of its K episodes succeeds); default: the checkpoint's "
                                      "eval_pass_k (1: none)")
    evaluate_parser.add_argument("--num-env-runners", type=_non_negative_int, default=None, metavar="N",
                                 help="override num_env_runners for the evaluation")
    evaluate_parser.add_argument("--show", type=_non_negative_int, default=0, metavar="N",
                                 help="also print N episode transcripts (observation, reply, parsed action, reward "
                                      "per turn)")
    evaluate_parser.add_argument("--verbose", action="store_true", help="show Ray's and RLlib's start-up notes")
    export_parser = commands.add_parser(
        "export", help="write a checkpoint's policy as a Hugging Face model folder",
        description="Write the trained policy of a checkpoint (or of the newest complete checkpoint of a run "
                    "directory) as a Hugging Face model folder: config, safetensors weights, generation config, "
                    "tokenizer and chat template (LoRA adapters merged). transformers' from_pretrained and vLLM "
                    "load it as it is. Needs no Ray. A missing, partial or damaged checkpoint is reported (exit 2).")
    export_parser.add_argument("checkpoint", metavar="CHECKPOINT",
                               help="a checkpoint directory, or a run directory written by train")
    export_parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    export_parser.add_argument("--force", action="store_true",
                               help="replace DIR when it exists and is not empty (refused otherwise)")
    export_parser.add_argument("--verbose", action="store_true", help="show RLlib's notes while the policy loads")
    plot_parser = commands.add_parser(
        "plot", help="plot the progress.csv of one or more training runs into a PNG",
        description="Plot return, success rate, invalid-action rate and entropy per iteration of one or more "
                    "runs (directories written by `rllib train`) into one PNG. Needs matplotlib.")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding progress.csv")
    plot_parser.add_argument("--out", default="gigpo_progress.png", help="PNG path (default gigpo_progress.png)")
    _add_check_env_parser(commands)
    return parser


CHECK_ENV_CONFIG_KEYS = ("anchor_canonicalizer", "anchor_similarity_threshold", "answer_format", "history_length",
                         "invalid_action_penalty", "model_name_or_path", "system_prompt")
"""The config keys `rllib check-env --config` takes: those that change the env, its anchors or its prompts."""


def _json_strings(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f'expected a JSON list of strings like \'["[0]", "[4]"]\', got {text!r}')
    return value


def _add_check_env_parser(commands) -> None:
    from gigpo_rllib.check_env import DEFAULT_GROUP_SIZE, DEFAULT_GROUPS, POLICIES, RECURRENCE_THRESHOLD

    parser = commands.add_parser(
        "check-env", help="will GiGPO help this env? play it with a random policy and report (no model, no Ray)",
        description="Play an env with a random (or scripted) policy over its allowed actions, through the same "
                    "wrappers, episode groups and anchor ids as training, without a model, and print its spaces, "
                    "whether it can train, episode lengths and returns, the policy's success rate, prompt tokens, "
                    "and how often states recur within an episode group (GiGPO's step baseline needs them to): "
                    f"states recur when at least {RECURRENCE_THRESHOLD:.0%} of the steps after the first turn "
                    "share an anchor. An env that cannot be checked is reported in one line (exit 2).")
    parser.add_argument("env", metavar="ENV_ID_OR_TAG",
                        help="env tag (FrozenLake, Sokoban, a TextArena game), registered Gymnasium id, or "
                             "'module:EnvId'")
    parser.add_argument("--env-config", metavar="JSON", help="JSON object of the env's keyword arguments")
    parser.add_argument("--episodes", type=_positive_int, default=None, metavar="N",
                        help=f"episodes in all, a multiple of --group-size (default {DEFAULT_GROUPS} groups)")
    parser.add_argument("--group-size", type=_positive_int, default=DEFAULT_GROUP_SIZE, metavar="G",
                        help=f"episodes per group, all reset with one seed (default {DEFAULT_GROUP_SIZE}, the "
                             "config's train_env_manager.group_size)")
    parser.add_argument("--policy", choices=POLICIES, default="random",
                        help="random: a uniformly random allowed action per turn; first: always the first one")
    parser.add_argument("--actions", type=_json_strings, metavar="JSON",
                        help="JSON list of the moves the policy picks from in a free-text env (no action_words), "
                             "e.g. '[\"[0]\", \"[4]\"]'; without it, it answers random short words")
    parser.add_argument("--model", metavar="MODEL", default=argparse.SUPPRESS,
                        help="whose tokenizer counts the prompt tokens (default: the config's model_name_or_path, "
                             "gigpo-tiny; e.g. smollm2-135m-instruct)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="env seed of the first group (default 0)")
    parser.add_argument("--config", metavar="JSON",
                        help=f"JSON object of config keys, any of {', '.join(CHECK_ENV_CONFIG_KEYS)}, e.g. "
                             "'{\"anchor_canonicalizer\": \"my_module:strip_turn\"}'")


def _check_env_report(args: argparse.Namespace):
    """The :class:`~gigpo_rllib.check_env.EnvCheckReport` of the `rllib check-env` arguments."""
    from gigpo_rllib.check_env import EnvCheckError, check_env

    settings = _json_flag(args, "config")
    unknown = sorted(set(settings) - set(CHECK_ENV_CONFIG_KEYS))
    if unknown:
        raise ExperimentError(f"--config: check-env takes the keys {', '.join(CHECK_ENV_CONFIG_KEYS)}; got {unknown}")
    model = _flag(args, "model", settings.pop("model_name_or_path", None))
    try:
        return check_env(args.env, _json_flag(args, "env_config"), episodes=args.episodes, group_size=args.group_size,
                         policy=args.policy, actions=args.actions, seed=args.seed,
                         **({"model": model} if model else {}), **settings)
    except EnvCheckError as error:
        raise ExperimentError(str(error)) from error
    except TypeError as error:  # a config value of the wrong type reached the env or the policy
        raise ExperimentError(f"--config: {error}") from error


# ---------------------------------------------------------------------------------------------- train


@dataclass
class TrainJob:
    """Everything `rllib train` settled before starting Ray."""

    config: "GiGPOConfig"
    stop: StopCriteria
    run_dir: pathlib.Path
    checkpoint_freq: int
    checkpoint_at_end: bool
    resume: bool
    allow_config_change: bool
    callbacks: list[Any]


def _flag(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _json_flag(args: argparse.Namespace, name: str) -> dict[str, Any]:
    text = _flag(args, name)
    if text is None:
        return {}
    flag = "--" + name.replace("_", "-")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ExperimentError(f"{flag} is not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise ExperimentError(f"{flag} must be a JSON object like {{\"key\": value}}, got {text!r}")
    return value


def _experiment_from_args(args: argparse.Namespace) -> Experiment:
    if args.train_mode == "file":
        experiment = read_experiment_file(args.path)
        return experiment.overridden(algo=_flag(args, "algo"), env=_flag(args, "env"),
                                     settings=_json_flag(args, "config"), stop=_json_flag(args, "stop"))
    env = _flag(args, "env")
    if not env:
        raise ExperimentError("`rllib train` needs either `file PATH.yaml` or --env ENV (see rllib train --help)")
    algo = _flag(args, "algo", "GiGPO")
    settings = _json_flag(args, "config")
    # --config may carry "stop", as a flat experiment file may; --stop wins per key.
    experiment = experiment_from_mapping(settings, source="--config", default_name=f"{algo}_{env}")
    return experiment.overridden(algo=algo, env=env, stop=_json_flag(args, "stop"))


def _train_job(args: argparse.Namespace) -> TrainJob:
    for module in ("wandb", "mlflow"):  # a missing tracker package fails at once, before the config is built
        if _flag(args, module):
            require_extra(module)
    experiment = _experiment_from_args(args)
    stop = dict(experiment.stop)
    if _flag(args, "stop_iters") is not None:
        stop[TRAINING_ITERATION] = args.stop_iters
    settings = dict(experiment.settings)
    if _flag(args, "num_env_runners") is not None:
        settings["num_env_runners"] = args.num_env_runners
    source = experiment.source if args.train_mode == "file" else "--config"
    config = build_config(settings, algo=experiment.algo, source=source)
    criteria = build_stop(stop, source="--stop" if _flag(args, "stop") else source)
    check_envs(config, source=source)
    at_end = _flag(args, "checkpoint_at_end")
    run_dir = _run_dir(args, experiment)
    return TrainJob(
        config=config, stop=criteria, run_dir=run_dir,
        checkpoint_freq=_first_given(_flag(args, "checkpoint_freq"), experiment.checkpoint_freq, 0),
        checkpoint_at_end=_first_given(at_end, experiment.checkpoint_at_end, True),
        resume=bool(_flag(args, "resume", False)), allow_config_change=bool(_flag(args, "allow_config_change", False)),
        callbacks=_tracker_callbacks(args, run_dir, experiment.name))


def _tracker_callbacks(args: argparse.Namespace, run_dir: pathlib.Path, name: str) -> list[Any]:
    """Tune's logger callbacks for --wandb / --mlflow (a missing package is a one-line error naming the extra)."""
    callbacks = []
    if _flag(args, "wandb"):
        callbacks.append(wandb_callback(args.wandb, run_dir=run_dir, quiet=not _flag(args, "verbose", False)))
    if _flag(args, "mlflow"):
        callbacks.append(mlflow_callback(args.mlflow, experiment_name=name))
    return callbacks


def _first_given(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def _run_dir(args: argparse.Namespace, experiment: Experiment) -> pathlib.Path:
    checkpoint_dir, storage_path = _flag(args, "checkpoint_dir"), _flag(args, "storage_path")
    if checkpoint_dir and storage_path:
        raise ExperimentError("give either --checkpoint-dir RUN_DIR (the run directory itself) or --storage-path DIR "
                              "(the run goes to DIR/NAME), not both")
    if checkpoint_dir:
        return pathlib.Path(checkpoint_dir).expanduser()
    storage_path = storage_path or experiment.storage_path
    if storage_path:
        return pathlib.Path(storage_path).expanduser() / _path_safe(experiment.name)
    if _flag(args, "resume"):
        raise ExperimentError("--resume needs the run to continue: --checkpoint-dir RUN_DIR (the run directory "
                              "printed when it started) or the --storage-path it was started with")
    return default_checkpoint_dir(experiment.name)


@contextlib.contextmanager
def _ray_session(*, quiet: bool):
    """Start Ray for the command (quiet unless --verbose) and shut it down after; reuse a running one."""
    import ray

    if ray.is_initialized():
        yield
        return
    start_ray(quiet=quiet)
    try:
        yield
    finally:
        ray.shutdown()


def _train_command(args: argparse.Namespace) -> None:
    quiet = not _flag(args, "verbose", False)
    with quiet_output(quiet):  # from the start: RLlib logs its new-API-stack note when the config is validated
        job = _train_job(args)
        # A run already there without --resume, a resume with another config, a tracker that cannot start: fail
        # before Ray starts.
        start = prepare_run(job.config, job.stop, checkpoint_dir=job.run_dir, resume=job.resume,
                            allow_config_change=job.allow_config_change)
        TrackerHooks(job.callbacks, run_dir=job.run_dir, params=start.params).setup(job.stop.thresholds)
        with _ray_session(quiet=quiet):
            train(job.config, job.stop, checkpoint_dir=job.run_dir, checkpoint_every=job.checkpoint_freq,
                  checkpoint_at_end=job.checkpoint_at_end, resume=job.resume,
                  allow_config_change=job.allow_config_change, quiet=quiet, command=args.command_line,
                  callbacks=job.callbacks)


def _evaluate_command(args: argparse.Namespace) -> None:
    quiet = not args.verbose
    with quiet_output(quiet):
        config_from_checkpoint(resolve_checkpoint(args.checkpoint))  # a bad checkpoint fails before Ray starts
        with _ray_session(quiet=quiet):
            metrics = evaluate(args.checkpoint, episodes=args.episodes, num_env_runners=args.num_env_runners,
                               quiet=quiet, transcripts=args.show, greedy=args.greedy, pass_k=args.pass_k)
    transcripts = metrics.pop("transcripts", [])
    for number, turns in enumerate(transcripts, 1):
        print(format_transcript(number, turns))
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _export_command(args: argparse.Namespace) -> None:
    from gigpo_rllib.export import export_checkpoint

    with quiet_output(not args.verbose):
        folder = export_checkpoint(args.checkpoint, args.out, force=args.force)
    print(f"model folder written: {folder}")


def _plot_command(args: argparse.Namespace) -> None:
    print(f"plot written: {plot(args.runs, args.out)}")


def _check_env_command(args: argparse.Namespace) -> None:
    print(_check_env_report(args))


COMMANDS = {"train": _train_command, "evaluate": _evaluate_command, "export": _export_command,
            "plot": _plot_command, "check-env": _check_env_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rllib`` console script. Returns the exit status: 0 done, 1 training failed, 2 bad
    arguments, config or checkpoint, 130 interrupted."""
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv) if argv is None else ["rllib", *argv]  # recorded in run_info.json
    try:
        COMMANDS[args.command](args)
    except ExperimentError as error:
        print(f"rllib: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as failure:
        print(failure.report(), file=sys.stderr)
        return failure.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
