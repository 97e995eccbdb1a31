"""The four dataset sources and every bad-input case of the loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from finetune.data import DataError, load_dataset
from finetune.synthetic import SyntheticConfig, make_synthetic_data


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SyntheticConfig(breeds=3, train_per_breed=4, test_per_breed=2)
    return make_synthetic_data(tmp_path_factory.mktemp("d") / "s", cfg)


def test_oxford_layout_uses_its_splits_and_species(small_set: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(small_set), tmp_path)
    assert (len(ds.train), len(ds.test)) == (12, 6)
    assert ds.labels.ids == ["Abyssinian", "Bengal", "american_bulldog"]
    assert [label.species for label in ds.labels.labels] == ["cat", "cat", "dog"]
    assert ds.labels.labels[2].text == "American Bulldog"


def test_class_per_folder_tree_is_split_stratified(small_set: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for img in (small_set / "images").glob("*.jpg"):
        label = img.stem.rsplit("_", 1)[0]
        (tree / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(img, tree / label / img.name)
    ds = load_dataset(str(tree), tmp_path, test_fraction=0.5)
    assert len(ds.train) == len(ds.test) == 9
    assert {e.label for e in ds.test} == set(ds.labels.ids)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_with_splits(small_set: Path, tmp_path: Path, fmt: str) -> None:
    rows = [
        {"path": str(p), "label": p.stem.rsplit("_", 1)[0], "split": "test" if p.stem[-2:] in ("_5", "_6") else "train"}
        for p in sorted((small_set / "images").glob("*.jpg"))
    ]
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        manifest.write_text("path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows))
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(str(manifest), tmp_path)
    assert (len(ds.train), len(ds.test)) == (12, 6)


def test_corrupt_images_are_skipped_and_counted(small_set: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_set, broken)
    (broken / "images" / "Bengal_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = (broken / "images" / "Bengal_2.jpg").read_bytes()
    (broken / "images" / "Bengal_2.jpg").write_bytes(data[: len(data) // 3])
    (broken / "images" / "Abyssinian_1.jpg").unlink()
    ds = load_dataset(str(broken), tmp_path)
    assert len(ds.train) == 9
    assert len(ds.report.skipped) == 3
    assert any("Bengal_2" in path for path, _ in ds.report.skipped)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"), tmp_path)


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"), tmp_path)


def test_test_label_missing_from_train_is_a_clear_error(small_set: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(small_set, odd)
    lines = (odd / "annotations" / "trainval.txt").read_text().splitlines()
    (odd / "annotations" / "trainval.txt").write_text("\n".join(x for x in lines if not x.startswith("Bengal")))
    with pytest.raises(DataError, match="test labels not in the training set: Bengal"):
        load_dataset(str(odd), tmp_path)


def test_images_of_any_mode_become_rgb(tmp_path: Path) -> None:
    from finetune.data import load_image

    for mode in ("L", "RGBA", "CMYK", "P"):
        Image.new(mode, (8, 8)).save(tmp_path / f"x.{mode}.png" if mode != "CMYK" else tmp_path / "x.CMYK.jpg")
    for path in tmp_path.iterdir():
        assert load_image(path).mode == "RGB"
