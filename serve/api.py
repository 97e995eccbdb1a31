"""The HTTP routes, in small routers. Every prediction route ends in `ServerState.predict`.

Images arrive only as bytes (multipart upload or base64); no route ever fetches a URL.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from serve.errors import ApiError
from serve.images import decode_base64
from serve.schemas import (
    AdapterVersion,
    ErrorResponse,
    LabelScore,
    ModelsResponse,
    PredictJSONRequest,
    PredictResponse,
    VertexRequest,
    VertexResponse,
)
from serve.state import ServerState

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "bad base64, not an image, truncated image", 404: "unknown or refused adapter",
        413: "body or image pixel count over the limit", 415: "unsupported content type or image format",
        422: "invalid request (fields, top_k, too many images)", 429: "queue full (see Retry-After)",
        503: "engine not loaded yet, replaced adapter, or the engine stopped (see Retry-After)",
    }.items()
}


def state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


def _log_extra(request: Request, **fields: Any) -> None:
    """Fields for the access log line the middleware writes."""
    request.scope.setdefault("state", {}).setdefault("log_extra", {}).update(fields)


predict_router = APIRouter(tags=["predict"])

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more image files (repeat the `file` field)"},
                        "adapter": {"type": "string", "description": "NAME or NAME@VERSION"},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSONRequest"}},
        },
    }
}


@predict_router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=_PREDICT_BODY)
async def predict(request: Request, server: ServerState = Depends(state)) -> PredictResponse:  # noqa: B008
    """Classify image(s): multipart upload (`file`, repeatable) or JSON with base64 images."""
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        images, adapter, top_k = await _from_form(request)
    elif content_type == "application/json":
        body = PredictJSONRequest.model_validate_json(await request.body())
        images, adapter, top_k = [decode_base64(i.b64) for i in body.images], body.adapter, body.top_k
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    ref, predictions = await server.predict(images, adapter, top_k)
    _log_extra(request, adapter=ref, images=len(images))
    return PredictResponse(adapter=ref, predictions=predictions, latency_ms=(time.perf_counter() - started) * 1000)


async def _from_form(request: Request) -> tuple[list[bytes], str | None, int]:
    async with request.form() as form:
        files = form.getlist("file")
        if not files:
            raise ApiError(422, "invalid_request", "file: at least one image file is required")
        if not all(isinstance(f, UploadFile) for f in files):
            raise ApiError(422, "invalid_request", "file: must be file uploads, not text fields")
        images = [await f.read() for f in files if isinstance(f, UploadFile)]
        adapter = form.get("adapter")
        top_k = _top_k(form.get("top_k"))
    if adapter is not None and not isinstance(adapter, str):
        raise ApiError(422, "invalid_request", "adapter: must be a text field")
    return images, adapter or None, top_k


def _top_k(value: object) -> int:
    if value is None:
        return 5
    if isinstance(value, str) and value.strip().isdigit() and 1 <= int(value) <= 100:
        return int(value)
    raise ApiError(422, "invalid_request", "top_k: must be an integer from 1 to 100")


async def vertex_predict(
    body: VertexRequest, request: Request, server: ServerState = Depends(state)  # noqa: B008
) -> VertexResponse:
    """Vertex AI custom-container prediction: {"instances": [{"image": {"bytesBase64Encoded": ...}}]}."""
    params = body.parameters
    images = [decode_base64(instance.image.bytesBase64Encoded) for instance in body.instances]
    ref, predictions = await server.predict(images, params.adapter if params else None, params.top_k if params else 5)
    _log_extra(request, adapter=ref, images=len(images))
    return VertexResponse(predictions=predictions, adapter=ref)


def vertex_router(routes: list[str]) -> APIRouter:
    router = APIRouter(tags=["predict"])
    for path in dict.fromkeys(routes):  # /predict plus AIP_PREDICT_ROUTE, once each
        router.add_api_route(path, vertex_predict, methods=["POST"], response_model=VertexResponse, responses=ERRORS)
    return router


models_router = APIRouter(tags=["models"])


@models_router.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
async def models(server: ServerState = Depends(state)) -> ModelsResponse:  # noqa: B008
    """Served adapters (every version), their label sets and metrics; refused ones with the reason."""
    table = server.tables()
    served = [_version(e.manifest, loaded=True) for e in table.entries.values()]
    refused = [_version(r.manifest, loaded=False, reason=r.reason) for r in table.refused.values() if r.manifest]
    return ModelsResponse(
        base_model=server.settings.base_model, default_adapter=table.default_ref(),
        adapters=sorted([*served, *refused], key=lambda a: (a.name, a.version)),
    )


@models_router.get("/v1/models/{name}/{version}/report", responses=ERRORS)
async def report(name: str, version: int, server: ServerState = Depends(state)) -> JSONResponse:  # noqa: B008
    """The version's evaluation report from training (accuracy, macro-F1, per class, confusion)."""
    return JSONResponse(json.loads(_eval_file(server, name, version, "report.json").read_text()))


