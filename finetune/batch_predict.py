"""`petbreed batch-predict`: label a long list of images with a registry adapter, as a Cloud Run
job of N tasks.

The list (a .txt of paths, or a CSV/JSONL manifest with a `path` column/key; local or gs://) is
read by every task in the same order. Task i of N scores its shard (contiguous or strided) with
the transformers + PEFT scorer that evaluation uses (`finetune.scoring.label_distributions`) and
writes `OUTPUT/shards/part-{i:05d}-of-{N:05d}.jsonl` in one write (atomic locally and on GCS).
Each task then lists the parts; the one that finds all N present writes `OUTPUT/predictions.jsonl`
in input order. `--merge` does only that step, for when a task was re-run by hand.

An image that cannot be read or decoded gets a line with `error` set; it never stops the job.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from adapter_contract.storage import Storage, StorageError, is_gcs, join, open_storage
from finetune.data import DataError, load_image

PREDICTIONS_FILE = "predictions.jsonl"
SHARDS_DIR = "shards"
# Every failure a single image can cause: a missing file, bytes that are not an image, a truncated
# file, a decompression bomb. Anything else is a bug and should stop the task.
_IMAGE_ERRORS = (OSError, ValueError, StorageError, Image.DecompressionBombError)


def _task(name: str) -> AliasChoices:
    """Cloud Run's variable first, then ours, then the field name (the `--task-index` flag)."""
    return AliasChoices(f"CLOUD_RUN_{name.upper()}", f"PETBREED_{name.upper()}", name)


class BatchPredictSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PETBREED_", cli_kebab_case=True, cli_implicit_flags=True, populate_by_name=True
    )

    images: str = Field(description="image list: .txt (one path a line) or .csv/.jsonl with `path`; local or gs://")
    output: str = Field(description="folder for shards/ and predictions.jsonl; local or gs://")
    adapter: str = Field("pets", description="NAME or NAME@VERSION in the registry")
    registry: str = Field("artifacts/registry", description="adapter registry: local folder or gs://bucket/prefix")
    base_model: str = Field("artifacts/tiny-gemma4", description="Hugging Face id, local folder or gs:// prefix")
    cache_dir: Path = Path(".cache/petbreed")
    batch_size: int = Field(16, ge=1)
    read_workers: int = Field(8, ge=1, description="threads fetching and decoding images (GCS reads are I/O bound)")
    top_k: int = Field(5, ge=1, description="labels listed per image (capped at the adapter's label count)")
    shard: Literal["contiguous", "strided"] = Field(
        "contiguous", description="contiguous: task i takes the i-th block; strided: every N-th image from i"
    )
    merge: bool = Field(False, description="only merge the shards already written into predictions.jsonl")
    device: str = "auto"

    task_index: int = Field(0, ge=0, validation_alias=_task("task_index"))
    task_count: int = Field(1, ge=1, validation_alias=_task("task_count"))


class BatchSummary(BaseModel):
    adapter: str | None
    task_index: int
    task_count: int
    images: int
    errors: int
    part: str | None
    merged: str | None


@dataclass(frozen=True)
class Item:
    index: int  # position in the input list: the merged file's order
    path: str  # as resolved: an absolute local path or a gs:// URI


# ---------------------------------------------------------------- the list and its shards


