"""HTTP client for the prediction API. Every failure becomes an `ApiError` with a sentence a person
can act on: the UI shows `str(error)` and never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError

from serve.schemas import ModelsResponse, PredictResponse

# What to tell a person for each API error code/status. The server's own message follows it,
# because it holds the specifics (which limit, which adapter).
_STATUS_HINTS = {
    400: "The API could not use this file",
    404: "Not found",
    413: "The file is too large for the API",
    415: "This file type is not supported; upload a JPEG, PNG, WebP, GIF or BMP image",
    422: "The API rejected the request",
    429: "The API is busy (too many requests); try again in a few seconds",
    503: "The API is not ready yet (the model may still be loading); try again shortly",
}


T = TypeVar("T", bound=BaseModel)


class ApiError(Exception):
    """A failed API call, described for people. `status` is None when no HTTP answer came back."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ClassReport(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class EvalReport(BaseModel):
    """The fields of an adapter version's eval/report.json that the UI shows (others are ignored)."""

    model: str = ""
    n: int = 0
    accuracy: float
    macro_f1: float
    labels: list[str] = Field(default_factory=list)
    per_class: dict[str, ClassReport] = Field(default_factory=dict)
    confusion: list[list[int]] = Field(default_factory=list)


class ApiClient:
    def __init__(self, base_url: str, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def predict_file(self, path: Path, adapter: str | None = None, top_k: int = 5) -> PredictResponse:
        """Upload the file's bytes untouched (multipart: no base64 growth), so the API judges what is an image."""
        fields = {"top_k": str(top_k), **({"adapter": adapter} if adapter else {})}
        files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
        return _parse(PredictResponse, self._request("POST", "/v1/predict", data=fields, files=files))

    def models(self) -> ModelsResponse:
        return _parse(ModelsResponse, self._request("GET", "/v1/models"))

    def report(self, name: str, version: int) -> EvalReport:
        return _parse(EvalReport, self._request("GET", f"/v1/models/{name}/{version}/report"))

    def confusion_png(self, name: str, version: int) -> bytes:
        return self._request("GET", f"/v1/models/{name}/{version}/confusion.png").content

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TimeoutException as exc:
            raise ApiError(f"The prediction API at {self.base_url} did not answer in time ({_kind(exc)}).") from exc
        except httpx.TransportError as exc:
            raise ApiError(
                f"Cannot reach the prediction API at {self.base_url} ({_kind(exc)}). Is `petbreed serve` running?"
            ) from exc
        if response.is_error:
            raise _http_error(response)
        return response


def _kind(exc: Exception) -> str:
    # The exception text can be empty or a long errno dump; its class name is always meaningful.
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _http_error(response: httpx.Response) -> ApiError:
    code, message = _error_body(response)
    hint = _STATUS_HINTS.get(response.status_code, f"The API answered HTTP {response.status_code}")
    text = f"{hint}: {message}" if message else f"{hint}."
    return ApiError(text, status=response.status_code, code=code)


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """The contract's `{"error": {"code", "message"}}`, else FastAPI's `{"detail": ...}`, else text."""
    try:
        data = response.json()
    except ValueError:
        return None, response.text.strip()[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error.get("code"), str(error.get("message", "")).strip()
    if isinstance(data, dict) and "detail" in data:
        return None, str(data["detail"])[:300]
    return None, str(data)[:300]


def _parse(model: type[T], response: httpx.Response) -> T:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ApiError(
            f"The API at {response.request.url} answered something this UI does not understand "
            f"({exc.error_count()} field errors); are the UI and API versions the same?"
        ) from exc
