"""Build a tiny, random-weight Gemma 4 checkpoint that loads like a real `google/gemma-4-*` one.

Same classes (Gemma4ForConditionalGeneration, GemmaTokenizer, Gemma4Processor), same files on
disk and a config vLLM accepts; only the sizes differ. The tokenizer is a Gemma-style BPE
(spaces as "▁", byte fallback) trained here on petbreed's own vocabulary, padded so every id of
the embedding decodes.
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from adapter_contract.labels import LabelSet
from adapter_contract.prompt import INSTRUCTION
from finetune.model import LoraSettings, add_lora, load_base
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
    """Shape of the random model. `tiny` is the offline default; `tiny-kv` the same with layers that
    share KV (`SHAPES`); `e4b` has the text and vision shapes of google/gemma-4-E4B-it, for GPU
    benchmarks (random weights cost the same compute).
    A random model learns faster with a wide init, hence init_std 0.1 for tiny (see README).
    `audio` adds an audio tower (E4B's: transformers' defaults), as the released E2B and E4B have."""

    shape: Literal["tiny", "tiny-kv", "e4b"] = "tiny"
    audio: bool = False
    seed: int = 0
    text_hidden: int = 64
    vision_hidden: int = 32
    init_std: float | None = None
    device: str = "cpu"

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else float(SHAPES[self.shape]["init_std"])


SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(
            vocab_size=1024, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            global_head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
            vocab_size_per_layer_input=1024, hidden_size_per_layer_input=16, max_position_embeddings=1024,
        ),
        "vision": dict(
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
            pooling_kernel_size=3, position_embedding_size=1024, use_clipped_linears=True,
        ),
        "audio": dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
        ),
        "soft_tokens": 70,
        "init_std": 0.1,
    },
    "e4b": {
        "text": dict(
            vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
            num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
            vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256, num_kv_shared_layers=18,
            sliding_window=512, final_logit_softcapping=30.0, max_position_embeddings=131072,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
        ),
        "vision": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
            num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
            position_embedding_size=10240, use_clipped_linears=True,
        ),
        "audio": {},
        "soft_tokens": 280,
        "init_std": 0.02,
    },
}

# The tiny model with 4 layers, the last 2 sharing the KV cache of earlier ones as E2B's and E4B's
# last layers do, and a full-attention head size unlike the sliding one's, as theirs.
SHAPES["tiny-kv"] = {**SHAPES["tiny"], "text": {
    **SHAPES["tiny"]["text"], "num_hidden_layers": 4, "num_kv_shared_layers": 2, "global_head_dim": 64,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
}}


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
        # Pairs are what the BPE model takes; the annotation only names the "a b" string form.
        vocab=vocab, merges=merges,  # type: ignore[arg-type]
        image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>",
        audio_token="<|audio|>", boa_token="<|audio>", eoa_token="<audio|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[5:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _gemma4_config(cfg: TinyModelConfig, tokenizer):  # type: ignore[no-untyped-def]
    from transformers import Gemma4Config

    ids = tokenizer.convert_tokens_to_ids
    shape = SHAPES[cfg.shape]
    text = {"hidden_size": cfg.text_hidden, "intermediate_size": 2 * cfg.text_hidden, **shape["text"]}
    vision = {"hidden_size": cfg.vision_hidden, "intermediate_size": 2 * cfg.vision_hidden, **shape["vision"]}
    text.update(initializer_range=cfg.std, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision.update(initializer_range=cfg.std)
    audio = {**shape["audio"], "initializer_range": cfg.std} if cfg.audio else None
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio, initializer_range=cfg.std,
        image_token_id=ids("<|image|>"), boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
        video_token_id=ids("<|video|>"), audio_token_id=ids("<|audio|>"), boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"),
        # Generation stops at the end of a turn as well, as with the released checkpoints.
        eos_token_id=[tokenizer.eos_token_id, ids("<turn|>")],  # type: ignore[call-arg]
    )
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


def build_processor(tokenizer, vision: dict[str, Any], soft_tokens: int):  # type: ignore[no-untyped-def]
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor

    image_processor = Gemma4ImageProcessor(
        patch_size=vision["patch_size"], pooling_kernel_size=vision["pooling_kernel_size"], max_soft_tokens=soft_tokens
    )
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(), chat_template=CHAT_TEMPLATE, image_seq_length=soft_tokens,
    )


def make_tiny_model(out: Path, cfg: TinyModelConfig) -> Path:
    """Write a complete model folder to `out`: weights, config, tokenizer, processor."""
    from transformers import Gemma4ForConditionalGeneration

    shape = SHAPES[cfg.shape]
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(shape["text"]["vocab_size"])
    config = _gemma4_config(cfg, tokenizer)
    dtype = torch.bfloat16 if cfg.shape == "e4b" else torch.float32
    with torch.device(cfg.device):
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="4GB")
    build_processor(tokenizer, shape["vision"], shape["soft_tokens"]).save_pretrained(out)
    _add_vllm_keys(out, config, shape["soft_tokens"])
    return out


def _add_vllm_keys(out: Path, config: Any, soft_tokens: int) -> None:
    """What vLLM needs that transformers does not write."""
    path = out / "config.json"
    saved = json.loads(path.read_text())
    # The number of soft tokens per image.
    saved["vision_config"]["default_output_length"] = soft_tokens
    path.write_text(json.dumps(saved, indent=2))
    _add_kv_shared_k_norms(out, config.text_config)


def _add_kv_shared_k_norms(out: Path, text: Any) -> None:
    """transformers saves no `self_attn.k_norm.weight` for layers that share another layer's KV
    cache, but vLLM loads one for every layer; released checkpoints carry them. Add ones (identity)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    if not shared:
        return
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        with safe_open(str(out / "model.safetensors"), "pt") as fh:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in fh.keys()}}  # noqa: SIM118
    extra = {}
    for layer in range(text.num_hidden_layers - shared, text.num_hidden_layers):
        prefix = f"model.language_model.layers.{layer}.self_attn"
        if f"{prefix}.k_norm.weight" not in index["weight_map"]:
            # The layer's own q_norm has its head size (which config attribute holds the size of
            # full-attention heads differs between transformers versions).
            q_norm = f"{prefix}.q_norm.weight"
            with safe_open(str(out / index["weight_map"][q_norm]), "pt") as fh:
                size = fh.get_slice(q_norm).get_shape()
            extra[f"{prefix}.k_norm.weight"] = torch.ones(size, dtype=torch.bfloat16)
    if extra:
        save_file(extra, str(out / "model-kv-shared-k-norm.safetensors"), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(extra, "model-kv-shared-k-norm.safetensors"))
        index_path.write_text(json.dumps(index, indent=2))


