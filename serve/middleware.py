"""One ASGI middleware for what every request needs: the body limit, a request id, metrics and
an access log line. Pure ASGI (not BaseHTTPMiddleware) because the limit must wrap `receive`."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import BodyTooLarge, error_response
from serve.metrics import Metrics

log = logging.getLogger("petbreed.serve.access")


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if _declared_length(scope) > self.max_body_bytes:
                await self._too_large(scope, receive, send_observed)
            else:
                await self.app(scope, self._limited(receive), send_observed)
        finally:
            self._record(scope, status["code"], time.perf_counter() - start, request_id)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes")
            return message

        return receive_limited

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "body_too_large", f"request body is over the limit of {self.max_body_bytes} bytes"
        )
        await response(scope, receive, send)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route = _route_template(scope)
        self.metrics.requests.labels(route, scope["method"], str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        extra: dict[str, Any] = {
            "request_id": request_id, "method": scope["method"], "path": scope["path"], "route": route,
            "status": status, "latency_ms": round(seconds * 1000, 2),
        }
        extra.update(scope.get("state", {}).get("log_extra", {}))
        log.info("request", extra=extra)


def _declared_length(scope: Scope) -> int:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _route_template(scope: Scope) -> str:
    """The matched route's template, so unmatched paths cannot blow up the label cardinality."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
