"""The ``rllib`` command: train GiGPO from a YAML file or from flags, and evaluate a checkpoint.

Ray >= 2.44 no longer ships an ``rllib`` command; ``pyproject.toml`` installs this one
(``rllib = gigpo_rllib.cli:main``). Without installing, ``python3 -m gigpo_rllib.cli ...`` does the same.

Usage::

    rllib train file configs/frozenlake_gigpo.yaml [--stop-iters N] [--checkpoint-dir DIR]
                                                   [--checkpoint-every K] [--num-env-runners N]
    rllib train --algo GiGPO --env TextFrozenLake-v0 --config '{"train_env_manager": {...}, ...}' [same flags]
    rllib evaluate CHECKPOINT [--episodes N] [--num-env-runners N]

An experiment file is a flat YAML mapping of :class:`~gigpo_rllib.config.GiGPOConfig` keys (the GiGPO keys of
the README's configuration reference, with partial dicts for ``reward_normalization`` / ``train_env_manager``)
plus RLlib's own keys (``env``, ``env_config``, ``num_env_runners``, ``num_learners``, ``lr``,
``minibatch_size``, ``seed``, ...) and an optional ``stop: {training_iteration: N}`` section.
The reusable pieces are :func:`load_experiment`, :func:`config_from_dict`, :func:`train` and :func:`evaluate`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
import statistics
import sys
import time
from typing import Any, Sequence

DEFAULT_STOP_ITERS = 10
STOP_KEYS = ("training_iteration",)
# Keys of an experiment dict that are not config attributes.
_EXPERIMENT_ONLY_KEYS = ("stop",)


class ExperimentError(ValueError):
    """A bad experiment file or flag; the CLI prints its message and exits with status 2."""


# --------------------------------------------------------------------------------------------- loading


def _known_config_keys() -> set[str]:
    from gigpo_rllib.config import GiGPOConfig

    return set(GiGPOConfig().to_dict())


def config_from_dict(settings: dict[str, Any], *, source: str = "config") -> tuple["GiGPOConfig", int]:
    """A validated :class:`GiGPOConfig` and the number of iterations to train, from an experiment dict.

    ``settings`` holds config keys exactly as :meth:`GiGPOConfig.to_dict` names them, plus an optional
    ``stop: {training_iteration: N}`` (default :data:`DEFAULT_STOP_ITERS`). Unknown keys raise
    :class:`ExperimentError` naming the key and ``source``; invalid values raise the config's own error.
    """
    from gigpo_rllib.config import GiGPOConfig

    if not isinstance(settings, dict):
        raise ExperimentError(f"{source}: expected a mapping of config keys, got {type(settings).__name__}")
    settings = dict(settings)
    stop = settings.pop("stop", None) or {}
    if not isinstance(stop, dict):
        raise ExperimentError(f"{source}: 'stop' must be a mapping like {{training_iteration: 10}}, got {stop!r}")
    unknown_stop = sorted(set(stop) - set(STOP_KEYS))
    if unknown_stop:
        raise ExperimentError(f"{source}: unknown stop key(s) {unknown_stop}; supported: {list(STOP_KEYS)}")
    stop_iters = stop.get("training_iteration", DEFAULT_STOP_ITERS)
    if not isinstance(stop_iters, int) or isinstance(stop_iters, bool) or stop_iters < 1:
        raise ExperimentError(f"{source}: stop.training_iteration must be an integer >= 1, got {stop_iters!r}")

    unknown = sorted(set(settings) - _known_config_keys())
    if unknown:
        raise ExperimentError(
            f"{source}: unknown config key(s) {unknown}. Use GiGPOConfig attribute names (see the README's "
            "configuration reference, or GiGPOConfig().to_dict() for RLlib's own keys) and a 'stop' section.")
    config = GiGPOConfig()
    env = settings.pop("env", None)
    env_config = settings.pop("env_config", None)
    if env is not None:
        config.environment(env=env)
    if env_config is not None:
        config.environment(env_config=env_config)
    try:
        config.update_from_dict(settings)
        config.validate()
    except ValueError as error:
        raise ExperimentError(f"{source}: {error}") from error
    return config, stop_iters


def load_experiment(path: str | pathlib.Path) -> tuple["GiGPOConfig", int]:
    """Read a YAML experiment file (see the module docstring) into ``(GiGPOConfig, stop_iters)``."""
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {str(path)!r}")
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path}: not valid YAML: {error}") from error
    return config_from_dict(settings or {}, source=str(path))


# ------------------------------------------------------------------------------------------- training


def _metric(result: dict, *keys: str) -> float:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def progress_line(result: dict) -> str:
    """One line per iteration: return, success, invalid-action rate and the time split of this iteration from
    ``result["timers"]`` (sampling, learner update, weight sync; GiGPO logs them per iteration)."""
    times = iteration_times(result)
    return (
        f"iter {int(result.get('training_iteration', 0)):4d} | "
        f"return {_metric(result, 'env_runners', 'episode_return_mean'):+.3f} | "
        f"success {_metric(result, 'env_runners', 'success_rate'):.3f} | "
        f"invalid {_metric(result, 'env_runners', 'invalid_action_rate'):.3f} | "
        f"time {_metric(result, 'time_this_iter_s'):.1f}s "
        f"(rollout {times['rollout_s']:.2f}s, advantages {times['advantages_s'] * 1e3:.1f}ms, "
        f"update {times['update_s']:.2f}s, sync {times['sync_s'] * 1e3:.1f}ms)"
    )


def iteration_times(result: dict) -> dict[str, float]:
    """This iteration's seconds in rollout, advantage computation (on the learner), the rest of the learner
    update, and weight sync."""
    advantages = _metric(result, "learners", "advantages_time_s")
    return {"rollout_s": _metric(result, "timers", "env_runner_sampling_timer"),
            "advantages_s": advantages,
            "update_s": _metric(result, "timers", "learner_update_timer") - advantages,
            "sync_s": _metric(result, "timers", "synch_weights")}


def default_checkpoint_dir(name: str) -> pathlib.Path:
    return pathlib.Path.home() / "gigpo_results" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"


def _save(algo, checkpoint_dir: pathlib.Path, out) -> str:
    path = checkpoint_dir / f"checkpoint_{algo.iteration:06d}"
    saved = algo.save_to_path(str(path.resolve()))
    print(f"checkpoint saved: {saved}", file=out, flush=True)
    return str(saved)


def train(config, stop_iters: int, *, checkpoint_dir: str | pathlib.Path, checkpoint_every: int = 0,
          out=None) -> dict[str, Any]:
    """Build the algorithm, train ``stop_iters`` iterations printing one progress line each, checkpoint every
    ``checkpoint_every`` iterations (0: only at the end) and at the end. Returns a summary dict
    (``iterations``, ``time_s``, ``final``/``best`` return and success, ``checkpoint``: the last path)."""
    out = out or sys.stdout
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    started = time.perf_counter()
    algo = config.build_algo()
    build_seconds = time.perf_counter() - started
    print(f"built GiGPO in {build_seconds:.1f}s (env {config.env_tags}, {config.rollout_batch_size} trajectories "
          f"per iteration, {config.num_env_runners} env runner(s)); training {stop_iters} iteration(s)",
          file=out, flush=True)
    best_return, best_success = -math.inf, -math.inf
    time_split: list[dict[str, float]] = []
    result: dict[str, Any] = {}
    checkpoint = None
    try:
        for _ in range(stop_iters):
            result = algo.train()
            print(progress_line(result), file=out, flush=True)
            time_split.append(iteration_times(result))
            best_return = max(best_return, _metric(result, "env_runners", "episode_return_mean"))
            best_success = max(best_success, _metric(result, "env_runners", "success_rate"))
            if checkpoint_every and algo.iteration % checkpoint_every == 0 and algo.iteration < stop_iters:
                checkpoint = _save(algo, checkpoint_dir, out)
        checkpoint = _save(algo, checkpoint_dir, out)
    finally:
        algo.stop()
    summary = {
        "iterations": algo.iteration,
        "time_s": time.perf_counter() - started,
        "final_return": _metric(result, "env_runners", "episode_return_mean"),
        "final_success_rate": _metric(result, "env_runners", "success_rate"),
        "best_return": best_return,
        "best_success_rate": best_success,
        "checkpoint": checkpoint,
        "mean_iteration_times": {key: statistics.fmean(t[key] for t in time_split) for key in time_split[0]}
        if time_split else {},
    }
    print(f"done: {summary['iterations']} iteration(s) in {summary['time_s']:.1f}s | final return "
          f"{summary['final_return']:+.3f}, success {summary['final_success_rate']:.3f} | best return "
          f"{best_return:+.3f}, success {best_success:.3f} | checkpoint {checkpoint}", file=out, flush=True)
    if time_split:
        mean = summary["mean_iteration_times"]
        print(f"mean time per iteration: rollout {mean['rollout_s']:.2f}s | advantages "
              f"{mean['advantages_s'] * 1e3:.1f}ms | update {mean['update_s']:.2f}s | weight sync "
              f"{mean['sync_s'] * 1e3:.1f}ms", file=out, flush=True)
    return summary


# ----------------------------------------------------------------------------------------- evaluation


def config_from_checkpoint(checkpoint: str | pathlib.Path):
    """The (unfrozen) :class:`GiGPOConfig` an algorithm checkpoint was built with."""
    from gigpo_rllib.algorithm import GiGPO
    from gigpo_rllib.config import GiGPOConfig

    ctor_file = pathlib.Path(checkpoint) / GiGPO.CLASS_AND_CTOR_ARGS_FILE_NAME
    if not ctor_file.is_file():
        raise ExperimentError(f"not an algorithm checkpoint (no {ctor_file.name} in it): {str(checkpoint)!r}")
    with ctor_file.open("rb") as f:
        ctor_info = pickle.load(f)
    state = ctor_info["ctor_args_and_kwargs"][0][0]
    return GiGPOConfig.from_state(state) if isinstance(state, dict) else state.copy(copy_frozen=False)


def evaluate(checkpoint: str | pathlib.Path, *, episodes: int | None = None,
             num_env_runners: int | None = None) -> dict[str, float]:
    """Restore ``checkpoint`` and run :meth:`GiGPO.validate` on ``episodes`` fresh episodes (default: the
    checkpoint's ``val_batch_size``). Returns the validation metrics."""
    from gigpo_rllib.algorithm import GiGPO

    config = config_from_checkpoint(checkpoint)
    if episodes is not None:
        if episodes < 1:
            raise ExperimentError(f"--episodes must be >= 1, got {episodes}")
        config.val_batch_size = episodes
    if num_env_runners is not None:
        config.num_env_runners = num_env_runners
    # The checkpoint's constructor argument is the config; passing ours replaces it, then the state is restored.
    algo = GiGPO.from_checkpoint(str(pathlib.Path(checkpoint).resolve()), config=config)
    try:
        return algo.validate()
    finally:
        algo.stop()


# ----------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: flags given before `file` (rllib train --stop-iters 2 file x.yaml) are not reset by the sub-parser.
    parser.add_argument("--stop-iters", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="training iterations (overrides the experiment's stop.training_iteration; "
                             f"default {DEFAULT_STOP_ITERS})")
    parser.add_argument("--checkpoint-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="where checkpoints go, as DIR/checkpoint_<iteration> "
                             "(default ~/gigpo_results/<name>_<timestamp>)")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=argparse.SUPPRESS, metavar="K",
                        help="also checkpoint every K iterations (default 0: only at the end)")
    parser.add_argument("--num-env-runners", type=_non_negative_int, default=argparse.SUPPRESS, metavar="N",
                        help="override num_env_runners (remote sampling actors; 0 samples in the driver)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rllib", description="Train and evaluate GiGPO (gigpo-rllib) on text environments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  rllib train file configs/frozenlake_gigpo.yaml --stop-iters 5\n"
               "  rllib train --algo GiGPO --env TextFrozenLake-v0 --config "
               "'{\"train_env_manager\": {\"num_env_groups\": 4, \"group_size\": 4}, \"rollout_batch_size\": 16}'\n"
               "  rllib evaluate ~/gigpo_results/frozenlake_gigpo_<time>/checkpoint_000020 --episodes 64")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train_parser = commands.add_parser(
        "train", help="train GiGPO (from a YAML file: `rllib train file X.yaml`, or from flags)",
        description="Train GiGPO. Either `rllib train file X.yaml [flags]` or "
                    "`rllib train --algo GiGPO --env ENV --config JSON [flags]`. Prints one progress line per "
                    "iteration and a summary, and saves a checkpoint at the end.")
    train_parser.add_argument("--algo", default="GiGPO", choices=["GiGPO"], help="the algorithm (only GiGPO)")
    train_parser.add_argument("--env", default=None,
                              help="env tag (FrozenLake, Sokoban, a TextArena game) or registered Gymnasium id")
    train_parser.add_argument("--config", default="{}", metavar="JSON",
                              help="JSON object of config keys, as in an experiment YAML (may hold \"stop\")")
    _add_run_flags(train_parser)
    train_modes = train_parser.add_subparsers(dest="train_mode", metavar="file")
    file_parser = train_modes.add_parser(
        "file", help="train from a YAML experiment file",
        description="Train from a YAML experiment file: flat GiGPOConfig keys, nested dicts for "
                    "reward_normalization / train_env_manager, RLlib keys (env, env_config, num_env_runners, "
                    "num_learners, lr, minibatch_size, seed) and an optional stop: {training_iteration: N}.")
    file_parser.add_argument("path", metavar="PATH.yaml", help="the experiment file")
    _add_run_flags(file_parser)

    evaluate_parser = commands.add_parser(
        "evaluate", help="restore a checkpoint and run validation episodes",
        description="Restore a GiGPO checkpoint and run validate(): N single episodes on fresh validation "
                    "seeds; prints the validation metrics as JSON.")
    evaluate_parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory written by train")
    evaluate_parser.add_argument("--episodes", type=_positive_int, default=None, metavar="N",
                                 help="validation episodes (default: the checkpoint's val_batch_size)")
    evaluate_parser.add_argument("--num-env-runners", type=_non_negative_int, default=None, metavar="N",
                                 help="override num_env_runners for the evaluation")
    return parser


