"""The FastAPI application: `create_app(settings)` wires settings, state, routers, errors and
middleware. The engine loads in the background after start-up; /readyz turns 200 when it has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from serve import api
from serve.engine import Classifier
from serve.errors import install_error_handlers
from serve.metrics import Metrics
from serve.middleware import ObserveMiddleware
from serve.schemas import PredictJSONRequest
from serve.settings import ServeSettings
from serve.state import ServerState


def create_app(settings: ServeSettings | None = None, classifier: Classifier | None = None) -> FastAPI:
    """`classifier`: an engine already started in this process (the benchmark); None builds vLLM."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    server = ServerState(settings, metrics, classifier)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.begin()
        yield
        await server.stop()

    app = FastAPI(
        title="petbreed", version="1", lifespan=lifespan,
        description="Pet breed classification with Gemma 4 + LoRA adapters served by vLLM. "
        "Answers are label distributions over the adapter's label set.",
    )
    app.state.server = server
    for router in (
        api.predict_router, api.vertex_router(["/predict", settings.predict_route]), api.models_router,
        api.ops_router, api.health_router(settings.health_route), api.admin_router,
    ):
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    _document_json_body(app)
    return app


def _document_json_body(app: FastAPI) -> None:
    """/v1/predict parses its body by content type itself, so FastAPI does not know the JSON
    model; add its schema to the OpenAPI components the route's requestBody refers to."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        model = PredictJSONRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(model.pop("$defs", {}))
        components["PredictJSONRequest"] = model
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
