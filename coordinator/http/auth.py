"""The API key: with one set (`create_app(api_key=…)`), a route that depends on `check_key`
demands `Authorization: Bearer KEY` and answers 401 otherwise."""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import ApiError


def check_key(request: Request) -> None:
    api_key = request.app.state.api_key
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       "authentication_error")
