"""FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /version, /metrics.

Every error, including FastAPI's own validation and routing errors, leaves as OpenAI's JSON
error body; client input never produces a 500.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pacer import __version__
from pacer.config import ServerConfig, parse_bytes
from pacer.engine.frontend import Frontend
from pacer.model.tokenizer import Tokenizer
from pacer.request import SLO
from pacer.server.body_limit import BodySizeLimit
from pacer.server.metrics import Metrics
from pacer.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from pacer.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list"}
_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def _errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the errors a route answers, all with OpenAI's error body."""
    reasons = {400: "invalid request", 401: "missing or wrong API key", 413: "body larger than --max-request-bytes",
               429: "refused by admission control (Retry-After says when to retry)",
               503: "draining, or no engine is running"}
    return {status: {"model": ErrorResponse, "description": reasons[status]} for status in statuses}


_GENERATE_ERRORS = _errors(400, 401, 413, 429, 503)


@dataclass
class ServerState:
    """What the routes share; `draining` flips on SIGTERM (new requests then get 503)."""

    engine: Frontend
    serving: OpenAIServing
    metrics: Metrics
    model_name: str
    model_root: str
    max_model_len: int
    api_key: str | None = None
    draining: bool = False


def create_app(engine: Frontend, tokenizer: Tokenizer, model_name: str, model_root: str, model_family: str,
               api_key: str | None = None, metrics: Metrics | None = None, default_slo: SLO | None = None,
               api_key_all_routes: bool = False, stream_timeout_s: float = 0.0,
               max_tokens_default: int | None = None,
               max_request_bytes: int = parse_bytes(ServerConfig.max_request_bytes)) -> FastAPI:
    """`engine` must be started (its limits shape the API); the app stops it (aborting leftovers) on shutdown.
    The API key guards /v1, or with `api_key_all_routes` every route; `stream_timeout_s` bounds a stalled stream
    (pacer/server/sse.py)."""
    if api_key_all_routes and api_key is None:
        raise ValueError("api_key_all_routes needs an API key (--api-key or $PACER_API_KEY)")
    metrics = metrics or Metrics(model_name, lambda: engine.load)
    engine.observer = metrics
    serving = OpenAIServing(engine, tokenizer, model_name, metrics, default_slo, stream_timeout_s, max_tokens_default)
    state = ServerState(engine, serving, metrics, model_name, model_root, engine.limits.max_model_len, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="pacer", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)  # not FastAPI's max_body_size: its 413 is plain text
    app.state.pacer = state
    _add_error_handlers(app, metrics)

    def authorized(request: Request) -> None:
        if state.api_key is not None:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
                raise APIError(401, "Missing or incorrect API key: send `Authorization: Bearer <key>`",
                               type="authentication_error", code="invalid_api_key")

    def accepting(request: Request) -> float:
        """Auth and drain checks for /v1 routes; returns the HTTP arrival time (monotonic s)."""
        arrival_s = time.monotonic()
        authorized(request)
        if state.draining:
            raise APIError(503, "the server is shutting down and takes no new requests",
                           type="service_unavailable", code="shutting_down")
        return arrival_s

    @app.post("/v1/completions", responses=_GENERATE_ERRORS)
    async def completions(body: CompletionRequest, request: Request, arrival_s: float = Depends(accepting)):
        return await state.serving.completions(body, request, arrival_s)

    @app.post("/v1/chat/completions", responses=_GENERATE_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               arrival_s: float = Depends(accepting)):
        return await state.serving.chat(body, request, arrival_s)

    @app.get("/v1/models", dependencies=[Depends(accepting)], responses=_errors(401, 503))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, root=model_root, family=model_family,
                                        max_model_len=state.max_model_len)])

    operator_routes = [Depends(authorized)] if api_key_all_routes else []  # open by default, as vLLM's

    @app.get("/health", dependencies=operator_routes, response_class=Response, responses={
        200: {"description": "serving: an empty body, or each replica's state as JSON on Ray",
              "content": {}}, **_errors(401, 503)})
    async def health() -> Response:
        """200 while serving (with each replica's state, on Ray), 503 while draining or with no engine up."""
        if state.draining or not engine.is_alive:
            reason = "shutting down" if state.draining else "the engine is not running"
            raise APIError(503, f"unhealthy: {reason}", type="service_unavailable", code="unhealthy")
        details = engine.health()
        return Response(status_code=200) if details is None else JSONResponse(details)

    @app.get("/version", dependencies=operator_routes, responses=_errors(401))
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", dependencies=operator_routes, response_class=PlainTextResponse, responses=_errors(401))
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    _drop_422(app)
    return app


def _drop_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body or parameters; pacer answers invalid input with OpenAI's
    400 instead, so the schema must not promise a 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for route in schema["paths"].values():
                for operation in route.values():
                    operation["responses"].pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
        if status in (400, 404, 413, 429, 503) and info.code != "not_found":  # not a request: a wrong URL
            metrics.rejected(info.code or str(status))
        return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return respond(error.status, error.body.error, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return respond(400, ErrorInfo(message=message, type="invalid_request_error", code="invalid_json"))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        # A union (e.g. prompt: str | list[...]) reports each alternative; name the field, not the branch.
        loc = [part for part in loc if not (part in _TYPE_NAMES or "[" in part or part[:1].isupper()
                                           or part.startswith("constrained-"))]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "missing":
            message = f"{param} is required" if param else "a JSON body is required"
        return respond(400, ErrorInfo(message=message, type="invalid_request_error", param=param,
                                      code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        status = 400 if error.status_code == 422 else error.status_code
        message, code = str(error.detail), None
        if status == 400:  # FastAPI could not read the body (e.g. it is not UTF-8)
            message, code = f"the body could not be read as UTF-8 JSON ({message})", "invalid_json"
        elif status == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif status == 413:
            code = "request_too_large"
        return respond(status, ErrorInfo(message=message, type=_HTTP_ERROR_TYPES.get(status, "invalid_request_error"),
                                         code=code), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return respond(500, ErrorInfo(message=f"internal server error: {error!r}", type="server_error",
                                      code="internal_error"))
