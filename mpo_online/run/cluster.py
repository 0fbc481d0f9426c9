"""What a multi-node cluster must share with the driver, checked before the loop starts.

    from mpo_online.run.cluster import check_shared_paths
    check_shared_paths({"loop.run_dir": "runs/x"}, {"model.path": "artifacts/tiny_vlm/config.json"})  # after ray.init

The loop passes paths, not bytes, between its processes: training workers read the policy and write the next one into
`<run_dir>/policies/`, and engine replicas load the checkpoint they start on and each published version from there.
On one node that is one filesystem. On a cluster every node that can run an engine replica or a training worker must
see the same files at the same absolute paths (NFS, a cluster filesystem, a bind mount of one volume). Without that,
the first symptom used to be a vLLM or DeepSpeed stack trace minutes into the run; this check turns it into one error
before anything starts: the driver writes a marker file with a random token into each directory, and a zero-CPU task
pinned to every other alive node reads it back at the same path.

Without shared storage (`resources.shared_storage: false`) the job skips this check: checkpoints then travel through
the object store (mpo_online/run/shipping.py) and the run directory stays on the driver's node.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from pathlib import Path

MARKER = ".mpo-online-shared-check"


class SharedStorageError(RuntimeError):
    """A node of the cluster does not see a directory or file the loop shares between nodes."""


def _digest(path: str) -> tuple[str, str | None]:
    """(this node's hostname, sha256 of the file at `path` here, or None when it cannot be read here)."""
    try:
        return socket.gethostname(), hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return socket.gethostname(), None


def check_shared_paths(run_dirs: dict[str, str | Path], files: dict[str, str | Path] | None = None, *,
                       timeout_s: float = 60.0) -> list[str]:
    """Raise SharedStorageError naming every (node, path) where another node does not see what the driver sees.

    run_dirs: {config key: a directory the loop writes} (created if missing; the check writes a marker with a random
    token into it and deletes it after). files: {config key: a file that exists here} (e.g. the base checkpoint's
    config.json), compared by content. Nodes that are not alive are skipped, and so is the driver's own node.
    Returns the ids of the nodes checked (empty on a one-node cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return []
    probes, markers = {}, []
    for key, d in run_dirs.items():
        d = Path(d).resolve()
        d.mkdir(parents=True, exist_ok=True)
        marker = d / MARKER
        marker.write_text(secrets.token_hex(16))
        markers.append(marker)
        probes[key] = marker
    for key, f in (files or {}).items():
        probes[key] = Path(f).resolve()
    want = {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in probes.items()}
    read = ray.remote(num_cpus=0, max_retries=0)(_digest)
    try:
        futures = {(n["NodeID"], n.get("NodeManagerAddress", "?"), key): read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(path))
            for n in others for key, path in probes.items()}
        results = dict(zip(futures, ray.get(list(futures.values()), timeout=timeout_s)))
    finally:
        for m in markers:
            try:
                os.unlink(m)
            except OSError:
                pass
    bad = [f"node {node_id[:12]} ({ip}, host {host}) does not see {key} = "
           f"{probes[key].parent if probes[key].name == MARKER else probes[key]}"
           for (node_id, ip, key), (host, seen) in results.items() if seen != want[key]]
    if bad:
        raise SharedStorageError(
            "every node that runs engines or training workers must see the run's files at the same absolute paths "
            "(shared storage such as NFS); " + "; ".join(bad)
            + ". Mount them on every node, or set resources.shared_storage=false to ship checkpoints through Ray's "
            "object store instead (README: On a cluster).")
    return [n["NodeID"] for n in others]
