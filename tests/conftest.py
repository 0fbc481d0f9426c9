"""Shared pytest fixtures and helpers: a local Ray instance, and a policy Serve app for a test module's lifetime.
Test-specific fixtures stay in their own files."""

import contextlib

import pytest


@pytest.fixture
def experiment():
    """Load a script of experiments/ as a module: `experiment("pair_shift").report(...)` (they are not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).parent.parent / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


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


@pytest.fixture(scope="session")
def policy_app():
    """The `_policy_app` context manager, for module fixtures: `with policy_app(model, app=..., port=...) as client`."""
    return _policy_app


@contextlib.contextmanager
def _policy_app(model_dir, *, app: str, port: int, **options):
    """A fresh local Ray (4 logical CPUs), Serve on `port` and the policy app `app` serving `model_dir`; yields its
    PolicyClient and tears everything down afterwards. `options` go to serving.app.start_policy_server."""
    import ray
    from ray import serve

    from serving.app import start_policy_server, stop_policy_server

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"port": port})
        yield start_policy_server(model_dir, app_name=app, port=port, **options)
    finally:
        try:
            stop_policy_server(app)
        finally:
            serve.shutdown()
            ray.shutdown()
