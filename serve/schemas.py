"""Request and response models of the prediction API (the UI and clients rely on these)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    label: str = Field(description="label id, e.g. 'american_bulldog'")
    text: str = Field(description="display name, e.g. 'American Bulldog'")
    species: str | None = None
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    label: str
    text: str
    species: str | None = None
    confidence: float = Field(ge=0, le=1, description="probability of the winning label")
    uncertain: bool = Field(description="confidence is below the server's threshold (open-set verdict)")
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    adapter: str = Field(description="NAME@VERSION that answered")
    predictions: list[Prediction]
    latency_ms: float


class Base64Image(BaseModel):
    b64: str = Field(description="base64 of the image file bytes (JPEG, PNG, WebP, GIF, BMP)")


class PredictJSONRequest(BaseModel):
    images: list[Base64Image] = Field(min_length=1)
    adapter: str | None = Field(None, description="NAME or NAME@VERSION; default: newest of the default adapter")
    top_k: int = Field(5, ge=1, le=100)


class AdapterVersion(BaseModel):
    name: str
    version: int
    ref: str
    base_model: str
    labels: list[LabelScore] = Field(description="the label set (probability unused, 0)")
    metrics: dict[str, float]
    parent: str | None
    created_at: str
    loaded: bool
    refused_reason: str | None = Field(None, description="why the server refused this version (loaded is false)")


class ModelsResponse(BaseModel):
    base_model: str
    default_adapter: str | None
    adapters: list[AdapterVersion]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class VertexImage(BaseModel):
    bytesBase64Encoded: str  # Vertex AI's field name


class VertexInstance(BaseModel):
    image: VertexImage


class VertexParameters(BaseModel):
    adapter: str | None = None
    top_k: int = Field(5, ge=1, le=100)


class VertexRequest(BaseModel):
    instances: list[VertexInstance] = Field(min_length=1)
    parameters: VertexParameters | None = None


class VertexResponse(BaseModel):
    predictions: list[Prediction]
    deployedModelId: str | None = None  # Vertex AI's field name
    adapter: str | None = Field(None, description="NAME@VERSION that answered")
