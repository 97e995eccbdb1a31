"""`petbreed batch-predict`: two Cloud Run tasks + merge give exactly what one task gives, on GCS
(emulator), in input order, with an unreadable image reported in its line instead of a crash."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from adapter_contract.storage import open_storage
from finetune.batch_predict import Item, merge, part_key, predict_lines, read_image_list, shard_of
from finetune.data import DataError
from tests.conftest import petbreed, summary

CORRUPT = "corrupt.jpg"


def _lines(uri: str) -> list[dict[str, object]]:
    parent, _, name = uri.rpartition("/")
    return [json.loads(line) for line in open_storage(parent).read_bytes(name).decode().splitlines()]


@pytest.fixture(scope="module")
def image_list(gcs_emulator: str, synthetic_data: Path) -> str:
    """12 synthetic images and a corrupt one (13 entries), uploaded to the bucket and listed in a
    shuffled (not sorted) order: mostly relative keys, one absolute gs:// URI, one local path."""
    bucket = open_storage(f"{gcs_emulator}/batch")
    images = sorted((synthetic_data / "images").glob("*.jpg"))[::17][:12]
    for path in images[1:]:
        bucket.upload_file(path, f"images/{path.name}")
    bucket.write_bytes(f"images/{CORRUPT}", b"\xff\xd8\xff\xe0 this is not a jpeg")
    entries = [f"images/{p.name}" for p in images[2:]] + [f"images/{CORRUPT}", str(images[0])]
    random.Random(0).shuffle(entries)
    entries.append(f"{gcs_emulator}/batch/images/{images[1].name}")
    bucket.write_bytes("list.txt", ("# images to label\n" + "\n".join(entries) + "\n").encode())
    return f"{gcs_emulator}/batch/list.txt"


def _run(image_list: str, output: str, registry: str, model: Path, cache: Path, *extra: str,
         env: dict[str, str] | None = None) -> dict[str, object]:
    result = petbreed(
        "batch-predict", "--images", image_list, "--output", output, "--adapter", "pets@1", "--registry", registry,
        "--base-model", str(model), "--cache-dir", str(cache), "--batch-size", "4", "--top-k", "10", *extra, env=env,
    )
    return summary(result)


