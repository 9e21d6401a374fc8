"""`create_app`: the FastAPI app that serves one `LLM`: routes, errors in OpenAI's shape,
the body limit, the API key and the metrics registry."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from . import metrics
from .errors import ApiError, error_response, validation_message
from .limits import MAX_BODY_BYTES, BodyLimit
from .routes import Served, router


def create_app(llm, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving `llm` (an `LLM`) under `model_name`; with `api_key`, every route
    but /health and the page demands `Authorization: Bearer KEY`."""
    app = FastAPI(title="llm-shard", version="0.1.0")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.llm, app.state.api_key = llm, api_key
    app.state.registry, http_requests = metrics.registry(llm)
    app.state.served = Served(llm, model_name, {model_name, Path(model_name).name,
                                                llm.store.path.name}, http_requests)

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
