"""Checkpoints that survive a kill, and the run directory a training run writes and resumes.

A checkpoint is written into a hidden staging directory next to its target (``.checkpoint_000002.partial-PID``),
then a manifest of its files and their sizes is added (:data:`MANIFEST_NAME`), then the directory is renamed to
``checkpoint_000002``. A rename within one file system is atomic, so a process killed at any moment leaves either
a complete ``checkpoint_*`` or a staging directory that nothing mistakes for a checkpoint (``--resume`` deletes
it). Replacing an existing checkpoint moves the old one aside to a backup first; a kill between the two renames
leaves no ``checkpoint_*`` of that iteration, and ``--resume`` puts the backup back before anything is deleted
(:func:`plan_run`). The manifest lets :func:`checkpoint_problem` tell a complete checkpoint from a damaged one without
unpickling gigabytes.

A run directory holds ``progress.csv``, TensorBoard event files, ``checkpoint_*`` directories and, after a
failure, ``error.txt`` (the full traceback).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
from dataclasses import dataclass, field

from gigpo_rllib.experiment import ExperimentError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
STAGING_PATTERN = re.compile(r"^\.checkpoint_\d+\.(partial|replaced)-\d+$")
BACKUP_PATTERN = re.compile(r"^\.(checkpoint_\d+)\.replaced-\d+$")
MANIFEST_NAME = "gigpo_checkpoint.json"
ERROR_FILE = "error.txt"
PROGRESS_FILE = "progress.csv"
# What RLlib's Algorithm.save_to_path always writes at the top of a checkpoint (the learner state lives under
# learner_group/); enough to recognise checkpoints written without our manifest (algo.save_to_path).
REQUIRED_ENTRIES = ("class_and_ctor_args.pkl", "algorithm_state.pkl", "learner_group")


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:06d}"


# -------------------------------------------------------------------------------------------------- writing


def save_checkpoint(algo, run_dir: str | pathlib.Path) -> pathlib.Path:
    """Save ``algo`` as ``run_dir/checkpoint_<iteration>``, atomically (see module docstring). An existing
    checkpoint of the same iteration is replaced. Returns the checkpoint's path."""
    run_dir = pathlib.Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / checkpoint_name(algo.iteration)
    staging = run_dir / f".{target.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    algo.save_to_path(str(staging))
    write_manifest(staging, iteration=algo.iteration)
    _publish(staging, target)
    return target


def write_manifest(checkpoint: pathlib.Path, *, iteration: int) -> None:
    files = {str(path.relative_to(checkpoint)): path.stat().st_size
             for path in sorted(checkpoint.rglob("*")) if path.is_file()}
    manifest = {"iteration": iteration, "files": files}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_tree(checkpoint)


def _publish(staging: pathlib.Path, target: pathlib.Path) -> None:
    if target.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first (still a hidden name, so
        # a kill in between leaves the previous checkpoints intact and this one recoverable by a rerun).
        aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
    else:
        os.rename(staging, target)
    _fsync_dir(target.parent)


def _fsync_tree(directory: pathlib.Path) -> None:
    # Data reaches the disk before the rename makes the checkpoint visible (matters on power loss, not on a kill).
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: pathlib.Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -------------------------------------------------------------------------------------------------- reading


def checkpoint_problem(path: str | pathlib.Path) -> str | None:
    """What is wrong with the checkpoint directory ``path``, in words, or ``None`` when it looks complete.

    With a manifest every listed file must exist with its recorded size; without one (a checkpoint written by
    ``algo.save_to_path`` directly), RLlib's top-level files must exist and no ``.pkl`` file may be empty.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a directory (a checkpoint is a directory written by `rllib train`)"
    if STAGING_PATTERN.match(path.name):
        return "it is the staging directory of a checkpoint save that did not finish (the process was stopped)"
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        return _manifest_problem(path, manifest)
    missing = [name for name in REQUIRED_ENTRIES if not (path / name).exists()]
    if missing:
        return (f"it lacks {', '.join(missing)}: not an algorithm checkpoint, or one whose save was interrupted "
                "(expected a directory written by `rllib train` or Algorithm.save_to_path)")
    empty = [str(p.relative_to(path)) for p in sorted(path.rglob("*.pkl")) if p.stat().st_size == 0]
    if empty:
        return f"{empty[0]} is empty: the save was interrupted"
    return None


def _manifest_problem(path: pathlib.Path, manifest: pathlib.Path) -> str | None:
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_NAME} is unreadable ({error})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes instead of {size}: the file was cut short or changed"
    return None


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """``path`` itself when it is a complete checkpoint; for a run directory, its newest complete checkpoint.
    Raises :class:`ExperimentError` saying what is wrong otherwise."""
    path = pathlib.Path(path)
    is_run_dir = path.is_dir() and not any((path / entry).exists() for entry in REQUIRED_ENTRIES)
    if is_run_dir and list_checkpoints(path):
        plan = plan_run(path, resume=True)
        if plan.checkpoint is None:
            details = "; ".join(f"{p.name}: {problem}" for p, problem in plan.skipped)
            raise ExperimentError(f"run directory {str(path)!r} has no complete checkpoint ({details})")
        return plan.checkpoint
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ExperimentError(f"cannot use checkpoint {str(path)!r}: {problem}")
    return path


def checkpoint_iteration(path: str | pathlib.Path) -> int:
    """The training iteration a checkpoint was saved at (from its manifest, else from its name, else 0)."""
    path = pathlib.Path(path)
    try:
        return int(json.loads((path / MANIFEST_NAME).read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_PATTERN.match(path.name)
        return int(match.group(1)) if match else 0


def list_checkpoints(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """The ``checkpoint_<n>`` directories of ``run_dir``, oldest first (complete or not)."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def staging_leftovers(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Staging directories of saves that never finished (a kill mid-checkpoint)."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if STAGING_PATTERN.match(p.name))


