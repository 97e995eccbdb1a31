"""UI settings: one typed object filled from flags, then `PETBREED_UI_*` environment variables, then defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UISettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PETBREED_UI_")

    api_url: str = Field(default="http://127.0.0.1:8080", description="prediction API URL (petbreed serve's default)")
    timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout; a CPU engine under load is slow")
    host: str = Field(default="127.0.0.1", description="interface Gradio listens on (0.0.0.0 in a container)")
    port: int = Field(default=7860, ge=0, le=65535, description="Gradio port; 0: any free one")
    top_k: int = Field(default=5, ge=1, le=100, description="how many breeds the confidence bar shows")
    cache_dir: Path = Field(default=Path(".cache/petbreed/ui"), description="where generated example images go")
    max_upload_mb: float = Field(
        default=50.0, gt=0, description="Gradio's own upload limit; above the API's, so the API's 413 shows"
    )
