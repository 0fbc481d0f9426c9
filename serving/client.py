"""`PolicyClient`: the training loop's view of the serving app (rollouts, weight publishing, versions) via handles.

    client = serving.app.start_policy_server(model_dir, replicas=2)      # or PolicyClient("mpo-policy")
    results = client.generate([{"messages": [...], "n": 8, "temperature": 1.0, "max_tokens": 96}])
    client.publish(3, "runs/x/ckpt_3")        # returns when every live replica serves v3
    client.current_version(), client.replica_versions()

The client holds only names (app, deployment, registry), so it pickles into Ray Data tasks/actors and rebuilds its
deployment handle on first use there. Sync methods (`generate`, `publish`, ...) are for plain code and Ray tasks;
inside an event loop (async actors) use the `*_async` twins. This module imports Ray lazily: `import mpo_online`
stays light.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

DEFAULT_APP = "mpo-policy"
# A call whose replica died with it in flight is sent again (to a live replica, or to the replacement Serve starts,
# which serves the latest published version) up to this many times. Safe to repeat: a call's results are taken once,
# and seeded requests sample the same tokens wherever they run.
REPLICA_DIED_RETRIES = 3


def _replica_died_errors() -> tuple[type[BaseException], ...]:
    """What a deployment handle raises for a call whose replica died (or became unreachable) with it in flight."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    return ActorDiedError, ActorUnavailableError


def server_deployment_name(model_id: str) -> str:
    """Name of the PolicyServer deployment (same rule as ray.serve.llm's builder, with our prefix)."""
    return "PolicyServer:" + model_id.replace("/", "--").replace(".", "_")


def registry_name_for(app_name: str) -> str:
    return f"{app_name}-registry"


def running_replicas(app_name: str, deployment_name: str) -> int:
    """RUNNING replicas of a deployment according to the Serve controller (0 when the app is not there)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    dep = app.deployments.get(deployment_name) if app is not None else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0


async def running_replicas_async(app_name: str, deployment_name: str) -> int:
    return await asyncio.to_thread(running_replicas, app_name, deployment_name)


class PolicyClient:
    def __init__(self, app_name: str = DEFAULT_APP, *, model_id: str = "policy", base_url: str | None = None):
        self.app_name, self.model_id = app_name, model_id
        self.deployment_name = server_deployment_name(model_id)
        self.registry_name = registry_name_for(app_name)
        self.base_url = base_url  # the OpenAI endpoint (http://host:port/v1), for humans and evals
        self._handle = None
        self._registry = None
        self.retried = 0  # calls sent again because their replica died (this process's count)
        self.reused = False  # start_policy_server attached to an app already running this deployment

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_registry")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _handle=None, _registry=None)

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment_name, self.app_name)
        return self._handle

    @property
    def registry(self):
        if self._registry is None:
            from serving.weight_sync import get_registry

            self._registry = get_registry(self.registry_name, create=False)
        return self._registry

    # ------------------------------------------------------------------ rollouts
    def _split(self, requests: list[dict], chunks: int | None) -> list[list[dict]]:
        if chunks is None:  # one slice per live replica, so the router spreads one call per replica
            chunks = max(1, len(self.replica_versions()))
        chunks = max(1, min(chunks, len(requests)))
        size = -(-len(requests) // chunks)
        return [requests[i:i + size] for i in range(0, len(requests), size)]

    def generate(self, requests: list[dict], *, chunks: int | None = None, progress=None) -> list[dict]:
        """Generate for every request through the PolicyServer handles; results in request order.

        Each result: {"version", "outputs": [{"text", "n_tokens", "finish_reason"}], "prompt_tokens", "error"};
        requests with "logprobs": true also get each output's "token_ids", "logprobs" and "text_offsets" (see
        serving.server.PolicyServer.generate_batch for these and the other token-level request fields).
        `progress(done, total)` is called as the chunks' results arrive (all chunks are in flight at once). A chunk
        whose replica dies with it in flight is sent again (REPLICA_DIED_RETRIES; counted in `self.retried`).
        """
        if not requests:
            return []
        parts = self._split(requests, chunks)
        responses = [self.handle.generate_batch.remote(c) for c in parts]
        results = []
        for part, resp in zip(parts, responses):
            for attempt in range(REPLICA_DIED_RETRIES + 1):
                try:
                    results += resp.result()
                    break
                except _replica_died_errors() as exc:
                    self._replica_died(attempt, exc)
                    resp = self.handle.generate_batch.remote(part)
            if progress is not None:
                progress(len(results), len(requests))
        return results

    async def generate_async(self, requests: list[dict], *, chunks: int | None = None) -> list[dict]:
        if not requests:
            return []
        outs = await asyncio.gather(*(self._call_async(c) for c in self._split(requests, chunks)))
        return [r for part in outs for r in part]

    async def _call_async(self, part: list[dict]) -> list[dict]:
        for attempt in range(REPLICA_DIED_RETRIES + 1):
            try:
                return await self.handle.generate_batch.remote(part)
            except _replica_died_errors() as exc:
                self._replica_died(attempt, exc)

    def _replica_died(self, attempt: int, exc: BaseException) -> None:
        """A call's replica died on attempt `attempt` (0-based): count the retry, or give up after the last one."""
        if attempt == REPLICA_DIED_RETRIES:
            raise RuntimeError(f"the replicas serving a call died {attempt + 1} times in a row") from exc
        self.retried += 1

    # ------------------------------------------------------------------ weights and versions
    def publish(self, version: int, weights_dir: str | Path | None = None, *, weights_bytes: bytes | None = None,
                timeout_s: float = 300.0) -> dict:
        """Make every live replica serve `version` (a checkpoint directory, or safetensors bytes for multi-node).

        Returns {"version", "seconds", "replicas"}; raises weight_sync.PublishTimeout naming the laggards.
        """
        return asyncio.run(self.publish_async(version, weights_dir, weights_bytes=weights_bytes, timeout_s=timeout_s))

    async def publish_async(self, version: int, weights_dir: str | Path | None = None, *,
                            weights_bytes: bytes | None = None, timeout_s: float = 300.0) -> dict:
        from serving.weight_sync import make_source, publish_and_wait

        source = make_source(weights_dir=weights_dir, weights_bytes=weights_bytes)
        return await publish_and_wait(self.registry, int(version), source,
                                      lambda: running_replicas_async(self.app_name, self.deployment_name), timeout_s)

    def current_version(self) -> int:
        """The latest published version (what every replica serves once the last publish returned)."""
        import ray

        return int(ray.get(self.registry.status.remote())["desired"]["version"])

    def replica_versions(self) -> dict[str, int | None]:
        """Live replica id -> the version it serves."""
        import ray

        return {rid: s["version"] for rid, s in ray.get(self.registry.status.remote())["replicas"].items()}

    def status(self) -> dict[str, Any]:
        import ray

        return ray.get(self.registry.status.remote())

    def pause(self, timeout_s: float = 60.0) -> None:
        """Every replica stops admitting requests (in-flight ones finish; new ones wait) until `resume()`.
        Returns once every live replica reports paused."""
        self._set_paused(True, timeout_s)

    def resume(self, timeout_s: float = 60.0) -> None:
        self._set_paused(False, timeout_s)

    def _set_paused(self, paused: bool, timeout_s: float) -> None:
        import time

        import ray

        ray.get(self.registry.set_paused.remote(paused))
        want = "paused" if paused else "serving"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {rid: s["state"] for rid, s in self.status()["replicas"].items()}
            if states and all(st == want for st in states.values()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"replicas did not all become {want}: {states}")
