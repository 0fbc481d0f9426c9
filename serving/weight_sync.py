"""Versioned weight hot-swap for the serving replicas: worker extension, registry actor, replica-side sync, publisher.

The protocol (why each piece exists):

- `WeightSyncExtension` is mixed into every vLLM worker process (`worker_extension_cls=
  "serving.weight_sync.WeightSyncExtension"`); a replica calls it through `collective_rpc`, so tensor-parallel
  shards all reload. On CPU the worker's own `reload_weights` is the only path that works after startup (linear weights
  are repacked at load; `model.load_weights` into them fails).
- `PolicyRegistry` is a named, detached Ray actor holding the *desired state* (version, weight source, paused) plus
  what each replica reports. Serve has no public "call every replica" API, so instead each replica long-polls the
  registry: `poll()` awaits an asyncio.Event until the desired state changes, which makes a publish reach every
  replica within one round trip, and a replica that starts later (restart, scale-up) reads the latest state before
  it serves its first request.
- `ReplicaSync` runs inside a replica: an admission gate (requests enter/leave; a swap closes the gate, waits for
  in-flight requests to finish on the old weights, reloads, clears the prefix cache, reopens) and the poll loop.
  A request's version is read when it is admitted and cannot change until it leaves, so every response is produced
  by exactly one version. A failed reload keeps the gate closed (new requests get an error, never mixed weights)
  and is retried with backoff.
- `publish_and_wait()` sets the desired version and returns when every live replica reports it, or raises
  `PublishTimeout` naming the laggards.

Nothing here imports Ray or vLLM at module level: the extension is imported inside vLLM's spawned workers and the
registry class is made a Ray actor only by `get_registry()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

REGISTRY_NAMESPACE = "mpo_online"
STALE_AFTER_S = 30.0  # a replica silent for longer (no poll, no report) is considered gone


class PublishTimeout(TimeoutError):
    """Not every live replica reported the published version in time; `laggards` maps replica id -> its status."""

    def __init__(self, version: int, laggards: dict[str, dict], expected: int):
        self.version, self.laggards, self.expected = version, laggards, expected
        detail = ", ".join(f"{rid}: v{s.get('version')} {s.get('state')} {s.get('error') or ''}".strip()
                           for rid, s in laggards.items()) or "no replica reported"
        super().__init__(f"version {version} not live on all {expected} replicas: {detail}")


class ReplicaUnavailable(RuntimeError):
    """The replica cannot serve: its last weight reload failed and has not been retried successfully yet."""


# --------------------------------------------------------------------------------------------------------------
# Worker extension (runs in vLLM worker processes)
# --------------------------------------------------------------------------------------------------------------

class WeightSyncExtension:
    """Methods added to each vLLM worker; `self` is the worker (it has `reload_weights` and `model_runner`)."""

    def mpo_reload_from_path(self, weights_dir: str) -> float:
        """Reload every weight from the safetensors files of a checkpoint directory; returns seconds taken."""
        t0 = time.perf_counter()
        self.reload_weights(weights_path=str(weights_dir), is_checkpoint_format=True)
        return time.perf_counter() - t0

    def mpo_reload_from_bytes(self, blob: bytes) -> float:
        """Reload from an in-memory safetensors file (collective_rpc cannot carry tensors; bytes it can)."""
        from safetensors.torch import load

        t0 = time.perf_counter()
        tensors = load(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return time.perf_counter() - t0

    def mpo_fingerprint(self) -> str:
        """A cheap digest of the loaded weights (per-tensor float64 sums), to tell two weight sets apart in tests."""
        import hashlib

        import torch

        model = self.model_runner.get_model()
        h = hashlib.sha256()
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.numel() and t.is_floating_point():
                    h.update(f"{name}:{float(t.double().sum()):.10e};".encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Registry actor (one per Serve app)
# --------------------------------------------------------------------------------------------------------------

class PolicyRegistry:
    """Desired state + replica reports. Async actor: `poll` parks on an Event without blocking other calls.

    A weight source is `{"path": dir}` (a checkpoint directory every replica's node can read) or
    `{"ref": [ObjectRef], "sha256": hex}` (a safetensors file as a uint8 array in the object store, for replicas on
    other nodes; wrapped in a list so a poll returns the reference, not the 100s of MB).
    """

    def __init__(self, initial_version: int = 0):
        self._desired: dict[str, Any] = {"gen": 0, "version": initial_version, "source": None, "paused": False}
        self._changed = asyncio.Event()
        self._replicas: dict[str, dict[str, Any]] = {}
        self._app_key: str | None = None  # the deployment this registry's app runs (serving.app.app_key)

    def _bump(self, **fields) -> int:
        self._desired.update(fields, gen=self._desired["gen"] + 1)
        self._changed.set()
        self._changed = asyncio.Event()  # pollers hold the old event; they wake, a new one waits for the next change
        return self._desired["gen"]

    def set_version(self, version: int, source: dict) -> int:
        # Re-publishing the published version from the same checkpoint (path, or bytes of the same sha256) is a
        # no-op, so a resumed driver can repeat its last publish (the registry is detached and outlives a killed
        # driver). Anything else must move forward.
        if version == self._desired["version"] and _same_source(source, self._desired["source"]):
            return self._desired["gen"]
        if version <= self._desired["version"]:
            raise ValueError(f"version {version} is not newer than the published {self._desired['version']}")
        gen = self._bump(version=int(version), source=source)
        if "ref" in source:
            asyncio.get_running_loop().create_task(self._adopt(gen, source["ref"][0]))
        return gen

    async def _adopt(self, gen: int, ref) -> None:
        """Re-put published bytes from this actor so the registry owns them: a replica that (re)starts after the
        publishing driver exited can still fetch them. Replicas already polling use the publisher's copy."""
        import ray

        try:
            own = ray.put(await ref)
        except Exception:  # the publisher's copy stays the source
            return
        if self._desired["gen"] == gen:
            self._desired["source"] = {**self._desired["source"], "ref": [own]}

    async def set_boot_files(self, packed: list) -> None:
        """[ObjectRef of mpo_online.run.shipping.pack_dir(boot checkpoint)]: re-put here, so the registry owns it
        and a replica that (re)starts on a node without the driver's files can fetch it after the driver is gone."""
        import ray

        pack = await packed[0]
        self._boot_files = [pack["digest"], ray.put(pack)]

    def boot_files(self) -> list | None:
        """[digest, ObjectRef of the pack] (None before set_boot_files)."""
        return getattr(self, "_boot_files", None)

    def set_app_key(self, key: str) -> None:
        self._app_key = key

    def set_paused(self, paused: bool) -> int:
        return self._bump(paused=bool(paused))

    async def poll(self, replica_id: str, seen_gen: int, timeout_s: float) -> dict:
        """Return the desired state as soon as its generation exceeds `seen_gen`, or after `timeout_s` (heartbeat)."""
        self._touch(replica_id)
        if self._desired["gen"] <= seen_gen:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        self._touch(replica_id)
        return dict(self._desired)

    def report(self, replica_id: str, version: int, state: str, error: str | None = None,
               timings: dict | None = None) -> None:
        """A replica's state; `timings` of its last swap: drain_s, reload_s, reset_s, swap_s (their sum)."""
        entry = self._touch(replica_id)
        entry.update(version=version, state=state, error=error)
        if timings:
            entry.update(timings)

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def status(self) -> dict:
        now = time.time()
        live = {rid: dict(s, age_s=now - s["seen"]) for rid, s in self._replicas.items()
                if now - s["seen"] < STALE_AFTER_S}
        return {"desired": {k: v for k, v in self._desired.items() if k != "source"}, "replicas": live,
                "app_key": self._app_key}

    def _touch(self, replica_id: str) -> dict:
        entry = self._replicas.setdefault(replica_id, {"version": None, "state": "starting", "error": None})
        entry["seen"] = time.time()
        return entry


def _same_source(a: dict, b: dict | None) -> bool:
    """The same checkpoint directory, or safetensors bytes with the same sha256."""
    if b is None:
        return False
    if "path" in a:
        return a == b
    return "sha256" in a and a["sha256"] == b.get("sha256")


def get_registry(name: str, *, create: bool = True, initial_version: int = 0):
    """The named registry actor (detached: it lives as long as the Serve app, not as long as a driver).
    `initial_version`: the version of the checkpoint the replicas boot from (used when this call creates it)."""
    import ray

    if not create:
        return ray.get_actor(name, namespace=REGISTRY_NAMESPACE)
    import os

    # The actor's worker must import this module even when the project is not pip-installed.
    root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return ray.remote(PolicyRegistry).options(
        name=name, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=1000, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    ).remote(initial_version)


def make_source(*, weights_dir: str | Path | None = None, weights_bytes: bytes | None = None) -> dict:
    """A weight source for `PolicyRegistry.set_version`: a checkpoint directory, or safetensors bytes.

    Bytes go to the object store here, in the publisher, as a uint8 array: passing them to the registry as a call
    argument costs seconds for 100s of MB, and replicas read an array zero-copy from shared memory.
    """
    if (weights_dir is None) == (weights_bytes is None):
        raise ValueError("give exactly one of weights_dir / weights_bytes")
    if weights_bytes is not None:
        import numpy as np
        import ray

        return {"ref": [ray.put(np.frombuffer(weights_bytes, dtype=np.uint8))],
                "sha256": hashlib.sha256(weights_bytes).hexdigest()}
    d = Path(weights_dir).resolve()
    if not d.is_dir() or not any(d.glob("*.safetensors")):
        raise FileNotFoundError(f"{d} is not a directory with *.safetensors files")
    return {"path": str(d)}


async def publish_and_wait(registry, version: int, source: dict, expected_replicas: Callable[[], Awaitable[int]],
                           timeout_s: float = 300.0, poll_s: float = 0.02, recount_s: float = 1.0) -> dict:
    """Publish `version`; return once at least `await expected_replicas()` live replicas serve it.

    Returns {"version", "seconds", "replicas": {id: status}}; raises PublishTimeout naming the replicas that lag.
    The replica count is re-read every `recount_s` so a replica that dies mid-publish does not stall it.
    """
    t0 = time.perf_counter()
    await registry.set_version.remote(version, source)
    status: dict = {"replicas": {}}
    expected, counted_at = 1, -recount_s
    while True:
        now = time.perf_counter()
        if now - counted_at >= recount_s:
            expected, counted_at = max(1, await expected_replicas()), now
        status = await registry.status.remote()
        done = {rid: s for rid, s in status["replicas"].items() if _serves(s, version)}
        if len(done) >= expected:
            return {"version": version, "seconds": time.perf_counter() - t0, "replicas": done}
        if now - t0 > timeout_s:
            break
        await asyncio.sleep(poll_s)
    laggards = {rid: s for rid, s in status["replicas"].items() if not _serves(s, version)}
    raise PublishTimeout(version, laggards, expected)


def _serves(s: dict, version: int) -> bool:
    return s["version"] is not None and s["version"] >= version and s["state"] in ("serving", "paused")


# --------------------------------------------------------------------------------------------------------------
# Replica side: admission gate + poll loop
# --------------------------------------------------------------------------------------------------------------

class ReplicaSync:
    """Owns a replica's served version. `reload(source)` and `reset_cache()` are supplied by the server (they call
    the engine); everything else here is engine-agnostic asyncio, so it is unit-testable with fakes."""

    def __init__(self, replica_id: str, registry, reload: Callable[[dict], Awaitable[None]],
                 reset_cache: Callable[[], Awaitable[None]], poll_timeout_s: float = 5.0,
                 max_backoff_s: float = 30.0):
        self.replica_id, self.registry = replica_id, registry
        self._reload, self._reset_cache = reload, reset_cache
        self.poll_timeout_s, self.max_backoff_s = poll_timeout_s, max_backoff_s
        self.version = 0
        self.error: str | None = None  # set while the last reload failed: the replica refuses work
        self.failures = 0  # consecutive failed reloads (check_health uses it)
        self._cond = asyncio.Condition()
        self._active = 0
        self._swapping = False
        self._paused = False
        self._seen_gen = -1
        self._task: asyncio.Task | None = None

    # ---- admission ----
    @asynccontextmanager
    async def admit(self):
        """Hold while serving one request; yields the version that serves it. Waits while paused or swapping."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.error is not None or not (self._swapping or self._paused))
            if self.error is not None:
                raise ReplicaUnavailable(f"replica {self.replica_id} is not serving: {self.error}")
            self._active += 1
        try:
            yield self.version
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    async def _close_and_drain(self) -> None:
        async with self._cond:
            self._swapping = True
            await self._cond.wait_for(lambda: self._active == 0)

    async def _open(self) -> None:
        async with self._cond:
            self._swapping = False
            self._cond.notify_all()

    # ---- applying the desired state ----
    async def apply(self, desired: dict) -> None:
        """Bring this replica to `desired`; on a reload error keep the gate closed and raise."""
        if desired["version"] > self.version:
            if desired["source"] is None:  # the registry's first version is the checkpoint this engine booted from
                self.version = desired["version"]
            else:
                await self._swap(desired["version"], desired["source"])
        async with self._cond:
            self._paused = bool(desired["paused"])
            self._cond.notify_all()
        self._seen_gen = desired["gen"]
        await self._report("paused" if self._paused else "serving")

    async def _swap(self, version: int, source: dict) -> None:
        await self._report("swapping")  # awaited: an async actor may run un-awaited calls out of order
        t0 = time.perf_counter()
        await self._close_and_drain()  # in-flight requests finish on the old weights; new ones wait
        t1 = time.perf_counter()
        try:
            await self._reload(source)
            t2 = time.perf_counter()
            await self._reset_cache()  # cached KV blocks were computed by the old weights
        except BaseException as exc:
            async with self._cond:
                self.error = f"reload to v{version} failed: {type(exc).__name__}: {exc}"
                self.failures += 1
                self._cond.notify_all()  # waiting requests fail fast instead of hanging
            await self._report("failed", error=self.error)
            raise
        async with self._cond:
            self.version, self.error, self.failures = version, None, 0
        await self._open()
        t3 = time.perf_counter()
        await self._report("serving", timings={"drain_s": t1 - t0, "reload_s": t2 - t1, "reset_s": t3 - t2,
                                               "swap_s": t3 - t0})

    async def _report(self, state: str, error: str | None = None, timings: dict | None = None) -> None:
        try:
            await self.registry.report.remote(self.replica_id, self.version, state, error, timings)
        except Exception:  # the registry being briefly unreachable must not break serving
            pass

    # ---- the background loop ----
    async def sync_once(self) -> None:
        """Startup path: read the desired state now (no waiting) and apply it before the replica serves."""
        desired = await self.registry.poll.remote(self.replica_id, -1, 0.0)
        await self.apply(desired)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.registry.forget.remote(self.replica_id)
        except Exception:
            pass

    async def _loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                seen = self._seen_gen if self.error is None else -1  # after a failure, re-fetch and retry
                desired = await self.registry.poll.remote(self.replica_id, seen, self.poll_timeout_s)
                if desired["gen"] != self._seen_gen or self.error is not None:
                    await self.apply(desired)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
