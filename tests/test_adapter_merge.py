"""An adapter merged into the base weights (serve/adapter_merge.py): the weights against PEFT's own
merge, and the swap of versions. The served answers of a merged adapter, and a new version merged
while serving, are checked through the real server in tests/test_serve_api.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_contract.registry import Registry
from serve.adapter_merge import AdapterReplaced, MergedAdapter, merged_weights


@pytest.fixture(scope="module")
def pets(trained_registry: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained all-linear adapter: language model, vision tower and projector."""
    folder = tmp_path_factory.mktemp("merge") / "pets1"
    Registry(trained_registry).download("pets", 1, folder)
    return folder


def test_the_merged_weights_are_peft_merge_and_unload(tiny_model: Path, pets: Path) -> None:
    from finetune.model import load_adapter, load_base

    expected = load_adapter(load_base(str(tiny_model), torch.device("cpu")), pets).merge_and_unload().state_dict()
    merged, base = dict(merged_weights(tiny_model, pets)), _base(tiny_model)
    changed = [name for name, tensor in merged.items() if not torch.equal(tensor, base[name])]
    assert any("vision_tower" in name for name in changed) and any("language_model" in name for name in changed)
    for name in changed:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)


def _base(model: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))


@pytest.mark.parametrize("change", [{"use_dora": True}, {"rank_pattern": {"q_proj": 4}}, {"bias": "lora_only"},
                                    {"modules_to_save": ["lm_head"]}])
def test_adapters_that_are_not_plain_lora_are_refused_before_any_weight_is_read(
    tiny_model: Path, pets: Path, tmp_path: Path, change: dict[str, Any]
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(pets, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match="plain LoRA"):
        merged_weights(tiny_model, adapter)


def test_an_adapter_for_weights_the_base_lacks_is_refused_before_any_weight_is_read(
    tiny_model: Path, pets: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(tiny_model / "config.json", base)
    tensors = {k: v for k, v in _base(tiny_model).items() if "vision_tower" not in k}
    from safetensors.torch import save_file

    save_file(tensors, str(base / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        merged_weights(base, pets)


class FakeEngine:
    """Records merges by the adapter folder's name (unit tests only: the real engine's merges are in
    tests/test_serve_api.py)."""

    def __init__(self, *failing: str) -> None:
        self.merged: list[str] = []
        self.failing = failing

    async def collective_rpc(self, method: str, args: tuple[str, str]) -> None:
        assert method == "petbreed_merge_adapter"
        await asyncio.sleep(0.01)
        name = Path(args[1]).name
        if name in self.failing:
            raise RuntimeError("reload failed")
        self.merged.append(name)

    async def reset_prefix_cache(self) -> None:
        pass


Versions = Callable[[str], Any]


@pytest.fixture
def versions(pets: Path, tmp_path: Path) -> Versions:
    """An entry per version, each a copy of the trained adapter in a folder named for its ref."""
    from types import SimpleNamespace

    def entry(ref: str) -> Any:
        folder = tmp_path / ref
        if not folder.exists():
            shutil.copytree(pets, folder)
        return SimpleNamespace(ref=ref, path=folder)

    return entry


def test_a_swap_waits_for_running_classifications_and_later_requests_for_the_old_version_are_told_to_retry(
    tiny_model: Path, versions: Versions
) -> None:
    async def scenario() -> list[str]:
        engine, merged, events = FakeEngine(), MergedAdapter(tiny_model), []
        await merged.swap(engine, versions("pets@1"))

        async def classify(ref: str) -> None:
            try:
                async with merged.serving(versions(ref)):
                    events.append(f"start {ref}")
                    await asyncio.sleep(0.05)
                    events.append(f"end {ref}")
            except AdapterReplaced:
                events.append(f"replaced {ref}")

        running = asyncio.create_task(classify("pets@1"))
        await asyncio.sleep(0.01)
        swap = asyncio.create_task(merged.swap(engine, versions("pets@2")))
        while not merged._swapping:  # the swap has checked the adapter and now waits for `running`
            await asyncio.sleep(0.001)
        late = asyncio.create_task(classify("pets@1"))  # resolved before the swap, runs after it
        await asyncio.gather(running, swap, late)
        events.append(f"merged {engine.merged}")
        await classify("pets@2")
        return events

    assert asyncio.run(scenario()) == [
        "start pets@1", "end pets@1", "replaced pets@1", "merged ['pets@1', 'pets@2']", "start pets@2", "end pets@2",
    ]


def test_an_adapter_that_cannot_be_merged_is_refused_before_the_engine_is_asked(
    tiny_model: Path, versions: Versions
) -> None:
    dora = versions("pets@2")
    config = json.loads((dora.path / "adapter_config.json").read_text())
    (dora.path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))

    async def scenario() -> tuple[list[str], str]:
        engine, merged = FakeEngine(), MergedAdapter(tiny_model)
        await merged.swap(engine, versions("pets@1"))
        with pytest.raises(ValueError, match="plain LoRA"):
            await merged.swap(engine, dora)
        assert merged.entry is not None
        return engine.merged, merged.entry.ref

    assert asyncio.run(scenario()) == (["pets@1"], "pets@1")


def test_a_failed_merge_merges_the_served_version_again_and_keeps_serving_it(
    tiny_model: Path, versions: Versions
) -> None:
    async def scenario() -> tuple[list[str], str]:
        engine, merged = FakeEngine("pets@2"), MergedAdapter(tiny_model)
        await merged.swap(engine, versions("pets@1"))
        with pytest.raises(RuntimeError, match="reload failed"):
            await merged.swap(engine, versions("pets@2"))
        async with merged.serving(versions("pets@1")):
            pass
        assert merged.entry is not None
        return engine.merged, merged.entry.ref

    assert asyncio.run(scenario()) == (["pets@1", "pets@1"], "pets@1")


def test_when_merging_the_served_version_back_fails_too_the_weights_are_broken_and_no_request_runs(
    tiny_model: Path, versions: Versions
) -> None:
    async def scenario() -> bool:
        engine, merged = FakeEngine(), MergedAdapter(tiny_model)
        await merged.swap(engine, versions("pets@1"))
        engine.failing = ("pets@1", "pets@2")
        with pytest.raises(RuntimeError, match="reload failed"):
            await merged.swap(engine, versions("pets@2"))
        with pytest.raises(RuntimeError, match="unusable"):
            async with merged.serving(versions("pets@1")):
                pass
        return merged.broken

    assert asyncio.run(scenario())
