"""Retraining for new breeds: extend the parent adapter's label set, continue from its weights,
and replay a sample of the old breeds' training images so they are not forgotten.

The old data is found through the parent's manifest (`training.data`), so a retrain needs only
the new images. Old labels keep their indices; new ones are appended.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from adapter_contract.manifest import AdapterManifest
from adapter_contract.registry import Registry
from finetune.data import DataError, Dataset, Example, load_dataset
from finetune.settings import TrainSettings


@dataclass
class RetrainPlan:
    dataset: Dataset
    parent_dir: Path
    parent: AdapterManifest
    old_labels: list[str]
    new_labels: list[str]
    data_sources: list[str]


def plan(settings: TrainSettings, new: Dataset) -> RetrainPlan:
    assert settings.parent
    registry = Registry(settings.registry)
    name, version = registry.resolve(settings.parent)
    parent = registry.manifest(name, version)
    parent_dir = settings.cache_dir / "parents" / f"{name}-{version}"
    registry.download(name, version, parent_dir)
    sources = parent.training.get("data_sources")
    if not isinstance(sources, list) or not sources:
        raise DataError(f"{parent.ref} does not record its training data, so its breeds cannot be replayed")
    old = _union([load_dataset(uri, settings.cache_dir, settings.test_fraction, settings.seed) for uri in sources])
    old_ids = parent.labels.ids
    labels = parent.labels.extended(new.labels.labels)
    replay = _replay(old.train, old_ids, settings.replay_per_breed, settings.seed)
    old_test = [e for e in old.test if e.label in set(old_ids)]
    dataset = Dataset(train=new.train + replay, test=old_test + new.test, labels=labels, report=new.report)
    dataset.report.skipped += old.report.skipped
    new_ids = [i for i in labels.ids if i not in set(old_ids)]
    if not new_ids:
        raise DataError(f"the new data adds no breed that {parent.ref} does not already know")
    return RetrainPlan(dataset, parent_dir, parent, old_ids, new_ids, [*sources, settings.data])


def _union(parts: list[Dataset]) -> Dataset:
    labels = parts[0].labels
    for part in parts[1:]:
        labels = labels.extended(part.labels.labels)
    report = parts[0].report
    for part in parts[1:]:
        report.skipped += part.report.skipped
    return Dataset([e for p in parts for e in p.train], [e for p in parts for e in p.test], labels, report)


def _replay(rows: list[Example], labels: list[str], per_label: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    sample: list[Example] = []
    for label in labels:
        items = [e for e in rows if e.label == label]
        sample += rng.sample(items, min(per_label, len(items)))
    return sample
