import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every test that needs it (``ray.init`` costs seconds). Four logical CPUs on the
    2-core machine: the two-runner and two-learner tests each hold three actors plus the driver."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