def test_two_tasks_then_merge_equal_one_task(
    image_list: str, gcs_emulator: str, trained_registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    single, sharded = f"{gcs_emulator}/out/single", f"{gcs_emulator}/out/sharded"
    cache = tmp_path / "cache"
    one = _run(image_list, single, trained_registry, tiny_model, cache)
    assert one["merged"] == f"{single}/predictions.jsonl" and one["errors"] == 1

    first = _run(image_list, sharded, trained_registry, tiny_model, cache, "--shard", "strided",
                 env={"CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "2"})
    assert first["merged"] is None, "task 0 must not merge while task 1's part is missing"
    last = _run(image_list, sharded, trained_registry, tiny_model, cache, "--shard", "strided",
                env={"CLOUD_RUN_TASK_INDEX": "1", "CLOUD_RUN_TASK_COUNT": "2"})
    assert last["merged"] == f"{sharded}/predictions.jsonl", "the task finding all parts merges"
    assert last["part"] == f"{sharded}/shards/part-00001-of-00002.jsonl"
    assert int(str(first["images"])) + int(str(last["images"])) == 13

    merged_again = summary(petbreed("batch-predict", "--images", image_list, "--output", sharded, "--merge"))
    assert merged_again["merged"] == f"{sharded}/predictions.jsonl" and merged_again["errors"] == 1

    expected, got = _lines(f"{single}/predictions.jsonl"), _lines(f"{sharded}/predictions.jsonl")
    listed = [item.path for item in read_image_list(image_list)]
    assert [line["path"] for line in got] == [line["path"] for line in expected] == listed
    assert [line["index"] for line in got] == list(range(13))
    for a, b in zip(expected, got, strict=True):
        assert a["label"] == b["label"] and a["error"] == b["error"]
        pa = {t["label"]: t["probability"] for t in a["top_k"]}  # type: ignore[attr-defined]
        pb = {t["label"]: t["probability"] for t in b["top_k"]}  # type: ignore[attr-defined]
        assert pa.keys() == pb.keys()
        assert all(abs(pa[k] - pb[k]) < 1e-6 for k in pa), (a["path"], pa, pb)

    corrupt = [line for line in got if str(line["path"]).endswith(CORRUPT)]
    assert len(corrupt) == 1 and corrupt[0]["label"] is None and corrupt[0]["top_k"] == []
    # JPEG magic then garbage: PIL takes it for a JPEG and fails while decoding it.
    assert str(corrupt[0]["error"]).startswith(("OSError", "UnidentifiedImageError")), corrupt[0]["error"]
    good = [line for line in got if line["error"] is None]
    assert len(good) == 12
    for line in good:
        assert line["adapter"] == "pets@1" and len(line["top_k"]) == 6  # type: ignore[arg-type]
        assert line["confidence"] == line["top_k"][0]["probability"]  # type: ignore[index]
        assert abs(sum(t["probability"] for t in line["top_k"]) - 1) < 1e-5  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize(("n", "count"), [(12, 2), (10, 3), (2, 5), (1, 1)])
def test_shards_cover_every_image_once(mode: str, n: int, count: int) -> None:
    items = [Item(i, f"img-{i}.jpg") for i in range(n)]
    shards = [shard_of(items, i, count, mode) for i in range(count)]
    assert sorted(it.index for shard in shards for it in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_list_formats_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("# comment\nx/1.jpg\n\n/abs/2.jpg\ngs://b/3.jpg\n")
    (tmp_path / "a.csv").write_text("path,label\nx/1.jpg,pug\n/abs/2.jpg,\ngs://b/3.jpg,pug\n")
    (tmp_path / "a.jsonl").write_text('{"path": "x/1.jpg"}\n{"path": "/abs/2.jpg"}\n{"path": "gs://b/3.jpg"}\n')
    want = [str(tmp_path / "x/1.jpg"), "/abs/2.jpg", "gs://b/3.jpg"]
    for name in ("a.txt", "a.csv", "a.jsonl"):
        assert [it.path for it in read_image_list(str(tmp_path / name))] == want
    (tmp_path / "bad.csv").write_text("file\n1.jpg\n")
    with pytest.raises(DataError, match="no `path`"):
        read_image_list(str(tmp_path / "bad.csv"))


def test_merge_refuses_missing_and_stale_parts(tmp_path: Path) -> None:
    out = open_storage(str(tmp_path))
    items = [Item(0, "/a.jpg"), Item(1, "/b.jpg")]
    line = {"index": 0, "path": "/a.jpg", "adapter": "pets@1", "label": "x", "top_k": [], "error": None}
    out.write_bytes(part_key(0, 2), (json.dumps(line) + "\n").encode())
    with pytest.raises(DataError, match="1 of 2 parts missing"):
        merge(out, items, 2)
    out.write_bytes(part_key(1, 2), (json.dumps({**line, "index": 1, "path": "/other.jpg"}) + "\n").encode())
    with pytest.raises(DataError, match="do not match the image list"):
        merge(out, items)


class _FixedScorer:
    ref, labels = "fake@1", ["a", "b", "c"]

    def distributions(self, images: list[Image.Image]) -> list[list[float]]:
        return [[0.2, 0.5, 0.3] for _ in images]


def test_unreadable_images_become_error_lines(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = ["ok.png", "bad.jpg", "missing.jpg", "ok.png"]
    items = [Item(i, str(tmp_path / p)) for i, p in enumerate(paths)]
    lines = list(predict_lines(_FixedScorer(), items, batch_size=3, top_k=2, workers=2))  # type: ignore[arg-type]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["label"] for line in lines] == ["b", None, None, "b"]
    assert lines[0]["top_k"] == [{"label": "b", "probability": 0.5}, {"label": "c", "probability": 0.3}]
    assert lines[1]["error"] == f"UnidentifiedImageError: cannot identify image file {tmp_path / 'bad.jpg'}"
    assert str(lines[2]["error"]).startswith("FileNotFoundError")
