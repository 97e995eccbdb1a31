"""`petbreed ui`: start the Gradio app against a running prediction API and print its URL."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Annotated

import typer

from ui.settings import UISettings

if TYPE_CHECKING:
    import gradio as gr

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def ui(
    api_url: Annotated[str | None, typer.Option(help="prediction API base URL [env PETBREED_UI_API_URL]")] = None,
    host: Annotated[str | None, typer.Option(help="interface to listen on [env PETBREED_UI_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port, 0: any free one [env PETBREED_UI_PORT]")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="API request timeout [env PETBREED_UI_TIMEOUT_S]")] = None,
) -> None:
    """Start the web UI: upload a pet photo, see its breed."""
    flags = {"api_url": api_url, "host": host, "port": port, "timeout_s": timeout_s}
    # Flags override the environment, which overrides the defaults.
    settings = UISettings.model_validate({key: value for key, value in flags.items() if value is not None})
    demo, url = launch(settings)
    typer.echo(f"petbreed UI: {url} (prediction API: {settings.api_url})")
    demo.block_thread()


def launch(settings: UISettings) -> tuple[gr.Blocks, str]:
    """Start the app without blocking; returns it and its local URL."""
    from ui.app import build_ui  # imported late: gradio takes seconds to import, --help should not

    demo = build_ui(settings)
    demo.queue(default_concurrency_limit=4)  # the API batches; let a few page requests overlap
    demo.launch(
        server_name=settings.host, server_port=settings.port or free_port(settings.host), prevent_thread_lock=True,
        show_error=False, max_file_size=int(settings.max_upload_mb * 2**20), quiet=True,
    )
    return demo, _local_url(settings, demo.server_port)


def free_port(host: str) -> int:
    # Gradio treats None as "7860 or the next free one"; 0 should mean any port, as it does for sockets.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _local_url(settings: UISettings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{port}/"


if __name__ == "__main__":
    app()
