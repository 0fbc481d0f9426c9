"""`PolicyServer`: Ray Serve LLM's `LLMServer` (one vLLM engine per replica) plus versioned weights and a batch path.

Deployed by `serving.app.build_policy_app` through `LLMConfig(server_cls=PolicyServer)`; never started by hand.
On top of LLMServer it adds:

- versioning: a `ReplicaSync` (serving.weight_sync) admission gate around every request, and a background task
  that long-polls the `PolicyRegistry` and hot-swaps weights through the vLLM worker extension. Before the replica
  serves its first request it loads the latest published version (restarts and scale-ups join at the current one).
- version tags: OpenAI responses from `chat`/`completions` carry `model: "<model_id>@v<version>"` (the ingress copies
  it into the `x-policy-version` header); `generate_batch` results carry `version`.
- `generate_batch(requests)`: the rollout hot path. Called through a deployment handle (no HTTP, no OpenAI JSON),
  it renders each request with the engine's own renderer and submits all of them to the AsyncLLM at once with
  final-only outputs, so the engine batches them like offline `LLM.generate` would.

`self.engine._engine_client` (the vLLM AsyncLLM) is a private attribute of Ray's VLLMEngine: LLMServer exposes no
raw-generate method, and going through its OpenAI `chat` per rollout would cost JSON/pydantic work per request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from typing import Any

from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm import LLMServer

from serving.validation import (
    InputError,
    Limits,
    check_messages,
    check_sampling,
    check_token_fields,
    decode_image_bytes,
)
from serving.weight_sync import ReplicaSync, ReplicaUnavailable, get_registry

MAX_FAILED_SWAPS = 3  # consecutive failed reloads before check_health reports the replica dead (Serve replaces it)
DEFAULT_MAX_TOKENS = 128
RPC_BYTES_LIMIT = 64 << 20  # larger weight blobs are staged to a file: collective_rpc moves ~40 MB/s of bytes


class PolicyServer(LLMServer):
    async def __init__(self, llm_config, *, registry_name: str, limits: dict | None = None,
                       cpu_cores_per_replica: int | None = None, **kwargs):
        ctx = serve.get_replica_context()
        if cpu_cores_per_replica:
            _bind_cores(ctx, cpu_cores_per_replica)  # before the engine processes are spawned
        await super().__init__(llm_config, **kwargs)
        self._model_id = llm_config.model_id
        self._limits = Limits(**(limits or {}))
        self._visible_ids: dict[int, bool] = {}  # token id -> kept by detokenization (see _visible)
        self._replica_id = ctx.replica_id.unique_id
        self._sync = ReplicaSync(self._replica_id, get_registry(registry_name), self._reload, self._reset_caches)
        await self._sync.sync_once()  # join at the latest published version before serving anything
        self._sync.start()

    # ------------------------------------------------------------------ weights
    async def _reload(self, source: dict) -> None:
        if "path" in source:
            await self.collective_rpc("mpo_reload_from_path", kwargs={"weights_dir": source["path"]})
            return
        blob = await source["ref"][0]  # uint8 array, zero-copy view of the object store
        if blob.nbytes <= RPC_BYTES_LIMIT:
            await self.collective_rpc("mpo_reload_from_bytes", args=(blob.tobytes(),))
            return
        # Big blobs: one memcpy into a RAM-backed file, then the fast directory path in the workers.
        stage = tempfile.mkdtemp(prefix="mpo-weights-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            with open(os.path.join(stage, "model.safetensors"), "wb") as f:
                f.write(memoryview(blob))
            del blob
            await self.collective_rpc("mpo_reload_from_path", kwargs={"weights_dir": stage})
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    async def _reset_caches(self) -> None:
        # Prefix-cache KV blocks and cached vision-encoder outputs were computed by the old weights. The workers'
        # reload already dropped their own encoder/multimodal caches, so the engine-side bookkeeping of those
        # caches must be dropped too, or the scheduler believes an image is still encoded ("Encoder cache miss").
        llm = self.engine._engine_client
        # The gate has drained our requests, but a request aborted by a disconnecting client can still be
        # finishing inside the engine for a step; vLLM refuses (returns False) to reset while requests run.
        for _ in range(200):
            if await llm.reset_prefix_cache():
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("prefix cache could not be reset: requests still running in the engine")
        await llm.reset_encoder_cache()
        await llm.reset_mm_cache()

    async def weights_fingerprint(self) -> list[str]:
        """Per-worker digest of the loaded weights (tests compare it across versions)."""
        return await self.collective_rpc("mpo_fingerprint")

    async def replica_status(self) -> dict:
        return {"replica_id": self._replica_id, "version": self._sync.version, "error": self._sync.error}

    async def check_health(self) -> None:
        await super().check_health()
        if self._sync.failures >= MAX_FAILED_SWAPS:
            raise RuntimeError(f"weight reload failed {self._sync.failures} times: {self._sync.error}")

    async def __del__(self):
        sync = getattr(self, "_sync", None)
        if sync is not None:
            await sync.stop()
        await super().__del__()

    # ------------------------------------------------------------------ OpenAI path (called by the ingress)
    async def chat(self, request, raw_request_info=None):
        # Return a lazy generator: the gate must be entered *before* LLMServer.chat builds its stream, because
        # the streaming Batcher starts consuming the engine as soon as it is constructed.
        return self._versioned(LLMServer.chat, request, raw_request_info)

    async def completions(self, request, raw_request_info=None):
        return self._versioned(LLMServer.completions, request, raw_request_info)

    async def _versioned(self, method, request, raw_request_info):
        from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

        try:
            async with self._sync.admit() as version:
                tag = f"{self._model_id}@v{version}"
                stream = await method(self, request, raw_request_info)
                async for item in stream:
                    yield _retag(item, self._model_id, tag)
        except ReplicaUnavailable as exc:
            yield ErrorResponse(error=ErrorInfo(message=str(exc), type="ServiceUnavailable", code=503))

    # ------------------------------------------------------------------ rollout hot path (handles only)
    async def generate_batch(self, requests: list[dict]) -> list[dict]:
        """Run every request concurrently on this replica's engine; one result per request, in order.

        Request: {"messages": [...]} (OpenAI content parts; images as `image_url` data URLs or
        {"type": "image", "image": <png bytes>}) or {"prompt": <templated str>, "images": [<png bytes>]},
        plus optional "n", "temperature", "top_p", "max_tokens", "seed", and:
          "logprobs": true         each output also carries "token_ids" (as sampled; a final EOS is included when
                                   generation stopped on it), "logprobs" (per token: the engine's log-prob of the
                                   sampled token) and "text_offsets" (per token: where its text ends in "text";
                                   null when the per-token texts do not rebuild "text" exactly)
          "return_prompt_token_ids": true   the result carries "prompt_token_ids" (images expanded)
          "assistant_prefix_token_ids": [...]   with text-only "messages": appended to the rendered chat prompt
                                   (generation prompt included), so the sample continues exactly those tokens
        Result: {"version", "outputs": [{"text", "n_tokens", "finish_reason", ...}], "prompt_tokens", "error",
        "replica"} ("replica": the id of the replica that served it; for tests and debugging).
        """
        try:
            async with self._sync.admit() as version:
                results = await asyncio.gather(*(self._generate_one(r) for r in requests))
        except ReplicaUnavailable as exc:
            return [{"version": self._sync.version, "outputs": [], "prompt_tokens": 0, "error": str(exc),
                     "replica": self._replica_id} for _ in requests]
        for r in results:
            r["version"], r["replica"] = version, self._replica_id
        return results

    async def _generate_one(self, req: dict) -> dict[str, Any]:
        try:
            llm = self.engine._engine_client
            check_token_fields(req, self._limits)
            params = _sampling_params(req, self._limits)
            engine_input = await self._render(llm.renderer, req)
            final = None
            async for out in llm.generate(engine_input, params, request_id=f"mpo-{uuid.uuid4().hex}"):
                final = out
            outputs = [self._output(o, llm.renderer, bool(req.get("logprobs"))) for o in final.outputs]
            result = {"outputs": outputs, "prompt_tokens": len(final.prompt_token_ids or ()), "error": None}
            if req.get("return_prompt_token_ids"):
                result["prompt_token_ids"] = list(final.prompt_token_ids or ())
            return result
        except asyncio.CancelledError:
            raise
        except InputError as exc:
            return {"outputs": [], "prompt_tokens": 0, "error": f"invalid request ({exc.param}): {exc.message}"}
        except Exception as exc:  # one bad request must not fail the batch
            return {"outputs": [], "prompt_tokens": 0, "error": f"{type(exc).__name__}: {exc}"}

    def _output(self, o, renderer, logprobs: bool) -> dict[str, Any]:
        """One vLLM CompletionOutput -> a plain dict (see generate_batch)."""
        out = {"text": o.text, "n_tokens": len(o.token_ids), "finish_reason": o.finish_reason or "length"}
        if not logprobs:
            return out
        ids = list(o.token_ids)
        # With SamplingParams(logprobs=0) position i holds {sampled id: Logprob} (vLLM 0.32 adds the sampled token
        # even when it is not in the top-k), as a list of dicts or a FlatLogprobs; both index the same way.
        steps = [o.logprobs[i][t] for i, t in enumerate(ids)]
        out["token_ids"] = ids
        out["logprobs"] = [float(lp.logprob) for lp in steps]
        pieces = [(lp.decoded_token or "") if self._visible(renderer, t) else "" for lp, t in zip(steps, ids)]
        out["text_offsets"] = text_offsets(o.text, pieces)
        return out

    def _visible(self, renderer, token_id: int) -> bool:
        """Whether detokenization keeps this token's text (skip_special_tokens drops <pad>, <image>, EOS, ...)."""
        if token_id not in self._visible_ids:
            text = renderer.get_tokenizer().decode([token_id], skip_special_tokens=True)
            self._visible_ids[token_id] = text != ""
        return self._visible_ids[token_id]

    async def _render(self, renderer, req: dict):
        """Request -> the engine input vLLM's own chat / completion paths would build (template, images, tokens)."""
        from vllm.inputs import TokensPrompt
        from vllm.renderers.params import ChatParams

        tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        if "messages" in req:
            check_messages(req["messages"], self._limits)
            messages = [_inline_images(m, self._limits) for m in req["messages"]]
            chat_params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
            _, (engine_input,) = await renderer.render_chat_async([messages], chat_params, tok_params)
            prefix = req.get("assistant_prefix_token_ids")
            if prefix is None:
                return engine_input
            if engine_input.get("type") != "token":  # multimodal inputs carry placeholder ranges we would shift
                raise InputError(400, "assistant_prefix_token_ids needs text-only messages", "messages")
            # Dropout-NTP continuations: the prompt's own token ids + the given ids, re-entered as a tokens prompt
            # (no retokenization of the prefix: the continuation is conditioned on exactly these tokens).
            ids = list(engine_input["prompt_token_ids"]) + list(prefix)
            (engine_input,) = await renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=ids)], tok_params)
            return engine_input
        if "prompt" in req:
            prompt = req["prompt"]
            if not isinstance(prompt, str):
                raise InputError(400, "prompt must be a string (already templated)", "prompt")
            if len(prompt) > self._limits.max_prompt_chars:
                raise InputError(400, f"prompt has {len(prompt)} characters; the limit is "
                                      f"{self._limits.max_prompt_chars}", "prompt")
            item: dict[str, Any] = {"prompt": prompt}
            images = [decode_image_bytes(b, self._limits.max_image_bytes, "images") for b in req.get("images") or []]
            if images:
                item["multi_modal_data"] = {"image": images}
            (engine_input,) = await renderer.render_cmpl_async([item], tok_params)
            return engine_input
        raise InputError(400, "a request needs 'messages' or 'prompt'", "messages")


