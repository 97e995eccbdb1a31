"""`petbreed serve`: run the prediction API with uvicorn.

Settings come from `PETBREED_*` variables (see serve/settings.py) and these flags. vLLM spawns
its engine process, which re-imports the main module: every entry point that reaches here must
be under an `if __name__ == "__main__":` guard (this module's is, and the console script's).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

app = typer.Typer(help="Serve petbreed adapters over HTTP.", pretty_exceptions_show_locals=False)


@app.command()
def serve(
    base_model: Annotated[str | None, typer.Option(help="HF id, folder or gs:// [PETBREED_BASE_MODEL]")] = None,
    registry: Annotated[str | None, typer.Option(help="adapter registry URI [PETBREED_REGISTRY]")] = None,
    default_adapter: Annotated[str | None, typer.Option(help="adapter NAME when a request names none")] = None,
    host: Annotated[str | None, typer.Option(help="bind address [PETBREED_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="[PETBREED_PORT, AIP_HTTP_PORT, PORT]")] = None,
) -> None:
    """Start the prediction API (vLLM engine + FastAPI). Other settings: PETBREED_* variables."""
    from serve.jsonlog import configure_logging
    from serve.settings import ServeSettings

    flags = {"base_model": base_model, "registry": registry, "default_adapter": default_adapter, "host": host,
             "port": port}
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    settings = ServeSettings(**overrides)
    use_json_logs_in_vllm(settings)
    import uvicorn

    from serve.app import create_app

    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=10,
    )


def use_json_logs_in_vllm(settings: Any) -> None:
    """Before vLLM is imported: its engine core and workers, where `configure_logging` never runs,
    log the same JSON lines at the same level. Left alone if the operator configured vLLM's logging."""
    if "VLLM_CONFIGURE_LOGGING" in os.environ or "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return
    from serve.jsonlog import vllm_logging_config

    path = settings.cache_dir / "vllm-logging.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vllm_logging_config(settings.log_level)))
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path.resolve())


if __name__ == "__main__":
    app()
