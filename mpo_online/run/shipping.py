"""Checkpoint directories shipped between nodes through Ray's object store, for clusters without shared storage.

    packed = pack_dir("runs/x/policies/v0003")          # {"digest": sha256, "files": {name: bytes}}
    ensure_local("runs/x/policies/v0003", packed["digest"], lambda: packed)   # on another node: the same files
                                                                              # at the same absolute path

With `resources.shared_storage: false` the loop never assumes that another node sees the driver's files. What a node
needs is shipped to it as bytes: the training workers get the policy (and reference) directory of each call and
send the new policy back to the driver (mpo_online/trainer/session.py); an engine replica gets the checkpoint it
boots on from the app's registry (serving/server.py LocalModelCallback), and every later version as safetensors
bytes through the publisher (serving/weight_sync.py). The run directory itself stays on the driver's node.

A shipped copy is written where the driver has the directory, so paths in configs, records and logs mean the same
on every node. `ensure_local` leaves a directory alone when it exists without a shipped-copy marker (it is the
original: that node shares the driver's filesystem) or with the marker of the same digest; a copy with another
digest is replaced. Checkpoint directories are flat (config, tokenizer, processor, safetensors), so only the
directory's own files are shipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

MARKER = ".mpo-shipped"  # in a shipped copy: the digest of what was shipped


def pack_dir(path: str | Path) -> dict:
    """The regular files directly in `path` (not the shipped-copy marker) as {"digest", "files": {name: bytes}}."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot ship {path}: not a directory on the driver's node")
    files = {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file() and f.name != MARKER}
    h = hashlib.sha256()
    for name, data in files.items():
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return {"digest": h.hexdigest(), "files": files}


def is_here(path: str | Path, digest: str) -> bool:
    """`path` needs nothing shipped: the driver's own directory (no marker), or a shipped copy of `digest`."""
    marker = Path(path) / MARKER
    return Path(path).is_dir() and (not marker.exists() or marker.read_text() == digest)


def ensure_local(path: str | Path, digest: str, fetch: Callable[[], dict]) -> bool:
    """Make `path` hold the shipped directory of `digest` on this node, unless it already does; True when files
    were written. `fetch()` returns the pack (e.g. `ray.get` of its ref): called only when the files are missing.

    Callers on one node (the training workers of a call) take turns on a lock file beside `path`: the first fetches
    and writes, the others then find its copy and keep it (replacing it while the first loaded from it once fed that
    worker a half-deleted processor config)."""
    import fcntl

    path = Path(path)
    if is_here(path, digest):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.ship-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_here(path, digest):
            return False
        packed = fetch()
        if packed["digest"] != digest:
            raise ValueError(f"{path}: the pack's digest {packed['digest'][:12]} is not the expected {digest[:12]}")
        tmp = path.with_name(f".{path.name}.ship-{uuid.uuid4().hex[:8]}")
        write_files(tmp, packed["files"])
        (tmp / MARKER).write_text(digest)
        if path.is_dir():  # a shipped copy of other content (the same path, a round redone)
            shutil.rmtree(path)
        os.rename(tmp, path)
    return True


def remove_copy(path: str | Path) -> None:
    """Delete a shipped copy (a directory with the marker) and its lock file; the driver's own is never touched."""
    path = Path(path)
    if (path / MARKER).exists():
        shutil.rmtree(path, ignore_errors=True)
        path.with_name(f".{path.name}.ship-lock").unlink(missing_ok=True)


def write_files(path: str | Path, files: dict[str, bytes]) -> None:
    """Write `files` {name: bytes} into directory `path` (created; no marker: the caller owns what it is)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a flat file name: {name!r}")
        (path / name).write_bytes(data)


def weights_bytes(path: str | Path) -> bytes:
    """The single safetensors file of a checkpoint directory (what a replica reloads from bytes)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{path}: expected one .safetensors file to publish as bytes, found {len(files)}")
    return files[0].read_bytes()
