"""`petbreed serve`: run the prediction API with uvicorn.

Settings come from `PETBREED_*` variables (see serve/settings.py) and these flags. vLLM spawns
its engine process, which re-imports the main module: every entry point that reaches here must
be under an `if __name__ == "__main__":` guard (this module's is, and the console script's).
"""

from __future__ import annotations

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
    # Before vLLM is imported: let its loggers propagate to our JSON handler.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    import uvicorn

    from serve.app import create_app
    from serve.jsonlog import configure_logging
    from serve.settings import ServeSettings

    flags = {"base_model": base_model, "registry": registry, "default_adapter": default_adapter, "host": host,
             "port": port}
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    settings = ServeSettings(**overrides)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    app()
