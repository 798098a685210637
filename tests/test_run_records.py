"""Run records (gigpo_rllib.run_records): params.json reads back as the same config, run_info.json says what ran,
and --resume refuses a changed config, naming each key; (slow) `rllib train file params.json` repeats a run."""

import json
import math
import pathlib

import pytest

import gigpo_rllib
from gigpo_rllib import run_records
from gigpo_rllib.checkpoints import MANIFEST_NAME, checkpoint_name
from gigpo_rllib.cli import config_from_dict, load_experiment, main
from gigpo_rllib.experiment import ExperimentError, decode_settings, encode_settings
from gigpo_rllib.progress import read_csv
from gigpo_rllib.run_records import (PARAMS_FILE, RUN_INFO_FILE, ConfigChanged, check_resume_config,
                                     run_params, write_run_records)
from tests.test_cli import TINY, write_yaml

TINY_SETTINGS = {key: value for key, value in TINY.items() if key != "stop"}
# Columns that measure time; everything else of an iteration must repeat exactly.
TIMING_COLUMNS = {"time_s", "rollout_s", "learner_update_s", "advantages_s", "old_logprobs_s", "sync_s", "update_s",
                  "train_tokens_per_s"}


@pytest.fixture(scope="module")
def tiny_config():
    return config_from_dict(TINY_SETTINGS)[0]


def test_params_json_reads_back_as_the_same_config(tmp_path, tiny_config):
    params = run_params(tiny_config, {"training_iteration": 3})
    # Every key of the config, RLlib's own too; classes and functions as import paths.
    assert set(params) == set(tiny_config.to_dict()) | {"stop"}
    assert params["env_runner_cls"] == {"__python__": "gigpo_rllib.env_runner:GiGPOEnvRunner"}
    path = tmp_path / PARAMS_FILE
    path.write_text(json.dumps(params))
    config, iterations = load_experiment(path)
    assert iterations == 3
    assert run_records.config_changes(params, run_params(config, {"training_iteration": 3})) == {}
    assert config.env_runner_cls is tiny_config.env_runner_cls


def test_json_files_keep_numbers_that_yaml_would_read_as_strings(tmp_path):
    # YAML 1.1 reads 1e-05 as a string; a .json experiment file is read as JSON.
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({**TINY_SETTINGS, "lr": 1e-05}))
    assert load_experiment(path)[0].lr == 1e-05


def test_python_objects_without_an_import_path_are_named_when_read_back():
    encoded = encode_settings({"callbacks": lambda: None, "nested": {"cls": pathlib.Path}, "pair": (1, 2)})
    assert encoded["nested"] == {"cls": {"__python__": "pathlib:Path"}} and encoded["pair"] == [1, 2]
    assert "<lambda>" in encoded["callbacks"]["__unrecorded__"]
    assert decode_settings(encoded["nested"], source="f")["cls"] is pathlib.Path
    with pytest.raises(ExperimentError, match=r"f: callbacks was a Python object without an import path"):
        decode_settings(encoded, source="f")
    with pytest.raises(ExperimentError, match=r"f: x: cannot import 'nowhere_module:Thing'"):
        decode_settings({"x": {"__python__": "nowhere_module:Thing"}}, source="f")


def test_run_info_records_what_ran(tmp_path, monkeypatch):
    write_run_records(tmp_path, {"lr": 0.1, "stop": {}}, command=["rllib", "train", "file", "x.yaml"])
    info = json.loads((tmp_path / RUN_INFO_FILE).read_text())
    assert info["command"] == ["rllib", "train", "file", "x.yaml"]
    versions = info["versions"]
    assert set(versions) == {"python", "torch", "ray", "transformers", "vllm", "gigpo_rllib"}
    import ray
    import torch

    assert (versions["torch"], versions["ray"]) == (torch.__version__, ray.__version__)
    assert info["start_time"].endswith("+00:00") and info["host"]["cpu_count"] >= 1
    assert isinstance(info["host"]["gpus"], list) and info["resumes"] == []
    assert run_records.package_version("no_such_package_here") is None  # absent: null
    # Outside a git checkout (an installed wheel) the commit is null, not an error.
    monkeypatch.setattr(gigpo_rllib, "__file__", str(tmp_path / "site-packages" / "gigpo_rllib" / "__init__.py"))
    assert run_records.project_git_commit() is None