def read_image_list(uri: str) -> list[Item]:
    """The list's entries in file order; relative paths are taken relative to the list's folder."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    parent = parent or "."
    try:
        text = open_storage(parent).read_bytes(name).decode("utf-8-sig")
    except StorageError:
        raise DataError(f"image list {uri} does not exist") from None
    entries = _entries(name, text, uri)
    if not entries:
        raise DataError(f"image list {uri} holds no images")
    return [Item(i, _resolve(parent, entry)) for i, entry in enumerate(entries)]


def _entries(name: str, text: str, uri: str) -> list[str]:
    if name.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif name.endswith(".csv"):
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    missing = [i + 1 for i, r in enumerate(records) if not str(r.get("path") or "").strip()]
    if missing:
        raise DataError(f"image list {uri}: rows {missing[:5]} have no `path`")
    return [str(r["path"]).strip() for r in records]


def _resolve(parent: str, entry: str) -> str:
    if is_gcs(entry) or Path(entry).is_absolute():
        return entry
    return join(parent, entry) if is_gcs(parent) else str((Path(parent) / entry).resolve())


def shard_of(items: Sequence[Item], index: int, count: int, mode: str) -> list[Item]:
    """Task `index` of `count`'s share: every item lands in exactly one shard, sizes differ by <= 1."""
    if not 0 <= index < count:
        raise DataError(f"task index {index} is outside 0..{count - 1}")
    if mode == "strided":
        return list(items[index::count])
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])


def part_key(index: int, count: int) -> str:
    return f"{SHARDS_DIR}/part-{index:05d}-of-{count:05d}.jsonl"


# ---------------------------------------------------------------- reading images


@functools.lru_cache(maxsize=16)
def _bucket(name: str) -> Storage:
    return open_storage(f"gs://{name}")


def read_image(path: str) -> Image.Image:
    """Decoded like finetune.data.load_image (EXIF orientation, then RGB), from memory: on Cloud
    Run the disk is RAM, so images are never staged as files."""
    if is_gcs(path):
        bucket, _, key = path.removeprefix("gs://").partition("/")
        data = _bucket(bucket).read_bytes(key)
    else:
        data = Path(path).read_bytes()
    return load_image(io.BytesIO(data))


# ---------------------------------------------------------------- scoring


class Scorer:
    """The published adapter on its base, with the prompt its manifest describes."""

    def __init__(self, settings: BatchPredictSettings) -> None:
        from adapter_contract.prompt import ClassificationPrompt
        from finetune.model import load_published, pick_device

        self.device = pick_device(settings.device)
        self.model, self.processor, manifest = load_published(
            settings.registry, settings.adapter, settings.base_model, settings.cache_dir, self.device
        )
        self.ref: str = manifest.ref
        self.labels: list[str] = manifest.labels.ids
        self.prompt = ClassificationPrompt.build(self.processor, manifest.labels)

    def distributions(self, images: Sequence[Image.Image]) -> list[list[float]]:
        from finetune.scoring import label_distributions

        return label_distributions(self.model, self.processor, self.prompt, images, self.device)


def _fetch(item: Item) -> Image.Image | str:
    """The decoded image, or the reason it cannot be used."""
    try:
        return read_image(item.path)
    except Image.UnidentifiedImageError:
        # PIL's own message names the in-memory buffer (an address), not the file.
        return f"UnidentifiedImageError: cannot identify image file {item.path}"
    except _IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())}"


