"""`PolicyIngress`: Ray Serve LLM's `OpenAiIngress` with input checks, version headers and token-guarded admin routes.

Built into the app by `serving.app.build_policy_app` via `ray.serve.llm.ingress.make_fastapi_ingress` with the
endpoint map from `endpoint_map(admin=...)`. Routes:

    GET  /v1/models, /v1/models/{id}        (OpenAiIngress's, 503 + Retry-After until a replica serves: readiness)
    POST /v1/chat/completions, /v1/completions
         -> 400/404/413 with an OpenAI-style error body for bad input (serving.validation) before anything reaches
            an engine; responses carry `model: "<id>@v<version>"` and the header `x-policy-version: <version>`.
    GET  /admin/status, POST /admin/publish, /admin/pause, /admin/resume
         -> mounted only when an admin token is configured, and then require `Authorization: Bearer <token>`
            (401 without credentials, 403 with a wrong token). The training loop itself uses handles, not these.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at import time.
"""

import hmac
import json
import logging
import re

from fastapi import Request
from pydantic import BaseModel
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIHTTPException,
)
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving.validation import (
    InputError,
    Limits,
    check_completion_prompt,
    check_messages,
    check_prompt_chars,
    check_sampling,
)
from serving.weight_sync import PublishTimeout, get_registry, make_source, publish_and_wait

VERSION_HEADER = "x-policy-version"
_TAG_RE = re.compile(r'"model"\s*:\s*"[^"]*@v(\d+)"')
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# what the engine says when a prompt does not fit, inside ray.llm's "Internal exception: ..." wrapper
_CONTEXT_RE = re.compile(r"maximum context length is (\d+) tokens.*?(\d+) input tokens", re.S)
logger = logging.getLogger("ray.serve")


def endpoint_map(admin: bool) -> dict:
    """Method name -> FastAPI route decorator factory, the shape `make_fastapi_ingress` takes."""
    routes = {
        "models": lambda app: app.get("/v1/models"),
        "model_data": lambda app: app.get("/v1/models/{model:path}"),
        "completions": lambda app: app.post("/v1/completions"),
        "chat": lambda app: app.post("/v1/chat/completions"),
    }
    if admin:
        routes.update({
            "admin_status": lambda app: app.get("/admin/status"),
            "admin_publish": lambda app: app.post("/admin/publish"),
            "admin_pause": lambda app: app.post("/admin/pause"),
            "admin_resume": lambda app: app.post("/admin/resume"),
        })
    return routes


class PublishBody(BaseModel):
    version: int
    weights_dir: str
    timeout_s: float = 300.0


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


class PolicyIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, model_id: str, registry_name: str,
                 app_name: str, server_deployment: str, limits: dict, admin_token: str | None = None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._model_id, self._limits = model_id, Limits(**limits)
        self._registry_name, self._app_name, self._server_deployment = registry_name, app_name, server_deployment
        self._admin_token = admin_token

    # ------------------------------------------------------------------ OpenAI routes
    async def models(self) -> Response:
        """The model list, once a replica can serve (503 + Retry-After before: the ingress is up well before an
        engine has loaded, and a client polling this route for readiness must not be told to go ahead)."""
        if (waiting := await self._not_ready()) is not None:
            return waiting
        return await super().models()

    async def model_data(self, model: str) -> Response:
        if (waiting := await self._not_ready()) is not None:
            return waiting
        return await super().model_data(model)

    async def _not_ready(self) -> JSONResponse | None:
        replicas = (await get_registry(self._registry_name).status.remote())["replicas"]
        if any(r["state"] in ("serving", "paused") for r in replicas.values()):
            return None
        resp = _error(503, "no replica is serving yet (the engine is starting); retry shortly", kind="unavailable")
        resp.headers["Retry-After"] = "5"
        return resp

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        try:
            self._check_model(body.model)
            for msg in body.messages:  # pydantic leaves content parts as a one-shot iterator; make it a list
                if isinstance(msg, dict) and msg.get("content") is not None and not isinstance(msg["content"], str):
                    msg["content"] = list(msg["content"])
            check_messages(body.messages, self._limits)
            check_sampling(_sampling_fields(body), self._limits)
        except InputError as exc:
            return _error(exc.status, exc.message, exc.param)
        try:
            resp = await super().chat(body, request)
        except OpenAIHTTPException as exc:  # the engine refused it: ray.llm raises with its internal chain
            return _client_error(exc.status_code, exc.message)
        return await self._with_version_header(resp)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        try:
            self._check_model(body.model)
            check_completion_prompt(body.prompt, self._limits)
            if body.suffix:
                check_prompt_chars(len(body.suffix), self._limits)
            check_sampling(_sampling_fields(body), self._limits)
        except InputError as exc:
            return _error(exc.status, exc.message, exc.param)
        try:
            resp = await super().completions(body, request)
        except OpenAIHTTPException as exc:
            return _client_error(exc.status_code, exc.message)
        return await self._with_version_header(resp)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._model_id:
            raise InputError(404, f"unknown model {model!r}; this server serves {self._model_id!r}", "model")

    async def _with_version_header(self, resp: Response) -> Response:
        """Copy the replica's version tag (in the `model` field) into a response header."""
        if isinstance(resp, StreamingResponse):
            body_iter = resp.body_iterator
            try:
                first = await body_iter.__anext__()
            except StopAsyncIteration:
                return resp
            text = first if isinstance(first, str) else bytes(first).decode("utf-8", "replace")
            m = _TAG_RE.search(text)

            async def replay():
                yield first
                async for chunk in body_iter:
                    yield chunk

            headers = {VERSION_HEADER: m.group(1)} if m else {}
            return StreamingResponse(replay(), media_type=resp.media_type, status_code=resp.status_code,
                                     headers=headers)
        m = _TAG_RE.search(bytes(resp.body).decode("utf-8", "replace")) if hasattr(resp, "body") else None
        if m:
            resp.headers[VERSION_HEADER] = m.group(1)
        return resp

    # ------------------------------------------------------------------ admin routes (mounted only with a token)
    def _authorize(self, request: Request) -> JSONResponse | None:
        if self._admin_token is None:  # defensive: the routes are not mounted without a token
            return _error(404, "admin routes are disabled", kind="not_found")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return JSONResponse({"error": {"message": "admin route: send Authorization: Bearer <token>",
                                           "type": "unauthorized", "code": 401}},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(auth[7:].strip().encode(), self._admin_token.encode()):
            return _error(403, "admin route: wrong token", kind="forbidden")
        return None

    async def admin_status(self, request: Request) -> Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        return JSONResponse(await get_registry(self._registry_name).status.remote())

    async def admin_publish(self, body: PublishBody, request: Request) -> Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        from serving.client import running_replicas_async

        registry = get_registry(self._registry_name)
        try:
            source = make_source(weights_dir=body.weights_dir)
            result = await publish_and_wait(
                registry, body.version, source,
                lambda: running_replicas_async(self._app_name, self._server_deployment), body.timeout_s)
        except (FileNotFoundError, ValueError) as exc:  # a ValueError from the registry actor is a RayTaskError
            return _error(400, short_message(exc), "weights_dir" if isinstance(exc, FileNotFoundError) else "version")
        except PublishTimeout as exc:
            return _error(504, str(exc), kind="publish_timeout")
        return JSONResponse(json.loads(json.dumps(result, default=str)))

    async def admin_pause(self, request: Request) -> Response:
        return await self._set_paused(request, True)

    async def admin_resume(self, request: Request) -> Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool) -> Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        gen = await get_registry(self._registry_name).set_paused.remote(paused)
        return JSONResponse({"paused": paused, "gen": gen})


def short_message(exc: BaseException) -> str:
    """The message a client should see for an exception: the original error's own text (a RayTaskError wraps it
    with a traceback, pids and actor ids), one line, no terminal colours."""
    cause = getattr(exc, "cause", None)
    text = _ANSI_RE.sub("", str(cause if isinstance(cause, BaseException) else exc)).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__


def _client_error(status: int, message: str) -> JSONResponse:
    """An error from the engine path as ray.llm reports it (its message carries an internal exception chain: module
    paths, request ids, sometimes a traceback) -> what was wrong, in one sentence; the original goes to the log."""
    message = _ANSI_RE.sub("", str(message or ""))
    logger.warning("engine error returned to a client as %s: %s", status, message)
    m = _CONTEXT_RE.search(message)
    if m:
        return _error(400, f"the prompt has at least {m.group(2)} tokens; this model's context is {m.group(1)} tokens "
                           "(prompt and max_tokens together)", "messages")
    if status < 500 and message and "\n" not in message and not any(
            mark in message for mark in ("Traceback", "Internal exception", "ray.llm", "ray::", "File \"")):
        return _error(status, message)  # already a plain sentence
    return _error(status, "the engine could not process this request (the server log has the details)",
                  kind="invalid_request_error" if status < 500 else "internal_error")


def _sampling_fields(body) -> dict:
    return {k: getattr(body, k, None) for k in ("temperature", "top_p", "n", "max_tokens",
                                                  "max_completion_tokens", "seed")}
