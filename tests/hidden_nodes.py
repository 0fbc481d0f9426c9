"""Ray worker nodes that do not see a directory the driver sees: the nearest one machine gets to cluster nodes without
shared storage (tests/test_cluster.py, tests/test_online_loop.py).

    why = cannot_hide(d)                    # None when this machine allows it (root: a mount namespace + tmpfs)
    with hidden_node(gcs_address, d, {"engine": 2}, log=tmp / "engine.log") as node_pid: ...

A node is `ray start --address=... --block` run by `unshare -m` after a tmpfs is mounted over the directory: its
raylet and every worker it starts see an empty, private directory there; the code and the venv stay visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def cannot_hide(d: Path) -> str | None:
    """None when `unshare -m` + a tmpfs mount work here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {d}"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -m + mount refused: {probe.stderr.strip()[:200]}"


@contextlib.contextmanager
def hidden_node(address: str, hide: Path, resources: dict, *, log: Path, num_cpus: int = 1, timeout_s: float = 120):
    """A node joining the cluster at `address` (GCS host:port) that sees an empty tmpfs at `hide`, offering
    `num_cpus` CPUs and the custom `resources`; yields its `ray start` pid once the node is up, stops it after."""
    cmd = (f"mount -t tmpfs tmpfs {hide} && exec {RAY} start --address={address} --num-cpus={num_cpus} "
           f"--resources='{json.dumps(resources)}' --block --disable-usage-stats")
    with open(log, "wb") as out:
        node = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        # `ray start --block` prints this once the node has registered (one node at a time: two starting at once
        # on this machine timed out)
        while b"block forever" not in log.read_bytes():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the hidden node did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield node.pid
    finally:
        os.killpg(node.pid, 15)
        node.wait(timeout=60)