class LocalModelCallback(CallbackBase):
    """Skip ray.serve.llm's per-node "download the model" task when the model is a local directory; with
    `boot_registry` (no shared storage) first fetch that directory to this node when it is not here.

    That task starts another Ray worker process per replica and imports vLLM in it (~15-20 s on 2 busy cores) only
    to return the same path. `ctx.run_init_node` is the documented switch for it (ray.llm callback protocol).
    """

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        registry = self.kwargs.get("boot_registry")
        if registry and isinstance(source, str) and not os.path.isdir(source):
            # no shared storage: this node gets the boot checkpoint, at the driver's path, from the app's registry
            import ray

            from mpo_online.run.shipping import ensure_local
            boot = await get_registry(registry, create=False).boot_files.remote()
            if not boot:
                raise RuntimeError(f"{source} is not on this node and the registry {registry} has no boot files")
            # in a thread: the fetch (only by the first replica of the node, under ensure_local's lock) and the
            # write of a checkpoint's bytes would otherwise hold the replica's event loop
            digest, ref = boot
            await asyncio.to_thread(ensure_local, source, digest, lambda: ray.get(ref))
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False


def _bind_cores(ctx, k: int) -> None:
    """Pin this replica's vLLM-CPU compute threads to its own k cores (local rank r -> cores r*k .. r*k+k-1).

    vLLM's "auto" binding gives every engine on a node the same cores (core 0 on a 2-core machine), so replicas
    sharing a node would share one core; explicit disjoint lists spread them.
    """
    rank = getattr(ctx.rank, "local_rank", ctx.rank)
    n = os.cpu_count() or 1
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str((int(rank) * k + i) % n) for i in range(k))


