"""ui.api_client: answers parsed, and every failure turned into a sentence (never a traceback)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ui.api_client import ApiClient, ApiError
from ui.examples import example_images


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> ApiClient:
    return ApiClient("http://api.test", timeout_s=5, transport=httpx.MockTransport(handler))


def _answer(status: int, body: object) -> ApiClient:
    return _mock(lambda request: httpx.Response(status, json=body))


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "unreadable_image", "could not use this file"),
        (413, "too_large", "too large"),
        (415, "unsupported_type", "not supported"),
        (429, "overloaded", "busy"),
        (503, "not_ready", "not ready"),
        (404, "unknown_adapter", "Not found"),
    ],
)
def test_contract_errors_become_sentences(status: int, code: str, expected: str) -> None:
    client = _answer(status, {"error": {"code": code, "message": "the server's detail"}})
    with pytest.raises(ApiError) as info:
        client.models()
    assert expected in str(info.value)
    assert "the server's detail" in str(info.value)  # the server's specifics are kept
    assert (info.value.status, info.value.code) == (status, code)


def test_non_contract_error_bodies_are_still_readable() -> None:
    with pytest.raises(ApiError, match="HTTP 502: Bad Gateway"):
        _mock(lambda request: httpx.Response(502, text="Bad Gateway")).models()
    with pytest.raises(ApiError, match=r"rejected the request: .*missing"):
        _answer(422, {"detail": [{"msg": "field missing"}]}).models()


def test_timeout_and_unexpected_bodies() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(ApiError, match="did not answer in time"):
        _mock(slow).models()
    with pytest.raises(ApiError, match="does not understand"):
        _answer(200, {"unexpected": True}).models()


def test_sends_the_file_bytes_untouched(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00not an image\xff")
    seen: list[bytes] = []

    def capture(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        return httpx.Response(400, json={"error": {"code": "bad_image", "message": "no"}})

    with pytest.raises(ApiError):
        _mock(capture).predict_file(path)
    assert path.read_bytes() in seen[0] and b'name="file"' in seen[0]


def test_nothing_listening_is_a_hint_not_a_traceback(unused_url: str) -> None:
    with pytest.raises(ApiError, match=r"Cannot reach the prediction API .* Is `petbreed serve` running"):
        ApiClient(unused_url, timeout_s=5).models()


@pytest.fixture
def unused_url() -> str:
    import socket

    with socket.socket() as sock:  # bound then closed: nothing listens there afterwards
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- against the real API (petbreed serve with the tiny model and the `pets` adapter) ----

@pytest.mark.slow
def test_real_models_and_prediction(api_server: str, tmp_path: Path) -> None:
    client = ApiClient(api_server, timeout_s=120)
    models = client.models()
    labels = {label.text for adapter in models.adapters for label in adapter.labels}
    response = client.predict_file(example_images(tmp_path)[0])
    top = response.predictions[0]
    assert top.text in labels and 0 <= top.confidence <= 1
    assert response.adapter.startswith("pets@")


@pytest.mark.slow
def test_real_report(api_server: str) -> None:
    client = ApiClient(api_server, timeout_s=60)
    adapter = client.models().adapters[0]
    report = client.report(adapter.name, adapter.version)
    assert 0 <= report.accuracy <= 1 and 0 <= report.macro_f1 <= 1
    assert set(report.per_class) == {label.label for label in adapter.labels}
    assert Image.open(io.BytesIO(client.confusion_png(adapter.name, adapter.version))).format == "PNG"


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"this is not an image", b"\x89PNG\r\n\x1a\n broken"])
def test_real_unreadable_file(api_server: str, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(ApiError) as info:
        ApiClient(api_server, timeout_s=60).predict_file(path)
    assert info.value.status in (400, 415, 422)
    assert "Traceback" not in str(info.value) and len(str(info.value)) > 20


@pytest.mark.slow
def test_real_unknown_adapter(api_server: str, tmp_path: Path) -> None:
    with pytest.raises(ApiError) as info:
        ApiClient(api_server, timeout_s=60).predict_file(example_images(tmp_path)[0], adapter="no_such_adapter@99")
    assert info.value.status in (400, 404, 422)
    with pytest.raises(ApiError) as info:
        ApiClient(api_server, timeout_s=60).report("no_such_adapter", 99)
    assert info.value.status == 404
