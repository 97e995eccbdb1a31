"""The tiny Gemma 4 is a real checkpoint: it reloads through the Auto* classes, and its saved
tokenizer encodes exactly like the one that was built (vLLM reads the saved one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from finetune.synthetic import BREEDS
from finetune.tiny_model import build_tokenizer

SAMPLES = [
    " pug", "American Pit Bull Terrier", "What breed is the pet in this photo?", "zzq ünïcode 🐶 \t tabs",
    "<|turn>model\nBeagle<turn|>\n", *[b.text for b in BREEDS],
]


@pytest.mark.parametrize("text", SAMPLES)
def test_saved_tokenizer_encodes_like_the_built_one(tiny_model: Path, text: str) -> None:
    built = build_tokenizer(1024)
    saved = AutoTokenizer.from_pretrained(tiny_model)
    assert saved(text)["input_ids"] == built(text)["input_ids"]
    assert saved.decode(saved(text, add_special_tokens=False)["input_ids"]) == text
    assert saved.unk_token_id not in saved(text)["input_ids"]


def test_checkpoint_reloads_through_auto_classes(tiny_model: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model)
    processor = AutoProcessor.from_pretrained(tiny_model)
    assert config.model_type == "gemma4"
    assert type(processor).__name__ == "Gemma4Processor"
    assert len(processor.tokenizer) == config.text_config.vocab_size
    saved = json.loads((tiny_model / "config.json").read_text())
    assert saved["vision_config"]["default_output_length"] == processor.image_processor.max_soft_tokens


def test_an_image_token_budget_given_to_the_processor_is_what_images_become(tiny_model: Path) -> None:
    from PIL import Image

    from finetune.model import load_processor

    def soft_tokens(budget: int | None) -> int:
        processor = load_processor(str(tiny_model), budget)
        return int(processor.image_processor(Image.new("RGB", (96, 96)))["num_soft_tokens_per_image"][0])

    counts = {budget: soft_tokens(budget) for budget in (None, 70, 140, 280)}
    assert counts[None] == counts[70] <= 70 < counts[140] <= 140 < counts[280] <= 280, counts


def test_build_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    from finetune.tiny_model import TinyModelConfig, make_tiny_model

    again = make_tiny_model(tmp_path / "again", TinyModelConfig())
    assert (again / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_kv_shared_layers_get_the_k_norm_weights_vllm_loads(tmp_path: Path) -> None:
    """E4B-shaped builds share the KV of their last layers; transformers saves no k_norm for
    those, vLLM requires one of the layer's head size (which differs for full attention)."""
    from safetensors import safe_open

    from finetune.tiny_model import TinyModelConfig, make_tiny_model

    out = make_tiny_model(tmp_path / "model", TinyModelConfig(shape="tiny-kv"))
    weights = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            weights.update({name: fh.get_slice(name).get_shape() for name in fh.keys()})  # noqa: SIM118
    layer = "model.language_model.layers.{}.self_attn.{}.weight"
    assert weights[layer.format(2, "k_norm")] == weights[layer.format(2, "q_norm")] == [32]
    assert weights[layer.format(3, "k_norm")] == weights[layer.format(3, "q_norm")] == [64]
