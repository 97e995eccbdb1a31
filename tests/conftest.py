"""Shared fixtures: everything is built for real, once per test session.

- `tiny_model`: a tiny random Gemma 4 folder (`petbreed make-tiny-model`).
- `synthetic_data`: 6 synthetic breeds, default level (`petbreed make-synthetic-data`).
- `trained_registry`: a local registry holding `pets@1`, trained by `petbreed train`.
- `gcs_emulator`: a GCS emulator process; yields a `gs://` bucket URI the real client can use.
- `api_server`: `petbreed serve` (real vLLM CPU engine) serving `trained_registry`; yields its URL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's own default, which `petbreed serve` moves into its cache folder: the servers the tests
# start, each with a fresh cache folder, share it instead, since an empty one costs a start here
# about 10 s (vLLM inspecting the model class again).
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/vllm"))

BIN = Path(sys.executable).parent
EMULATOR_BUCKET = "petbreed-test"


def petbreed(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `petbreed` console script."""
    result = subprocess.run(
        [str(BIN / "petbreed"), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"petbreed {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The JSON summary `petbreed train` prints last."""
    return dict(json.loads(result.stdout[result.stdout.index("{") :]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-gemma4"
    petbreed("make-tiny-model", str(out))
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    petbreed("make-synthetic-data", str(out), "--breeds", "6")
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, synthetic_data: Path) -> dict[str, object]:
    """One real training run with the default recipe; its summary and its folders."""
    root = tmp_path_factory.mktemp("trained")
    registry = root / "registry"
    result = petbreed(
        "train", "--data", str(synthetic_data), "--base-model", str(tiny_model), "--output", str(root / "run"),
        "--registry", str(registry), "--cache-dir", str(root / "cache"), "--eval-every", "100",
    )
    return {**summary(result), "registry": str(registry), "run": str(root / "run")}


@pytest.fixture(scope="session")
def trained_registry(trained_run: dict[str, object]) -> str:
    return str(trained_run["registry"])


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "gcp-storage-emulator"), "start", "--in-memory", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", EMULATOR_BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield f"gs://{EMULATOR_BUCKET}"
    proc.terminate()
    proc.wait(10)
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@contextmanager
def running_server(model: Path, env: dict[str, str], port: int, workdir: Path) -> Iterator[dict[str, object]]:
    """`python -m serve.cli` (what `petbreed serve` runs) on the tiny model until the block ends.
    Yields its URL, its log file, the /readyz answers seen while the engine was loading and the process."""
    log_path = workdir / "server.log"
    full_env = {
        **os.environ, "PETBREED_BASE_MODEL": str(model), "PETBREED_CACHE_DIR": str(workdir / "cache"),
        "PETBREED_HOST": "127.0.0.1", "PETBREED_VLLM__DTYPE": "float32", "PETBREED_VLLM__MAX_MODEL_LEN": "256",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
        **env,
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli"], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        loading = _wait_ready(url, proc, log_path)
        yield {"url": url, "log": log_path, "loading": loading, "process": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 240) -> list[httpx.Response]:
    seen: list[httpx.Response] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if response.status_code == 200:
            return seen
        seen.append(response)
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def api_server(trained_registry: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {"PETBREED_REGISTRY": trained_registry, "PETBREED_PORT": str(port)}
    with running_server(tiny_model, env, port, tmp_path_factory.mktemp("api-server")) as running:
        yield str(running["url"])
