"""The ``rllib`` command: train GiGPO from a YAML file or from flags, and evaluate a checkpoint.

Ray >= 2.44 no longer ships an ``rllib`` command; ``pyproject.toml`` installs this one
(``rllib = gigpo_rllib.cli:main``). Without installing, ``python3 -m gigpo_rllib.cli ...`` does the same.

Usage::

    rllib train file configs/frozenlake_gigpo.yaml [--stop-iters N] [--checkpoint-dir DIR]
                                                   [--checkpoint-every K] [--num-env-runners N]
    rllib train --algo GiGPO --env TextFrozenLake-v0 --config '{"train_env_manager": {...}, ...}' [same flags]
    rllib evaluate CHECKPOINT [--episodes N] [--num-env-runners N]
    rllib plot RUN_DIR [RUN_DIR ...] [--out progress.png]

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
from typing import TYPE_CHECKING, Any, Sequence

from gigpo_rllib.progress import CsvLog, format_progress, iteration_metrics, plot_runs, read_csv

if TYPE_CHECKING:
    from gigpo_rllib.config import GiGPOConfig

DEFAULT_STOP_ITERS = 10
PROGRESS_FILE = "progress.csv"
STOP_KEYS = ("training_iteration",)


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


def progress_line(result: dict) -> str:
    """One line per iteration: return, success, invalid-action rate and this iteration's time split."""
    return format_progress(iteration_metrics(result))


def default_checkpoint_dir(name: str) -> pathlib.Path:
    return pathlib.Path.home() / "gigpo_results" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"


def _save(algo, checkpoint_dir: pathlib.Path, out) -> str:
    path = checkpoint_dir / f"checkpoint_{algo.iteration:06d}"
    saved = algo.save_to_path(str(path.resolve()))
    print(f"checkpoint saved: {saved}", file=out, flush=True)
    return str(saved)


def train(config, stop_iters: int, *, checkpoint_dir: str | pathlib.Path, checkpoint_every: int = 0,
          out=None) -> dict[str, Any]:
    """Build the algorithm, train ``stop_iters`` iterations printing one progress line each (and appending it to
    ``checkpoint_dir/progress.csv``), checkpoint every ``checkpoint_every`` iterations (0: only at the end) and at
    the end. Returns a summary dict (``iterations``, ``time_s``, ``final``/``best`` return and success,
    ``mean_iteration_times``, ``checkpoint``: the last path, ``progress_csv``)."""
    out = out or sys.stdout
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    log = CsvLog(checkpoint_dir / PROGRESS_FILE)
    started = time.perf_counter()
    algo = config.build_algo()
    print(f"built GiGPO in {time.perf_counter() - started:.1f}s (env {config.env_tags}, {config.rollout_batch_size} "
          f"trajectories per iteration, {config.num_env_runners} env runner(s)); training {stop_iters} "
          f"iteration(s); progress in {log.path}", file=out, flush=True)
    rows: list[dict[str, float]] = []
    checkpoint = None
    try:
        for _ in range(stop_iters):
            rows.append(iteration_metrics(algo.train()))
            log.append(rows[-1])
            print(format_progress(rows[-1]), file=out, flush=True)
            if checkpoint_every and algo.iteration % checkpoint_every == 0 and algo.iteration < stop_iters:
                checkpoint = _save(algo, checkpoint_dir, out)
        checkpoint = _save(algo, checkpoint_dir, out)
    finally:
        algo.stop()
    summary = _summary(rows, time.perf_counter() - started, checkpoint, log.path)
    print(f"done: {len(rows)} iteration(s) in {summary['time_s']:.1f}s | final return {summary['final_return']:+.3f}, "
          f"success {summary['final_success_rate']:.3f} | best return {summary['best_return']:+.3f}, success "
          f"{summary['best_success_rate']:.3f} | checkpoint {checkpoint}", file=out, flush=True)
    if rows:
        mean = summary["mean_iteration_times"]
        print(f"mean time per iteration: rollout {mean['rollout_s']:.2f}s | advantages "
              f"{mean['advantages_s'] * 1e3:.1f}ms | update {mean['update_s']:.2f}s | weight sync "
              f"{mean['sync_s'] * 1e3:.1f}ms", file=out, flush=True)
    return summary


def _summary(rows: list[dict[str, float]], seconds: float, checkpoint: str | None, csv_path) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {
        "iterations": len(rows),
        "time_s": seconds,
        "final_return": last.get("episode_return_mean", math.nan),
        "final_success_rate": last.get("success_rate", math.nan),
        "best_return": max((row["episode_return_mean"] for row in rows), default=math.nan),
        "best_success_rate": max((row["success_rate"] for row in rows), default=math.nan),
        "mean_iteration_times": {key: statistics.fmean(row[key] for row in rows)
                                 for key in ("rollout_s", "advantages_s", "update_s", "sync_s")} if rows else {},
        "checkpoint": checkpoint,
        "progress_csv": str(csv_path),
    }


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
    plot_parser = commands.add_parser(
        "plot", help="plot the progress.csv of one or more training runs into a PNG",
        description="Plot return, success rate, invalid-action rate and entropy per iteration of one or more "
                    "runs (directories written by `rllib train`) into one PNG. Needs matplotlib.")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding progress.csv")
    plot_parser.add_argument("--out", default="gigpo_progress.png", help="PNG path (default gigpo_progress.png)")
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
    if args.command == "plot":
        try:
            print(f"plot written: {plot(args.runs, args.out)}")
        except ExperimentError as error:
            print(f"rllib: error: {error}", file=sys.stderr)
            return 2
        return 0
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