def config_from_checkpoint(checkpoint: str | pathlib.Path):
    """The (unfrozen) :class:`GiGPOConfig` an algorithm checkpoint was built with. Raises ``ValueError`` when
    the checkpoint's constructor file is missing or cannot be read."""
    from gigpo_rllib.algorithm import GiGPO
    from gigpo_rllib.config import GiGPOConfig

    ctor_file = pathlib.Path(checkpoint) / GiGPO.CLASS_AND_CTOR_ARGS_FILE_NAME
    if not ctor_file.is_file():
        raise ValueError(f"not an algorithm checkpoint (no {ctor_file.name} in it): {str(checkpoint)!r}")
    try:
        with ctor_file.open("rb") as file:
            ctor_info = pickle.load(file)
        state = ctor_info["ctor_args_and_kwargs"][0][0]
    except (EOFError, pickle.UnpicklingError, KeyError, IndexError, TypeError, AttributeError,
            ModuleNotFoundError) as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r}: {ctor_file.name} cannot be read ({type(error).__name__}: "
                         f"{error}); the save was interrupted or the file is damaged") from error
    return GiGPOConfig.from_state(state) if isinstance(state, dict) else state.copy(copy_frozen=False)


# ----------------------------------------------------------------------------------------- the run directory


@dataclass
class RunPlan:
    """Where a training run starts: fresh, or from ``checkpoint`` (iteration ``iteration``) of its directory."""

    run_dir: pathlib.Path
    checkpoint: pathlib.Path | None = None
    iteration: int = 0
    resume: bool = False
    skipped: list[tuple[pathlib.Path, str]] = field(default_factory=list)  # damaged checkpoints passed over
    leftovers: list[pathlib.Path] = field(default_factory=list)  # staging directories to delete


class RunDirError(ExperimentError):
    """The run directory does not fit the request (a run is there without --resume)."""


def existing_run_files(run_dir: pathlib.Path) -> list[str]:
    """Names in ``run_dir`` that belong to an earlier training run."""
    if not run_dir.is_dir():
        return []
    names = [p.name for p in list_checkpoints(run_dir) + staging_leftovers(run_dir)]
    names += [name for name in (PROGRESS_FILE, ERROR_FILE) if (run_dir / name).exists()]
    names += sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))
    return names


def plan_run(run_dir: str | pathlib.Path, *, resume: bool) -> RunPlan:
    """Decide how a run in ``run_dir`` starts. The only change on disk: with ``resume``, a checkpoint whose
    replacement was killed half-way (see :func:`_publish`) is put back first, so it is never taken for a leftover.

    Without ``resume`` the directory must not hold a run already (:class:`RunDirError`). With ``resume`` the
    run continues from the newest complete checkpoint; damaged ones are passed over (listed in ``skipped``) and
    an empty or missing directory simply starts a new run.
    """
    run_dir = pathlib.Path(run_dir)
    existing = existing_run_files(run_dir)
    if not resume:
        if existing:
            shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise RunDirError(f"{str(run_dir)!r} already holds a training run ({shown}); pass --resume to continue "
                              "it from its last checkpoint, or choose another --checkpoint-dir / --storage-path")
        return RunPlan(run_dir)
    restore_interrupted_replacements(run_dir)
    plan = RunPlan(run_dir, resume=True, leftovers=staging_leftovers(run_dir))
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            plan.checkpoint, plan.iteration = checkpoint, checkpoint_iteration(checkpoint)
            break
        plan.skipped.append((checkpoint, problem))
    return plan


def restore_interrupted_replacements(run_dir: pathlib.Path) -> None:
    """Rename each backup of a replaced checkpoint back when the checkpoint itself is missing: the save that
    replaced it was killed between its two renames, and the backup is the only complete copy."""
    for leftover in staging_leftovers(run_dir):
        backup = BACKUP_PATTERN.match(leftover.name)
        if backup and not (run_dir / backup.group(1)).exists():
            os.rename(leftover, run_dir / backup.group(1))


def clear_leftovers(plan: RunPlan) -> None:
    """Delete the staging directories of unfinished saves (they never became checkpoints) and the backups of
    replaced checkpoints (:func:`plan_run` has put back any backup that was the only complete copy)."""
    for leftover in plan.leftovers:
        shutil.rmtree(leftover, ignore_errors=True)


def write_error_file(run_dir: pathlib.Path, text: str) -> pathlib.Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ERROR_FILE
    path.write_text(text)
    return path