def _train_command(args: argparse.Namespace) -> None:
    if args.train_mode == "file":
        if args.env is not None or args.config != "{}":
            raise ExperimentError("--env/--config go with `rllib train --algo GiGPO ...`, not with `train file`; "
                                  "put env and config keys in the YAML file")
        config, stop_iters = load_experiment(args.path)
        name = pathlib.Path(args.path).stem
    else:
        if not args.env:
            raise ExperimentError("`rllib train` needs either `file PATH.yaml` or --env ENV (see rllib train -h)")
        try:
            settings = json.loads(args.config)
        except json.JSONDecodeError as error:
            raise ExperimentError(f"--config is not valid JSON: {error}") from error
        if not isinstance(settings, dict):
            raise ExperimentError(f"--config must be a JSON object, got {args.config!r}")
        config, stop_iters = config_from_dict({**settings, "env": args.env}, source="--config")
        name = f"{args.algo}_{args.env}"
    stop_iters = getattr(args, "stop_iters", stop_iters)
    if getattr(args, "num_env_runners", None) is not None:
        config.env_runners(num_env_runners=args.num_env_runners)
    checkpoint_dir = getattr(args, "checkpoint_dir", None) or default_checkpoint_dir(name)
    train(config, stop_iters, checkpoint_dir=checkpoint_dir, checkpoint_every=getattr(args, "checkpoint_every", 0))


def _evaluate_command(args: argparse.Namespace) -> None:
    metrics = evaluate(args.checkpoint, episodes=args.episodes, num_env_runners=args.num_env_runners)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rllib`` console script. Returns the exit status (0 on success, 2 on bad input)."""
    args = build_parser().parse_args(argv)
    import ray

    import gigpo_rllib  # noqa: F401  (registers the "GiGPO" trainable)

    started_ray = False
    try:
        if args.command == "evaluate":
            # Fail on a bad path before paying for ray.init.
            config_from_checkpoint(args.checkpoint)
        elif args.train_mode == "file" and not pathlib.Path(args.path).is_file():
            raise ExperimentError(f"experiment file not found: {args.path!r}")
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
            started_ray = True
        if args.command == "train":
            _train_command(args)
        else:
            _evaluate_command(args)
    except ExperimentError as error:
        print(f"rllib: error: {error}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
