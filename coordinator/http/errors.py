"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """An error a route raises: its status, message, OpenAI error type and the field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(status, message)
        self.kind, self.param = kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


def validation_message(e: RequestValidationError) -> str:
    """What is wrong with a body that failed its schema, one clause per problem."""
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', '')}")
        elif isinstance(err.get("input"), bytes):
            problems.append("the body must be a JSON object, sent with Content-Type: "
                            "application/json")
        else:
            got = (f" (got {json.dumps(err['input'], default=str)[:60]})"
                   if "input" in err else "")
            problems.append(f"{where or 'body'}: {err.get('msg')}{got}")
    return "; ".join(problems) or "invalid request"