def make_random_adapter(model_dir: Path, out: Path, lora: LoraSettings, std: float, seed: int = 0) -> Path:
    """A LoRA adapter with random weights, for serving tests and benchmarks. PEFT starts lora_B
    at zero (an adapter that changes nothing), so it is drawn from N(0, std) here."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = add_lora(load_base(str(model_dir), device), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, std)
    model.save_pretrained(out)
    # Callers start vLLM next, which checks at start that gpu_memory_utilization of the card is
    # free: the E4B-shaped model's 15.5 GiB left in torch's cache failed 0.85 on an H100 (2026-12-05).
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def publish_random_adapter(model_dir: Path, registry_uri: str, labels: LabelSet, lora: LoraSettings, std: float) -> str:
    """`pets@1` in `registry_uri`: a random adapter with a manifest for `labels`. Returns its ref."""
    from adapter_contract.manifest import AdapterManifest, BaseModelRef, config_sha256
    from adapter_contract.prompt import PROMPT_VERSION, answer_terminator
    from adapter_contract.registry import Registry
    from finetune.model import load_processor

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_random_adapter(model_dir, Path(tmp) / "adapter", lora, std)
        manifest = AdapterManifest(
            name="pets", version=1, labels=labels, prompt_version=PROMPT_VERSION, instruction=INSTRUCTION,
            base_model=BaseModelRef(id=str(model_dir), config_sha256=config_sha256(model_dir / "config.json")),
            answer_terminator=answer_terminator(load_processor(str(model_dir))), data_fingerprint="-",
        )
        return Registry(registry_uri).publish(adapter, manifest).ref
