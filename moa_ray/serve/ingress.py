"""The OpenAI-compatible HTTP ingress: a FastAPI app, and the Serve deployment that hosts it.

Routes (``model`` = a pipeline name):

* ``POST /v1/chat/completions`` - plain or ``stream: true`` (server-sent events of the
  final call's tokens, ending with ``data: [DONE]``); ``"moa": {"trace": true}`` adds the trace
  (``"full"``: with every call's text), ``"moa": {"stream_layers": true}`` streams each call as it ends;
* ``POST /v1/responses`` - OpenAI's Responses API, translated to and from chat completions
  (:mod:`moa_ray.serve.responses`), plain or streamed;
* ``GET /v1/models``, ``GET /v1/models/{id}`` - the served pipelines;
* ``GET /health`` - liveness for load balancers and Kubernetes probes (no key needed).

With ``server.cors`` set, browsers of the allowed origins may call it: preflights (``OPTIONS``) are answered
before any key is checked, as browsers send them without one. Off by default.

:func:`create_api` builds the app from a :class:`ChatService`, so it can be tested
without Ray; :class:`MoAIngress` builds the service from the config and the agent
deployments' handles inside its replica, where the API keys are read from the
environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from moa_ray.serve.access_log import REQUEST_ID_HEADER, AccessLog, outcome_of
from moa_ray.serve.auth import KeyVerifier, Redactor, load_api_keys
from moa_ray.serve.http_errors import APIError, install_error_handlers
from moa_ray.serve.responses import ResponseShell, chat_body, response_events, response_of
from moa_ray.serve.responses import parse_request as parse_responses_request
from moa_ray.serve.service import ChatService

# A child of "ray.serve", so Serve writes these lines to the replica's log file.
log = logging.getLogger("ray.serve.moa_ray.ingress")

INGRESS_DEPLOYMENT = "moa-ingress"


class BodyRefused(APIError):
    """A request refused while its body was still arriving (or before it was sent): answered with
    ``Connection: close``, which makes the replica's HTTP server (uvicorn) close the connection once the answer is
    sent. The rest of the body would otherwise be read as the next request, or never arrive, and the connection
    would stay open, held by a client that sent a Content-Length larger than its body or a body it was refused."""

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Connection": "close"}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes, and with 408 when it has not
    all arrived within ``timeout_s`` (a Content-Length larger than the body sent would hold the connection); either
    closes the connection (:class:`BodyRefused`)."""
    declared = request.headers.get("content-length", "")
    too_large = f"the request body exceeds this server's limit of {limit} bytes"
    if declared.isdigit() and int(declared) > limit:
        raise BodyRefused(413, too_large, code="request_too_large")
    body = bytearray()

    async def read() -> None:
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise BodyRefused(413, too_large, code="request_too_large")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BodyRefused(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    return bytes(body)


def create_api(service: ChatService, verifier: KeyVerifier, *, serve_request_ids: bool = False) -> FastAPI:
    """The endpoint's FastAPI application; ``serve_request_ids``: it runs in a Serve replica, where Ray Serve sets and
    returns each request's ``x-request-id`` (else the app does)."""
    # No generated docs or schema: they would answer without a key, and FastAPI's schema describes neither the
    # request body (read raw, for the size limit) nor the errors (400s, not 422s). OpenAI's API reference applies.
    app = FastAPI(
        title="moa-ray",
        description="Mixture-of-Agents pipelines behind an OpenAI-compatible API.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    # inside CORS: preflights are not requests
    app.add_middleware(AccessLog, enabled=service.limits.access_log, serve_request_ids=serve_request_ids)
    cors = service.limits.cors
    if cors is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            expose_headers=["x-should-retry", REQUEST_ID_HEADER],
            max_age=cors.max_age_s,
        )

    async def require_key(authorization: str | None = Header(default=None)) -> None:
        if not verifier.check(authorization):
            message = "invalid API key" if authorization else "missing API key: send 'Authorization: Bearer <key>'"
            raise APIError(401, message, code="invalid_api_key")

    authorized = [Depends(require_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pipelines": len(service.pipelines)}

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return service.models().model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def get_model(model_id: str) -> dict[str, Any]:
        return service.model_card(model_id).model_dump()

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, service.limits.max_request_bytes, service.limits.body_timeout_s)
        chat = service.parse(body)
        outcome = outcome_of(request)
        if chat.stream:
            events = await service.open_stream(chat, outcome)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return JSONResponse((await service.complete(chat, outcome)).wire())

    @app.post("/v1/responses", dependencies=authorized)
    async def responses(request: Request) -> Any:
        body = await read_body(request, service.limits.max_request_bytes, service.limits.body_timeout_s)
        asked = parse_responses_request(body)
        chat = service.parse(json.dumps(chat_body(asked)).encode())
        shell = ResponseShell(asked)
        outcome = outcome_of(request)
        if chat.stream:
            events = response_events(shell, await service.open_stream(chat, outcome))
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return JSONResponse(response_of(shell, (await service.complete(chat, outcome)).wire()))

    return app


def build_service(config: dict[str, Any], pipelines: list[str], handles: dict[str, Any]) -> tuple[ChatService, KeyVerifier]:
    """The ingress replica's service: the pipelines over the deployed models' handles and, for remote models
    hosted in process, agents of this replica's own; client keys from the environment."""
    from moa_ray.config import parse_config
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import assemble_agents
    from moa_ray.serve.handle import handle_agents

    cfg = parse_config(config, "<serve application args>")
    keys = load_api_keys()
    agents = assemble_agents(cfg, cfg.models_for(pipelines), handle_agents(handles))  # as a session assembles them
    built = {name: build_pipeline(cfg, name, agents) for name in pipelines}
    log.info(
        "moa-ray ingress: pipelines %s; client API keys %s",
        ", ".join(pipelines),
        f"required ({len(keys)} configured)" if keys else "not configured: the endpoint is open",
    )
    return ChatService(cfg, built, Redactor.for_config(cfg, extra=keys)), KeyVerifier(keys)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class MoAIngress:
    """Serves the OpenAI API for ``pipelines``; ``agents`` are the model deployments' handles by model name."""

    def __init__(self, config: dict[str, Any], pipelines: list[str], **agents: Any) -> None:
        self.service, self.verifier = build_service(config, pipelines, agents)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service, self.verifier, serve_request_ids=True)