def test_a_resume_appends_to_run_info_and_keeps_params(tmp_path):
    write_run_records(tmp_path, {"lr": 0.1, "stop": {}}, command=["first"])
    write_run_records(tmp_path, {"lr": 0.2, "stop": {}}, command=["second"], resumed_from=4,
                      changes={"lr": (0.1, 0.2)})
    assert json.loads((tmp_path / PARAMS_FILE).read_text())["lr"] == 0.1  # the config the run started with
    info = json.loads((tmp_path / RUN_INFO_FILE).read_text())
    assert info["command"] == ["first"]
    (resume,) = info["resumes"]
    assert resume["command"] == ["second"] and resume["resumed_from_iteration"] == 4
    assert resume["config_changes"] == {"lr": {"before": 0.1, "after": 0.2}}


def test_resume_check_names_every_changed_key_but_not_stop(tmp_path):
    recorded = {"lr": 0.1, "policies": {"p": [None, None]}, "seed": 0, "stop": {"training_iteration": 2}}
    (tmp_path / PARAMS_FILE).write_text(json.dumps(recorded))
    same = {**recorded, "policies": {"p": (None, None)}, "stop": {"training_iteration": 9}}  # tuple == JSON list
    assert check_resume_config(tmp_path, same, allow_change=False) == {}
    changed = {**recorded, "lr": 0.2, "seed": 1, "new_key": True}
    with pytest.raises(ConfigChanged) as error:
        check_resume_config(tmp_path, changed, allow_change=False)
    message = str(error.value)
    assert "in 3 key(s): lr: 0.1 -> 0.2; new_key: null -> true; seed: 0 -> 1" in message
    assert "--allow-config-change" in message
    assert set(check_resume_config(tmp_path, changed, allow_change=True)) == {"lr", "new_key", "seed"}
    # A run from before params.json existed is not checked.
    assert check_resume_config(tmp_path / "older_run", changed, allow_change=False) == {}


def _fake_checkpoint(run_dir: pathlib.Path, iteration: int) -> None:
    checkpoint = run_dir / checkpoint_name(iteration)
    checkpoint.mkdir(parents=True)
    (checkpoint / MANIFEST_NAME).write_text(json.dumps({"iteration": iteration, "files": {}}))


def test_cli_resume_with_another_config_exits_2_before_ray_starts(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, 1)
    (run_dir / PARAMS_FILE).write_text(json.dumps(run_params(tiny_config, {"training_iteration": 1})))
    path = write_yaml(tmp_path, {**TINY, "lr": 0.5})
    assert main(["train", "file", str(path), "--checkpoint-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rllib: error: --resume: the config differs from the one this run started with")
    assert "in 1 key(s): lr: 0.001 -> 0.5" in err and err.count("\n") == 1


@pytest.mark.slow
def test_train_file_params_json_repeats_the_first_iteration(ray_session, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "file", str(write_yaml(tmp_path, TINY)), "--checkpoint-dir", str(first)]) == 0
    info = json.loads((first / RUN_INFO_FILE).read_text())
    assert info["command"][:3] == ["rllib", "train", "file"]
    assert main(["train", "file", str(first / PARAMS_FILE), "--checkpoint-dir", str(again)]) == 0
    assert json.loads((again / PARAMS_FILE).read_text()) == json.loads((first / PARAMS_FILE).read_text())
    (row,), (repeated,) = read_csv(first / "progress.csv"), read_csv(again / "progress.csv")
    compared = [column for column in row if column not in TIMING_COLUMNS]
    assert {column: row[column] for column in compared if not math.isnan(row[column])} == {
        column: repeated[column] for column in compared if not math.isnan(repeated[column])}

    # Resuming with another learning rate is refused; allowed, the change is recorded.
    capsys.readouterr()
    resume = ["train", "file", str(first / PARAMS_FILE), "--checkpoint-dir", str(first), "--resume",
              "--stop-iters", "2", "--config", '{"lr": 0.002}']
    assert main(resume) == 2
    assert "lr: 0.001 -> 0.002" in capsys.readouterr().err
    assert main([*resume, "--allow-config-change"]) == 0
    assert "warning: resuming with a config that differs from params.json" in capsys.readouterr().out
    (resumed,) = json.loads((first / RUN_INFO_FILE).read_text())["resumes"]
    assert resumed["resumed_from_iteration"] == 1
    assert resumed["config_changes"] == {"lr": {"before": 0.001, "after": 0.002}}
    assert json.loads((first / PARAMS_FILE).read_text())["lr"] == 0.001
