"""Example images, drawn at startup into a cache folder (no image files live in the repo)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image

from finetune.synthetic import SyntheticConfig, draw_pet


def example_images(cache_dir: Path, breeds: int = 6) -> list[Path]:
    """One synthetic pet for each of the first `breeds` breeds (the demo adapter's), then scikit-image's cat."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig.model_validate({"breeds": breeds})
    return [*(_synthetic(cache_dir, index, cfg) for index in range(cfg.breeds)), _chelsea(cache_dir)]


def _synthetic(cache_dir: Path, index: int, cfg: SyntheticConfig) -> Path:
    path = cache_dir / f"synthetic_{index + 1}.png"
    if not path.exists():
        # One seed per breed, so each example is the same picture on every start and machine.
        image = draw_pet(index, cfg.level, cfg.size, random.Random(1000 + index))
        _save(image, path)
    return path


def _chelsea(cache_dir: Path) -> Path:
    path = cache_dir / "chelsea.jpg"
    if not path.exists():
        from skimage import data  # imported here: it is slow, and only needed on the first start

        _save(Image.fromarray(data.chelsea()), path)
    return path


def _save(image: Image.Image, path: Path) -> None:
    # Write then rename, so two UIs starting at once never read a half-written example.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG" if path.suffix == ".png" else "JPEG")
    tmp.replace(path)
