"""The API key: with one set (`create_app(api_key=…)`), a route that depends on `check_key`
demands `Authorization: Bearer KEY` and answers 401 otherwise. Keys are compared as bytes:
the key as UTF-8, the header as its client sent it (HTTP headers are bytes), so a
non-ASCII key works and a non-ASCII token is only a wrong one."""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import ApiError


def key_bytes(api_key: str | bytes | None) -> bytes | None:
    """The key as the header carries it: UTF-8 (a key read from the environment or the
    command line that is not valid UTF-8 keeps its bytes); None or empty: no key."""
    if isinstance(api_key, str):
        api_key = api_key.encode("utf-8", "surrogateescape")
    return api_key or None


def authorized(request: Request) -> bool:
    """Whether the request may use the key's routes: no key is set, or it sent the key."""
    api_key = request.app.state.api_key  # bytes (key_bytes)
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes sent
    sent = token.strip(" \t").encode("latin-1")  # str.strip would eat \xa0 and \x85
    return scheme.lower() == "bearer" and secrets.compare_digest(sent, api_key)


def check_key(request: Request) -> None:
    if not authorized(request):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       "authentication_error")
