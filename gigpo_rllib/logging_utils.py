"""Quiet runs: the ``rllib`` command and the examples show our progress lines, warnings that matter and errors,
not the start-up notes Ray and RLlib print on every run.

Ray's own knobs do most of the work (:func:`start_ray`): ``ray.init(logging_level=WARNING)`` drops Ray's INFO
lines ("Started a local Ray instance", "Trainable.setup took ..."), and the ``worker_process_setup_hook`` of the
job's runtime env quiets every worker process the same way as the driver. What is left are a few WARNING-level
notes that are harmless for GiGPO; :data:`HARMLESS_LOG_LINES` lists each one with the reason, and a logging
filter on the logger that emits it drops exactly those. One line comes from Ray's C++ core worker, which
writes to file descriptor 2 directly, below Python's logging: :func:`filtered_native_stderr` drops it while
the algorithm builds its actors. ``quiet=False`` (the CLI's ``--verbose``) keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence


@dataclass(frozen=True)
class HarmlessLine:
    """A log message to drop: ``logger`` (the emitting logger's name) and ``pattern`` (a regex searched in the
    message); ``why`` says why nobody training GiGPO needs to read it."""

    logger: str
    pattern: str
    why: str


HARMLESS_LOG_LINES: tuple[HarmlessLine, ...] = (
    HarmlessLine("ray._private.authentication.authentication_token_setup", r"^Token authentication is enabled",
                 "Ray turns token authentication on for local clusters and announces it at every start."),
    HarmlessLine("ray._common.deprecation", r"DeprecationWarning|has been deprecated",
                 "Ray's deprecation notices concern RLlib's internals (e.g. RLModule builds an RLModuleConfig "
                 "itself), not anything a GiGPO config sets."),
    HarmlessLine("ray.rllib.algorithms.algorithm_config", r"on the new API stack!",
                 "GiGPO only exists on the new API stack; the note is for users of RLlib's old algorithms."),
    HarmlessLine("ray.tune.utils.util", r"^Install gputil",
                 "GPU utilisation monitoring is optional and unused by the CLI."),
)

HARMLESS_NATIVE_LINES: tuple[str, ...] = (
    # Every actor RLlib creates with max_restarts > 0 (env runners, learners) triggers this C++ note; RLlib keeps
    # the constructor arguments alive for the whole run, so a restart can always find them.
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and "
    r"max_restarts > 0",
)

# Hugging Face's "Loading weights" progress bar, printed by the driver and every env runner and learner.
_PROGRESS_BAR_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class _DropHarmless(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


AddedFilters = list[tuple[logging.Logger, logging.Filter]]


def install_log_filters(lines: Sequence[HarmlessLine] = HARMLESS_LOG_LINES) -> AddedFilters:
    """Attach a filter for each harmless line to the logger that emits it (idempotent). A filter on the emitting
    logger sees only that logger's records, so nothing else Ray logs is touched. Returns the filters added now
    (for :func:`remove_log_filters`)."""
    added = []
    for line in lines:
        logger = logging.getLogger(line.logger)
        if not any(isinstance(f, _DropHarmless) and f.pattern.pattern == line.pattern for f in logger.filters):
            log_filter = _DropHarmless(line.pattern)
            logger.addFilter(log_filter)
            added.append((logger, log_filter))
    return added


def remove_log_filters(added: AddedFilters) -> None:
    for logger, log_filter in added:
        logger.removeFilter(log_filter)


def disable_progress_bars() -> Callable[[], None]:
    """Hide Hugging Face's weight-loading progress bars here and in the processes started from here. Returns a
    function that restores the previous setting in this process."""
    previous_env = {name: os.environ.get(name) for name in _PROGRESS_BAR_ENV}
    os.environ.update(_PROGRESS_BAR_ENV)  # read when the libraries are imported, here and in every Ray worker
    # Already imported: switch them off directly (importing them here would only slow down a failing command).
    restore_transformers = None
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging as transformers_logging

        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            restore_transformers = transformers_logging.enable_progress_bar

    def restore() -> None:
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if restore_transformers is not None:
            restore_transformers()

    return restore


def quiet_this_process() -> None:
    """Drop the known-harmless log lines and the progress bars in this process from now on (for scripts such as
    the examples). Call it before building a config: RLlib's new-API-stack note is logged by ``validate()``."""
    install_log_filters()
    disable_progress_bars()


@contextlib.contextmanager
def quiet_output(active: bool = True) -> Iterator[None]:
    """:func:`quiet_this_process` for the length of the block only (the CLI's commands: a program that calls
    ``main()`` gets its logging back as it was). ``active=False`` (``--verbose``) changes nothing."""
    if not active:
        yield
        return
    added = install_log_filters()
    restore_progress_bars = disable_progress_bars()
    try:
        yield
    finally:
        remove_log_filters(added)
        restore_progress_bars()


def quiet_worker_setup() -> None:
    """``worker_process_setup_hook`` of :func:`start_ray`: runs first in every Ray worker process (env runners,
    learners, Tune trials), so their output forwarded to the driver is as quiet as the driver's.

    A hook that fails kills the worker, so nothing may escape: quiet output is never worth a failed run.
    """
    try:
        quiet_this_process()
        logging.getLogger("ray").setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass


def start_ray(*, quiet: bool = True, **init_kwargs) -> None:
    """``ray.init`` for the CLI and the examples: no dashboard; when ``quiet``, Ray's INFO lines and the known
    harmless warnings are dropped in the driver and in every worker. ``init_kwargs`` go to ``ray.init``."""
    import ray

    init_kwargs.setdefault("include_dashboard", False)
    if quiet:
        init_kwargs.setdefault("logging_level", logging.WARNING)
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", _portable(quiet_worker_setup))
        init_kwargs["runtime_env"] = runtime_env
    with quiet_output(quiet):  # the token-authentication note is logged during ray.init
        ray.init(**init_kwargs)


def _portable(function):
    """``function`` made to travel by value: a worker that imports another copy of this package (or none; an
    old install, a different checkout) still runs the hook instead of dying on an ImportError."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return function


@contextlib.contextmanager
def filtered_native_stderr(patterns: Sequence[str] = HARMLESS_NATIVE_LINES, *, active: bool = True
                           ) -> Iterator[None]:
    """Drop lines matching ``patterns`` from what is written to file descriptor 2 inside the block (native code
    such as Ray's C++ core worker writes there directly; Python's logging never sees it). Every other line, in
    Python or native code, reaches the real stderr unchanged. ``active=False`` makes this a no-op."""
    if not active or not patterns:
        yield
        return
    compiled = [re.compile(pattern) for pattern in patterns]
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy_kept_lines, args=(read_end, real_stderr, compiled), daemon=True,
                              name="filtered-native-stderr")
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes the pipe's last write end here, so the copier reads to the end and stops
        # A child process started inside the block may still hold the pipe: then the daemon copier keeps copying.
        copier.join(timeout=2.0)
        if not copier.is_alive():
            os.close(real_stderr)


def _copy_kept_lines(read_end: int, destination: int, patterns: Sequence[re.Pattern]) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _write_unless_harmless(line + b"\n", destination, patterns)
    if pending:
        _write_unless_harmless(pending, destination, patterns)


def _write_unless_harmless(line: bytes, destination: int, patterns: Sequence[re.Pattern]) -> None:
    text = line.decode("utf-8", "replace")
    if not any(pattern.search(text) for pattern in patterns):
        os.write(destination, line)
