"""Datasets: one loader for four sources, all ending as (image path, label id) pairs.

- Oxford-IIIT Pet layout: images/*.jpg + annotations/{trainval,test,list}.txt (the synthetic set
  is written in this layout too);
- a class-per-folder tree: ROOT/<label>/*.jpg, or ROOT/{train,test}/<label>/*.jpg;
- a manifest: CSV with columns path,label[,split] or JSONL with those keys; paths may be relative
  to the manifest, absolute, or gs:// URIs.

A `gs://` dataset is copied to a local cache first, then read like a local one. Every image is
decoded once before training; unreadable ones are skipped and listed in the DataReport.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from PIL import Image
from tqdm import tqdm

from adapter_contract.image import to_model_input
from adapter_contract.labels import LabelSet
from adapter_contract.storage import download_tree, is_gcs, open_storage
from finetune.breeds import SPECIES_IDS, label_for

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


class DataError(Exception):
    """A dataset that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class Example:
    path: Path
    label: str


@dataclass
class DataReport:
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.skipped)} unreadable image(s) skipped"


@dataclass
class Dataset:
    train: list[Example]
    test: list[Example]
    labels: LabelSet
    report: DataReport

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for ex in sorted(self.train + self.test, key=lambda e: str(e.path)):
            digest.update(f"{ex.path.name}\t{ex.label}\n".encode())
        return digest.hexdigest()[:16]


def load_image(source: Path | IO[bytes]) -> Image.Image:
    """Decode (a very large photo at a reduced size), apply EXIF orientation, return RGB (any mode,
    alpha, CMYK or palette): `adapter_contract.image.to_model_input`, as serving does."""
    with Image.open(source) as img:
        return to_model_input(img)


def load_dataset(uri: str, cache_dir: Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    root = _materialise(uri, cache_dir)
    train, test, species = _read_rows(root, test_fraction, seed)
    report = DataReport()
    train, test = _readable(train, report), _readable(test, report)
    if not train:
        raise DataError(f"no readable training images in {uri}")
    train_labels = sorted({ex.label for ex in train})
    unknown = sorted({ex.label for ex in test} - set(train_labels))
    if unknown:
        raise DataError(f"test labels not in the training set: {', '.join(unknown)}")
    labels = LabelSet(labels=[label_for(name, species.get(name)) for name in train_labels])
    return Dataset(train=train, test=test, labels=labels, report=report)


def _materialise(uri: str, cache_dir: Path) -> Path:
    if is_gcs(uri):
        local = cache_dir / "datasets" / uri.removeprefix("gs://").replace("/", "_")
        if not local.exists():
            storage = open_storage(uri)
            if not storage.list():
                raise DataError(f"dataset {uri} is empty")
            download_tree(storage, "", local)
        return local
    root = Path(uri)
    if not root.exists():
        raise DataError(f"dataset path {uri} does not exist")
    return root


def _read_rows(root: Path, test_fraction: float, seed: int) -> tuple[list[Example], list[Example], dict[str, str]]:
    if root.is_file():
        rows, has_split = _manifest_rows(root)
        species: dict[str, str] = {}
    elif (root / "annotations" / "trainval.txt").exists():
        rows, species, has_split = _oxford_rows(root), _oxford_species(root), True
    else:
        rows, has_split = _folder_rows(root)
        species = {}
    if not rows:
        raise DataError(f"no images found in {root}")
    if has_split:
        return [e for e, s in rows if s == "train"], [e for e, s in rows if s == "test"], species
    train, test = _stratified_split([e for e, _ in rows], test_fraction, seed)
    return train, test, species


def _oxford_rows(root: Path) -> list[tuple[Example, str]]:
    rows = []
    for split_file, split in (("trainval.txt", "train"), ("test.txt", "test")):
        path = root / "annotations" / split_file
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                stem = line.split()[0]
                rows.append((Example(root / "images" / f"{stem}.jpg", stem.rsplit("_", 1)[0]), split))
    return rows


def _oxford_species(root: Path) -> dict[str, str]:
    """Breed -> species from list.txt (SPECIES 1 = cat, 2 = dog), as the dataset defines it."""
    path = root / "annotations" / "list.txt"
    species = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#"):
                species[parts[0].rsplit("_", 1)[0]] = SPECIES_IDS.get(int(parts[2]), "")
    return species


def _folder_rows(root: Path) -> tuple[list[tuple[Example, str]], bool]:
    split_dirs = [(root / name, split) for name, split in (("train", "train"), ("test", "test"))]
    if all(d.is_dir() for d, _ in split_dirs):
        return [row for d, split in split_dirs for row in _class_folders(d, split)], True
    return _class_folders(root, ""), False


def _class_folders(root: Path, split: str) -> list[tuple[Example, str]]:
    return [
        (Example(path, folder.name), split)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def _manifest_rows(path: Path) -> tuple[list[tuple[Example, str]], bool]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as fh:
            records = list(csv.DictReader(fh))
    else:
        raise DataError(f"manifest {path} must be .csv or .jsonl")
    missing = [i + 1 for i, r in enumerate(records) if not r.get("path") or not r.get("label")]
    if missing:
        raise DataError(f"manifest {path}: rows {missing[:5]} lack a path or a label")
    has_split = all(r.get("split") in ("train", "test") for r in records) and bool(records)
    return [(Example(_resolve(path, r["path"]), r["label"]), r.get("split", "")) for r in records], has_split


def _resolve(manifest: Path, entry: str) -> Path:
    if is_gcs(entry):
        bucket_uri, _, key = entry.rpartition("/")
        local = manifest.parent / ".gcs-cache" / entry.removeprefix("gs://")
        if not local.exists():
            open_storage(bucket_uri).download_file(key, local)
        return local
    candidate = Path(entry)
    return candidate if candidate.is_absolute() else manifest.parent / candidate


def _stratified_split(rows: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({e.label for e in rows}):
        items = [e for e in rows if e.label == label]
        rng.shuffle(items)
        n_test = round(len(items) * test_fraction) if len(items) > 1 else 0
        test += items[:n_test]
        train += items[n_test:]
    return train, test


def _readable(rows: list[Example], report: DataReport) -> list[Example]:
    kept = []
    for ex in tqdm(rows, desc="checking images", unit="img", leave=False):
        try:
            load_image(ex.path)
            kept.append(ex)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            report.skipped.append((str(ex.path), f"{type(err).__name__}: {err}"))
    return kept
