"""Build a tiny, random-weight Gemma 4 checkpoint that loads like a real `google/gemma-4-*` one.

Same classes (Gemma4ForConditionalGeneration, GemmaTokenizer, Gemma4Processor), same files on
disk and a config vLLM accepts; only the sizes differ. The tokenizer is a Gemma-style BPE
(spaces as "▁", byte fallback) trained here on petbreed's own vocabulary, padded so every id of
the embedding decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel

from adapter_contract.prompt import INSTRUCTION
from finetune.synthetic import BREEDS

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|turn>", "<turn|>",
]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

# Gemma 4's turn markup: `<|turn>ROLE\n ... <turn|>\n`, the assistant role called "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


class TinyModelConfig(BaseModel):
    """Sizes of the tiny model. A random model learns faster with a wide init (see README)."""

    seed: int = 0
    vocab_size: int = 1024
    text_hidden: int = 64
    text_layers: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    soft_tokens: int = 70
    init_std: float = 0.1


def _corpus() -> list[str]:
    words = [b.text for b in BREEDS] + [INSTRUCTION, "user model cat dog pet breed photo"]
    return [" ".join(words)] * 4 + words * 8


def build_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    reserved = SPECIAL_TOKENS + BYTE_TOKENS
    # Few merges on purpose: breed names then span several tokens and share prefixes, as with
    # Gemma's real tokenizer, so label scoring is exercised beyond single-token answers.
    trainer = trainers.BpeTrainer(vocab_size=len(reserved) + 160, special_tokens=reserved, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Pad to exactly vocab_size so that any id the model can emit decodes to something.
    filler = (f"▁unused{i}" for i in range(vocab_size))
    while len(vocab) < vocab_size:
        vocab.setdefault(next(filler), len(vocab))
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=merges, image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>",
        audio_token="<|audio|>", boa_token="<|audio>", eoa_token="<audio|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[5:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _gemma4_config(cfg: TinyModelConfig, tokenizer):  # type: ignore[no-untyped-def]
    from transformers import Gemma4Config

    ids = tokenizer.convert_tokens_to_ids
    heads_dim = 32
    text = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=heads_dim, global_head_dim=heads_dim, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * (cfg.text_layers // 2),
        vocab_size_per_layer_input=cfg.vocab_size, hidden_size_per_layer_input=16,
        max_position_embeddings=1024, initializer_range=cfg.init_std,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = dict(
        hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        patch_size=4, pooling_kernel_size=3, position_embedding_size=1024, use_clipped_linears=True,
        initializer_range=cfg.init_std,
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, initializer_range=cfg.init_std,
        image_token_id=ids("<|image|>"), boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
        video_token_id=ids("<|video|>"), audio_token_id=ids("<|audio|>"), boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"), eos_token_id=[tokenizer.eos_token_id, ids("<turn|>")],
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


def build_processor(tokenizer, soft_tokens: int):  # type: ignore[no-untyped-def]
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor

    image_processor = Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=3, max_soft_tokens=soft_tokens)
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(), chat_template=CHAT_TEMPLATE, image_seq_length=soft_tokens,
    )


def make_tiny_model(out: Path, cfg: TinyModelConfig) -> Path:
    """Write a complete model folder to `out`: weights, config, tokenizer, processor."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.vocab_size)
    config = _gemma4_config(cfg, tokenizer)
    model = Gemma4ForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer, cfg.soft_tokens).save_pretrained(out)
    _add_vllm_keys(out / "config.json", cfg.soft_tokens)
    return out


def _add_vllm_keys(config_path: Path, soft_tokens: int) -> None:
    # vLLM reads the number of soft tokens per image from here; transformers does not write it.
    config = json.loads(config_path.read_text())
    config["vision_config"]["default_output_length"] = soft_tokens
    config_path.write_text(json.dumps(config, indent=2))
