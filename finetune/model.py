"""Loading Gemma 4 (+ LoRA) for training and evaluation. A Hugging Face id, a local folder and a
`gs://` prefix are all just a `--base-model` value; a gs:// one is copied to the cache first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from adapter_contract.modules import AUDIO_MODULES
from adapter_contract.storage import download_tree, is_gcs, open_storage


class LoraSettings(BaseModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" reaches the patch embedder and the image projector, which a random tiny model
    # needs to learn; for real checkpoints the language-model regex is the usual choice:
    # r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    targets: str = "all-linear"


def resolve_base_model(ref: str, cache_dir: Path) -> str:
    """A path or hub id that `from_pretrained` (and vLLM) can open."""
    if not is_gcs(ref):
        return ref
    local = cache_dir / "models" / ref.removeprefix("gs://").replace("/", "_")
    if not (local / "config.json").exists():
        download_tree(open_storage(ref), "", local)
    return str(local)


def config_path(model_path: str) -> Path:
    """The config.json of a local folder or a hub id (fetched into the HF cache)."""
    from transformers.utils import cached_file

    found = cached_file(model_path, "config.json")
    if found is None:
        raise FileNotFoundError(f"no config.json for base model {model_path}")
    return Path(found)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@contextmanager
def opening_base_model(model_path: str) -> Iterator[None]:
    """transformers reports a missing folder or an unknown hub id as a bare OSError; as a
    FileNotFoundError naming the base model, the CLI prints it as one line."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"base model {model_path} could not be opened: {first_line}") from err


def load_processor(model_path: str, soft_tokens: int | None = None) -> Any:
    """The base model's processor; with `soft_tokens`, images become up to that many tokens."""
    from transformers import AutoProcessor

    with opening_base_model(model_path):
        processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    if soft_tokens is not None:
        processor.image_processor.max_soft_tokens = soft_tokens
    return processor


def load_base(model_path: str, device: torch.device) -> Any:
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with opening_base_model(model_path):
        model: Any = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
    return model.to(device)


def add_lora(model: Any, settings: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    # An audio tower (E2B/E4B) never sees an image, and the server skips it (adapter_contract/modules.py).
    # Only where there is one: PEFT warns about an exclusion that matches nothing.
    audio = getattr(model.config, "audio_config", None) is not None
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=settings.targets,
        exclude_modules=rf".*\.{AUDIO_MODULES}\..*" if audio else None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def compile_blocks(model: Any) -> int:
    """torch.compile each repeated block (decoder and vision-encoder layers); returns how many.

    An eager step of Gemma 4 spends most of its GPU time in unfused element-wise kernels (norms,
    activations, clipping, LoRA scaling), not in matrix multiplies. Compiling the blocks rather
    than the whole model fuses those while identical layers share one graph, so compile time grows
    with the kinds of layer, not their number. The loss and gradients are unchanged.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds and type(m).__name__.endswith("Layer")]
    # Gemma 4's layers of one class still differ (sliding or global attention, KV-sharing, wider
    # MLPs, the first layer's input needing no gradient), and each variant is its own graph. Past
    # dynamo's default of 8 graphs per function the remaining layers silently ran eagerly (seen on
    # E4B: MFU 26 %). Dynamic shapes keep a new padded length from costing another graph.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks) + 1)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def load_adapter(model: Any, adapter_dir: Path, trainable: bool = False) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def load_published(registry_uri: str, ref: str, base_model: str, cache_dir: Path, device: torch.device,
                   soft_tokens: int | None = None) -> Any:
    """Base model + a registry adapter (downloaded and hash-checked), ready for scoring, with the
    image token budget it was trained with unless `soft_tokens` is given.
    Returns (model, processor, manifest)."""
    from adapter_contract.registry import Registry

    registry = Registry(registry_uri)
    name, version = registry.resolve(ref)
    folder = cache_dir / "adapters-published" / f"{name}-{version}"
    manifest = registry.download(name, version, folder)
    model_path = resolve_base_model(base_model, cache_dir)
    model = load_adapter(load_base(model_path, device), folder)
    return model.eval(), load_processor(model_path, soft_tokens or manifest.image_soft_tokens), manifest
