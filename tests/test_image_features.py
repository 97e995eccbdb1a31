"""With LoRA on the language model only, training reuses each image's soft tokens after its first
epoch (`cache_image_features`): the run must be the run it would be without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.data import load_dataset
from finetune.image_features import tower_is_frozen, vision_tower
from finetune.model import LoraSettings, add_lora, load_base
from finetune.settings import TrainSettings
from finetune.train import fit, prepare

LM_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _two_epochs(tiny_model: Path, synthetic_data: Path, out: Path, cache: bool,
                gib: float = 2.0) -> tuple[list[float], int, bool]:
    """The losses of a two-epoch run and how often the vision encoder ran."""
    dataset = load_dataset(str(synthetic_data), out / "cache")
    batch = 16
    settings = TrainSettings(
        data=str(synthetic_data), base_model=str(tiny_model), output=str(out / "run"), cache_dir=out / "cache",
        max_steps=2 * (len(dataset.train) // batch), batch_size=batch, eval_every=0, checkpoint_every=10**6,
        lora=LoraSettings(targets=LM_ONLY), lr=1e-3, cache_image_features=cache, image_cache_gib=gib,
    )
    run = prepare(settings, dataset)
    calls = []
    vision_tower(run.model).encoder.register_forward_hook(lambda *_: calls.append(1))
    fit(run)
    return [r["loss"] for r in run.records], len(calls), run.features is not None


def test_cached_soft_tokens_train_exactly_as_recomputed_ones(tiny_model: Path, synthetic_data: Path,
                                                            tmp_path: Path) -> None:
    cached, cached_calls, cache_on = _two_epochs(tiny_model, synthetic_data, tmp_path / "on", cache=True)
    recomputed, recomputed_calls, cache_off = _two_epochs(tiny_model, synthetic_data, tmp_path / "off", cache=False)
    # No room to keep any: every step runs the encoder again, outside autograd, to the same losses.
    unkept, unkept_calls, _ = _two_epochs(tiny_model, synthetic_data, tmp_path / "full", cache=True, gib=0)

    assert cache_on and not cache_off
    assert cached == pytest.approx(recomputed, abs=1e-5)
    assert unkept == pytest.approx(recomputed, abs=1e-5)
    steps = len(recomputed)
    assert recomputed_calls == unkept_calls == steps
    # Epoch 2 runs the encoder only for the few images epoch 1 left out (its last partial batch).
    assert steps // 2 <= cached_calls < steps


def test_the_cache_applies_only_where_the_tower_is_frozen(tiny_model: Path) -> None:
    base = load_base(str(tiny_model), torch.device("cpu"))
    assert tower_is_frozen(add_lora(base, LoraSettings(targets=LM_ONLY)))
    # The tiny default's all-linear LoRA reaches the tower's patch embedder: its output changes as it trains.
    base = load_base(str(tiny_model), torch.device("cpu"))
    assert not tower_is_frozen(add_lora(base, LoraSettings()))
