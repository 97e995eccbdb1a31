"""The adapter table (serve/adapters.py) on a real registry, real adapters and the real processor.
The same refusals are also checked through the running server in tests/test_serve_api.py; this
file covers the cases that the CPU build of vLLM cannot show (no tower LoRA support)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoProcessor

from adapter_contract.labels import LabelSet
from adapter_contract.manifest import AdapterManifest, BaseModelRef, config_sha256
from adapter_contract.prompt import INSTRUCTION, PROMPT_VERSION, answer_terminator
from adapter_contract.registry import Registry
from finetune.synthetic import BREEDS
from serve.adapters import AdapterEntry, AdapterNotFound, AdapterTable, sync


@pytest.fixture(scope="module")
def registry(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """pets@1, pets@2 (all-linear LoRA), lm@1 (language model only, r=32), alien@1 (other base)."""
    import torch

    from finetune.model import LoraSettings, add_lora, load_base

    root = tmp_path_factory.mktemp("adapters")
    processor = AutoProcessor.from_pretrained(tiny_model)
    reg = Registry(str(root / "registry"))
    sha = config_sha256(tiny_model / "config.json")
    lm_only = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    for name, lora, base_sha in [
        ("pets", LoraSettings(r=8), sha), ("pets", LoraSettings(r=8), sha),
        ("lm", LoraSettings(r=32, targets=lm_only), sha), ("alien", LoraSettings(r=8), "f" * 64),
    ]:
        folder = root / f"{name}-{len(list(root.iterdir()))}"
        add_lora(load_base(str(tiny_model), torch.device("cpu")), lora).save_pretrained(folder)
        reg.publish(folder, AdapterManifest(
            name=name, version=1, base_model=BaseModelRef(id="tiny", config_sha256=base_sha),
            labels=LabelSet(labels=BREEDS[:6]), prompt_version=PROMPT_VERSION, instruction=INSTRUCTION,
            answer_terminator=answer_terminator(processor), data_fingerprint="-",
        ))
    return reg.uri, processor


def table(registry: tuple[str, object], tiny_model: Path, tmp_path: Path, **kwargs: object) -> AdapterTable:
    uri, processor = registry
    options: dict = {"max_lora_rank": 64, "default_name": "pets", **kwargs}
    return AdapterTable(uri, tmp_path, processor, config_sha256(tiny_model / "config.json"), **options)


async def _loaded(_: AdapterEntry) -> None:
    return None


def run_sync(t: AdapterTable) -> dict[str, list[str]]:
    return asyncio.run(sync(t, _loaded, asyncio.to_thread))


def test_loads_every_listed_version_and_refuses_another_base(
    registry: tuple[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    t = table(registry, tiny_model, tmp_path)
    result = run_sync(t)
    assert sorted(result["added"]) == ["lm@1", "pets@1", "pets@2"] and result["refused"] == ["alien@1"]
    assert t.resolve(None).ref == "pets@2" and t.resolve("pets@1").ref == "pets@1"
    assert "config sha256" in t.refused[("alien", 1)].reason
    with pytest.raises(AdapterNotFound, match="refused") as err:
        t.resolve("alien")
    assert err.value.refused
    for unknown in ("nope", "pets@7", "pets@x"):
        with pytest.raises(AdapterNotFound):
            t.resolve(unknown)
    assert run_sync(t) == {"added": [], "refused": [], "failed": []}  # nothing new, nothing redone
    # The prompt's token ids are the prompt text's, unexpanded (one image placeholder).
    entry = t.resolve("pets")
    processor = registry[1]
    assert list(entry.prompt_token_ids) == processor.tokenizer.encode(entry.prompt.text)  # type: ignore[attr-defined]
    assert entry.prompt_token_ids.count(processor.tokenizer.convert_tokens_to_ids("<|image|>")) == 1  # type: ignore[attr-defined]


def test_without_tower_lora_support_vision_adapters_are_refused(
    registry: tuple[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    """vLLM 0.24 cannot apply LoRA on Gemma 4's vision tower: all-linear adapters must not be served there."""
    t = table(registry, tiny_model, tmp_path, tower_lora=False)
    result = run_sync(t)
    assert result["added"] == ["lm@1"]
    assert "vision tower" in t.refused[("pets", 1)].reason


def test_merged_only_the_default_adapters_newest_version_is_loaded_and_a_newer_one_replaces_it(
    registry: tuple[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    """`merged_adapter`: the weights hold one version, so the table serves that one alone. Each sync
    loads at most one version (a merge reloads the whole model)."""
    uri = str(tmp_path / "registry")
    shutil.copytree(str(registry[0]), uri)
    t = table((uri, registry[1]), tiny_model, tmp_path, merged=True)
    assert run_sync(t) == {"added": ["pets@2"], "refused": [], "failed": []}
    with pytest.raises(AdapterNotFound):
        t.resolve("lm")
    reg = Registry(uri)
    reg.download("pets", 1, tmp_path / "pets1")
    newer = reg.publish(tmp_path / "pets1", reg.manifest("pets", 1))
    assert run_sync(t)["added"] == [newer.ref] == ["pets@3"]
    assert t.resolve(None).ref == "pets@3" and list(t.entries) == [("pets", 3)]
    with pytest.raises(AdapterNotFound):
        t.resolve("pets@2")


def test_an_image_budget_over_the_engines_is_refused(
    registry: tuple[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "registry")
    shutil.copytree(str(registry[0]), uri)
    reg = Registry(uri)
    reg.download("pets", 1, tmp_path / "pets1")
    larger, same = (reg.publish(tmp_path / "pets1", reg.manifest("pets", 1).model_copy(update={"image_soft_tokens": n}))
                    for n in (140, 70))
    t = table((uri, registry[1]), tiny_model, tmp_path, max_image_soft_tokens=70)
    result = run_sync(t)
    assert result["refused"] == ["alien@1", larger.ref] and same.ref in result["added"]
    reason = t.refused[("pets", larger.version)].reason
    assert "140 soft tokens" in reason and "PETBREED_VLLM__MAX_SOFT_TOKENS=140" in reason


def test_rank_over_the_engine_limit_is_refused(registry: tuple[str, object], tiny_model: Path, tmp_path: Path) -> None:
    t = table(registry, tiny_model, tmp_path, max_lora_rank=16)
    run_sync(t)
    assert "rank 32" in t.refused[("lm", 1)].reason
    assert ("pets", 1) in t.entries


def test_corrupt_download_is_retried_not_served(
    registry: tuple[str, object], tiny_model: Path, tmp_path: Path
) -> None:
    uri, _ = registry
    weights = Path(uri) / "lm" / "1" / "adapter_config.json"
    original = weights.read_text()
    weights.write_text(json.dumps({**json.loads(original), "r": 4}))  # no longer matches its sha256
    try:
        t = table(registry, tiny_model, tmp_path)
        assert run_sync(t)["failed"] == ["lm@1"]
        assert ("lm", 1) not in t.entries and ("lm", 1) not in t.refused
    finally:
        weights.write_text(original)
    assert run_sync(t)["added"] == ["lm@1"]  # the next sync tries again
