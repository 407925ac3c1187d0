"""The front end's application: the OpenAI and TGI routers over one asyncio gRPC client of the
ensemble, behind an API key check, a request size limit and CORS. `textgen serve-api` (or
`python -m textgen_api`) runs it alone; `textgen-launcher` runs it beside tritonserver."""
from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from textgen_api import openai_routes, tgi_routes
from textgen_api.config import ApiConfig
from textgen_api.errors import ApiError
from textgen_client.aio import AsyncTextgenClient

logger = logging.getLogger("textgen")


def _error_response(path: str, error: ApiError) -> JSONResponse:
    if path.startswith("/v1"):
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param,
                          "code": None}}
    else:
        body = {"error": error.message, "error_type": error.kind}
    return JSONResponse(body, status_code=error.status)


class _Guard:
    """ASGI middleware: the bearer token when --api-key is set (compared in constant time), and
    at most payload_limit bytes of body (413 past it)."""

    def __init__(self, app, config: ApiConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        key = self.config.api_key
        if key is not None and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            expected = f"Bearer {key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                error = ApiError(401, "a valid API key is required (Authorization: Bearer)",
                                 "authentication_error")
                return await _error_response(path, error)(scope, receive, send)
        limit = self.config.payload_limit
        if int(headers.get("content-length", 0) or 0) > limit:
            error = ApiError(413, f"the request body is larger than the payload limit "
                                  f"({limit} bytes)", "validation")
            return await _error_response(path, error)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, f"the request body is larger than the payload limit "
                                    f"({limit} bytes)", "validation")
            return message

        return await self.app(scope, limited_receive, send)


def create_app(config: ApiConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = AsyncTextgenClient(config.triton_url)
        yield
        await app.state.client.close()

    app = FastAPI(title="textgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(openai_routes.router(config))
    app.include_router(tgi_routes.router(config))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(request.url.path, error)

    @app.exception_handler(StarletteHTTPException)  # unknown route (404), wrong method (405)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return _error_response(request.url.path, ApiError(error.status_code, str(error.detail),
                                                          kind))

    @app.exception_handler(Exception)  # a defect of ours: still the shape clients parse
    async def internal_error(request: Request, error: Exception):
        logger.exception("[textgen] front end error on %s", request.url.path)
        return _error_response(request.url.path, ApiError(
            500, "internal error (the front end's log has its cause)", "internal_error"))

    app.add_middleware(_Guard, config=config)
    if config.cors_allow_origin:  # outermost: preflights are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origin),
                           allow_methods=["*"], allow_headers=["*"])
    return app


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The front end's flags (also the launcher's, with --api-port for --port)."""
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"),
                        help="Bearer token every route requires (env API_KEY).")
    parser.add_argument("--cors-allow-origin", default=os.environ.get("CORS_ALLOW_ORIGIN", ""),
                        help="Comma-separated origins allowed by CORS (TGI's flag).")
    parser.add_argument("--payload-limit", type=int,
                        default=int(os.environ.get("PAYLOAD_LIMIT", 2_000_000)),
                        help="Largest request body in bytes (TGI's flag).")


def config_from_args(args, **known) -> ApiConfig:
    origins = tuple(o.strip() for o in args.cors_allow_origin.split(",") if o.strip())
    return ApiConfig(api_key=args.api_key or None, cors_allow_origin=origins,
                     payload_limit=args.payload_limit, **known)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="textgen serve-api", description=__doc__)
    parser.add_argument("--triton-url", default="localhost:8001",
                        help="gRPC address of a running textgen tritonserver.")
    parser.add_argument("--model-name", default="textgen",
                        help="The base model's id in /v1/models and /info.")
    parser.add_argument("--adapters", default="",
                        help="Comma-separated adapter ids that /v1/models lists.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--max-input-tokens", type=int, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    add_flags(parser)
    args = parser.parse_args(argv)
    config = config_from_args(
        args, triton_url=args.triton_url, model_name=args.model_name,
        adapters=tuple(a for a in args.adapters.split(",") if a), host=args.host,
        port=args.port, max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
