"""Every error leaves the server as `{"error": {"code", "message"}}` (schemas.ErrorResponse),
whether raised by our code, by FastAPI's request validation, by routing (404/405) or by a bug."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.images import ImageError
from serve.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("petbreed.serve.errors")

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full",
    503: "not_ready",
}


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed (chunked) body passes the limit."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_message(errors: list[Any]) -> str:
    """`loc: msg; ...` without the offending input, which may be megabytes of base64."""
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(ImageError)
    async def _image(_: Request, err: ImageError) -> JSONResponse:
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(BodyTooLarge)
    async def _body(_: Request, err: BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", str(err))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", validation_message(list(err.errors())))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, err: ValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", validation_message(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal", "internal server error")
