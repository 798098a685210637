"""Quiet by default: Ray's and RLlib's known-harmless start-up lines are dropped, everything else is kept."""

import logging
import os
import re
import subprocess
import sys

import pytest

from gigpo_rllib import logging_utils
from gigpo_rllib.cli import main
from gigpo_rllib.experiment import ExperimentError
from gigpo_rllib.logging_utils import (HARMLESS_NATIVE_LINES, filtered_native_stderr, install_log_filters,
                                       remove_log_filters)
from tests.conftest import ROOT
from tests.test_cli import TINY, write_yaml

# What a quiet run must not print (each seen in a plain `rllib train` before the filters).
HARMLESS = (
    r"Token authentication is enabled",
    r"on the new API stack",
    r"DeprecationWarning",
    r"Install gputil",
    r"core_worker\.cc.*constructor arguments",
    r"Started a local Ray instance",
    r"Trainable\.setup took",
    r"Loading weights",
)
CORE_WORKER_LINE = ("[2026-11-29 02:10:32,067 E 6192 6192] core_worker.cc:2465: Actor with class name: "
                    "'GiGPOEnvRunner' and ID: 'caab7f' has constructor arguments in the object store and "
                    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
                    "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_log_filters_drop_only_the_known_lines():
    added = install_log_filters()
    assert install_log_filters() == []  # idempotent: one filter per line
    token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(token_logger.filters) == 1
    config_logger = logging.getLogger("ray.rllib.algorithms.algorithm_config")
    collect = Collect()
    # Ray's and RLlib's loggers have their own handlers and do not propagate to the root logger.
    handlers_at = [logging.getLogger(name) for name in ("ray", "ray.rllib")]
    for logger in handlers_at:
        logger.addHandler(collect)
    try:
        token_logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        config_logger.warning("You are running GiGPO on the new API stack! This is the new default behavior ...")
        logging.getLogger("ray._common.deprecation").warning("DeprecationWarning: `RLModule(config=...)` has been "
                                                             "deprecated.")
        config_logger.warning("num_env_runners=0 with evaluation: something that matters")
        logging.getLogger("ray.rllib.other").warning("You are running GiGPO on the new API stack! (other logger)")
    finally:
        for logger in handlers_at:
            logger.removeHandler(collect)
        remove_log_filters(added)
    assert collect.messages == [
        "num_env_runners=0 with evaluation: something that matters",
        "You are running GiGPO on the new API stack! (other logger)"]


def test_native_stderr_filter_drops_the_core_worker_note_only(capfd):
    with filtered_native_stderr():
        os.write(2, CORE_WORKER_LINE.encode())
        os.write(2, b"[2026-11-29 02:10:33,000 E 6192 6192] core_worker.cc:100: a real error\n")
        print("a Python error line", file=sys.stderr, flush=True)
        os.write(2, b"no newline at the end")
    err = capfd.readouterr().err
    assert "constructor arguments" not in err
    assert "a real error" in err and "a Python error line" in err and err.endswith("no newline at the end")
    with filtered_native_stderr(active=False):  # --verbose
        os.write(2, CORE_WORKER_LINE.encode())
    assert "constructor arguments" in capfd.readouterr().err


def test_native_patterns_match_the_real_line():
    assert any(re.search(pattern, CORE_WORKER_LINE) for pattern in HARMLESS_NATIVE_LINES)


def test_cli_quiets_only_while_it_runs_and_not_with_verbose(tmp_path):
    token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen = []

    def spy(argv):
        def build_config(*args, **kwargs):
            seen.append(len(token_logger.filters))
            raise ExperimentError("stop here")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("gigpo_rllib.cli.build_config", build_config)
            assert main(argv) == 2

    experiment = write_yaml(tmp_path, TINY)
    remove_log_filters([(token_logger, f) for f in list(token_logger.filters)])
    spy(["train", "file", str(experiment)])
    spy(["train", "file", str(experiment), "--verbose"])
    assert seen == [1, 0]  # filtered during the quiet command only
    assert token_logger.filters == []  # and given back afterwards, for a program that calls main()


def test_worker_hook_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(logging_utils, "install_log_filters", broken)
    logging_utils.quiet_worker_setup()  # a failing hook would kill every Ray worker


@pytest.mark.slow
def test_a_normal_run_prints_none_of_the_harmless_lines(tmp_path):
    # One remote env runner, so the actor-creation note and a worker's output are exercised too.
    experiment = write_yaml(tmp_path, {**TINY, "num_env_runners": 1})
    process = subprocess.run(
        [sys.executable, "-m", "gigpo_rllib.cli", "train", "file", str(experiment), "--checkpoint-dir",
         str(tmp_path / "run")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=300)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert "iter    1 | return" in output and "checkpoint saved" in output
    found = [pattern for pattern in HARMLESS if re.search(pattern, output)]
    assert not found, f"harmless lines still printed: {found}\n{output}"
    assert process.stderr.strip() == "", process.stderr  # nothing at all on stderr when nothing is wrong