def predict_lines(
    scorer: Scorer, items: Sequence[Item], batch_size: int, top_k: int, workers: int = 1
) -> Iterator[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in tqdm(range(0, len(items), batch_size), desc="batch-predict", unit="batch", leave=False):
            batch = items[start : start + batch_size]
            fetched = list(pool.map(_fetch, batch))  # in batch order, whatever order reads finish in
            images = [f for f in fetched if isinstance(f, Image.Image)]
            probs = iter(scorer.distributions(images) if images else [])
            for item, got in zip(batch, fetched, strict=True):
                if isinstance(got, str):
                    yield _line(item, scorer.ref, None, top_k, scorer.labels, got)
                else:
                    yield _line(item, scorer.ref, next(probs), top_k, scorer.labels, None)


def _line(
    item: Item, ref: str, probs: list[float] | None, top_k: int, labels: list[str], error: str | None
) -> dict[str, Any]:
    ranked = sorted(zip(labels, probs, strict=True), key=lambda lp: -lp[1]) if probs else []
    top = [{"label": label, "probability": p} for label, p in ranked[:top_k]]
    return {
        "index": item.index, "path": item.path, "adapter": ref,
        "label": top[0]["label"] if top else None, "confidence": top[0]["probability"] if top else None,
        "top_k": top, "error": error,
    }


def _jsonl(lines: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# ---------------------------------------------------------------- merging


def parts_present(out: Storage, count: int) -> bool:
    present = set(out.list(SHARDS_DIR))
    return all(part_key(i, count) in present for i in range(count))


def _part_counts(out: Storage) -> set[int]:
    return {int(key.rsplit("-of-", 1)[1].removesuffix(".jsonl")) for key in out.list(SHARDS_DIR) if "-of-" in key}


def merge(out: Storage, items: Sequence[Item], count: int | None = None) -> str:
    """Join the parts into predictions.jsonl in input order, after checking they belong to this
    list: every index once, each with the path the list gives it, all from one adapter version."""
    if count is None:
        counts = _part_counts(out)
        if len(counts) != 1:
            found = sorted(counts)
            raise DataError(f"{join(out.uri, SHARDS_DIR)} must hold the parts of one run, found counts {found}")
        count = counts.pop()
    missing = [part_key(i, count) for i in range(count) if not out.exists(part_key(i, count))]
    if missing:
        raise DataError(f"cannot merge: {len(missing)} of {count} parts missing, e.g. {join(out.uri, missing[0])}")
    lines = sorted((ln for i in range(count) for ln in _parse_jsonl(out.read_bytes(part_key(i, count)))),
                   key=lambda ln: int(ln["index"]))
    if [(ln["index"], ln["path"]) for ln in lines] != [(it.index, it.path) for it in items]:
        raise DataError(f"the parts in {join(out.uri, SHARDS_DIR)} do not match the image list (stale shards?)")
    if len({ln["adapter"] for ln in lines}) > 1:
        raise DataError(f"the parts in {join(out.uri, SHARDS_DIR)} come from different adapter versions")
    out.write_bytes(PREDICTIONS_FILE, _jsonl(lines))
    return join(out.uri, PREDICTIONS_FILE)


# ---------------------------------------------------------------- the job


def _existing_part(out: Storage, key: str, shard: Sequence[Item], scorer: Scorer) -> list[dict[str, Any]] | None:
    """A part a previous attempt of this task finished, if it covers this shard with this adapter:
    a Cloud Run retry after a crash past the write then skips straight to the merge check."""
    if not out.exists(key):
        return None
    lines = _parse_jsonl(out.read_bytes(key))
    same_items = [(ln["index"], ln["path"]) for ln in lines] == [(it.index, it.path) for it in shard]
    return lines if same_items and all(ln["adapter"] == scorer.ref for ln in lines) else None


def run_batch_predict(settings: BatchPredictSettings) -> BatchSummary:
    items = read_image_list(settings.images)
    out = open_storage(settings.output)
    return _merge_only(settings, items, out) if settings.merge else _run_task(settings, items, out)


def _merge_only(settings: BatchPredictSettings, items: list[Item], out: Storage) -> BatchSummary:
    merged = merge(out, items)
    errors = sum(1 for ln in _parse_jsonl(out.read_bytes(PREDICTIONS_FILE)) if ln["error"])
    return BatchSummary(adapter=None, task_index=settings.task_index, task_count=settings.task_count,
                        images=len(items), errors=errors, part=None, merged=merged)


def _run_task(settings: BatchPredictSettings, items: list[Item], out: Storage) -> BatchSummary:
    index, count = settings.task_index, settings.task_count
    shard = shard_of(items, index, count, settings.shard)
    scorer = Scorer(settings)
    key = part_key(index, count)
    lines = _existing_part(out, key, shard, scorer)
    if lines is None:
        lines = list(predict_lines(scorer, shard, settings.batch_size, settings.top_k, settings.read_workers))
        out.write_bytes(key, _jsonl(lines))
    merged = merge(out, items, count) if parts_present(out, count) else None
    return BatchSummary(adapter=scorer.ref, task_index=index, task_count=count, images=len(lines),
                        errors=sum(1 for ln in lines if ln["error"]), part=join(out.uri, key), merged=merged)
