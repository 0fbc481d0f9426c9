"""Shared pytest fixtures. Only the Ray fixture lives here; test-specific fixtures stay in their own files."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module: 2 logical CPUs (the machine's), no dashboard (faster start).

    If something already started Ray (e.g. a test that called ray.init itself), reuse it and leave it running.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