def _sampling_params(req: dict, limits: Limits):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    fields = {k: req.get(k) for k in ("n", "temperature", "top_p", "max_tokens", "seed")}
    check_sampling(fields, limits)
    kwargs = {k: v for k, v in fields.items() if v is not None}
    kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    if req.get("logprobs"):
        # 0 = only the sampled token's log-prob. vLLM's default logprobs_mode (raw_logprobs) takes it from the
        # log-softmax of the unscaled logits, before temperature / top-p: the policy's own log pi(token | context),
        # whatever the sampling settings. That is what the trainer recomputes, so the default is kept on purpose.
        kwargs["logprobs"] = 0
    # FINAL_ONLY: one output object per request instead of one per generated token.
    return SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)


def text_offsets(text: str, pieces: list[str]) -> list[int] | None:
    """Per token, the offset in `text` where its text ends (pieces: each token's text, "" for dropped ones), or None
    when the pieces do not concatenate to `text` (e.g. a tokenizer whose per-token texts differ from its decode)."""
    ends, at = [], 0
    for piece in pieces:
        if not text.startswith(piece, at):
            return None
        at += len(piece)
        ends.append(at)
    return ends if at == len(text) else None


def _inline_images(message: dict, limits: Limits) -> dict:
    """Raw-bytes image parts -> `image_pil` parts vLLM's chat parser accepts (skips a base64 round trip)."""
    content = message.get("content")
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        return message
    parts = [{"type": "image_pil", "image_pil": decode_image_bytes(bytes(p["image"]), limits.max_image_bytes)}
             if p.get("type") == "image" else p for p in content]
    return {**message, "content": parts}


def _retag(item, model_id: str, tag: str):
    """Replace the served model name by `<model_id>@v<version>` in a response object or SSE chunk(s)."""
    if isinstance(item, list):
        return [_retag(x, model_id, tag) for x in item]
    if isinstance(item, str):  # "data: {...}\n\n" chunks: the JSON carries `"model":"<id>"`
        return item.replace(f'"model":"{model_id}"', f'"model":"{tag}"')
    if hasattr(item, "model") and getattr(item, "model", None) == model_id:
        item.model = tag
    return item