@models_router.get(
    "/v1/models/{name}/{version}/confusion.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
async def confusion(name: str, version: int, server: ServerState = Depends(state)) -> Response:  # noqa: B008
    """The version's confusion matrix, as plotted at the end of training."""
    return Response(_eval_file(server, name, version, "confusion.png").read_bytes(), media_type="image/png")


def _eval_file(server: ServerState, name: str, version: int, file: str) -> Path:
    # `file` is one of two constants, never client input, so no path can escape the adapter folder.
    entry = server.resolve(f"{name}@{version}")
    path = entry.path / "eval" / file
    if not path.is_file():
        raise ApiError(404, "no_report", f"adapter {entry.ref} was published without eval/{file}")
    return path


def _version(manifest: Any, loaded: bool, reason: str | None = None) -> AdapterVersion:
    labels = [LabelScore(label=x.id, text=x.text, species=x.species, probability=0) for x in manifest.labels.labels]
    return AdapterVersion(
        name=manifest.name, version=manifest.version, ref=manifest.ref, base_model=manifest.base_model.id,
        labels=labels, metrics=manifest.metrics, parent=manifest.parent, created_at=manifest.created_at,
        loaded=loaded, refused_reason=reason,
    )


ops_router = APIRouter(tags=["operations"])


@ops_router.get("/healthz")
async def healthz(server: ServerState = Depends(state)) -> JSONResponse:  # noqa: B008
    """Liveness: the process serves HTTP. 503 only if start-up failed or the engine died (a restart may help)."""
    if server.failed or server.engine_died():
        raise server.not_ready()
    return JSONResponse({"status": "ok"})


async def readyz(server: ServerState = Depends(state)) -> JSONResponse:  # noqa: B008
    """Readiness: the engine is loaded and the registry was read. 503 until then, and once it has died."""
    if server.engine_died() or not server.ready:
        raise server.not_ready()
    return JSONResponse({"status": "ready", "adapters": len(server.tables().entries)})


def health_router(extra_route: str | None) -> APIRouter:
    router = APIRouter(tags=["operations"])
    # Vertex AI's health route means "ready for predictions", so it is the readiness check.
    for path in dict.fromkeys(["/readyz", *([extra_route] if extra_route else [])]):
        router.add_api_route(path, readyz, methods=["GET"], responses={503: {"model": ErrorResponse}})
    return router


@ops_router.get("/metrics")
async def metrics(server: ServerState = Depends(state)) -> Response:  # noqa: B008
    """Prometheus text format."""
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


admin_router = APIRouter(tags=["admin"])


@admin_router.post("/v1/admin/reload", responses=ERRORS)
async def reload(request: Request, server: ServerState = Depends(state)) -> dict[str, list[str]]:  # noqa: B008
    """Read the registry index now and load new versions. Needs `Authorization: Bearer <admin token>`."""
    token = server.settings.admin_token
    if token is None:
        raise ApiError(404, "not_found", "the admin API is disabled (no admin token configured)")
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise ApiError(401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
    if not server.ready:
        raise server.not_ready()
    return await server.reload()
