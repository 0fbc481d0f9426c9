"""The shared-storage check a multi-node job runs before it starts (mpo_online/run/cluster.py), on a real Ray cluster
of several nodes on this machine: a head (`ray.cluster_utils.Cluster`), a worker node that shares the filesystem, and
a worker node started by `ray start` inside its own mount namespace (`unshare -m`) with a tmpfs mounted over the run
directory: the nearest this machine gets to a node without the shared volume. That case needs root (mount); where
`unshare` is not allowed it is skipped with the reason. (On one node the check has nothing to do: every loop test runs
it so.)"""

import time

import pytest
from hidden_nodes import cannot_hide, hidden_node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _wait_nodes(ray, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(1 for node in ray.nodes() if node["Alive"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} nodes did not come up in {timeout_s} s: {ray.nodes()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + one node on the same filesystem; yields (cluster, ray)."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    _wait_nodes(ray, 2)
    try:
        yield c, ray
    finally:
        ray.shutdown()
        c.shutdown()


def test_nodes_on_one_filesystem_pass_and_the_marker_is_removed(cluster, tmp_path):
    from mpo_online.run.cluster import MARKER, check_shared_paths

    c, ray = cluster
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "idefics3"}')
    checked = check_shared_paths({"loop.run_dir": tmp_path / "run"},
                                 {"model.path": tmp_path / "model" / "config.json"})
    worker_ids = {n.node_id for n in c.worker_nodes}
    assert set(checked) == worker_ids and len(checked) == 1
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / MARKER).exists()


def test_a_node_that_does_not_see_the_run_dir_is_named_before_anything_starts(cluster, tmp_path):
    from mpo_online.run.cluster import SharedStorageError, check_shared_paths

    c, ray = cluster
    shared = tmp_path / "shared"
    (shared / "model").mkdir(parents=True)
    (shared / "model" / "config.json").write_text('{"model_type": "idefics3"}')
    why = cannot_hide(shared)
    if why:
        pytest.skip(why)
    # a third node whose processes see an empty tmpfs where the driver sees `shared`
    with hidden_node(c.address, shared, {"hidden": 1}, log=tmp_path / "node.log"):
        _wait_nodes(ray, 3)
        hidden = next(n for n in ray.nodes() if n["Alive"] and n["Resources"].get("hidden"))
        with pytest.raises(SharedStorageError) as err:
            check_shared_paths({"loop.run_dir": shared / "run"}, {"model.path": shared / "model" / "config.json"})
        msg = str(err.value)
        # the hidden node is named for both paths; the node that shares the filesystem is not
        assert f"node {hidden['NodeID'][:12]}" in msg and "loop.run_dir" in msg and "model.path" in msg
        assert msg.count("does not see") == 2
        assert not (shared / "run" / ".mpo-online-shared-check").exists()
