"""A synthetic pets dataset written in the Oxford-IIIT Pet layout, so the one loader reads both.

Each breed has a fixed look (body colour, body shape, ear style, coat texture) that depends only
on the breed's position in SYNTHETIC_ORDER, so a dataset of breeds 7-8 matches the look of those
breeds in a dataset of breeds 1-8 (which retraining relies on). Levels add nuisance:
- easy: grey background, a large centred animal, light noise. A tiny random model learns it on CPU.
- medium: random background colour, pose, scale and position.
- hard: medium plus clutter shapes, colour jitter and heavy noise. Meant for real models.
"""

from __future__ import annotations

import random
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel, Field
from tqdm import tqdm

from adapter_contract.labels import Label
from finetune.breeds import CATS, CLASS_IDS, DOGS, label_for, species_id

# Cats and dogs interleaved, so the first K breeds always hold both species.
SYNTHETIC_ORDER = [name for pair in zip(CATS, DOGS, strict=False) for name in pair] + DOGS[len(CATS):]
BREEDS: list[Label] = [label_for(name) for name in SYNTHETIC_ORDER]

PALETTE = [
    (220, 40, 40), (40, 170, 60), (40, 70, 220), (240, 220, 40), (200, 50, 200), (40, 210, 220),
    (250, 140, 20), (120, 50, 160), (245, 245, 245), (20, 20, 20), (130, 80, 30), (250, 160, 190),
]
SHAPES = ("ellipse", "box", "diamond")
TEXTURES = ("plain", "stripes", "spots")


class Level(StrEnum):
    easy = "easy"
    medium = "medium"
    hard = "hard"


class SyntheticConfig(BaseModel):
    breeds: int = Field(6, ge=2, le=len(SYNTHETIC_ORDER))
    first: int = Field(0, ge=0, description="skip this many breeds of the fixed order (for new-breed sets)")
    level: Level = Level.easy
    train_per_breed: int = Field(40, ge=1)
    test_per_breed: int = Field(20, ge=1)
    size: int = Field(96, ge=32)
    seed: int = 0


class _Look(BaseModel):
    colour: tuple[int, int, int]
    shape: str
    pointy_ears: bool
    texture: str


def look(index: int) -> _Look:
    return _Look(
        colour=PALETTE[index % len(PALETTE)],
        shape=SHAPES[(index // 2) % len(SHAPES)],
        pointy_ears=SYNTHETIC_ORDER[index] in CATS,
        texture=TEXTURES[(index // len(PALETTE)) % len(TEXTURES)],
    )


def draw_pet(index: int, level: Level, size: int, rng: random.Random) -> Image.Image:
    pet = look(index)
    hard = level is Level.hard
    background = (128, 128, 128) if level is Level.easy else tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    if hard:
        _clutter(draw, size, rng)
    scale = rng.uniform(0.6, 0.8) if level is Level.easy else rng.uniform(0.3 if hard else 0.4, 0.8)
    jitter = 0.05 if level is Level.easy else (1 - scale) / 2
    half = scale * size / 2
    cx = size / 2 + rng.uniform(-jitter, jitter) * size
    cy = size / 2 + rng.uniform(-jitter, jitter) * size
    colour = _jitter_colour(pet.colour, rng, 40 if hard else 10)
    _body(draw, pet.shape, (cx, cy), half, colour)
    _ears(draw, pet.pointy_ears, (cx, cy), half, colour)
    _texture(draw, pet.texture, (cx, cy), half)
    if level is not Level.easy:
        img = img.rotate(rng.uniform(-30, 30), fillcolor=background)  # type: ignore[arg-type]
    return _noise(img, rng, {Level.easy: 6, Level.medium: 14, Level.hard: 28}[level])


def _jitter_colour(colour: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)
    return r, g, b


def _body(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], half: float, colour) -> None:  # type: ignore[no-untyped-def]
    cx, cy = centre
    box = (cx - half, cy - half * 0.75, cx + half, cy + half * 0.75)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "box":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half * 0.8), (cx + half, cy), (cx, cy + half * 0.8), (cx - half, cy)], fill=colour)


def _ears(draw: ImageDraw.ImageDraw, pointy: bool, centre: tuple[float, float], half: float, colour) -> None:  # type: ignore[no-untyped-def]
    cx, cy = centre
    top = cy - half * 0.7
    for side in (-1, 1):
        x = cx + side * half * 0.5
        if pointy:
            draw.polygon([(x - half * 0.2, top), (x + half * 0.2, top), (x, top - half * 0.45)], fill=colour)
        else:
            draw.ellipse((x - half * 0.18, top - half * 0.1, x + half * 0.18, top + half * 0.5), fill=(60, 40, 20))


def _texture(draw: ImageDraw.ImageDraw, texture: str, centre: tuple[float, float], half: float) -> None:
    cx, cy = centre
    if texture == "stripes":
        for k in range(-2, 3):
            x = cx + k * half * 0.3
            draw.line((x, cy - half * 0.5, x, cy + half * 0.5), fill=(0, 0, 0), width=max(1, int(half / 12)))
    elif texture == "spots":
        r = half * 0.1
        for dx, dy in ((-0.4, -0.2), (0.3, -0.3), (0.0, 0.2), (-0.3, 0.35), (0.4, 0.25)):
            x, y = cx + dx * half, cy + dy * half
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 0, 0))


def _clutter(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    for _ in range(rng.randint(3, 8)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.12)
        draw.rectangle((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))  # type: ignore[arg-type]


def _noise(img: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, (img.height, img.width, 3))
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def make_synthetic_data(out: Path, cfg: SyntheticConfig) -> Path:
    """Write images/ and annotations/{list,trainval,test}.txt like Oxford-IIIT Pet does."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    splits: dict[str, list[str]] = {"trainval": [], "test": []}
    indices = range(cfg.first, min(cfg.first + cfg.breeds, len(SYNTHETIC_ORDER)))
    per_breed = cfg.train_per_breed + cfg.test_per_breed
    with tqdm(total=len(indices) * per_breed, desc="synthetic pets", unit="img") as bar:
        for index in indices:
            name = SYNTHETIC_ORDER[index]
            species = species_id(name)
            breed_in_species = (CATS if species == 1 else DOGS).index(name) + 1
            for n in range(per_breed):
                stem = f"{name}_{n + 1}"
                draw_pet(index, cfg.level, cfg.size, rng).save(out / "images" / f"{stem}.jpg", quality=92)
                split = "trainval" if n < cfg.train_per_breed else "test"
                splits[split].append(f"{stem} {CLASS_IDS[name]} {species} {breed_in_species}")
                bar.update()
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    for split, lines in splits.items():
        (out / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (out / "annotations" / "list.txt").write_text(header + "\n".join(splits["trainval"] + splits["test"]) + "\n")
    return out
