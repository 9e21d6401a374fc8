"""`create_app`: the FastAPI app that serves one `LLM`: routes, errors in OpenAI's shape,
the request limits, the API key and the metrics registry."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from . import metrics
from .auth import key_bytes
from .errors import ApiError, error_response, validation_message
from .limits import MAX_BODY_BYTES, MAX_PROMPTS_PER_REQUEST, BodyLimit
from .routes import Served, router


def create_app(llm, model_name: str, api_key: str | bytes | None = None,
               max_body_bytes: int = MAX_BODY_BYTES,
               max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST) -> FastAPI:
    """The app serving `llm` (an `LLM`) under `model_name`; with `api_key`, every route
    but /health and the page (the docs and /openapi.json too) demands `Authorization:
    Bearer KEY`. A completions request may carry `max_prompts_per_request` prompts."""
    if max_prompts_per_request < 1:
        raise ValueError(f"max_prompts_per_request must be >= 1, got {max_prompts_per_request}")
    # the docs and the spec are routes of ours (routes.py), behind the key
    app = FastAPI(title="llm-shard", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.llm, app.state.api_key = llm, key_bytes(api_key)
    app.state.registry, http_requests = metrics.registry(llm)
    app.state.served = Served(llm, model_name, {model_name, Path(model_name).name,
                                                llm.store.path.name}, http_requests,
                              max_prompts_per_request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        http_requests.labels(request.url.path, str(e.status_code)).inc()
        return error_response(e.status_code, e.detail, e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        http_requests.labels(request.url.path, "400").inc()
        return error_response(400, validation_message(e))

    app.include_router(router)
    return app
