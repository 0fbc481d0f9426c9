"""The training progress channel: rank 0 of a training call rewrites one small JSON file as it goes (stage, step,
total), and the loop's console polls it (mpo_online.run.console.train_progress_watcher). A file, not a Ray call:
it works from any worker on any node that shares the storage directory, and costs nothing when nobody reads it.
(Without shared storage the training session relays rank 0's fields through its job board and the driver writes
the file.)"""

from __future__ import annotations

import json
import os
import time

TRAIN_PROGRESS_FILE = "progress.json"


def report_train_progress(path, **fields) -> None:
    """Rewrite the progress file (atomically) with `fields`, e.g. stage="train", step=3, total=30. A no-op for
    path None (ranks other than 0); a callable instead of a path gets the fields (a worker on a node without the
    driver's files sends them to the driver, which writes the file: mpo_online/trainer/session.py). Never raises:
    progress must not break training."""
    if not path:
        return
    if callable(path):
        try:
            path(**fields)
        except Exception:
            pass
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**fields, "time": time.time()}, f)
        os.replace(tmp, path)
    except OSError:
        pass
